"""What the benchmark scripts share (they run as `python experiments/<script>.py`, so this folder is on
their import path)."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def write_json(path: Path, report: dict) -> None:
    """Write `report` as indented JSON to `path` (its folder made if need be) and say so on stderr."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {path}", file=sys.stderr)
