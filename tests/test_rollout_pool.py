"""Rollout workers and the pool on a real local Ray: every episode once, weight sync, lost workers."""

import copy
import time
from contextlib import contextmanager

import pytest
import ray
import torch

from envs.builtin import BUILTIN_PROMPTS, sentiment_reward
from rlhf_ray.models import load_policy
from rlhf_ray.rollout.pool import RolloutPool, WorkerSpec
from rlhf_ray.rollout.sampler import Sampler, SamplingParams, episode_seed
from rlhf_ray.rollout.worker import state_dict_digest

REWARD = "envs.builtin:sentiment_reward"
PARAMS = SamplingParams(max_new_tokens=8, temperature=1.2)


@pytest.fixture(scope="module")
def local_ray():
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def policy(tiny_model_dir):
    return load_policy(tiny_model_dir)


@contextmanager
def running_pool(tiny_model_dir, workers, ready=True):
    """A pool of `workers` over the tiny model (all of them started when `ready`), shut down when the block
    ends."""
    pool = make_pool(tiny_model_dir, workers)
    try:
        if ready:
            pool.wait_ready(timeout=None)
        yield pool
    finally:
        pool.shutdown()


def make_pool(tiny_model_dir, workers):
    return RolloutPool(WorkerSpec(policy=str(tiny_model_dir), reward=REWARD, params=PARAMS, num_cpus=0.5),
                       num_workers=workers)


def prompts_and_seeds(tokenizer, n):
    texts = [BUILTIN_PROMPTS[i % len(BUILTIN_PROMPTS)] for i in range(n)]
    return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts], [episode_seed(0, 0, i) for i in range(n)]


def test_pool_returns_every_episode_once_as_one_sampler_would(local_ray, tiny_model_dir, policy):
    model, tokenizer = policy
    prompt_ids, seeds = prompts_and_seeds(tokenizer, 10)
    with running_pool(tiny_model_dir, workers=3) as pool:
        pending = pool.submit(prompt_ids, seeds)
        episodes = pending.result()
    # each chunk's timing comes back once, with its chunk, not copied into every episode
    assert sorted(c.worker_id for c in pending.chunks) == sorted({e.worker_id for e in episodes})
    assert sum(len(c.episodes) for c in pending.chunks) == 10 and all(c.generate_s > 0 for c in pending.chunks)
    expected = Sampler(model, tokenizer, sentiment_reward, PARAMS).generate(prompt_ids, seeds)
    assert [e.seed for e in episodes] == seeds
    assert [e.response_ids.tolist() for e in episodes] == [e.response_ids.tolist() for e in expected]
    assert len({e.worker_id for e in episodes}) == 3
    assert all(e.policy_version == 0 for e in episodes)


def test_after_a_sync_every_worker_holds_the_learner_weights(local_ray, tiny_model_dir, policy):
    model, _ = policy
    learner = copy.deepcopy(model)
    with torch.no_grad():
        for param in learner.parameters():  # tied weights stay tied, as the learner's would
            param.add_(0.01 * torch.randn_like(param))
    learner_weights = learner.state_dict()
    with running_pool(tiny_model_dir, workers=2, ready=False) as pool:
        before = pool.weights_digests()
        pool.set_weights(learner_weights, version=1)
        after = pool.weights_digests()
        late = pool.add_worker()  # a worker that joins later catches up before its first chunk
        after_join = pool.weights_digests()
    assert set(before.values()) == {state_dict_digest(model.state_dict())}
    assert set(after.values()) == {state_dict_digest(learner_weights)}
    assert after_join[late] == state_dict_digest(learner_weights)


def test_a_lora_sync_leaves_every_worker_with_the_learners_merged_weights(local_ray, tiny_model_dir, policy):
    """Only adapters travel; each worker merges them into its base weights, a late joiner too, and a second
    sync replaces the first's update. Workers run the torch threads they are given."""
    from rlhf_ray.config import LoraSettings
    from rlhf_ray.models.lora import adapter_payload, add_adapters, merge_adapters

    model, _ = policy
    lora = LoraSettings(r=4, alpha=8.0, target_modules=["c_attn", "c_fc"])
    learner = add_adapters(copy.deepcopy(model), lora)
    spec = WorkerSpec(policy=str(tiny_model_dir), reward=REWARD, params=PARAMS, num_cpus=0.5, torch_threads=2)
    pool = RolloutPool(spec, num_workers=1)
    try:
        for version in (1, 2):
            with torch.no_grad():
                for name, param in learner.named_parameters():
                    if "lora_B" in name:
                        param.add_(0.05 * torch.randn_like(param))
            pool.set_weights(adapter_payload(learner.state_dict(), lora.alpha / lora.r), version)
            merged = state_dict_digest(merge_adapters(model, learner.state_dict(), lora))
            assert set(pool.weights_digests().values()) == {merged}
        late = pool.add_worker()
        assert pool.weights_digests()[late] == merged
        assert all(ray.get(w.info.remote(), timeout=60)["torch_threads"] == 2 for w in pool.workers.values())
    finally:
        pool.shutdown()


