"""The rollout pool: rollout workers that share out a batch of prompts and give every episode back once.

Workers can join (`add_worker`) and leave (`remove_worker`) between calls, and a worker that dies
during `generate` loses nothing: its chunk is sent again to a live worker (a new one is started
when none is left). Each episode's randomness comes from its own seed, so a re-sent chunk gives
the same episodes it would have given on the dead worker.

Faults are retried, the user's errors are not (`rlhf_ray.errors`): a worker whose reward function
raises, or whose constructor fails on the user's reward or data, ends the call at once with that
error; a worker that dies while starting is replaced with backoff at most `max_start_failures` times
in a row. Every wait is bounded (`PoolLimits`), and a wait that runs out names the workers that did
not answer and what they were doing.
"""

from __future__ import annotations

import itertools
import logging
import re
import time
from dataclasses import dataclass, field

import numpy as np
import ray
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError

from rlhf_ray.errors import RunStopped, WaitTimeout, one_line, stop_reason
from rlhf_ray.rollout.collective import CollectiveSync
from rlhf_ray.rollout.sampler import Episode, SamplingParams
from rlhf_ray.rollout.worker import RemoteRolloutWorker, RolloutChunk, to_shared_arrays

logger = logging.getLogger(__name__)
WORKER_LOST = (RayActorError, ActorDiedError, ActorUnavailableError)
FETCH_TIMEOUT_S = 120.0  # a result `ray.wait` reported ready may still have to come over from another node


def fetch_ready(ref: ray.ObjectRef, what: str):
    """The value of `ref`, which `ray.wait` reported ready (or the error it holds); bounded all the same,
    since the object may still travel from another node's store. `what` names it when that fails."""
    try:
        return ray.get(ref, timeout=FETCH_TIMEOUT_S)
    except ray.exceptions.GetTimeoutError:
        raise WaitTimeout(f"{what} was ready but could not be fetched within {FETCH_TIMEOUT_S:g} s") from None


class WorkerStartError(RunStopped):
    """Rollout workers kept failing to start; the message carries the last worker's own error."""


@dataclass(frozen=True)
class PoolLimits:
    """The bounds of the pool's waits and restarts (the `rollout.*` keys of the same names)."""

    start_timeout_s: float = 600.0  # a starting worker the cluster cannot place (or load) in this time
    max_start_failures: int = 3  # workers that fail to start, in a row, before the run fails
    rollout_timeout_s: float = 1800.0  # all chunks of one `submit` back
    sync_timeout_s: float = 300.0  # every worker has loaded new weights


def _cause(err: BaseException) -> str:
    """What a worker's failure says, in one line: its own exception, not Ray's wrapping of it; for a process
    that died, how it exited (Ray's message around that is a page of possible causes)."""
    cause = getattr(err, "cause", None)
    text = one_line(cause if isinstance(cause, BaseException) else err)
    died = re.search(r"pid: (\d+).*Worker exit type: (\w+) Worker exit detail: (.+?\.)", text)
    if isinstance(err, WORKER_LOST) and died:
        return f"its process (pid {died[1]}) died, {died[2]}: {died[3]}"
    return text if len(text) <= 400 else text[:400] + " ..."


@dataclass
class WorkerSpec:
    """How to start a rollout worker."""

    policy: str
    reward: str | dict  # a reward spec, or a `reward` config section with "{run}" already expanded
    params: SamplingParams
    max_length: int | None = None
    max_batch: int | None = None  # episodes a worker decodes at once (continuous batching); None: its whole chunk
    dtype: str = "float32"
    use_gpu: bool = False
    num_cpus: float = 1.0
    torch_threads: int | None = None  # None: num_cpus rounded down, at least 1
    actor_options: dict = field(default_factory=dict)


