"""Launching a learner group: `learner.num_workers` Ray Train workers (gloo on CPU, NCCL on GPU), one
DeepSpeed rank each, running a loop function. PPO (`learner/train_loop.py`) and the supervised stages
(`stages/sft.py`, `stages/reward_model.py`) start theirs here, and read a failed group's error here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from rlhf_ray.errors import one_line, stop_reason


def scaling_config(learner):
    """Ray Train's ScalingConfig for the learner group of a `LearnerConfig` (ranks, CPUs and GPU per rank)."""
    from ray.train import ScalingConfig

    resources = {"CPU": learner.cpus_per_worker, **({"GPU": 1} if learner.use_gpu else {})}
    return ScalingConfig(num_workers=learner.num_workers, use_gpu=learner.use_gpu, resources_per_worker=resources)


def learner_group(loop: Callable[[dict], None], loop_config: dict, learner, name: str, storage_path: str | Path,
                  max_failures: int = 0):
    """A `TorchTrainer` that runs `loop(loop_config)` on every rank of the group of `learner` (a
    `LearnerConfig`); Ray Train restarts the group from the loop's last checkpoint up to `max_failures`
    times after a lost worker or node (the loop ends the run itself on a user error: `rlhf_ray.errors`)."""
    from ray.train import FailureConfig, RunConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    return TorchTrainer(loop, train_loop_config=loop_config, scaling_config=scaling_config(learner),
                        torch_config=TorchConfig(backend="nccl" if learner.use_gpu else "gloo"),
                        run_config=RunConfig(name=name, storage_path=str(storage_path),
                                             failure_config=FailureConfig(max_failures=max_failures)))


def describe_failure(err: Exception) -> str:
    """Ray Train's error as the one line of its cause: the user's error if one is behind it, else the first
    failing rank's own exception (not "Training failed due to worker errors:" and a page of tracebacks)."""
    reason = stop_reason(err)
    if reason is not None:
        return one_line(reason)
    for rank, failure in sorted((getattr(err, "worker_failures", None) or {}).items()):
        cause = getattr(failure, "cause", None) or failure
        return f"rank {rank}: {type(cause).__name__}: {one_line(cause)[:500]}"
    return one_line(err)[:500]