def test_dead_worker_prompts_are_requeued(local_ray, tiny_model_dir, policy):
    _, tokenizer = policy
    prompt_ids, seeds = prompts_and_seeds(tokenizer, 8)
    with running_pool(tiny_model_dir, workers=2) as pool:
        reference = pool.generate(prompt_ids, seeds)
        ray.kill(pool.workers[next(iter(pool.workers))], no_restart=True)  # the pool does not know yet
        episodes = pool.generate(prompt_ids, seeds)
        assert pool.requeued_chunks == 1 and len(pool) == 1
    assert [e.seed for e in episodes] == seeds  # every prompt once, in order
    assert [e.response_ids.tolist() for e in episodes] == [e.response_ids.tolist() for e in reference]


def test_workers_join_and_leave_between_calls(local_ray, tiny_model_dir, policy):
    _, tokenizer = policy
    prompt_ids, seeds = prompts_and_seeds(tokenizer, 6)
    with running_pool(tiny_model_dir, workers=1, ready=False) as pool:
        one = pool.generate(prompt_ids, seeds)
        pool.add_worker()
        pool.wait_ready(timeout=None)
        two = pool.generate(prompt_ids, seeds)
        pool.remove_worker()
        again = pool.generate(prompt_ids, seeds)
        assert len(pool) == 1
    assert len({e.worker_id for e in two}) == 2
    tokens = [[e.response_ids.tolist() for e in batch] for batch in (one, two, again)]
    assert tokens[0] == tokens[1] == tokens[2]


def slow_sentiment_reward(prompts, responses):
    """The built-in reward behind a slow scorer, so that a chunk takes long enough to be interrupted."""
    import time

    time.sleep(3.0)
    return sentiment_reward(prompts, responses)


def test_worker_killed_in_the_middle_of_a_chunk_loses_no_prompt(local_ray, tiny_model_dir, policy):
    import sys
    import threading

    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import this test module
    _, tokenizer = policy
    prompt_ids, seeds = prompts_and_seeds(tokenizer, 8)
    spec = WorkerSpec(policy=str(tiny_model_dir), reward=slow_sentiment_reward, params=PARAMS, num_cpus=0.5)
    pool = RolloutPool(spec, num_workers=2)
    result = {}
    try:
        pool.wait_ready(timeout=None)
        victim = pool.workers[next(iter(pool.workers))]
        thread = threading.Thread(target=lambda: result.setdefault("episodes", pool.generate(prompt_ids, seeds)))
        thread.start()
        time.sleep(1.0)  # both chunks are being scored now
        ray.kill(victim, no_restart=True)
        thread.join(timeout=120)
        assert pool.requeued_chunks == 1 and len(pool) == 1
    finally:
        pool.shutdown()
    episodes = result["episodes"]
    assert [e.seed for e in episodes] == seeds  # every prompt once, in order
    expected = Sampler(*policy, sentiment_reward, PARAMS).generate(prompt_ids, seeds)
    assert [e.reward for e in episodes] == [e.reward for e in expected]


def test_shared_arrays_round_trip_every_dtype_and_send_tied_weights_once():
    import ray.cloudpickle as pickle

    from rlhf_ray.rollout.worker import from_shared_arrays, to_shared_arrays

    embedding = torch.randn(5, 3)
    state = {"wte.weight": embedding, "lm_head.weight": embedding, "bias": torch.randn(3).to(torch.bfloat16),
             "steps": torch.tensor([7], dtype=torch.int64)}
    arrays = to_shared_arrays(state)
    assert arrays["wte.weight"][0] is arrays["lm_head.weight"][0]  # one array for the tied pair
    back = from_shared_arrays(pickle.loads(pickle.dumps(arrays)))
    assert set(back) == set(state)
    for name, tensor in state.items():
        assert back[name].dtype == tensor.dtype and torch.equal(back[name], tensor)
