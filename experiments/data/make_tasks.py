"""Write the prompt files of the verifiable tasks of `envs.tasks`, deterministically (seeded), from the
task's own generator (no third-party text, so they are under the project's license).

For each task, experiments/data/tasks/<task>_train.jsonl and <task>_heldout.jsonl, {"prompt"} records:
the held-out prompts are drawn first and none of them is in the train file, so the held-out score
(`train.eval_every`, `rlhf-ray eval`) is measured on prompts the policy never trained on.

    python experiments/data/make_tasks.py            # rewrite the files under tasks/
    python experiments/data/make_tasks.py --check    # exit 1 if they differ from what it would write
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from envs.tasks import TASKS

SEED = 20260101
TRAIN, HELDOUT = 200, 48
HERE = Path(__file__).resolve().parent


def task_datasets(seed: int = SEED) -> dict[str, list[dict]]:
    """{file name: records} of every task; each task's prompts from its own seed, so adding a task changes
    no other task's files."""
    datasets = {}
    for offset, task in enumerate(TASKS.values()):
        prompts = task.prompts(HELDOUT + TRAIN, seed + offset)
        datasets[f"{task.name}_heldout.jsonl"] = [{"prompt": p} for p in prompts[:HELDOUT]]
        datasets[f"{task.name}_train.jsonl"] = [{"prompt": p} for p in prompts[HELDOUT:]]
    return datasets


def as_jsonl(records: list[dict]) -> str:
    return "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=HERE / "tasks", help="folder to write into (default: tasks/)")
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 if a file would change")
    args = parser.parse_args(argv)
    stale = []
    for name, records in task_datasets(args.seed).items():
        path, text = args.out / name, as_jsonl(records)
        if args.check:
            if not path.is_file() or path.read_text(encoding="utf-8") != text:
                stale.append(name)
            continue
        args.out.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        print(f"{path}: {len(records)} records")
    if stale:
        print(f"out of date: {', '.join(stale)} (run python {Path(__file__).name})", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
