"""The replica's decode loop: requests join the running batch, leave it when their client does, and a failed
step fails only the requests it decoded. A real engine on a tiny model; no Ray."""

import asyncio

import pytest
import torch

from rlhf_ray.models import build_tiny_model
from rlhf_ray.serve.decode_loop import DecodeLoop, GenerationJob
from rlhf_ray.serve.engine import GenerationEngine, GenerationRequest


@pytest.fixture(scope="module")
def engine():
    torch.set_num_threads(1)
    model, tokenizer = build_tiny_model("gpt2", seed=1)
    return GenerationEngine(model, tokenizer, max_rows=4)


def rows(engine, prompt, n=1, **kwargs):
    return [GenerationRequest(tuple(engine.encode(prompt)), seed=i, **kwargs) for i in range(n)]


async def collect(loop, job):
    texts, reasons = {}, {}
    async for deltas in loop.generate(job):
        for choice, delta in deltas:
            texts[choice] = texts.get(choice, "") + delta.text
            if delta.finish_reason:
                reasons[choice] = delta.finish_reason
    return [(texts[c], reasons[c]) for c in sorted(texts)]


def test_a_request_joins_a_running_batch_and_gets_what_it_gets_alone(engine):
    long_rows = rows(engine, "the movie was", n=2, max_new_tokens=30)
    short_rows = rows(engine, "our team", n=3, max_new_tokens=5, temperature=0.8)
    alone_long = [(g.text, g.finish_reason) for g in engine.generate(long_rows)]
    alone_short = [(g.text, g.finish_reason) for g in engine.generate(short_rows)]
    widest = []

    async def main():
        loop = DecodeLoop(engine)
        first = asyncio.create_task(collect(loop, GenerationJob(long_rows, stream=True)))
        while engine.running < 2:  # the first request is being decoded
            await asyncio.sleep(0.001)
        second = asyncio.create_task(collect(loop, GenerationJob(short_rows, stream=False)))
        while not second.done():
            widest.append(engine.running)
            await asyncio.sleep(0.001)
        return await first, await second

    long_out, short_out = asyncio.run(main())
    assert long_out == alone_long and short_out == alone_short
    assert max(widest) == 4  # max_rows: the second request's rows joined (3 of them, 2 first, 1 when a row freed)


def test_a_client_that_leaves_frees_its_rows_and_the_others_go_on(engine):
    async def main():
        loop = DecodeLoop(engine)
        other = asyncio.create_task(collect(loop, GenerationJob(rows(engine, "my day is very", max_new_tokens=40),
                                                                stream=True)))
        stream = loop.generate(GenerationJob(rows(engine, "the movie was", n=2, max_new_tokens=40), stream=True))
        await anext(stream)
        await stream.aclose()  # the client hung up
        while engine.running > 1:
            await asyncio.sleep(0.001)
        running_after = engine.running
        return await other, running_after

    [(text, reason)], running_after = asyncio.run(main())
    assert running_after <= 1 and reason in ("stop", "length")
    assert engine.running == 0


def test_a_failed_step_fails_its_requests_and_the_next_request_is_served(engine, monkeypatch):
    calls = {"n": 0}
    real_step = engine.step

    def failing_step(joining=(), leaving=()):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("CUDA out of memory (simulated)")
        return real_step(joining, leaving)

    monkeypatch.setattr(engine, "step", failing_step)

    async def main():
        loop = DecodeLoop(engine)
        with pytest.raises(RuntimeError, match="out of memory"):
            await collect(loop, GenerationJob(rows(engine, "the movie was", max_new_tokens=10), stream=True))
        return await collect(loop, GenerationJob(rows(engine, "our team", max_new_tokens=3), stream=False))

    (text, reason), = asyncio.run(main())
    assert reason in ("stop", "length") and engine.running == 0


def test_a_request_the_engine_cannot_take_is_refused_before_it_is_queued(engine):
    async def main():
        loop = DecodeLoop(engine)
        too_long = [GenerationRequest(tuple([3] * engine.context_length), max_new_tokens=1)]
        with pytest.raises(ValueError, match="exceed the context"):
            await collect(loop, GenerationJob(too_long, stream=False))
        return loop

    loop = asyncio.run(main())
    assert not loop.waiting and not loop.outputs


def test_a_replaced_loop_frees_its_thread_once_its_jobs_have_finished(engine):
    """After a policy swap the old loop gets no new job: it lets its jobs finish, then shuts its executor."""
    from concurrent.futures import ThreadPoolExecutor

    job_rows = rows(engine, "the movie was", n=2, max_new_tokens=20)
    alone = [(g.text, g.finish_reason) for g in engine.generate(job_rows)]

    async def main():
        executor = ThreadPoolExecutor(max_workers=1)
        loop = DecodeLoop(engine, executor)
        job = asyncio.create_task(collect(loop, GenerationJob(job_rows, stream=True)))
        while engine.running < 2:
            await asyncio.sleep(0.001)
        assert not await loop.close_when_idle(timeout_s=0.0)  # a job in flight: the bound is told, nothing shut
        closing = asyncio.create_task(loop.close_when_idle(timeout_s=60))
        out = await job
        assert await closing and loop.idle()
        with pytest.raises(RuntimeError):  # shut down
            executor.submit(print)
        return out

    assert asyncio.run(main()) == alone
