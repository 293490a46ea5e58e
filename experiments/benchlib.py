"""What the benchmark scripts share (they run as `python experiments/<script>.py`, so this folder is on
their import path)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path


def write_json(path: Path, report: dict) -> None:
    """Write `report` as indented JSON to `path` (its folder made if need be) and say so on stderr."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {path}", file=sys.stderr)


def progress(message: str, since: float) -> None:
    """`message` on stderr, stamped with the seconds since `since` (a `time.perf_counter()`)."""
    print(f"[{time.perf_counter() - since:6.1f} s] {message}", file=sys.stderr, flush=True)
