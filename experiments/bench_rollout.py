"""Benchmark rollout generation: the vector env + KV-cache sampler against Hugging Face `generate`.

    python experiments/bench_rollout.py [--threads 1] [--repeats 7] [--min-seconds 10] [--cases NAME,...] [--json PATH]

For each case both sides get the same model, batch of prompts, prompt length, response length and
sampling settings, in the same process with the same `torch.set_num_threads` and the same malloc
settings (`keep_freed_memory()`, as in rollout workers, unless `--default-malloc`):

- sampler: `Sampler.generate` (rlhf_ray/rollout/sampler.py) driving `envs.TextGenerationVectorEnv`,
  including what the env does (array steps, decoding and scoring the finished episodes with a
  constant reward) and the behaviour log-probabilities it records;
- generate: `model.generate(input_ids, attention_mask, max_new_tokens=R, ...)` on the same left-padded
  batch (do_sample with temperature 1, top_k 0, top_p 1; or greedy). It returns token ids only: no
  log-probabilities, no decoding, no reward, so the sampler does strictly more work per token.

Sampled tokens differ between the sides (per-episode seeded uniforms against torch's generator),
the amount of work does not: same shapes, same number of forward passes.

The response length is fixed on both sides: the model's output layer gets a bias of -1e9 on EOS
(the same model object on both sides), so no episode ends early and every row is R tokens; the
script checks that both sides did produce batch × R tokens, and for greedy cases that they made the
same tokens. Tokens/s is generated response tokens per second of wall time; each side is timed at
least `--repeats` times (more for short cases, until `--min-seconds`), interleaved, after one
warm-up each, and the median is reported. `<case>_ratio` in the JSON is sampler tokens/s ÷ generate
tokens/s (wall time); each result also has the same ratio in process CPU time, which other load on
the machine disturbs less, and the load average is printed with the table.

Continuous batching (`--continuous-cases`): N prompts, at most `max_batch` decoded at once, and EOS is
allowed (the output layer's EOS bias makes it end an episode with probability `eos_p` per step), so
episodes end at different steps. Three ways to make the same N episodes:

- continuous: `Sampler(max_batch=M).generate(all N)`; a row whose episode ends takes the next prompt;
- static: `Sampler.generate` on consecutive slices of M prompts; each slice runs until its longest
  episode ends (rows whose episodes ended are dropped once half of them have);
- generate: `model.generate` on the same slices of M.

Continuous and static make the same episodes from the same seeds, up to float rounding: the batch
shapes differ, and on a nearly flat 50k-token distribution a draw can land within rounding of a token
boundary (about 1 episode in 100 here); `episodes_equal` is the fraction made alike. Tokens/s counts
each episode's response tokens up to and including EOS.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from rlhf_ray.decoding import keep_freed_memory, left_pad
from rlhf_ray.models import build_tiny_model
from rlhf_ray.models.tiny import SPECIAL_TOKENS, build_tiny_tokenizer
from rlhf_ray.rollout.sampler import Sampler, SamplingParams, episode_seed

from benchlib import write_json  # experiments/benchlib.py


@dataclass(frozen=True)
class Case:
    name: str
    model: str  # "tiny-gpt2" (build_tiny_model) or "gpt2-4x256" (GPT-2 vocabulary, 4 layers of 256)
    batch: int
    prompt_length: int
    new_tokens: int
    greedy: bool


CASES = [
    Case("tiny_gpt2_b64_sample", "tiny-gpt2", 64, 16, 32, greedy=False),
    Case("tiny_gpt2_b64_greedy", "tiny-gpt2", 64, 16, 32, greedy=True),
    Case("gpt2_4x256_b32_sample", "gpt2-4x256", 32, 32, 32, greedy=False),
    Case("gpt2_4x256_b32_greedy", "gpt2-4x256", 32, 32, 32, greedy=True),
]
# GPT-2 small's shape (12 x 768, 124M parameters) at the batches of a GPU rollout worker: for `--device cuda`
# (experiments/gpu_check.sh); not in the default run, since a CPU takes minutes per run of them
GPU_CASES = [
    Case("gpt2_small_b256_greedy", "gpt2-small", 256, 64, 64, greedy=True),
    Case("gpt2_small_b1024_greedy", "gpt2-small", 1024, 64, 64, greedy=True),
]
DEVICE = torch.device("cpu")  # --device


@dataclass(frozen=True)
class ContinuousCase:
    name: str
    model: str
    prompts: int  # N episodes
    max_batch: int  # M rows decoded at once
    prompt_length: int
    new_tokens: int
    eos_p: float  # probability of EOS per step (the model is random: its other logits are nearly flat)


CONTINUOUS_CASES = [
    ContinuousCase("gpt2_4x256_n96_m16_eos", "gpt2-4x256", 96, 16, 16, 48, eos_p=0.06),
]


def zero_reward(prompts: list[str], responses: list[str]) -> np.ndarray:
    """A constant reward: the benchmark measures generation, not scoring."""
    return np.zeros(len(prompts))


def build_model(kind: str):
    """A randomly initialised model and a tokenizer with exactly its vocabulary; nothing is downloaded."""
    if kind == "tiny-gpt2":
        return build_tiny_model("gpt2", seed=0)
    if kind in ("gpt2-4x256", "gpt2-small"):
        from transformers import AutoModelForCausalLM, GPT2Config

        # GPT-2's vocabulary size (50257), so the output layer and the per-step softmax are full-sized
        words = SPECIAL_TOKENS + [f"w{i}" for i in range(50257 - len(SPECIAL_TOKENS))]
        tokenizer = build_tiny_tokenizer(words)
        shape = (dict(n_positions=256, n_embd=256, n_layer=4, n_head=4) if kind == "gpt2-4x256"
                 else dict(n_positions=1024, n_embd=768, n_layer=12, n_head=12))
        config = GPT2Config(vocab_size=len(tokenizer), **shape,
                            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                            bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
                            pad_token_id=tokenizer.pad_token_id)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.generation_config.eos_token_id = tokenizer.eos_token_id
        return model.eval(), tokenizer
    raise ValueError(f"unknown model {kind!r}; expected 'tiny-gpt2', 'gpt2-4x256' or 'gpt2-small'")


def forbid_eos(model, eos_token_id: int) -> None:
    """Give the output layer a bias of -1e9 on EOS (weights stay tied): responses always run to the budget."""
    head = model.get_output_embeddings()
    biased = torch.nn.Linear(head.in_features, head.out_features, bias=True)
    biased.weight = head.weight
    with torch.no_grad():
        biased.bias.zero_()
        biased.bias[eos_token_id] = -1e9
    model.set_output_embeddings(biased)


def make_prompts(tokenizer, batch: int, length: int, seed: int) -> list[list[int]]:
    """`batch` prompts of random non-special token ids; lengths vary in [length/2, length] (left padding)."""
    rng = np.random.default_rng(seed)
    low, high = len(SPECIAL_TOKENS), len(tokenizer)
    lengths = rng.integers(max(1, length // 2), length + 1, size=batch)
    lengths[0] = length
    return [rng.integers(low, high, size=n).tolist() for n in lengths]


@dataclass
class Timing:
    wall_s: float
    cpu_s: float  # process CPU time (all threads): less sensitive than wall time to other load on the machine
    tokens: int  # response tokens generated
    responses: list[list[int]]  # (B, R) token ids


def time_sampler(sampler: Sampler, prompts: list[list[int]], iteration: int) -> Timing:
    seeds = [episode_seed(0, iteration, i) for i in range(len(prompts))]
    wall, cpu = time.perf_counter(), time.process_time()
    episodes = sampler.generate(prompts, seeds)
    return Timing(time.perf_counter() - wall, time.process_time() - cpu, sum(len(e.response_ids) for e in episodes),
                  [e.response_ids.tolist() for e in episodes])


def time_generate(model, tokenizer, prompts: list[list[int]], case: Case, iteration: int) -> Timing:
    input_ids, attention_mask = left_pad(prompts, tokenizer.pad_token_id)  # (B, P): the sampler's padding
    input_ids, attention_mask = input_ids.to(DEVICE), attention_mask.to(DEVICE)
    sampling = {} if case.greedy else {"temperature": 1.0, "top_k": 0, "top_p": 1.0}
    torch.manual_seed(iteration)
    wall, cpu = time.perf_counter(), time.process_time()
    with torch.inference_mode():
        out = model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=case.new_tokens,
                             do_sample=not case.greedy, pad_token_id=tokenizer.pad_token_id,
                             eos_token_id=tokenizer.eos_token_id, **sampling)
        response = out[:, input_ids.shape[1]:].cpu()  # (B, R); waits for the device
    return Timing(time.perf_counter() - wall, time.process_time() - cpu, int(response.numel()), response.tolist())


def bias_eos(model, eos_token_id: int, probability: float, vocab_size: int) -> None:
    """An output-layer bias on EOS that makes it about `probability` likely when the other logits are flat."""
    forbid_eos(model, eos_token_id)
    bias = float(np.log(probability / (1 - probability) * (vocab_size - 1)))
    with torch.no_grad():
        model.get_output_embeddings().bias[eos_token_id] = bias


def response_tokens(rows: list[list[int]], eos_token_id: int) -> int:
    """Response tokens up to and including the first EOS of each row."""
    return sum(row.index(eos_token_id) + 1 if eos_token_id in row else len(row) for row in rows)


def run_continuous_case(case: ContinuousCase, repeats: int) -> dict:
    model, tokenizer = build_model(case.model)
    bias_eos(model, tokenizer.eos_token_id, case.eos_p, len(tokenizer))
    model.to(DEVICE)
    prompts = make_prompts(tokenizer, case.prompts, case.prompt_length, seed=2)
    params = SamplingParams(max_new_tokens=case.new_tokens)
    continuous = Sampler(model, tokenizer, zero_reward, params, max_batch=case.max_batch)
    static = Sampler(model, tokenizer, zero_reward, params)
    slices = [prompts[i:i + case.max_batch] for i in range(0, case.prompts, case.max_batch)]
    gen_case = Case(case.name, case.model, case.max_batch, case.prompt_length, case.new_tokens, greedy=False)

    def run_continuous(iteration):
        return time_sampler(continuous, prompts, iteration)

    def run_static(iteration):
        wall, cpu = time.perf_counter(), time.process_time()
        seeds = [episode_seed(0, iteration, i) for i in range(case.prompts)]
        episodes = [e for i in range(0, case.prompts, case.max_batch)
                    for e in static.generate(prompts[i:i + case.max_batch], seeds[i:i + case.max_batch])]
        return Timing(time.perf_counter() - wall, time.process_time() - cpu,
                      sum(len(e.response_ids) for e in episodes), [e.response_ids.tolist() for e in episodes])

    def run_generate(iteration):
        runs = [time_generate(model, tokenizer, chunk, gen_case, iteration * 1000 + i) for i, chunk in enumerate(slices)]
        rows = [row for run in runs for row in run.responses]
        return Timing(sum(r.wall_s for r in runs), sum(r.cpu_s for r in runs),
                      response_tokens(rows, tokenizer.eos_token_id), rows)

    sides = {"continuous": run_continuous, "static": run_static, "generate": run_generate}
    for run in sides.values():  # warm-up
        run(0)
    timings = {name: [] for name in sides}
    equal = []  # fraction of episodes that continuous and static batching made alike, per run
    for i in range(1, repeats + 1):  # interleaved
        for name, run in sides.items():
            timings[name].append(run(i))
        same = [x == y for x, y in zip(timings["continuous"][-1].responses, timings["static"][-1].responses)]
        equal.append(sum(same) / len(same))
    tps = {name: statistics.median(r.tokens / r.wall_s for r in runs) for name, runs in timings.items()}
    mean_length = statistics.mean(r.tokens for r in timings["continuous"]) / case.prompts
    return {
        "case": case.name, "model": case.model, "prompts": case.prompts, "max_batch": case.max_batch,
        "prompt_length": case.prompt_length, "new_tokens": case.new_tokens, "eos_p": case.eos_p, "repeats": repeats,
        "mean_response_length": mean_length,
        # below 1 only where float rounding (other batch shapes) moved a draw across a token boundary
        "episodes_equal": min(equal),
        **{f"{name}_tokens_per_s": value for name, value in tps.items()},
        **{f"{name}_wall_s": [r.wall_s for r in runs] for name, runs in timings.items()},
        "continuous_vs_static_ratio": tps["continuous"] / tps["static"],
        "continuous_vs_generate_ratio": tps["continuous"] / tps["generate"],
    }


def print_continuous_table(results: list[dict], threads: int) -> None:
    print(f"\ncontinuous batching: tokens/s to make N episodes, at most M at once (median, torch threads = {threads})")
    header = (f"{'case':<26} {'N':>4} {'M':>4} {'R':>4} {'mean len':>9} {'continuous':>11} {'static':>8} "
              f"{'generate':>9} {'vs static':>10} {'vs generate':>12} {'alike':>6}")
    print(header)
    print("-" * len(header))
    for r in results:
        print(f"{r['case']:<26} {r['prompts']:>4} {r['max_batch']:>4} {r['new_tokens']:>4} "
              f"{r['mean_response_length']:>9.1f} {r['continuous_tokens_per_s']:>11.0f} {r['static_tokens_per_s']:>8.0f} "
              f"{r['generate_tokens_per_s']:>9.0f} {r['continuous_vs_static_ratio']:>10.2f} "
              f"{r['continuous_vs_generate_ratio']:>12.2f} {r['episodes_equal']:>6.0%}")


def run_case(case: Case, repeats: int, min_seconds: float, max_repeats: int = 60) -> dict:
    model, tokenizer = build_model(case.model)
    forbid_eos(model, tokenizer.eos_token_id)
    model.to(DEVICE)
    prompts = make_prompts(tokenizer, case.batch, case.prompt_length, seed=1)
    params = SamplingParams(max_new_tokens=case.new_tokens, temperature=1.0, top_k=0, top_p=1.0, greedy=case.greedy)
    sampler = Sampler(model, tokenizer, zero_reward, params)
    expected = case.batch * case.new_tokens

    warm_sampler = time_sampler(sampler, prompts, iteration=0)  # warm-up
    warm_generate = time_generate(model, tokenizer, prompts, case, iteration=0)
    # greedy: both sides must make the same tokens, a check that they run the same model and settings
    greedy_rows_equal = (sum(a == b for a, b in zip(warm_sampler.responses, warm_generate.responses)) / case.batch
                         if case.greedy else None)
    sampler_runs, generate_runs = [], []
    # interleaved, so drift in the machine's speed hits both sides alike; short cases get more pairs
    # (at least `repeats`, until `min_seconds` have been timed), which steadies their medians
    i = 0
    while i < repeats or (sum(r.wall_s for r in sampler_runs + generate_runs) < min_seconds and i < max_repeats):
        i += 1
        run = time_sampler(sampler, prompts, iteration=i)
        assert run.tokens == expected, f"{case.name}: the sampler made {run.tokens} tokens, expected {expected}"
        sampler_runs.append(run)
        run = time_generate(model, tokenizer, prompts, case, iteration=i)
        assert run.tokens == expected, f"{case.name}: generate made {run.tokens} tokens, expected {expected}"
        generate_runs.append(run)

    sampler_tps = expected / statistics.median(r.wall_s for r in sampler_runs)
    generate_tps = expected / statistics.median(r.wall_s for r in generate_runs)
    return {
        "case": case.name, "model": case.model, "parameters": sum(p.numel() for p in model.parameters()),
        "vocab_size": len(tokenizer), "batch": case.batch, "prompt_length": case.prompt_length,
        "new_tokens": case.new_tokens, "mode": "greedy" if case.greedy else "sample", "repeats": i,
        "sampler_wall_s": [r.wall_s for r in sampler_runs], "generate_wall_s": [r.wall_s for r in generate_runs],
        "sampler_cpu_s": [r.cpu_s for r in sampler_runs], "generate_cpu_s": [r.cpu_s for r in generate_runs],
        "greedy_rows_equal": greedy_rows_equal,  # fraction of rows where both sides made the same tokens
        "sampler_tokens_per_s": sampler_tps, "generate_tokens_per_s": generate_tps,
        "sampler_vs_generate_ratio": sampler_tps / generate_tps,
        # the same comparison in process CPU time: what the ratio would be on an otherwise idle machine
        "sampler_vs_generate_cpu_time_ratio": (statistics.median(r.cpu_s for r in generate_runs)
                                               / statistics.median(r.cpu_s for r in sampler_runs)),
    }


def print_table(results: list[dict], threads: int) -> None:
    print(f"\nrollout tokens/s on {DEVICE} (median of interleaved runs, torch threads = {threads})")
    header = (f"{'case':<24} {'params':>8} {'B':>4} {'P':>4} {'R':>4} {'sampler tok/s':>14} {'generate tok/s':>15} "
              f"{'ratio':>6} {'cpu-time ratio':>15}")
    print(header)
    print("-" * len(header))
    for r in results:
        print(f"{r['case']:<24} {r['parameters'] / 1e6:>7.2f}M {r['batch']:>4} {r['prompt_length']:>4} "
              f"{r['new_tokens']:>4} {r['sampler_tokens_per_s']:>14.0f} {r['generate_tokens_per_s']:>15.0f} "
              f"{r['sampler_vs_generate_ratio']:>6.2f} {r['sampler_vs_generate_cpu_time_ratio']:>15.2f}")
    for r in results:
        if r["greedy_rows_equal"] is not None and r["greedy_rows_equal"] < 1.0:
            print(f"warning: {r['case']}: greedy tokens differ between the sides in "
                  f"{1 - r['greedy_rows_equal']:.0%} of rows")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=1,
                        help="torch.set_num_threads, the same for both sides (default 1: a rollout worker's share "
                             "of a CPU node; on a small shared machine more threads mostly measure the other load)")
    parser.add_argument("--repeats", type=int, default=7, help="timed runs per side at least (median reported)")
    parser.add_argument("--min-seconds", type=float, default=10.0,
                        help="keep timing pairs of runs until a case has been timed this long (at most 60 pairs)")
    parser.add_argument("--cases", default=",".join(c.name for c in CASES),
                        help=f"comma-separated subset of {[c.name for c in CASES + GPU_CASES]}")
    parser.add_argument("--device", default="cpu", help="where both sides run: cpu, or cuda (gpu_check.sh)")
    parser.add_argument("--continuous-cases", default=",".join(c.name for c in CONTINUOUS_CASES),
                        help=f"comma-separated subset of {[c.name for c in CONTINUOUS_CASES]}; '' for none")
    parser.add_argument("--default-malloc", action="store_true",
                        help="leave glibc malloc as it is (rollout workers call keep_freed_memory(); so does this "
                             "script by default, for both sides)")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)

    global DEVICE
    DEVICE = torch.device(args.device)
    by_name = {c.name: c for c in CASES + GPU_CASES}
    unknown = [n for n in args.cases.split(",") if n and n not in by_name]
    continuous_by_name = {c.name: c for c in CONTINUOUS_CASES}
    unknown += [n for n in args.continuous_cases.split(",") if n and n not in continuous_by_name]
    if unknown:
        parser.error(f"unknown case(s) {unknown}; expected some of {list(by_name) + list(continuous_by_name)}")
    torch.set_num_threads(args.threads)  # one setting for both sides
    # glibc malloc keeps freed (B, V) blocks for the next step, as rollout workers have it; both sides gain
    malloc_tuned = keep_freed_memory() if not args.default_malloc else False

    load_before = os.getloadavg()  # other processes on the machine make wall times noisy; recorded, not corrected
    results = []
    for name in filter(None, args.cases.split(",")):
        print(f"running {name} ...", file=sys.stderr, flush=True)
        results.append(run_case(by_name[name], args.repeats, args.min_seconds))
    continuous = []
    for name in filter(None, args.continuous_cases.split(",")):
        print(f"running {name} ...", file=sys.stderr, flush=True)
        continuous.append(run_continuous_case(continuous_by_name[name], max(3, args.repeats // 2)))
    load_after = os.getloadavg()
    if results:
        print_table(results, args.threads)
    if continuous:
        print_continuous_table(continuous, args.threads)
    print(f"load average (1 min) {load_before[0]:.1f} before, {load_after[0]:.1f} after, on {os.cpu_count()} CPUs; "
          f"malloc {'keeps freed blocks (keep_freed_memory)' if malloc_tuned else 'as is'} on both sides")

    if args.json:
        import transformers

        report = {"threads": args.threads, "device": args.device, "repeats": args.repeats,
                  "min_seconds": args.min_seconds,
                  "malloc_tuned": malloc_tuned,
                  "cpus": os.cpu_count(),
                  "torch": torch.__version__, "transformers": transformers.__version__,
                  "load_average_before": load_before[0], "load_average_after": load_after[0],
                  "results": results, "continuous_results": continuous,
                  **{f"{r['case']}_ratio": r["sampler_vs_generate_ratio"] for r in results},
                  "min_ratio": min((r["sampler_vs_generate_ratio"] for r in results), default=None)}
        write_json(args.json, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