class RolloutPool:
    """A set of `RolloutWorker` actors behind one `generate` call.

    A new worker is "starting" until its constructor (model load) has run; only ready workers get
    chunks, so a worker the cluster cannot place yet never holds up an iteration.
    """

    def __init__(self, spec: WorkerSpec, num_workers: int = 1, name: str = "rollout",
                 limits: PoolLimits = PoolLimits()):
        self.spec = spec
        self.name = name
        self.limits = limits
        self.start_failures = 0  # workers in a row that failed to start
        self._next_start = 0.0  # monotonic time before which no replacement starts (backoff)
        self.busy: dict[str, tuple[int, float]] = {}  # worker id -> (prompts in its chunk, monotonic start)
        self.workers: dict[str, ray.actor.ActorHandle] = {}  # ready
        self.starting: dict[str, tuple[ray.actor.ActorHandle, ray.ObjectRef]] = {}
        self._ids = itertools.count()
        self._latest = None  # the newest weights, for workers that join later
        self._weights_ref = None  # their object-store copy, once one was needed
        self.collective = CollectiveSync(self)  # rollout.sync: collective
        self.policy_version = 0
        self.requeued_chunks = 0
        for _ in range(num_workers):
            self.add_worker()

    def __len__(self) -> int:
        return len(self.workers)

    @property
    def size(self) -> int:
        """Ready and starting workers."""
        return len(self.workers) + len(self.starting)

    @property
    def demand(self) -> dict[str, float]:
        """The Ray resources one worker takes."""
        demand = {"CPU": self.spec.num_cpus, **self.spec.actor_options.get("resources", {})}
        if self.spec.use_gpu:
            demand["GPU"] = 1
        return {name: amount for name, amount in demand.items() if amount}

    # -- membership ------------------------------------------------------------------------------
    def add_worker(self) -> str:
        """Start a worker; it takes chunks once it is ready (see `wait_ready`)."""
        worker_id = f"{self.name}-{next(self._ids)}"
        options = {"num_cpus": self.spec.num_cpus, "num_gpus": 1 if self.spec.use_gpu else 0,
                   "max_restarts": 0, **self.spec.actor_options}
        handle = RemoteRolloutWorker.options(**options).remote(
            worker_id, self.spec.policy, self.spec.reward, self.spec.params, self.spec.max_length,
            self.spec.dtype, self.spec.use_gpu, self.spec.max_batch,
            self.spec.torch_threads or max(1, int(self.spec.num_cpus)))
        self.starting[worker_id] = (handle, handle.info.remote())
        if self._latest is not None:  # catch up with the learner before the first chunk
            self._send_latest([worker_id])
        return worker_id

    def remove_worker(self, worker_id: str | None = None) -> str:
        """Stop one worker (a starting one first, else the newest, when none is named) and forget it."""
        if worker_id is None:
            if not self.size:
                raise ValueError("the pool has no worker to remove")
            worker_id = next(reversed(self.starting)) if self.starting else next(reversed(self.workers))
        handle = self.workers.pop(worker_id, None) or self.starting.pop(worker_id)[0]
        ray.kill(handle, no_restart=True)
        return worker_id

    def resize(self, target: int) -> None:
        """Start or stop workers until ready + starting = `target` (a replacement for a worker that failed to
        start waits out its backoff)."""
        while self.size < target and time.monotonic() >= self._next_start:
            self.add_worker()
        while self.size > target:
            self.remove_worker()

    def wait_ready(self, timeout: float | None = 0.0) -> None:
        """Move starting workers that are ready into the pool; wait up to `timeout` (None: all)."""
        if not self.starting:
            return
        refs = {ref: worker_id for worker_id, (_, ref) in self.starting.items()}
        ready, _ = ray.wait(list(refs), num_returns=len(refs), timeout=timeout)
        for ref in ready:
            worker_id = refs[ref]
            handle, _ = self.starting.pop(worker_id)
            try:
                fetch_ready(ref, f"the start of {worker_id}")  # raises the worker's error if it failed
            except Exception as err:
                ray.kill(handle, no_restart=True)  # one whose constructor failed is alive, holding its CPUs
                self._start_failed(worker_id, err)
                continue
            self.start_failures = 0
            self.workers[worker_id] = handle

    def _start_failed(self, worker_id: str, err: Exception) -> None:
        """A worker could not start: the user's error ends the call now; a fault is retried with backoff,
        at most `max_start_failures` times in a row."""
        reason = stop_reason(err)
        if reason is not None:
            raise reason from err
        self.start_failures += 1
        limit = self.limits.max_start_failures
        if self.start_failures >= limit:
            raise WorkerStartError(f"rollout workers failed to start {self.start_failures} times in a row "
                                   f"(rollout.max_start_failures={limit}); the last one, {worker_id}: {_cause(err)}")
        backoff = min(30.0, 2.0 ** (self.start_failures - 1))
        self._next_start = time.monotonic() + backoff
        logger.warning("rollout worker %s failed to start (%d of at most %d in a row), a new one in %.0f s: %s",
                       worker_id, self.start_failures, limit, backoff, _cause(err))

    def _drop_dead(self, worker_id: str) -> None:
        self.busy.pop(worker_id, None)
        if self.workers.pop(worker_id, None) is not None:
            logger.warning("rollout worker %s died; its prompts go to live workers", worker_id)

    def shutdown(self) -> None:
        for worker_id in [*self.workers, *self.starting]:
            self.remove_worker(worker_id)

    def _ensure_ready_worker(self) -> None:
        """At least one ready worker, starting one when none is on the way (after any backoff)."""
        self.wait_ready(0)
        timeout = self.limits.start_timeout_s
        deadline = time.monotonic() + timeout
        while not self.workers:
            if not self.starting:
                time.sleep(max(0.0, min(self._next_start, deadline) - time.monotonic()))
                self.add_worker()
            ref = next(iter(self.starting.values()))[1]
            ray.wait([ref], timeout=max(0.0, deadline - time.monotonic()))
            self.wait_ready(0)
            if not self.workers and time.monotonic() >= deadline:
                raise WaitTimeout(f"no rollout worker became ready within rollout.start_timeout_s={timeout:g} s: "
                                  f"the cluster has no room for one (each needs {self.demand}; free: "
                                  f"{ray.available_resources()}), or loading the policy takes longer")

    # -- work --------------------------------------------------------------------------------------
    def generate(self, prompt_ids: list[list[int]], seeds: list[int]) -> list[Episode]:
        """One episode per prompt, in prompt order, each exactly once, whatever workers die meanwhile."""
        return self.submit(prompt_ids, seeds).result()  # bounded by rollout.timeout_s

    def submit(self, prompt_ids: list[list[int]], seeds: list[int]) -> "PendingRollout":
        """Send the prompts out and return at once; `result()` waits for the episodes.

        The chunks run with the weights the workers hold now: weights sent later (`set_weights`) reach a
        worker after its chunk (an actor runs its calls in order), which is how the learner trains on
        iteration k while the workers generate iteration k + 1.
        """
        if len(prompt_ids) != len(seeds):
            raise ValueError(f"got {len(prompt_ids)} prompts but {len(seeds)} seeds")
        self._ensure_ready_worker()
        # bucket by length: each worker's chunk holds prompts of similar length, so its left-padded batch
        # wastes fewer positions; episodes go back in prompt order (seeds travel with their prompts)
        order = np.argsort([len(p) for p in prompt_ids], kind="stable")
        pending = PendingRollout(self, [prompt_ids[i] for i in order], [seeds[i] for i in order], order)
        bounds = np.linspace(0, len(prompt_ids), len(self.workers) + 1).astype(int)
        for worker_id, start, end in zip(list(self.workers), bounds[:-1], bounds[1:]):
            if end > start:
                pending.send(worker_id, start, end)
        return pending

    def _live_worker(self, exclude: set[str]) -> str:
        """An idle ready worker if there is one, else any ready worker, else one that becomes ready."""
        self.wait_ready(0)
        idle = [w for w in self.workers if w not in exclude]
        if idle:
            return idle[0]
        if not self.workers:
            self._ensure_ready_worker()
        return next(iter(self.workers))

    def _keep_latest(self, state_dict, version: int) -> None:
        """The newest weights, which workers that start later load (put in the object store when one does)."""
        self._latest, self._weights_ref, self.policy_version = state_dict, None, version

    def _send_latest(self, worker_ids: list[str]) -> dict:
        """The newest weights to these workers (ready or starting) through one shared object-store copy, read in
        place from shared memory; a starting worker loads them after its constructor, before any chunk.
        {call: worker id}."""
        if self._weights_ref is None:
            self._weights_ref = ray.put(to_shared_arrays(self._latest))
        handles = {**{w: h for w, (h, _) in self.starting.items()}, **self.workers}
        return {handles[w].set_weights.remote(self._weights_ref, self.policy_version): w for w in worker_ids}

    def set_weights(self, state_dict, version: int) -> float:
        """Send new weights to every live worker through one shared object-store copy; seconds taken."""
        start = time.perf_counter()
        self._keep_latest(state_dict, version)
        self._send_latest(list(self.starting))
        calls = self._send_latest(list(self.workers))
        timeout = self.limits.sync_timeout_s
        done, late = ray.wait(list(calls), num_returns=len(calls), timeout=timeout)
        if late:
            raise WaitTimeout(f"weight sync (policy version {version}) did not finish within "
                              f"rollout.sync_timeout_s={timeout:g} s: {self.describe([calls[r] for r in late])} "
                              "did not answer")
        for ref in done:
            try:
                fetch_ready(ref, f"the weight sync of {calls[ref]}")  # raises if the worker died
            except WORKER_LOST:
                self._drop_dead(calls[ref])
        return time.perf_counter() - start

    def set_weights_collective(self, state_dict, version: int, bucket_bytes: int | None = None) -> float:
        """Send new weights to every ready worker over a gloo process group of this process (rank 0) and the
        workers (`rlhf_ray.rollout.collective.CollectiveSync`); seconds taken. Starting workers, and workers
        added later, load an object-store copy, made only for them."""
        start = time.perf_counter()
        self._keep_latest(state_dict, version)
        if self.starting:
            self._send_latest(list(self.starting))
        self.collective.send(state_dict, version, bucket_bytes)
        return time.perf_counter() - start

    def _drop_lost(self, calls: dict, errors: list | None = None) -> list[str]:
        """The workers among `calls` ({ref: worker id}, all finished) whose call ended because they died: dropped
        from the pool (their chunks go to the others). Any other error of a call is raised, or added to `errors`
        if given. The collective sync (`CollectiveSync`) calls it."""
        lost = []
        for ref, worker in calls.items():
            try:
                fetch_ready(ref, f"the weight sync of {worker}")
            except WORKER_LOST:
                self._drop_dead(worker)
                lost.append(worker)
            except Exception as err:
                if errors is None:
                    raise
                errors.append(err)
        return lost

    def describe(self, worker_ids: list[str]) -> str:
        """`rollout-1 (generating 16 prompts for 42 s), rollout-2 (idle)`: who, and what they were doing."""
        now, parts = time.monotonic(), []
        for worker_id in worker_ids:
            if worker_id in self.busy:
                prompts, since = self.busy[worker_id]
                parts.append(f"{worker_id} (generating {prompts} prompts for {now - since:.0f} s)")
            else:
                parts.append(f"{worker_id} (idle)")
        return "worker " + ", ".join(parts) if len(parts) == 1 else "workers " + ", ".join(parts)

    def weights_digests(self) -> dict[str, str]:
        """Each ready worker's weights hash (starting workers are waited for, within start_timeout_s)."""
        self.wait_ready(timeout=self.limits.start_timeout_s)
        if self.starting:
            raise WaitTimeout(f"{', '.join(self.starting)} did not become ready within "
                              f"rollout.start_timeout_s={self.limits.start_timeout_s:g} s")
        refs = {w.weights_digest.remote(): worker_id for worker_id, w in self.workers.items()}
        done, late = ray.wait(list(refs), num_returns=len(refs), timeout=self.limits.sync_timeout_s)
        if late:
            raise WaitTimeout(f"weights digests did not come back within rollout.sync_timeout_s="
                              f"{self.limits.sync_timeout_s:g} s: {self.describe([refs[r] for r in late])} "
                              "did not answer")
        return {refs[ref]: fetch_ready(ref, f"the weights digest of {refs[ref]}") for ref in done}


