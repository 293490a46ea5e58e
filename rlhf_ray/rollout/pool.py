"""The rollout pool: rollout workers that share out a batch of prompts and give every episode back once.

Workers can join (`add_worker`) and leave (`remove_worker`) between calls, and a worker that dies
during `generate` loses nothing: its chunk is sent again to a live worker (a new one is started
when none is left). Each episode's randomness comes from its own seed, so a re-sent chunk gives
the same episodes it would have given on the dead worker.
"""

from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass, field

import numpy as np
import ray
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError

from rlhf_ray.rollout.sampler import Episode, SamplingParams
from rlhf_ray.rollout.worker import RemoteRolloutWorker

logger = logging.getLogger(__name__)
WORKER_LOST = (RayActorError, ActorDiedError, ActorUnavailableError)


@dataclass
class WorkerSpec:
    """How to start a rollout worker."""

    policy: str
    reward: str
    params: SamplingParams
    max_length: int | None = None
    dtype: str = "float32"
    use_gpu: bool = False
    num_cpus: float = 1.0
    actor_options: dict = field(default_factory=dict)


class RolloutPool:
    """A set of `RolloutWorker` actors behind one `generate` call."""

    def __init__(self, spec: WorkerSpec, num_workers: int = 1, name: str = "rollout"):
        self.spec = spec
        self.name = name
        self.workers: dict[str, ray.actor.ActorHandle] = {}
        self._ids = itertools.count()
        self._weights_ref = None  # the latest weights, for workers that join later
        self.policy_version = 0
        self.requeued_chunks = 0
        for _ in range(num_workers):
            self.add_worker()

    def __len__(self) -> int:
        return len(self.workers)

    # -- membership ------------------------------------------------------------------------------
    def add_worker(self) -> str:
        worker_id = f"{self.name}-{next(self._ids)}"
        options = {"num_cpus": self.spec.num_cpus, "num_gpus": 1 if self.spec.use_gpu else 0,
                   "max_restarts": 0, **self.spec.actor_options}
        handle = RemoteRolloutWorker.options(**options).remote(
            worker_id, self.spec.policy, self.spec.reward, self.spec.params, self.spec.max_length,
            self.spec.dtype, self.spec.use_gpu)
        if self._weights_ref is not None:  # catch up with the learner before the first chunk
            handle.set_weights.remote(self._weights_ref, self.policy_version)
        self.workers[worker_id] = handle
        return worker_id

    def remove_worker(self, worker_id: str | None = None) -> str:
        """Stop one worker (the newest when none is named) and forget it."""
        if not self.workers:
            raise ValueError("the pool has no worker to remove")
        worker_id = worker_id or next(reversed(self.workers))
        ray.kill(self.workers.pop(worker_id), no_restart=True)
        return worker_id

    def _drop_dead(self, worker_id: str) -> None:
        if self.workers.pop(worker_id, None) is not None:
            logger.warning("rollout worker %s died; its prompts go to live workers", worker_id)

    def shutdown(self) -> None:
        for worker_id in list(self.workers):
            self.remove_worker(worker_id)

    # -- work --------------------------------------------------------------------------------------
    def generate(self, prompt_ids: list[list[int]], seeds: list[int]) -> list[Episode]:
        """One episode per prompt, in prompt order, each exactly once, whatever workers die meanwhile."""
        if len(prompt_ids) != len(seeds):
            raise ValueError(f"got {len(prompt_ids)} prompts but {len(seeds)} seeds")
        if not self.workers:
            self.add_worker()
        bounds = np.linspace(0, len(prompt_ids), len(self.workers) + 1).astype(int)
        pending = {}  # ObjectRef -> (worker_id, start, end)
        for worker_id, start, end in zip(list(self.workers), bounds[:-1], bounds[1:]):
            if end > start:
                pending[self._submit(worker_id, prompt_ids, seeds, start, end)] = (worker_id, start, end)
        results: list[Episode | None] = [None] * len(prompt_ids)
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            worker_id, start, end = pending.pop(ready[0])
            try:
                results[start:end] = ray.get(ready[0])
            except WORKER_LOST:
                self._drop_dead(worker_id)
                self.requeued_chunks += 1
                target = self._live_worker(exclude={w for w, _, _ in pending.values()})
                pending[self._submit(target, prompt_ids, seeds, start, end)] = (target, start, end)
        return results

    def _submit(self, worker_id, prompt_ids, seeds, start, end):
        return self.workers[worker_id].generate.remote(prompt_ids[start:end], seeds[start:end], self.policy_version)

    def _live_worker(self, exclude: set[str]) -> str:
        """An idle live worker if there is one, else any live worker, else a new one."""
        idle = [w for w in self.workers if w not in exclude]
        if idle:
            return idle[0]
        if self.workers:
            return next(iter(self.workers))
        return self.add_worker()

    def set_weights(self, state_dict, version: int) -> float:
        """Send new weights to every live worker through one shared object-store copy; seconds taken."""
        start = time.perf_counter()
        self._weights_ref = ray.put(state_dict)
        self.policy_version = version
        calls = {worker_id: w.set_weights.remote(self._weights_ref, version) for worker_id, w in self.workers.items()}
        for worker_id, ref in calls.items():
            try:
                ray.get(ref)
            except WORKER_LOST:
                self._drop_dead(worker_id)
        return time.perf_counter() - start

    def weights_digests(self) -> dict[str, str]:
        return dict(zip(self.workers, ray.get([w.weights_digest.remote() for w in self.workers.values()])))
