"""Launching a learner group: `learner.num_workers` Ray Train workers (gloo on CPU, NCCL on GPU), one
DeepSpeed rank each, running a loop function. PPO (`learner/train_loop.py`) and the supervised stages
(`stages/sft.py`, `stages/reward_model.py`) start theirs here, and read a failed group's error here.
"""

from __future__ import annotations

import contextlib
import functools
from pathlib import Path
from typing import Callable

from rlhf_ray.errors import one_line, stop_reason


def scaling_config(learner):
    """Ray Train's ScalingConfig for the learner group of a `LearnerConfig` (ranks, CPUs and GPU per rank)."""
    from ray.train import ScalingConfig

    resources = {"CPU": learner.cpus_per_worker, **({"GPU": 1} if learner.use_gpu else {}), **learner.resources}
    return ScalingConfig(num_workers=learner.num_workers, use_gpu=learner.use_gpu, resources_per_worker=resources)


def learner_group(loop: Callable[[dict], None], loop_config: dict, learner, name: str, storage_path: str | Path,
                  max_failures: int = 0):
    """A `TorchTrainer` that runs `loop(loop_config)` on every rank of the group of `learner` (a
    `LearnerConfig`); Ray Train restarts the group from the loop's last checkpoint up to `max_failures`
    times after a lost worker or node (the loop ends the run itself on a user error: `rlhf_ray.errors`)."""
    from ray.train import FailureConfig, RunConfig
    from ray.train.torch import TorchConfig

    return _trainer_class()(loop, train_loop_config=loop_config, scaling_config=scaling_config(learner),
                            torch_config=TorchConfig(backend="nccl" if learner.use_gpu else "gloo"),
                            run_config=RunConfig(name=name, storage_path=str(storage_path),
                                                 failure_config=FailureConfig(max_failures=max_failures)))


# Ray Train's placement-group cleaner (a detached actor) has a thread that asks the actor-state API once a
# second whether the controller lives, to remove the group of a controller that dies. When the group stops,
# the controller waits for that thread to exit: in Ray 2.60 up to 2 x 1 s + the state call's 10 s, and the
# state call does hang on a small machine, so every fit() ended with a 12 s wait ("Monitor thread did not
# exit within 12.00 seconds"; 4 s with a 2 s state timeout: the call outlives its own timeout). The
# controller removes its placement group itself on a normal stop; it now waits at most 1 s for the cleaner,
# which then exits on its own.
CLEANER_STATE_TIMEOUT_S = 2
CLEANER_STOP_TIMEOUT_S = 1.0


@functools.cache
def _trainer_class():
    """`TorchTrainer` whose placement-group cleaner is waited for at most `CLEANER_STOP_TIMEOUT_S` when the group
    stops; the cleaner still removes the group of a controller that dies. Plain `TorchTrainer` where Ray's
    internals are not 2.60's."""
    import ray
    from ray.train.torch import TorchTrainer

    try:
        from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback
    except ImportError:
        return TorchTrainer
    if not hasattr(TorchTrainer, "_create_default_callbacks"):
        return TorchTrainer

    class BoundedCleanerCallback(PlacementGroupCleanerCallback):
        def _stop_cleaner(self):
            # Ray logs a cleaner that has not stopped within the bound as a failure, with a traceback, after
            # every run on a loaded machine; it is not one (the cleaner exits on its own), so nothing is logged
            if self._cleaner:
                with contextlib.suppress(Exception):
                    ray.get(self._cleaner.stop.remote(), timeout=self._stop_timeout)
                self._cleaner = None

    class LearnerTrainer(TorchTrainer):
        def _create_default_callbacks(self):
            return [BoundedCleanerCallback(get_actor_timeout_s=CLEANER_STATE_TIMEOUT_S,
                                           stop_timeout=CLEANER_STOP_TIMEOUT_S)
                    if isinstance(callback, PlacementGroupCleanerCallback) else callback
                    for callback in super()._create_default_callbacks()]

    return LearnerTrainer


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
