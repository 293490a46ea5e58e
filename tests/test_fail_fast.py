"""The user's mistakes end a run in seconds with their own message, and nothing is retried or waits forever.

On a real local Ray: the rollout pool meets a reward that cannot be imported, raises, hangs or is slow,
a prompt that does not fit, and workers that die while starting. The `rlhf-ray train` cases (preflight,
a reward failing on iteration 2, the resume after the fix) are in tests/test_fail_fast_cli.py.
"""

import os
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import ray

from envs.builtin import BUILTIN_PROMPTS
from rlhf_ray.errors import WaitTimeout, stop_reason
from rlhf_ray.data import DataError
from rlhf_ray.models import load_tokenizer
from rlhf_ray.rewards import RewardError
from rlhf_ray.rollout.pool import PoolLimits, RolloutPool, WorkerSpec, WorkerStartError
from rlhf_ray.rollout.sampler import SamplingParams, episode_seed

TESTS = Path(__file__).parent
PARAMS = SamplingParams(max_new_tokens=4)


@contextmanager
def seconds(bound: float):
    """The block ends within `bound` seconds: a hang detector, not a benchmark."""
    start = time.monotonic()
    yield
    assert time.monotonic() - start < bound, f"took {time.monotonic() - start:.0f} s, expected < {bound:g} s"


@pytest.fixture(scope="module")
def local_ray():
    # rollout workers import the test's reward modules (tests/user_code.py) by name
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}})
    yield
    ray.shutdown()


def prompts(tokenizer, n, last_word=None):
    """n built-in prompts (`last_word` {i: word} appended to some) as token ids, and their seeds."""
    last_word = last_word or {}
    texts = [" ".join([BUILTIN_PROMPTS[i % len(BUILTIN_PROMPTS)], *([last_word[i]] if i in last_word else [])])
             for i in range(n)]
    return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts], [episode_seed(0, 0, i) for i in range(n)]


def pool_of(tiny_model_dir, reward, workers=1, limits=PoolLimits(), max_length=None):
    return RolloutPool(WorkerSpec(policy=str(tiny_model_dir), reward=reward, params=PARAMS, num_cpus=0.5,
                                  max_length=max_length), num_workers=workers, limits=limits)


def test_a_reward_that_cannot_be_imported_fails_at_the_first_worker_start(local_ray, tiny_model_dir):
    pool = pool_of(tiny_model_dir, "no.such:fn", workers=2)
    ids, seeds = prompts(load_tokenizer(tiny_model_dir), 4)
    try:
        with seconds(60), pytest.raises(RewardError, match=r"reward 'no.such:fn': cannot import module 'no.such'"):
            pool.submit(ids, seeds)
        assert pool.start_failures == 0  # a user error is not counted as a fault to retry: it ends the call
    finally:
        pool.shutdown()


def test_workers_that_die_while_starting_are_replaced_at_most_max_start_failures_times(local_ray, tiny_model_dir):
    pool = pool_of(tiny_model_dir, "crashes_on_import:score", limits=PoolLimits(max_start_failures=2))
    ids, seeds = prompts(load_tokenizer(tiny_model_dir), 2)
    try:
        with seconds(90), pytest.raises(WorkerStartError) as raised:
            pool.submit(ids, seeds)
    finally:
        pool.shutdown()
    message = str(raised.value)
    assert message.startswith("rollout workers failed to start 2 times in a row (rollout.max_start_failures=2); "
                              "the last one, rollout-1: ")
    # the worker's own death, as Ray reports it, not "no room in the cluster"
    assert "its process (pid " in message and "died, SYSTEM_ERROR: " in message


@pytest.fixture(scope="module")
def misbehaving_pool(local_ray, tiny_model_dir):
    """One worker whose reward misbehaves as the prompts' last word says (tests/user_code.py:by_last_word)."""
    pool = pool_of(tiny_model_dir, {"function": "user_code:by_last_word", "timeout_s": 4.0}, max_length=12)
    pool.wait_ready(timeout=None)
    yield pool
    pool.shutdown()


def test_a_reward_that_raises_in_a_chunk_ends_the_rollout_with_its_message_and_no_resend(misbehaving_pool,
                                                                                         tiny_model_dir):
    ids, seeds = prompts(load_tokenizer(tiny_model_dir), 6, last_word={5: "cold"})
    with seconds(60), pytest.raises(RewardError) as raised:
        misbehaving_pool.generate(ids, seeds)
    assert str(raised.value).startswith("reward 'user_code:by_last_word' raised ValueError: the scoring service "
                                        "rejected the request (HTTP 422) (scoring a batch of ")
    assert stop_reason(raised.value) is raised.value
    # not a lost worker: nothing re-sent, nobody dropped, and the worker goes on serving
    assert misbehaving_pool.requeued_chunks == 0 and len(misbehaving_pool) == 1
    assert len(misbehaving_pool.generate(*prompts(load_tokenizer(tiny_model_dir), 2))) == 2


def test_a_prompt_that_does_not_fit_the_context_is_a_data_error_not_a_fault(misbehaving_pool, tiny_model_dir):
    ids, seeds = prompts(load_tokenizer(tiny_model_dir), 3)
    ids[1] = ids[1] * 4  # longer than max_length=12
    with seconds(60), pytest.raises(DataError, match=r"has \d+ tokens, which leaves no room for a new token under "
                                                     r"max_length=12"):
        misbehaving_pool.generate(ids, seeds)
    assert misbehaving_pool.requeued_chunks == 0


def test_a_hung_reward_fails_after_reward_timeout_s_naming_the_reward_and_the_batch(misbehaving_pool,
                                                                                    tiny_model_dir):
    ids, seeds = prompts(load_tokenizer(tiny_model_dir), 3, last_word={0: "angry"})
    with seconds(60), pytest.raises(RewardError, match=r"reward 'user_code:by_last_word' did not return within "
                                                       r"reward.timeout_s=4 s for a batch of \d+ \(prompt, response\)"):
        misbehaving_pool.generate(ids, seeds)


def test_waits_on_a_busy_worker_are_bounded_and_name_the_worker_and_its_chunk(misbehaving_pool, tiny_model_dir):
    from rlhf_ray.models import load_policy

    pool = misbehaving_pool
    pool.limits = PoolLimits(rollout_timeout_s=1.0, sync_timeout_s=1.0)
    model, tokenizer = load_policy(tiny_model_dir)
    ids, seeds = prompts(tokenizer, 3, last_word={2: "dull"})  # scored slowly: the chunk runs until its reward
    # times out after reward.timeout_s=4 s, after both waits below have run out
    with seconds(30), pytest.raises(WaitTimeout, match=r"the rollout did not finish within rollout.timeout_s=1 s: "
                                                       r"worker rollout-0 \(generating 3 prompts for [12] s\) did "
                                                       r"not return its episodes"):
        pool.generate(ids, seeds)
    pool.busy["rollout-0"] = (3, time.monotonic())  # the chunk still runs; new weights wait behind it
    with seconds(30), pytest.raises(WaitTimeout, match=r"weight sync \(policy version 1\) did not finish within "
                                                       r"rollout.sync_timeout_s=1 s: worker rollout-0 "
                                                       r"\(generating 3 prompts for [01] s\) did not answer"):
        pool.set_weights(model.state_dict(), 1)
