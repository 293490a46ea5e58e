"""Benchmark rollout scaling: pool throughput with k workers against k times the throughput of one.

    python experiments/bench_scaling.py [--workers 1 2 4 8] [--prompts-per-worker 64] [--max-new-tokens 32]
                                        [--model rlhf-ray/tiny-gpt2] [--repeats 5] [--json PATH]
    python experiments/bench_scaling.py --quick       # 1 and 2 workers, 8 prompts each, 1 repeat: a smoke run

Weak scaling: with k workers the pool gets k × `--prompts-per-worker` prompts, so every worker has the
same share at every k. The measure is `RolloutPool.generate` (rlhf_ray/rollout/pool.py) as the training
loop calls it: the pool splits the batch, every worker samples its chunk with the KV-cache sampler and
scores it with a constant reward, and the call returns when all episodes are back in the driver.
Throughput is response tokens (as generated: an episode may end at EOS before the token budget, the
pool cannot forbid EOS) per second of the call's wall time.

Each worker is a Ray actor with 1 CPU and 1 torch thread (OMP_NUM_THREADS=1). One pool per k is
started at the beginning (the pools take sum(k) logical CPUs; only one generates at a time, so at
most max(k) cores are busy), every pool runs one warm-up call, and the timed calls are interleaved
over the pools (k = 1, 2, ... then again) so that the drift of a shared machine hits every k alike;
the median of `--repeats` calls per k is reported. Prompts are random non-special token ids of
`--prompt-length` tokens and each episode has its own seed, fixed across repeats, so every repeat of
a given k does the same work.

The baseline is the smallest k measured (1 by default) in the same run:
efficiency(k) = tokens/s(k) ÷ (k / k0 × tokens/s(k0)); 1.0 is perfect scaling.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from benchlib import progress, write_json  # experiments/benchlib.py

# one torch thread per worker, and no progress bars or logs from the workers' model loads
WORKER_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TRANSFORMERS_VERBOSITY": "error",
              "HF_HUB_DISABLE_PROGRESS_BARS": "1", "TOKENIZERS_PARALLELISM": "false"}


def make_prompts(tokenizer, count: int, length: int, seed: int) -> list[list[int]]:
    """`count` prompts of `length` random token ids, none of them special (no EOS or padding inside a prompt)."""
    special = set(tokenizer.all_special_ids)
    allowed = np.array([i for i in range(len(tokenizer)) if i not in special])
    rng = np.random.default_rng(seed)
    return rng.choice(allowed, size=(count, length)).tolist()


def default_workers() -> list[int]:
    """1, 2, 4, 8, as far as the machine has cores for: each worker wants a core of its own."""
    return [k for k in (1, 2, 4, 8) if k <= (os.cpu_count() or 1)] or [1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workers", type=int, nargs="+", default=None,
                        help=f"worker counts (default: 1, 2, 4, 8 up to the cores; here {default_workers()})")
    parser.add_argument("--model", default="rlhf-ray/tiny-gpt2", help="policy name or folder")
    parser.add_argument("--prompts-per-worker", type=int, default=64)
    parser.add_argument("--prompt-length", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per worker count, after one warm-up")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: --workers 1 2 --prompts-per-worker 8 --max-new-tokens 8 --repeats 1")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)
    if args.quick:
        args.workers = args.workers or [1, 2]
        args.prompts_per_worker, args.max_new_tokens, args.repeats = 8, 8, 1
    workers = sorted(set(args.workers or default_workers()))
    if workers[0] < 1 or args.repeats < 1 or args.prompts_per_worker < 1:
        parser.error("--workers, --repeats and --prompts-per-worker must be >= 1")
    cpus = os.cpu_count() or 1
    if workers[-1] > cpus:
        print(f"warning: {workers[-1]} workers on {cpus} cores: workers share cores, efficiency will drop",
              file=sys.stderr)
    for name, value in WORKER_ENV.items():
        os.environ.setdefault(name, value)  # the driver's tokenizer load, too

    import ray
    import torch

    from rlhf_ray.models import load_tokenizer
    from rlhf_ray.rollout.pool import RolloutPool, WorkerSpec
    from rlhf_ray.rollout.sampler import SamplingParams, episode_seed

    started = time.perf_counter()
    tokenizer = load_tokenizer(args.model)
    load_before = os.getloadavg()
    ray.init(address="local", num_cpus=max(cpus, sum(workers)), include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": WORKER_ENV})
    progress("Ray started", started)
    spec = WorkerSpec(policy=args.model, reward="envs.builtin:sentiment_reward",
                      params=SamplingParams(max_new_tokens=args.max_new_tokens), num_cpus=1.0)
    pools: dict[int, RolloutPool] = {}
    runs: dict[int, list[dict]] = {k: [] for k in workers}
    try:
        for k in workers:
            pools[k] = RolloutPool(spec, num_workers=k, name=f"scaling-{k}")
        for k, pool in pools.items():
            pool.wait_ready(timeout=None)
            if len(pool) != k:
                raise RuntimeError(f"{len(pool)} of {k} rollout workers started")
        progress(f"pools of {', '.join(map(str, workers))} worker(s) ready", started)

        batches = {}
        for k, pool in pools.items():
            count = k * args.prompts_per_worker
            batches[k] = (make_prompts(tokenizer, count, args.prompt_length, seed=k),
                          [episode_seed(0, k, i) for i in range(count)])
            episodes = pool.generate(*batches[k])  # warm-up
            if len(episodes) != count:
                raise RuntimeError(f"the pool of {k} returned {len(episodes)} episodes for {count} prompts")
        progress("warm-up calls done", started)

        for repeat in range(args.repeats):
            for k, pool in pools.items():
                prompts, seeds = batches[k]
                start = time.perf_counter()
                episodes = pool.generate(prompts, seeds)
                wall = time.perf_counter() - start
                tokens = sum(len(e.response_ids) for e in episodes)
                runs[k].append({"wall_s": wall, "tokens": tokens, "tokens_per_s": tokens / wall})
            progress(f"[{repeat + 1}/{args.repeats}] " + ", ".join(
                f"k={k}: {runs[k][-1]['tokens_per_s']:.0f} tok/s" for k in workers), started)
    finally:
        for pool in pools.values():
            pool.shutdown()
        ray.shutdown()
    load_after = os.getloadavg()

    base = workers[0]
    results = []
    for k in workers:
        tps = statistics.median(r["tokens_per_s"] for r in runs[k])
        results.append({"workers": k, "prompts": k * args.prompts_per_worker,
                        "tokens": statistics.median(r["tokens"] for r in runs[k]),
                        "wall_s": statistics.median(r["wall_s"] for r in runs[k]), "tokens_per_s": tps,
                        "runs": runs[k]})
    base_tps = results[0]["tokens_per_s"]
    for r in results:
        r["ideal_tokens_per_s"] = r["workers"] / base * base_tps
        r["efficiency"] = r["tokens_per_s"] / r["ideal_tokens_per_s"]

    print(f"\nrollout scaling, {args.model}, {args.prompts_per_worker} prompts of {args.prompt_length} tokens per "
          f"worker, up to {args.max_new_tokens} new tokens, 1 CPU per worker, median of {args.repeats}")
    header = (f"{'workers':>7} {'prompts':>7} {'tokens':>7} {'wall s':>8} {'tok/s':>9} {'ideal tok/s':>11} "
              f"{'efficiency':>10}")
    print(header)
    print("-" * len(header))
    for r in results:
        print(f"{r['workers']:>7} {r['prompts']:>7} {r['tokens']:>7.0f} {r['wall_s']:>8.3f} {r['tokens_per_s']:>9.0f} "
              f"{r['ideal_tokens_per_s']:>11.0f} {r['efficiency']:>10.2f}")
    print(f"baseline: {base} worker(s) in the same run; load average (1 min) {load_before[0]:.1f} before, "
          f"{load_after[0]:.1f} after, on {cpus} CPUs")
    if args.json:
        report = {"benchmark": "scaling", "model": args.model, "prompts_per_worker": args.prompts_per_worker,
                  "prompt_length": args.prompt_length, "max_new_tokens": args.max_new_tokens,
                  "repeats": args.repeats, "baseline_workers": base, "cpus": cpus, "torch": torch.__version__,
                  "ray": ray.__version__, "load_average_before": load_before[0], "load_average_after": load_after[0],
                  "results": results,
                  **{f"efficiency_{r['workers']}": r["efficiency"] for r in results}}
        write_json(args.json, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
