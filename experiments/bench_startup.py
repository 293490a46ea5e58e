"""Where the seconds between `rlhf-ray train` and its first iteration go.

    python experiments/bench_startup.py                                   # the quickstart, 1 iteration
    python experiments/bench_startup.py experiments/smollm2_word_count.yaml [--json PATH]

Runs `rlhf-ray train CONFIG train.iterations=1 --fresh` in a subprocess, timed from outside, and splits
its wall time with what the run writes: `events.jsonl`'s `launch` (preflight and Ray start seconds, when
Ray is up) and `learner_start` (when the learner rank is ready, its model loads and DeepSpeed init), and
the first iteration's `perf/*` of `metrics.jsonl`. The floor, measured in the same run: a Python that
only imports what a run imports (ray, torch, transformers, deepspeed, peft).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchlib import write_json  # experiments/benchlib.py

IMPORTS = "import ray, torch, transformers, deepspeed, peft"


def timed_command(cmd: list[str]) -> tuple[float, float, subprocess.CompletedProcess]:
    """(wall-clock start, seconds, the finished process)."""
    start = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    return start, time.time() - start, proc


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("config", nargs="?", default="experiments/quickstart.yaml")
    parser.add_argument("overrides", nargs="*", help="extra key=value overrides")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)

    _, import_s, proc = timed_command([sys.executable, "-c", IMPORTS])
    if proc.returncode:
        raise SystemExit(proc.stderr[-2000:])
    with tempfile.TemporaryDirectory(prefix="bench_startup_") as out:
        start, total_s, proc = timed_command([
            sys.executable, "-m", "rlhf_ray.cli", "train", args.config, f"output_dir={out}", "name=startup",
            "train.iterations=1", "train.eval_every=null", "train.checkpoint_every=1000", *args.overrides, "--fresh"])
        if proc.returncode:
            raise SystemExit(proc.stderr[-3000:])
        run = Path(out) / "startup"
        events = {e["event"]: e for e in map(json.loads, (run / "events.jsonl").read_text().splitlines())}
        first = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    launch, learner = events["launch"], events["learner_start"]
    ray_up = launch["time"] - start
    before_ray = ray_up - launch["ray_start_s"]
    learner_ready = learner["time"] - start
    first_done = learner_ready + first["perf/iteration_s"]
    phases = [
        ("python, imports, config", before_ray - launch["preflight_s"]),
        ("preflight (data, reward, 4 sampled answers)", launch["preflight_s"]),
        ("ray.init", launch["ray_start_s"]),
        ("Ray Train and rollout workers start", learner_ready - ray_up - learner["load_s"]),
        ("learner: model loads + DeepSpeed init", learner["load_s"]),
        ("iteration 1: rollout (waits for the worker's model)", first["perf/rollout_s"]),
        ("iteration 1: experience + update + sync", first["perf/iteration_s"] - first["perf/rollout_s"]),
        ("export policy, shut down", total_s - first_done),
    ]
    print(f"\n`rlhf-ray train {args.config} train.iterations=1`: {total_s:.1f} s, the first iteration done after "
          f"{first_done:.1f} s")
    print(f"{'phase':<52} {'seconds':>8}")
    for name, seconds in phases:
        print(f"{name:<52} {seconds:>8.1f}")
    print(f"{'floor: python -c ' + repr(IMPORTS):<52} {import_s:>8.1f}")
    print(f"learner torch threads: {learner.get('torch_threads')}")
    if args.json:
        write_json(args.json, {"benchmark": "startup", "config": args.config, "total_s": total_s,
                               "first_iteration_done_s": first_done, "import_floor_s": import_s,
                               "phases": dict(phases), "torch_threads": learner.get("torch_threads")})
    return 0


if __name__ == "__main__":
    sys.exit(main())
