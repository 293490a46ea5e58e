"""Benchmark rollout generation: the vector env + KV-cache sampler against Hugging Face `generate`.

    python experiments/bench_rollout.py [--threads 1] [--repeats 7] [--min-seconds 10] [--cases NAME,...] [--json PATH]

For each case both sides get the same model, batch of prompts, prompt length, response length and
sampling settings, in the same process with the same `torch.set_num_threads`:

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
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from rlhf_ray.models import build_tiny_model
from rlhf_ray.models.tiny import SPECIAL_TOKENS, build_tiny_tokenizer
from rlhf_ray.rollout.sampler import Sampler, SamplingParams, episode_seed, left_pad


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


def zero_reward(prompts: list[str], responses: list[str]) -> np.ndarray:
    """A constant reward: the benchmark measures generation, not scoring."""
    return np.zeros(len(prompts))


def build_model(kind: str):
    """A randomly initialised model and a tokenizer with exactly its vocabulary; nothing is downloaded."""
    if kind == "tiny-gpt2":
        return build_tiny_model("gpt2", seed=0)
    if kind == "gpt2-4x256":
        from transformers import AutoModelForCausalLM, GPT2Config

        # GPT-2's vocabulary size (50257), so the output layer and the per-step softmax are full-sized
        words = SPECIAL_TOKENS + [f"w{i}" for i in range(50257 - len(SPECIAL_TOKENS))]
        tokenizer = build_tiny_tokenizer(words)
        config = GPT2Config(vocab_size=len(tokenizer), n_positions=256, n_embd=256, n_layer=4, n_head=4,
                            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                            bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
                            pad_token_id=tokenizer.pad_token_id)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.generation_config.eos_token_id = tokenizer.eos_token_id
        return model.eval(), tokenizer
    raise ValueError(f"unknown model {kind!r}; expected 'tiny-gpt2' or 'gpt2-4x256'")


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
    sampling = {} if case.greedy else {"temperature": 1.0, "top_k": 0, "top_p": 1.0}
    torch.manual_seed(iteration)
    wall, cpu = time.perf_counter(), time.process_time()
    with torch.inference_mode():
        out = model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=case.new_tokens,
                             do_sample=not case.greedy, pad_token_id=tokenizer.pad_token_id,
                             eos_token_id=tokenizer.eos_token_id, **sampling)
    response = out[:, input_ids.shape[1]:]  # (B, R)
    return Timing(time.perf_counter() - wall, time.process_time() - cpu, int(response.numel()), response.tolist())


def run_case(case: Case, repeats: int, min_seconds: float, max_repeats: int = 60) -> dict:
    model, tokenizer = build_model(case.model)
    forbid_eos(model, tokenizer.eos_token_id)
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
    print(f"\nrollout tokens/s (median of interleaved runs, torch threads = {threads})")
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
                        help=f"comma-separated subset of {[c.name for c in CASES]}")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)

    by_name = {c.name: c for c in CASES}
    unknown = [n for n in args.cases.split(",") if n not in by_name]
    if unknown:
        parser.error(f"unknown case(s) {unknown}; expected some of {list(by_name)}")
    torch.set_num_threads(args.threads)  # one setting for both sides

    load_before = os.getloadavg()  # other processes on the machine make wall times noisy; recorded, not corrected
    results = []
    for name in args.cases.split(","):
        print(f"running {name} ...", file=sys.stderr, flush=True)
        results.append(run_case(by_name[name], args.repeats, args.min_seconds))
    load_after = os.getloadavg()
    print_table(results, args.threads)
    print(f"load average (1 min) {load_before[0]:.1f} before, {load_after[0]:.1f} after, on {os.cpu_count()} CPUs")

    if args.json:
        import transformers

        report = {"threads": args.threads, "repeats": args.repeats, "min_seconds": args.min_seconds,
                  "cpus": os.cpu_count(),
                  "torch": torch.__version__, "transformers": transformers.__version__,
                  "load_average_before": load_before[0], "load_average_after": load_after[0],
                  "results": results,
                  **{f"{r['case']}_ratio": r["sampler_vs_generate_ratio"] for r in results},
                  "min_ratio": min(r["sampler_vs_generate_ratio"] for r in results)}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
