"""Run every benchmark and print one table: each measure, its baseline from the same run, the ratio, the goal.

    python experiments/bench_all.py [--json PATH] [--skip serve ...] [--scaling-workers 1 2 4 8] [--sync-workers 2]
    python experiments/bench_all.py --quick [--json PATH]     # every benchmark at its smallest: a smoke run

Each benchmark runs as its own process (`python experiments/bench_<name>.py ... --json <tmp>/<name>.json`),
as a user would run it, one after the other so they do not share the cores; their output streams to
stderr with a `[name]` prefix. The table then takes from each JSON:

| benchmark | measure | baseline (same run) | goal |
|---|---|---|---|
| rollout | sampler tokens/s, per case | HF `generate` tokens/s | ratio >= 1.0 |
| rollout | continuous batching tokens/s (episodes of varied length) | `generate`; static batches | ratio >= 1.0 |
| ppo | learner tokens/s of a PPO iteration | DeepSpeed causal-LM training tokens/s | ratio >= 0.4 |
| learner | PPO update tokens/s, micro-batches + fused AdamW | one pass per minibatch, foreach AdamW | none |
| sync | seconds per `RolloutPool.set_weights` | `ray.put` + `ray.get` of the same weights | <= 1 s (135M, 2 workers) |
| scaling | pool tokens/s with k workers | k x tokens/s with 1 worker | ratio (efficiency) >= 0.8 |
| serve | batched requests/s, highest concurrency | unbatched requests/s | none |
| peer_trl | GRPO seconds per iteration; whole command; held-out reward | TRL `GRPOTrainer`, same settings | ratio <= 0.5; <= 1.0; not lower |
| dpo_trl | DPO stage training tokens/s; whole command | TRL `DPOTrainer`, same settings | ratio >= 1.0; none |

`peer_trl` and `dpo_trl` need TRL (`pip install -e ".[bench]"`); without it its row says so and it counts as skipped, not failed.

A benchmark that fails (non-zero exit, no JSON, or over `--timeout`) gets a row with its error, the
others still run, and the script exits with 1 at the end. `--json PATH` writes the machine, each
benchmark's command, exit status, duration and full JSON, and the table rows.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import importlib.util
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NAMES = ("rollout", "ppo", "learner", "sync", "scaling", "serve", "peer_trl", "dpo_trl")
# benchmarks that need an optional package: skipped with this note when it is not installed
NEEDS = {name: ("trl", 'TRL not installed: pip install -e ".[bench]"') for name in ("peer_trl", "dpo_trl")}


def commands(args) -> dict[str, list[str]]:
    """The command line of each benchmark, without `--json`: full settings, or the smallest with `--quick`."""
    scaling_workers = ["--workers", *map(str, args.scaling_workers)] if args.scaling_workers else []
    if args.quick:
        return {
            "rollout": ["--cases", "tiny_gpt2_b64_sample", "--continuous-cases", "", "--repeats", "1",
                        "--min-seconds", "0"],
            "ppo": ["--iterations", "2", "rollout.batch_size=8", "rollout.max_new_tokens=4", "ppo.minibatch_size=8",
                    "ppo.epochs=1"],
            "learner": ["--episodes", "8", "--minibatch", "4", "--max-new-tokens", "8", "--micro-batch-tokens", "40",
                        "--repeats", "1"],
            "sync": ["--quick", "--workers", str(args.sync_workers)],
            "scaling": ["--quick", *scaling_workers],
            "serve": ["--concurrency", "4", "--requests", "8", "--repeats", "1", "--max-tokens", "4", "--no-engine"],
            "peer_trl": ["--steps", "3", "--prompts-per-step", "4", "--group-size", "4", "--max-new-tokens", "8",
                         "--eval-samples", "2"],
            "dpo_trl": ["--pairs", "32", "--epochs", "1"],
        }
    return {"rollout": [], "ppo": [], "learner": [], "sync": ["--workers", str(args.sync_workers)],
            "scaling": scaling_workers, "serve": [], "peer_trl": [],
            "dpo_trl": ["--model", "HuggingFaceTB/SmolLM2-135M-Instruct", "--data",
                        "experiments/data/assistant_preferences.jsonl", "--pairs", "48", "--batch-size", "8",
                        "--epochs", "1", "--max-length", "192", "--lr", "5e-6"]}


def machine() -> dict:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    try:
        commit = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=ROOT, capture_output=True,
                                text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"), "cpu": cpu,
            "cores": os.cpu_count(), "gpu": gpu, "gpus": torch.cuda.device_count(), "torch": torch.__version__,
            "python": platform.python_version(), "platform": platform.platform(), "commit": commit,
            "load_average_before": os.getloadavg()[0]}


def run_benchmark(name: str, argv: list[str], out: Path, timeout: float) -> dict:
    """Run one benchmark script in its own process; its output goes to stderr, prefixed with its name."""
    command = [sys.executable, str(ROOT / "experiments" / f"bench_{name}.py"), *argv, "--json", str(out)]
    print(f"\n[{name}] $ {' '.join(command)}", file=sys.stderr, flush=True)
    tail: collections.deque[str] = collections.deque(maxlen=15)
    start = time.perf_counter()
    # its own session, so that a timeout stops the benchmark and what it started (Ray) together
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               errors="replace", start_new_session=True)
    timed_out = threading.Event()

    def stop():
        timed_out.set()
        try:
            os.killpg(process.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass

    timer = threading.Timer(timeout, stop)
    timer.start()
    try:
        for line in process.stdout:
            sys.stderr.write(f"[{name}] {line}")
            if line.strip():
                tail.append(line.rstrip())
        returncode = process.wait()
    finally:
        timer.cancel()
    record = {"command": command, "returncode": returncode, "seconds": time.perf_counter() - start,
              "result": None, "error": None}
    if timed_out.is_set():
        record["error"] = f"stopped after the --timeout of {timeout:.0f} s"
    elif returncode != 0:
        record["error"] = f"exit status {returncode}: {tail[-1] if tail else 'no output'}"
    elif not out.is_file():
        record["error"] = f"exit status 0 but no JSON at {out}"
    if out.is_file():
        try:
            record["result"] = json.loads(out.read_text())
        except json.JSONDecodeError as error:
            record["error"] = record["error"] or f"unreadable JSON at {out}: {error}"
    if record["error"]:
        record["output_tail"] = list(tail)
    return record


def row(benchmark: str, measure: str, value: float | None, baseline: float | None, ratio: float | None,
        goal: str = "—", met: bool | str | None = None, unit: str = "") -> dict:
    return {"benchmark": benchmark, "measure": measure, "rlhf_ray": value, "baseline": baseline, "ratio": ratio,
            "unit": unit, "goal": goal, "met": met}


def rollout_rows(result: dict) -> list[dict]:
    rows = [row("rollout", f"rollout tok/s, {r['case']} (vs HF generate)", r["sampler_tokens_per_s"],
                r["generate_tokens_per_s"], r["sampler_vs_generate_ratio"], "ratio ≥ 1.0",
                r["sampler_vs_generate_ratio"] >= 1.0, "tok/s")
            for r in result["results"]]
    for r in result.get("continuous_results", []):
        what = f"{r['prompts']} episodes, ≤ {r['max_batch']} at once, mean length {r['mean_response_length']:.0f}"
        rows.append(row("rollout", f"continuous batching tok/s, {what} (vs HF generate in batches of {r['max_batch']})",
                        r["continuous_tokens_per_s"], r["generate_tokens_per_s"], r["continuous_vs_generate_ratio"],
                        "ratio ≥ 1.0", r["continuous_vs_generate_ratio"] >= 1.0, "tok/s"))
        rows.append(row("rollout", f"continuous batching tok/s, same episodes (vs static batches of {r['max_batch']})",
                        r["continuous_tokens_per_s"], r["static_tokens_per_s"], r["continuous_vs_static_ratio"],
                        unit="tok/s"))
    return rows


def ppo_rows(result: dict) -> list[dict]:
    ratio = result["learner_vs_deepspeed_lm_ratio"]
    return [row("ppo", f"learner tok/s, PPO iteration of {result['model']} (vs DeepSpeed LM training)",
                result["learner_tokens_per_s"], result["deepspeed_lm_tokens_per_s"], ratio, "ratio ≥ 0.4",
                ratio >= 0.4, "tok/s")]


def learner_rows(result: dict) -> list[dict]:
    base = result["results"][0]
    return [row("learner", f"PPO update tok/s, {r['setting']} ({r['padded_tokens']} padded tokens; vs {base['setting']}, "
                           f"{base['padded_tokens']})", r["tokens_per_s"], base["tokens_per_s"], r["speedup"],
                unit="tok/s")
            for r in result["results"][1:]]


def sync_rows(result: dict) -> list[dict]:
    # the goal is stated for a 135M-parameter fp32 model and 2 workers; other settings are reported, not judged
    judged = result["parameters"] >= 100e6 and result["workers"] == 2 and result["dtype"] == "float32"
    met = result["sync_s"] <= 1.0 if judged else "n/a (not 135M, 2 workers)"
    return [row("sync", f"weight sync s, {result['parameters'] / 1e6:.1f}M {result['dtype']} to "
                        f"{result['workers']} workers (vs ray.put + ray.get)",
                result["sync_s"], result["object_store_floor_s"], result["sync_vs_object_store_ratio"],
                "≤ 1 s", met, "s")]


def scaling_rows(result: dict) -> list[dict]:
    base = result["baseline_workers"]
    return [row("scaling", f"rollout tok/s, {r['workers']} workers (vs {r['workers'] / base:g} x {base} worker"
                           f"{'s' if base > 1 else ''}): efficiency",
                r["tokens_per_s"], r["ideal_tokens_per_s"], r["efficiency"], "ratio ≥ 0.8", r["efficiency"] >= 0.8,
                "tok/s")
            for r in result["results"] if r["workers"] != base]


def serve_rows(result: dict) -> list[dict]:
    by_mode = {(r["mode"], r["concurrency"]): r for r in result["results"]}
    levels = [c for (mode, c) in by_mode if mode == "batched" and ("unbatched", c) in by_mode]
    if not levels:
        return [row("serve", "serve req/s, batched vs unbatched", None, None, None,
                    met="n/a (needs both modes at one concurrency)")]
    c = max(levels)
    batched, unbatched = by_mode[("batched", c)], by_mode[("unbatched", c)]
    return [row("serve", f"serve req/s, batched vs unbatched, concurrency {c}", batched["requests_per_s"],
                unbatched["requests_per_s"], batched["requests_per_s"] / unbatched["requests_per_s"], unit="req/s")]


def peer_trl_rows(result: dict) -> list[dict]:
    s = result["settings"]
    what = (f"GRPO {s['model']}, {s['steps']} steps of {s['prompts_per_step']} prompts x {s['group_size']}, "
            f"≤ {s['max_new_tokens']} tokens, loss {s['loss_type']}")
    rows = {r["measure"]: r for r in result["table"]}

    def pick(prefix: str) -> dict:
        return next(r for measure, r in rows.items() if measure.startswith(prefix))

    iteration, command = pick("seconds per iteration"), pick("whole command")
    heldout, last = pick("held-out reward, "), pick("reward after the last step")
    return [
        row("peer_trl", f"s per iteration, median after the first, {what} (vs TRL {result['trl_version']})",
            iteration["rlhf_ray"], iteration["trl"], iteration["ratio"], "ratio ≤ 0.5", iteration["met"], "s"),
        row("peer_trl", "whole command s, same run (vs TRL)", command["rlhf_ray"], command["trl"], command["ratio"],
            "ratio ≤ 1.0", command["met"], "s"),
        row("peer_trl", f"{heldout['measure']} (vs TRL)", heldout["rlhf_ray"], heldout["trl"], None,
            heldout["goal"], heldout["met"]),
        row("peer_trl", "reward after the last step, batch mean (vs TRL)", last["rlhf_ray"], last["trl"], None),
        row("peer_trl", f"cores and threads of both: {result['threads_note']}", None, None, None),
    ]


def dpo_trl_rows(result: dict) -> list[dict]:
    ours, trl = result["rlhf_ray"], result["trl"]
    what = (f"DPO {result['model']}, {result['pairs']} pairs x {result['epochs']} epochs, batch {result['batch_size']}, "
            f"{result['threads']} threads")
    ratio = result["tokens_per_s_ratio"]
    return [row("dpo_trl", f"training tok/s, {what} (vs TRL {result['trl_version']})", ours["tokens_per_s"],
                trl["tokens_per_s"], ratio, "ratio ≥ 1.0", ratio >= 1.0, "tok/s"),
            row("dpo_trl", "whole command s, same run (vs TRL)", ours["command_s"], trl["command_s"],
                ours["command_s"] / trl["command_s"], unit="s")]


ROWS = {"rollout": rollout_rows, "ppo": ppo_rows, "learner": learner_rows, "sync": sync_rows, "scaling": scaling_rows,
        "serve": serve_rows, "peer_trl": peer_trl_rows, "dpo_trl": dpo_trl_rows}


def number(value: float | None) -> str:
    if value is None:
        return ""
    if abs(value) >= 100:
        return f"{value:.0f}"
    return f"{value:.3g}"


def print_table(info: dict, rows: list[dict], quick: bool) -> None:
    print(f"\nbenchmarks of rlhf_ray, {info['date']}{' (--quick: smoke settings, not figures)' if quick else ''}")
    print(f"machine: {info['cpu']}, {info['cores']} cores, GPU: {info['gpu'] or 'none'}, torch {info['torch']}, "
          f"python {info['python']}, commit {info['commit']}; load average (1 min) "
          f"{info['load_average_before']:.1f} before, {info['load_average_after']:.1f} after")
    table = [["measure", "rlhf_ray", "baseline", "ratio", "goal", "met"]]
    for r in rows:
        met = r["met"] if isinstance(r["met"], str) else {True: "yes", False: "no", None: ""}[r["met"]]
        table.append([r["measure"], number(r["rlhf_ray"]), number(r["baseline"]),
                      "" if r["ratio"] is None else f"{r['ratio']:.2f}", r["goal"], met])
    widths = [max(len(line[i]) for line in table) for i in range(len(table[0]))]
    for i, line in enumerate(table):
        cells = [cell.ljust(w) if j in (0, 4, 5) else cell.rjust(w) for j, (cell, w) in enumerate(zip(line, widths))]
        print("| " + " | ".join(cells) + " |")
        if i == 0:
            print("|" + "|".join("-" * (w + 2) for w in widths) + "|")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--skip", nargs="+", choices=NAMES, default=[], metavar="NAME",
                        help=f"benchmarks not to run, of {', '.join(NAMES)}")
    parser.add_argument("--quick", action="store_true", help="every benchmark at its smallest settings (smoke run)")
    parser.add_argument("--sync-workers", type=int, default=2, help="rollout workers of the sync benchmark")
    parser.add_argument("--scaling-workers", type=int, nargs="+", default=None,
                        help="worker counts of the scaling benchmark (default: its own, 1 2 4 8 up to the cores)")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds allowed to each benchmark")
    parser.add_argument("--json", type=Path, help="write the machine, every benchmark's JSON and the table here")
    args = parser.parse_args(argv)

    info = machine()
    argvs = commands(args)
    records: dict[str, dict] = {}
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="bench_all_") as tmp:
        for name in NAMES:
            if name in args.skip:
                continue
            if name in NEEDS and importlib.util.find_spec(NEEDS[name][0]) is None:
                print(f"[{name}] skipped: {NEEDS[name][1]}", file=sys.stderr, flush=True)
                records[name] = {"skipped": NEEDS[name][1], "error": None}
                rows.append(row(name, f"{name}: skipped", None, None, None, met=f"skipped: {NEEDS[name][1]}"))
                continue
            record = run_benchmark(name, argvs[name], Path(tmp) / f"{name}.json", args.timeout)
            records[name] = record
            print(f"[{name}] {'failed: ' + record['error'] if record['error'] else 'done'} in "
                  f"{record['seconds']:.0f} s", file=sys.stderr, flush=True)
            if record["error"] is None:
                try:
                    rows.extend(ROWS[name](record["result"]))
                except (KeyError, TypeError, ValueError, ZeroDivisionError) as error:
                    record["error"] = f"its JSON lacks what the table needs: {type(error).__name__}: {error}"
            if record["error"] is not None:
                rows.append(row(name, f"{name}: FAILED", None, None, None, met=f"error: {record['error']}"))
    info["load_average_after"] = os.getloadavg()[0]

    print_table(info, rows, args.quick)
    failed = [name for name, record in records.items() if record["error"]]
    for name in failed:
        print(f"\n{name} failed ({records[name]['error']}); its last output:", file=sys.stderr)
        for line in records[name].get("output_tail", []):
            print(f"    {line}", file=sys.stderr)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"machine": info, "quick": args.quick, "benchmarks": records, "rows": rows},
                                        indent=2) + "\n")
        print(f"wrote {args.json}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
