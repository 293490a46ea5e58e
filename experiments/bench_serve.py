"""Throughput and latency of the policy server on a real Ray Serve, batched against unbatched.

    python experiments/bench_serve.py [--policy rlhf-ray/tiny-gpt2] [--concurrency 1 8 32 64]
                                      [--max-tokens 4 64] [--repeats 3] [--json results.json]

Two applications run side by side on one Serve instance at 127.0.0.1, each with one model replica:
`/batched` (`max_batch_size` 32) and `/unbatched` (`max_batch_size` 1). Each concurrency level C runs
`--requests` completions (at least 4 x C) from C concurrent HTTP clients over keep-alive connections,
alternating between the two apps and repeated `--repeats` times, so both see the same drift of a shared
machine; the table gives the median over the repeats. Request i has seed i and `max_tokens` drawn
uniformly from `--max-tokens LOW HIGH` with a fixed seed (one value: all alike), the same on both apps
and in every repeat, so long and short requests share batches as they do in real traffic. Reported per
(mode, C): requests/s, generated tokens/s, and the p50/p99 of the request latency seen by the client.
The client runs on the same machine as the server.

To compare two versions of the server, run this script against each with the same settings, back to
back: `PYTHONPATH=<worktree of the other commit> python experiments/bench_serve.py --label old ...`
(an older `ServeConfig` that still has `batch_wait_timeout_s` gets `--batch-wait-ms`).

A second table times the engine alone (`GenerationEngine`, no HTTP, no Serve) on batches of 1, 8 and 32
requests: what batching buys at the model, against what the HTTP path costs per request.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import random
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

from benchlib import write_json  # experiments/benchlib.py

PROMPTS = ["the movie was", "my day is very", "i think the food", "our team", "the weather today was",
           "this book is"]
MODES = {"batched": None, "unbatched": 1}  # mode -> max_batch_size (None: --batch-size)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    rank = q / 100 * (len(ordered) - 1)  # linear interpolation between closest ranks (numpy's default)
    low, high = int(rank), min(int(rank) + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def max_tokens_of(requests: int, bounds: list[int], seed: int = 0) -> list[int]:
    """Each request's `max_tokens`: uniform on [low, high] from a fixed seed, or the one value given."""
    low, high = bounds[0], bounds[-1]
    draw = random.Random(seed)
    return [draw.randint(low, high) for _ in range(requests)]


async def run_level(base_url: str, model: str, concurrency: int, requests: int, max_tokens: list[int],
                    seed_offset: int = 0) -> dict:
    """`requests` completions from `concurrency` clients, each sending its next request when the last returns."""
    latencies, tokens, failures = [], [], 0
    next_index = 0

    async def client_loop(client: httpx.AsyncClient):
        nonlocal next_index, failures
        while next_index < requests:
            i = next_index
            next_index += 1
            body = {"model": model, "prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": max_tokens[i],
                    "seed": seed_offset + i}
            start = time.perf_counter()
            response = await client.post("/v1/completions", json=body)
            latencies.append(time.perf_counter() - start)
            if response.status_code != 200:
                failures += 1
                continue
            tokens.append(response.json()["usage"]["completion_tokens"])

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=base_url, timeout=httpx.Timeout(300.0), limits=limits) as client:
        start = time.perf_counter()
        await asyncio.gather(*(client_loop(client) for _ in range(concurrency)))
        wall = time.perf_counter() - start
    return {"concurrency": concurrency, "requests": requests, "failures": failures, "wall_s": wall,
            "requests_per_s": requests / wall, "tokens_per_s": sum(tokens) / wall,
            "p50_ms": 1000 * percentile(latencies, 50), "p99_ms": 1000 * percentile(latencies, 99)}


def median_over_repeats(runs: list[dict]) -> dict:
    keys = ("requests_per_s", "tokens_per_s", "p50_ms", "p99_ms")
    return {**{k: runs[0][k] for k in ("mode", "concurrency", "requests")},
            **{k: statistics.median(r[k] for r in runs) for k in keys},
            "failures": sum(r["failures"] for r in runs), "repeats": len(runs),
            "requests_per_s_runs": [round(r["requests_per_s"], 2) for r in runs]}


def bench_engine(policy: str, max_tokens: list[int], batch_sizes: list[int], threads: int) -> list[dict]:
    """The engine alone: best of 5 timings of one batch of `b` requests, for each b (decoded at once)."""
    import torch

    from rlhf_ray.models import load_policy
    from rlhf_ray.serve.engine import GenerationEngine, GenerationRequest

    torch.set_num_threads(threads)
    model, tokenizer = load_policy(policy)
    engine = GenerationEngine(model, tokenizer, max_rows=max(batch_sizes))
    prompts = [tuple(engine.encode(p)) for p in PROMPTS]
    rows = []
    for b in batch_sizes:
        batch = [GenerationRequest(prompts[i % len(prompts)], max_tokens[i], seed=i) for i in range(b)]
        engine.generate(batch)  # warm-up
        times = []
        for _ in range(5):
            start = time.perf_counter()
            generations = engine.generate(batch)
            times.append(time.perf_counter() - start)
        best = min(times)
        rows.append({"batch": b, "batch_ms": 1000 * best, "requests_per_s": b / best,
                     "tokens_per_s": sum(g.completion_tokens for g in generations) / best})
    return rows