class PendingRollout:
    """Chunks of a rollout batch on their way; `result()` gathers them, re-sending those of dead workers."""

    def __init__(self, pool: RolloutPool, prompt_ids: list, seeds: list[int], order: np.ndarray):
        self.pool, self.prompt_ids, self.seeds, self.order = pool, prompt_ids, seeds, order
        self.pending: dict[ray.ObjectRef, tuple[str, int, int]] = {}  # -> (worker_id, start, end)
        self.chunks: list[RolloutChunk] = []  # the chunks that came back (their timing), after `result()`

    def send(self, worker_id: str, start: int, end: int) -> None:
        pool = self.pool
        ref = pool.workers[worker_id].generate.remote(self.prompt_ids[start:end], self.seeds[start:end],
                                                      pool.policy_version)
        self.pending[ref] = (worker_id, start, end)
        pool.busy[worker_id] = (end - start, time.monotonic())

    def result(self) -> list[Episode]:
        """Every episode once, in the order of the prompts given to `submit`.

        A worker lost meanwhile has its chunk re-sent; a worker whose chunk raised the user's error (a
        reward that fails, a prompt that does not fit) ends the call with that error, unwrapped; the whole
        wait is bounded by `rollout_timeout_s`.
        """
        pool, pending = self.pool, self.pending
        episodes: list[Episode | None] = [None] * len(self.prompt_ids)
        timeout = pool.limits.rollout_timeout_s
        deadline = time.monotonic() + timeout
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
            if not ready:
                workers = sorted({worker_id for worker_id, _, _ in pending.values()})
                raise WaitTimeout(f"the rollout did not finish within rollout.timeout_s={timeout:g} s: "
                                  f"{pool.describe(workers)} did not return its episodes")
            worker_id, start, end = pending.pop(ready[0])
            pool.busy.pop(worker_id, None)
            try:
                chunk = fetch_ready(ready[0], f"the episodes of {worker_id}")
            except WORKER_LOST:
                pool._drop_dead(worker_id)
                pool.requeued_chunks += 1
                self.send(pool._live_worker(exclude={w for w, _, _ in pending.values()}), start, end)
            except Exception as err:
                reason = stop_reason(err)
                if reason is None:
                    raise
                raise reason from err  # the user's own error; Ray's remote traceback stays as its cause, for the log
            else:
                episodes[start:end] = chunk.episodes
                self.chunks.append(chunk)
        results: list[Episode | None] = [None] * len(episodes)
        for position, index in enumerate(self.order):
            results[index] = episodes[position]
        return results
