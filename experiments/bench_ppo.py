"""Benchmark one PPO iteration of `rlhf-ray train`, against plain DeepSpeed LM training.

    python experiments/bench_ppo.py [--config experiments/quickstart.yaml] [key=value ...] [--json PATH]

Runs a short PPO run (`--iterations`, the first one excluded as warm-up) and reports the median
time split of an iteration (rollout = generation + scoring, reference and critic passes,
PPO update, weight sync), rollout and learner tokens/s. In the same run, the baseline trains the
same model with a causal-LM loss under the same DeepSpeed config (ZeRO stage, ranks, minibatch
size, sequence length, number of optimizer steps), and the table gives learner tokens/s ÷ baseline
tokens/s as `learner_vs_deepspeed_lm_ratio` (a PPO step also trains the critic, so ~0.5 is the
natural ceiling with a critic of the policy's size).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import ray
import torch
from ray.train import RunConfig as TrainRunConfig
from ray.train import ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

from rlhf_ray.config import load_config
from rlhf_ray.learner.distributed import get_rank, get_world_size
from rlhf_ray.pipeline.train import train


def deepspeed_lm_baseline(loop_config: dict) -> None:
    """Plain causal-LM training with the learner's engine settings; rank 0 writes tokens/s."""
    from transformers import AutoModelForCausalLM

    from rlhf_ray.config import RunConfig
    from rlhf_ray.learner.engine import create_engine
    from rlhf_ray.learner.train_loop import DTYPES, engine_config
    from rlhf_ray.models import resolve_model_path

    config = RunConfig.model_validate(loop_config["config"])
    world = get_world_size()
    model = AutoModelForCausalLM.from_pretrained(resolve_model_path(config.model.policy),
                                                 dtype=DTYPES[config.model.dtype])
    engine = create_engine(model, engine_config(config, world, config.learner.lr),
                           train_batch_size=config.ppo.minibatch_size)
    local = config.ppo.minibatch_size // world
    length = loop_config["sequence_length"]
    generator = torch.Generator().manual_seed(get_rank())
    steps = loop_config["steps"]

    def step():
        ids = torch.randint(3, model.config.vocab_size, (local, length), generator=generator)
        loss = engine(input_ids=ids.to(engine.device), labels=ids.to(engine.device)).loss
        engine.backward(loss)
        engine.step()

    step()  # warm-up
    start = time.perf_counter()
    for _ in range(steps):
        step()
    elapsed = time.perf_counter() - start
    if get_rank() == 0:
        Path(loop_config["out"]).write_text(json.dumps(
            {"tokens_per_s": steps * config.ppo.minibatch_size * length / elapsed, "seconds": elapsed}))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="experiments/quickstart.yaml")
    parser.add_argument("--iterations", type=int, default=4)
    parser.add_argument("--json", default=None, help="write the figures to this JSON file")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="bench_ppo_"))
    config = load_config(args.config, [*args.overrides, f"train.iterations={args.iterations}",
                                       f"train.checkpoint_every={args.iterations}", "name=bench_ppo",
                                       f"output_dir={workdir}"])
    run_dir = train(config, progress=False)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()][1:]

    def median(name):
        return statistics.median(r[name] for r in rows)

    # the baseline: same model, ranks, minibatch, tokens per sequence and number of optimizer steps
    sequence_length = int(round(median("perf/learner_tokens_per_s") * median("perf/update_s")
                                / (config.ppo.epochs * config.rollout.batch_size * config.ppo.group_size)))
    steps = config.ppo.epochs * config.rollout.batch_size * config.ppo.group_size // config.ppo.minibatch_size
    out = workdir / "baseline.json"
    TorchTrainer(
        deepspeed_lm_baseline,
        train_loop_config={"config": config.model_dump(mode="json"), "sequence_length": max(sequence_length, 2),
                           "steps": steps, "out": str(out)},
        scaling_config=ScalingConfig(num_workers=config.learner.num_workers, use_gpu=config.learner.use_gpu),
        torch_config=TorchConfig(backend="nccl" if config.learner.use_gpu else "gloo"),
        run_config=TrainRunConfig(name="baseline", storage_path=str(workdir / "ray_train")),
    ).fit()
    baseline = json.loads(out.read_text())

    figures = {
        "model": config.model.policy, "learner_workers": config.learner.num_workers,
        "zero_stage": config.learner.zero_stage, "rollout_workers": config.rollout.workers.min,
        "episodes_per_iteration": config.rollout.batch_size * config.ppo.group_size,
        "iteration_s": median("perf/iteration_s"), "rollout_s": median("perf/rollout_s"),
        "generate_s": median("perf/generate_s"), "scoring_s": median("perf/scoring_s"),
        "reference_and_critic_s": median("perf/experience_s"), "update_s": median("perf/update_s"),
        "sync_s": median("perf/sync_s"),
        "rollout_tokens_per_s": median("perf/rollout_tokens_per_s"),
        "learner_tokens_per_s": median("perf/learner_tokens_per_s"),
        "deepspeed_lm_tokens_per_s": baseline["tokens_per_s"],
    }
    figures["learner_vs_deepspeed_lm_ratio"] = figures["learner_tokens_per_s"] / figures["deepspeed_lm_tokens_per_s"]
    print(f"\nPPO iteration, median of {len(rows)} (after one warm-up), {figures['model']}, "
          f"{figures['learner_workers']} learner rank(s), ZeRO-{figures['zero_stage']}")
    print(f"{'measure':<34}{'value':>14}")
    for name, value in figures.items():
        if isinstance(value, float):
            print(f"{name:<34}{value:>14.4g}")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))
    ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