def print_tables(results: list[dict], engine_rows: list[dict], label: str) -> None:
    print(f"server: {label}")
    header = f"{'mode':<10} {'conc':>4} {'reqs':>5} {'req/s':>8} {'tok/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'fail':>4}"
    print(header)
    print("-" * len(header))
    for r in results:
        print(f"{r['mode']:<10} {r['concurrency']:>4} {r['requests']:>5} {r['requests_per_s']:>8.1f} "
              f"{r['tokens_per_s']:>8.0f} {r['p50_ms']:>8.1f} {r['p99_ms']:>8.1f} {r['failures']:>4}")
    batched = {r["concurrency"]: r for r in results if r["mode"] == "batched"}
    unbatched = {r["concurrency"]: r for r in results if r["mode"] == "unbatched"}
    for c in sorted(set(batched) & set(unbatched)):
        speedup = batched[c]["requests_per_s"] / unbatched[c]["requests_per_s"]
        print(f"concurrency {c:>2}: batched/unbatched x{speedup:.2f} requests/s, "
              f"p99 x{batched[c]['p99_ms'] / unbatched[c]['p99_ms']:.2f}")
    if engine_rows:
        print(f"\nengine alone (no HTTP): {'batch':>5} {'ms':>8} {'req/s':>8} {'tok/s':>8}")
        for r in engine_rows:
            print(f"{'':>23}{r['batch']:>5} {r['batch_ms']:>8.1f} {r['requests_per_s']:>8.1f} "
                  f"{r['tokens_per_s']:>8.0f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--policy", default="rlhf-ray/tiny-gpt2")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32, 64])
    parser.add_argument("--requests", type=int, default=64, help="requests per level (at least 4 x concurrency)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, nargs="+", default=[4, 64],
                        help="LOW HIGH: each request's max_tokens uniform on [LOW, HIGH] (fixed seed); or one value")
    parser.add_argument("--batch-size", type=int, default=32, help="max_batch_size of the batched mode")
    parser.add_argument("--batch-wait-ms", type=float, default=10.0,
                        help="batch_wait_timeout_s of a server that has one (before continuous batching)")
    parser.add_argument("--label", default="this tree", help="names the server version in the table and JSON")
    parser.add_argument("--modes", nargs="+", choices=sorted(MODES), default=list(MODES))
    parser.add_argument("--num-cpus", type=float, default=1.0, help="Ray CPUs (and torch threads) per replica")
    parser.add_argument("--no-engine", action="store_true", help="skip the engine-alone table")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    args = parser.parse_args(argv)

    import ray
    from ray import serve

    from rlhf_ray.serve.app import build_app
    from rlhf_ray.serve.config import ServeConfig
    from rlhf_ray.serve.policy import model_name

    port = free_port()
    model = model_name(args.policy)
    # one list for every level, the warm-up (16) and the engine table (32): the same draws however many are used
    max_tokens = max_tokens_of(max(args.requests, 4 * max(args.concurrency), 32), args.max_tokens)
    runs: dict[tuple[str, int], list[dict]] = {}
    ray.init(address="local", num_cpus=max(2, int(len(args.modes) * args.num_cpus) + 1), include_dashboard=False,
             log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        with tempfile.TemporaryDirectory() as tmp:
            for mode in args.modes:
                waits = ({"batch_wait_timeout_s": args.batch_wait_ms / 1000}
                         if "batch_wait_timeout_s" in ServeConfig.model_fields else {})
                config = ServeConfig(
                    policy=args.policy, feedback_db=str(Path(tmp) / f"{mode}.db"), num_cpus=args.num_cpus,
                    max_batch_size=MODES[mode] or args.batch_size, **waits,
                    max_ongoing_requests=max(64, *args.concurrency), max_tokens_limit=max(256, *args.max_tokens),
                    target_ongoing_requests=1000,
                )
                serve.run(build_app(config), name=f"bench-{mode}", route_prefix=f"/{mode}")
                asyncio.run(run_level(f"http://127.0.0.1:{port}/{mode}", model, 4, 16, max_tokens,
                                      seed_offset=10**6))  # warm-up
            for repeat in range(args.repeats):
                for concurrency in args.concurrency:
                    for mode in args.modes:
                        requests = max(args.requests, 4 * concurrency)
                        level = asyncio.run(run_level(f"http://127.0.0.1:{port}/{mode}", model, concurrency,
                                                      requests, max_tokens))
                        runs.setdefault((mode, concurrency), []).append({"mode": mode, **level})
                        print(f"[{repeat + 1}/{args.repeats}] {mode} c={concurrency}: {level['requests_per_s']:.1f} "
                              f"req/s, p50 {level['p50_ms']:.0f} ms, p99 {level['p99_ms']:.0f} ms", file=sys.stderr)
    finally:
        serve.shutdown()
        ray.shutdown()

    results = [median_over_repeats(runs[(mode, c)]) for mode in args.modes for c in args.concurrency]
    engine_rows = [] if args.no_engine else bench_engine(args.policy, max_tokens, [1, 8, 32],
                                                         max(1, int(args.num_cpus)))
    print_tables(results, engine_rows, args.label)
    if args.json:
        report = {"benchmark": "serve", "label": args.label, "policy": args.policy, "max_tokens": args.max_tokens,
                  "batch_size": args.batch_size, "batch_wait_ms": args.batch_wait_ms, "replica_cpus": args.num_cpus,
                  "repeats": args.repeats,
                  "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                              "python": platform.python_version(), "load_average": os.getloadavg()},
                  "results": results, "engine": engine_rows}
        write_json(args.json, report)
    return 1 if any(r["failures"] for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
