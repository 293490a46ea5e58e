"""The versions of a looped policy: one folder per version under {run}/versions/, and which one is served.

    versions/
      serve.json          the ServeConfig the loop serves with (`rlhf-ray rollback` deploys with it)
      served.json         the version being served: {id, policy, since}
      deploys.jsonl       every deploy and rollback, in order
      v0000/version.json  the start policy (model.policy)
      v0001/              round 1: feedback/ (what it was trained on), reward_model/, satisfaction_model/,
                          policy/ (PPO from the served version), eval/, version.json (steps done, feedback
                          counts and ids, eval figures, the gate's decision)

Every file is written whole or not at all (a temporary file renamed), so a killed loop leaves no half-written
record; a version folder exists before its round's first step runs, so the list has no gap.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from rlhf_ray.serve.db import write_atomically

VERSIONS = "versions"


class VersionError(ValueError):
    """A version that does not exist, or a run folder without versions."""


def version_id(number: int) -> str:
    return f"v{number:04d}"


def versions_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / VERSIONS


def write_json(path: Path, value) -> None:
    write_atomically(path, json.dumps(value, indent=2) + "\n")


def read_record(folder: Path) -> dict:
    return json.loads((folder / "version.json").read_text())


def write_record(folder: Path, record: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    write_json(folder / "version.json", record)


def list_versions(run_dir: str | Path) -> list[dict]:
    """Every version's record, oldest first."""
    root = versions_dir(run_dir)
    folders = sorted(p for p in root.glob("v[0-9][0-9][0-9][0-9]") if (p / "version.json").is_file())
    return [read_record(folder) for folder in folders]


def version_record(run_dir: str | Path, version: str) -> dict:
    folder = versions_dir(run_dir) / version
    if not (folder / "version.json").is_file():
        known = ", ".join(r["id"] for r in list_versions(run_dir)) or "none"
        raise VersionError(f"{run_dir} has no version {version!r} (versions: {known})")
    return read_record(folder)


def start_version(run_dir: str | Path, policy: str) -> dict:
    """v0000, the policy the loop starts from (written once)."""
    folder = versions_dir(run_dir) / version_id(0)
    if (folder / "version.json").is_file():
        return read_record(folder)
    record = {"id": version_id(0), "number": 0, "policy": policy, "parent": None, "created": time.time(),
              "steps": ["deploy"], "decision": "deploy", "feedback": {"records": 0, "labels": 0}}
    write_record(folder, record)
    return record


def served(run_dir: str | Path) -> dict | None:
    path = versions_dir(run_dir) / "served.json"
    return json.loads(path.read_text()) if path.is_file() else None


def mark_served(run_dir: str | Path, record: dict, how: str) -> dict:
    """Record that `record`'s version is now served (`how`: "deploy" or "rollback")."""
    entry = {"id": record["id"], "policy": record["policy"], "since": time.time(), "how": how}
    root = versions_dir(run_dir)
    write_json(root / "served.json", entry)
    with open(root / "deploys.jsonl", "a") as log:
        log.write(json.dumps(entry) + "\n")
    return entry


def format_versions(run_dir: str | Path) -> str:
    """The table of `rlhf-ray versions RUN`: the score is the judge's mean on the held-out prompts of the
    round's eval, the candidate's and (in brackets) the served parent's; people: the blind study's win rate
    (loop.gate.human)."""
    current = (served(run_dir) or {}).get("id")
    rows = [("version", "parent", "feedback", "score", "win rate", "people", "KL", "decision", "served")]
    for r in list_versions(run_dir):
        evaluation = r.get("eval") or {}
        win = f"{evaluation['win_rate']:.3f}" if "win_rate" in evaluation else "-"
        kl = f"{evaluation['kl']:.3f}" if "kl" in evaluation else "-"
        feedback, human = r.get("feedback") or {}, (r.get("human") or {}).get("win_rate")
        people = f"{human['rate']:.3f}" if human else "-"
        score = f"{evaluation['score']:+.3f} ({evaluation['served_score']:+.3f})" if "score" in evaluation else "-"
        decision = r.get("decision") or f"in progress ({', '.join(r.get('steps', [])) or 'started'})"
        rows.append((r["id"], r.get("parent") or "-", f"{feedback.get('records', 0)}+{feedback.get('labels', 0)}",
                     score, win, people, kl, decision, "*" if r["id"] == current else ""))
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(str(v).ljust(w) for v, w in zip(row, widths)).rstrip() for row in rows)
