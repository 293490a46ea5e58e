"""Elastic rollout capacity: how many rollout workers a run wants, and the run's control actor.

Each iteration the learner's rank 0 asks `desired_workers` how big the pool should be: the target
set by `rlhf-ray scale` when there is one, else grow from the current size towards
`rollout.workers.max` by as many workers as the cluster's free resources hold, never below
`rollout.workers.min`. Workers lost with their node leave the pool at once (their chunks are
re-sent); replacements start when resources come back. The autoscaler is asked for room for
`max` workers (`ray.autoscaler.sdk.request_resources`), so a cluster that can grow, grows.
"""

from __future__ import annotations

import math

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

NAMESPACE = "rlhf_ray"


def control_actor_name(run_name: str) -> str:
    return f"run:{run_name}"


def desired_workers(current: int, minimum: int, maximum: int, target: int | None,
                    free: dict[str, float], demand: dict[str, float]) -> int:
    """The pool size to aim for (ready + starting workers)."""
    if target is not None:
        return max(1, target)
    room = min((math.floor(free.get(name, 0.0) / amount) for name, amount in demand.items()), default=0)
    return max(minimum, min(maximum, current + max(0, room)))


class RunControl:
    """A named actor per running run: `rlhf-ray scale` talks to it, the learner's rank 0 reads it."""

    def __init__(self, run_name: str, minimum: int, maximum: int):
        self.run_name, self.minimum, self.maximum = run_name, minimum, maximum
        self.target: int | None = None
        self.workers = 0
        self.stop: dict | None = None  # why the learner ended the run early (rlhf_ray.errors.RunStopped)

    def set_rollout_workers(self, count: int) -> dict:
        if count < 1:
            raise ValueError(f"--rollout-workers must be >= 1, got {count}")
        self.target = count
        return self.status()

    def rollout_target(self) -> int | None:
        return self.target

    def report_workers(self, count: int) -> None:
        self.workers = count

    def report_stop(self, message: str, log: str) -> None:
        """The learner's rank 0 ended the run on a user error or a bound: the one-line reason and the
        traceback's file, for the driver."""
        self.stop = {"message": message, "log": log}

    def stopped(self) -> dict | None:
        return self.stop

    def status(self) -> dict:
        return {"run": self.run_name, "target": self.target, "min": self.minimum, "max": self.maximum,
                "workers": self.workers}


def start_control(run_name: str, minimum: int, maximum: int):
    """The run's control actor (num_cpus=0), named so that other drivers can find it.

    It lives on the driver's node, which the run cannot lose anyway: a rollout node going away must
    not take the run's control with it.
    """
    here = NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=False)
    return ray.remote(RunControl).options(name=control_actor_name(run_name), namespace=NAMESPACE, num_cpus=0,
                                          scheduling_strategy=here).remote(run_name, minimum, maximum)


def find_control(run_name: str):
    """The control actor of a running run; ValueError naming the run when there is none."""
    try:
        return ray.get_actor(control_actor_name(run_name), namespace=NAMESPACE)
    except ValueError:
        raise ValueError(f"no running run named {run_name!r} on this Ray cluster") from None
