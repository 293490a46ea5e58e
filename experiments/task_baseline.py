"""The base model's score on each verifiable task (envs/tasks.py): where RL starts from.

For each config (default: every experiments/smollm2_<task>.yaml of `envs.tasks.TASKS`), the policy
answers the first `train.eval_prompts` prompts of `data.eval_dataset`, chat-formatted as a run formats
them, with at most `rollout.max_new_tokens` new tokens (Hugging Face `generate`), and the config's
reward scores the answers:

- greedy: one answer per prompt, the mean score;
- sampled: `ppo.group_size` answers per prompt at the config's temperature, the mean score and the share
  of prompts whose answers do not all score the same. A group of equal scores has no advantage for GRPO
  to learn from, so that share is how much of a batch gives signal.

    python experiments/task_baseline.py                                  # every task, a table
    python experiments/task_baseline.py experiments/smollm2_start_word.yaml --show 4   # and 4 answers
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from envs.tasks import TASKS
from rlhf_ray.config import RunConfig, load_config
from rlhf_ray.models import load_tokenizer, resolve_model_path
from rlhf_ray.rewards.composite import build_reward
from rlhf_ray.rollout.run_sampler import reward_spec

HERE = Path(__file__).resolve().parent


def generate(model, tokenizer, prompts: list[str], max_new_tokens: int, temperature: float | None,
             seed: int = 0) -> list[str]:
    """One answer per prompt, greedy when `temperature` is None; decoded as rollouts decode them."""
    tokenizer.padding_side = "left"
    batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    torch.manual_seed(seed)
    sampling = {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0} if temperature else \
        {"do_sample": False, "temperature": None, "top_k": None, "top_p": None}
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                             **sampling)
    return tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)


def measure(config: RunConfig, model, tokenizer, show: int) -> dict:
    count = config.train.eval_prompts
    questions = [r.prompt for r in config.data.eval_dataset.load_prompts()][:count]  # as written, for --show
    prompts = [r.prompt for r in config.data.eval_dataset.load_prompts(tokenizer)][:count]  # as the policy reads
    reward = build_reward(reward_spec(config))
    tokens, group = config.rollout.max_new_tokens, config.ppo.group_size
    started = time.perf_counter()
    greedy = generate(model, tokenizer, prompts, tokens, None)
    sampled = generate(model, tokenizer, [p for p in prompts for _ in range(group)], tokens,
                       config.rollout.sampling.temperature, seed=config.seed)
    greedy_scores = reward(prompts, greedy)
    sampled_scores = reward([p for p in prompts for _ in range(group)], sampled).reshape(len(prompts), group)
    for question, answer, score in list(zip(questions, greedy, greedy_scores))[:show]:
        print(f"  {score:.2f}  {question!r}\n        -> {answer!r}")
    return {"prompts": len(prompts), "tokens": tokens, "temperature": config.rollout.sampling.temperature,
            "greedy": float(greedy_scores.mean()), "sampled": float(sampled_scores.mean()),
            "signal": float((sampled_scores.std(axis=1) > 0).mean()), "seconds": time.perf_counter() - started}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("configs", nargs="*", type=Path,
                        default=[HERE / f"smollm2_{name}.yaml" for name in TASKS])
    parser.add_argument("--show", type=int, default=0, help="print this many greedy answers per task")
    args = parser.parse_args(argv)
    models = {}
    rows = []
    for path in args.configs:
        config = load_config(path)
        policy = config.model.policy
        if policy not in models:
            folder = resolve_model_path(policy)
            models[policy] = AutoModelForCausalLM.from_pretrained(folder).eval(), load_tokenizer(folder)
        print(f"{config.name}:")
        rows.append((config.name, measure(config, *models[policy], args.show)))
    print(f"\n{'config':<24} {'prompts':>7} {'tokens':>6} {'greedy':>7} {'temp':>5} {'sampled':>8} {'signal':>7} "
          f"{'s':>5}")
    for name, row in rows:
        print(f"{name:<24} {row['prompts']:>7} {row['tokens']:>6} {row['greedy']:>7.3f} {row['temperature']:>5g} "
              f"{row['sampled']:>8.3f} {row['signal']:>7.0%} {row['seconds']:>5.0f}")
    print("sampled: ppo.group_size answers per prompt at the rollout temperature; signal: the share of prompts whose "
          "answers score differently")


if __name__ == "__main__":
    main()
