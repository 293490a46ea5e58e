"""Benchmark the PPO learner's update: one pass per minibatch against token-budget micro-batches, and
torch's foreach AdamW against its fused kernel.

    python experiments/bench_learner.py [--episodes 32] [--minibatch 8] [--micro-batch-tokens 256]
                                        [--threads 2] [--repeats 3] [--json PATH]

One process, a real DeepSpeed ZeRO-2 engine for the actor and the critic and a frozen reference
(a gloo process group of one rank), a GPT-2-shaped model built from a config (nothing downloaded),
and a fixed rollout batch whose responses have the varied lengths EOS gives (geometric, capped at
the token budget) after prompts of varied length. Each setting runs `make_experience` (reference and
critic passes) and `ppo_update` on the same episodes; the median of `--repeats` timed runs after a
warm-up is reported:

- one pass, foreach AdamW: each minibatch in one forward/backward at the batch's full padded width,
  torch's default multi-tensor AdamW (the learner before micro-batching and fused optimizers);
- one pass, fused AdamW: the same passes, `AdamW(fused=True)`;
- micro-batches, fused AdamW: `learner.micro_batch_tokens`: rows sorted by length into micro-batches
  of at most that many padded tokens, each trimmed to its own widest prompt and response.

Tokens/s counts real (unpadded) prompt + response tokens of the forward/backward passes of the
update, as `perf/learner_tokens_per_s` of a training run does; "padded tokens" is what the passes
actually computed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from rlhf_ray.config import PPOConfig
from rlhf_ray.learner.engine import EngineConfig, create_engine, create_reference_engine
from rlhf_ray.learner.ppo import make_experience, micro_batches, ppo_update
from rlhf_ray.models.value import ValueModel
from rlhf_ray.rollout.sampler import Episode

SETTINGS = [
    ("one pass, foreach AdamW", False, False),
    ("one pass, fused AdamW", True, False),
    ("micro-batches, fused AdamW", True, True),
]


def build(seed: int = 0, vocab: int = 8192):
    from transformers import AutoModelForCausalLM, GPT2Config

    config = GPT2Config(vocab_size=vocab, n_positions=256, n_embd=384, n_layer=4, n_head=6, resid_pdrop=0.0,
                        embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=2, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def rollout(count: int, max_new_tokens: int, vocab: int, seed: int = 0) -> list[Episode]:
    """Episodes with prompts of 8-24 tokens and responses of geometric length (mean 16), ending in EOS (2)."""
    rng = np.random.default_rng(seed)
    episodes = []
    for i in range(count):
        prompt = rng.integers(3, vocab, size=rng.integers(8, 25))
        length = int(min(rng.geometric(1 / 16), max_new_tokens))
        response = rng.integers(3, vocab, size=length)
        if length < max_new_tokens:
            response[-1] = 2
        episodes.append(Episode(prompt_ids=prompt, response_ids=response,
                                behaviour_logprobs=-rng.random(length).astype(np.float32) * 9,
                                eos=length < max_new_tokens, reward=float(rng.normal()), prompt="", response="",
                                seed=i))
    return episodes


def padded_tokens(episodes, minibatch: int, max_tokens: int | None) -> int:
    """Tokens the update's forward passes compute per epoch (rows x trimmed width), minibatches in order."""
    total = 0
    for start in range(0, len(episodes), minibatch):
        chunk = episodes[start:start + minibatch]
        prompts = np.array([len(e.prompt_ids) for e in chunk])
        responses = np.array([len(e.response_ids) for e in chunk])
        for rows in micro_batches(prompts, responses, max_tokens):
            total += len(rows) * (prompts[rows].max() + responses[rows].max())
    return int(total)


def time_setting(episodes, ppo: PPOConfig, fused: bool, max_tokens: int | None, repeats: int) -> list[float]:
    cfg = EngineConfig(zero_stage=2, lr=1e-5, micro_batch_size=ppo.minibatch_size, fused_optimizer=fused)
    actor = create_engine(build(), cfg, train_batch_size=ppo.minibatch_size)
    critic = create_engine(ValueModel(build().transformer), cfg, train_batch_size=ppo.minibatch_size)
    reference = create_reference_engine(build(), cfg)
    generator = torch.Generator().manual_seed(0)
    times = []
    for i in range(repeats + 1):  # the first is a warm-up
        start = time.perf_counter()
        experience, _ = make_experience(episodes, actor, critic, reference, ppo, 0.05, 1.0, 0, max_tokens=max_tokens)
        ppo_update(actor, critic, experience, ppo, 0.05, 1.0, generator, max_tokens=max_tokens)
        if i:
            times.append(time.perf_counter() - start)
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--episodes", type=int, default=32)
    parser.add_argument("--minibatch", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--micro-batch-tokens", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    # one rank, as a launcher would describe it to DeepSpeed
    for name, value in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(29500 + os.getpid() % 1000), "RANK": "0",
                        "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1"}.items():
        os.environ.setdefault(name, value)
    dist.init_process_group("gloo", rank=0, world_size=1)

    vocab = 8192
    episodes = rollout(args.episodes, args.max_new_tokens, vocab)
    ppo = PPOConfig(epochs=1, minibatch_size=args.minibatch)
    real = sum(len(e.prompt_ids) + len(e.response_ids) for e in episodes)
    results = []
    for name, fused, micro in SETTINGS:
        print(f"running {name} ...", file=sys.stderr, flush=True)
        max_tokens = args.micro_batch_tokens if micro else None
        times = time_setting(episodes, ppo, fused, max_tokens, args.repeats)
        seconds = statistics.median(times)
        results.append({"setting": name, "fused_optimizer": fused, "micro_batch_tokens": max_tokens,
                        "seconds": seconds, "times": times, "tokens_per_s": real * ppo.epochs / seconds,
                        "padded_tokens": padded_tokens(episodes, ppo.minibatch_size, max_tokens) * ppo.epochs})
    base = results[0]
    for r in results:
        r["speedup"] = base["seconds"] / r["seconds"]
    dist.destroy_process_group()

    params = sum(p.numel() for p in build().parameters())
    print(f"\nPPO update (reference + critic passes, 1 epoch of actor + critic training), {params / 1e6:.1f}M-parameter "
          f"GPT-2 shape, {args.episodes} episodes, minibatch {args.minibatch}, ZeRO-2, 1 rank, "
          f"{args.threads} threads; {real} real tokens, mean response "
          f"{statistics.mean(len(e.response_ids) for e in episodes):.1f} of at most {args.max_new_tokens}")
    header = f"{'setting':<30} {'seconds':>8} {'tok/s':>8} {'padded tokens':>14} {'speedup':>8}"
    print(header)
    print("-" * len(header))
    for r in results:
        print(f"{r['setting']:<30} {r['seconds']:>8.2f} {r['tokens_per_s']:>8.0f} {r['padded_tokens']:>14} "
              f"{r['speedup']:>8.2f}")
    print(f"load average (1 min) {os.getloadavg()[0]:.1f}, {os.cpu_count()} CPUs")
    if args.json:
        args.json.write_text(json.dumps({"parameters": params, "episodes": args.episodes, "minibatch": args.minibatch,
                                         "threads": args.threads, "real_tokens": real, "results": results,
                                         "micro_vs_one_pass_speedup": results[-1]["speedup"]}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
