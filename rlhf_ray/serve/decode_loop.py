"""A model replica's decode loop: every request in flight is decoded in one batch, and a new request joins it
at the next step (continuous batching), instead of waiting for a batch to fill or for the last one to end.

    request ─► DecodeLoop.generate(job) ─► waiting ─(free rows)─► GenerationEngine.step ─► deltas ─► request
                                                                     (one step at a time, in `executor`)

The loop runs while any sequence is waiting or running and stops when none is; the next request starts it
again. Each step runs in `executor` (one worker thread) while the event loop waits for it: the loop keeps
taking requests and flushing streams while torch computes, and gets the GIL back after every step. (A thread
running the whole batch on its own would hold the GIL through most of a small model's step, which is Python,
and starve the loop; measured in experiments/bench_serve.py on a 2-core CPU.) A request whose client leaves
frees its rows at the next step. A step that raises fails the requests it was decoding, with its error,
and the loop goes on with the others. Nothing here waits without a bound: a request waits for steps, and
every step ends within its sequences' token budgets.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, AsyncIterator

if TYPE_CHECKING:  # torch is imported by the model replica only
    from rlhf_ray.serve.engine import GenerationEngine, GenerationRequest, TextDelta

logger = logging.getLogger("rlhf_ray.serve")


@dataclass
class GenerationJob:
    """The sequences of one API request: row i is choice i."""

    rows: list[GenerationRequest]
    stream: bool  # deltas as they are made; otherwise all of them at once, when the last row ends


class DecodeLoop:
    def __init__(self, engine: GenerationEngine, executor=None):
        self.engine, self.executor = engine, executor
        self.waiting: deque[tuple[tuple[int, int], GenerationRequest]] = deque()  # ((job, choice), row)
        self.leaving: set[tuple[int, int]] = set()
        self.outputs: dict[int, asyncio.Queue] = {}  # job -> its deltas of each step, or the step's error
        self.task: asyncio.Task | None = None
        self._job_ids = itertools.count()

    async def generate(self, job: GenerationJob) -> AsyncIterator[list[tuple[int, TextDelta]]]:
        """(choice, delta) lists as the job's rows are decoded: every step's for a streaming job, one list
        at the end for any other. Every choice's last delta has a finish_reason."""
        for row in job.rows:
            self.engine.check(row)  # ValueError before anything is queued
        job_id = next(self._job_ids)
        queue = self.outputs[job_id] = asyncio.Queue()
        self.waiting.extend(((job_id, choice), row) for choice, row in enumerate(job.rows))
        if self.task is None or self.task.done():
            self.task = asyncio.create_task(self._run())
        unfinished, held = len(job.rows), []
        try:
            while unfinished:
                deltas = await queue.get()
                if isinstance(deltas, BaseException):
                    raise deltas
                unfinished -= sum(delta.finish_reason is not None for _, delta in deltas)
                if job.stream:
                    yield deltas
                else:
                    held.extend(deltas)
            if not job.stream:
                yield held
        finally:
            del self.outputs[job_id]
            if unfinished:  # the client left, or a step failed: free the job's rows
                self.waiting = deque(entry for entry in self.waiting if entry[0][0] != job_id)
                self.leaving.update((job_id, choice) for choice in range(len(job.rows)))

    def idle(self) -> bool:
        return not self.outputs and not self.waiting and (self.task is None or self.task.done())

    async def close_when_idle(self, timeout_s: float, poll_s: float = 0.05) -> bool:
        """Free the decoding thread once the jobs in flight have finished (a replaced loop: no new job
        comes); False if they did not finish within `timeout_s` (the thread is then left to them)."""
        deadline = asyncio.get_running_loop().time() + timeout_s
        while not self.idle():
            if asyncio.get_running_loop().time() > deadline:
                logger.warning("a replaced decode loop still had %d jobs after %.0f s; its thread stays",
                               len(self.outputs), timeout_s)
                return False
            await asyncio.sleep(poll_s)
        if self.executor is not None:
            self.executor.shutdown(wait=False)
        return True

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while self.waiting or self.engine.running:
            joining = [self.waiting.popleft() for _ in range(min(self.engine.free_rows(), len(self.waiting)))]
            leaving, self.leaving = self.leaving, set()
            try:
                deltas = await loop.run_in_executor(self.executor, self.engine.step, joining, leaving)
            except Exception as err:  # noqa: BLE001 - the requests it decoded get it; the others go on
                logger.exception("a decoding step failed")
                failed = {key[0] for key in self.engine.keys()} | {key[0] for key, _ in joining}
                self.engine.reset()
                for job_id in failed:
                    if job_id in self.outputs:
                        self.outputs[job_id].put_nowait(err)
                continue
            by_job: dict[int, list] = {}
            for (job_id, choice), delta in deltas:
                by_job.setdefault(job_id, []).append((choice, delta))
            for job_id, items in by_job.items():
                if job_id in self.outputs:
                    self.outputs[job_id].put_nowait(items)
