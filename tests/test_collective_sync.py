"""Collective weight sync (`rlhf_ray.rollout.collective`): the plan and its buckets by hand, then a broadcast
over a real gloo group from this process to real rollout workers on a local Ray, with joins, leaves and a
worker that does not answer."""

import os
import time
import zlib
from pathlib import Path

import pytest
import ray
import torch

from rlhf_ray.config import LoraSettings
from rlhf_ray.errors import WaitTimeout
from rlhf_ray.models import build_tiny_model, load_policy
from rlhf_ray.models.lora import adapter_payload, add_adapters, merged_state_dict
from rlhf_ray.rollout.collective import bucket_tensor, checksum, plan_sync, unflatten
from rlhf_ray.rollout.pool import PoolLimits, RolloutPool, WorkerSpec
from rlhf_ray.rollout.sampler import SamplingParams
from rlhf_ray.rollout.worker import state_dict_digest

TESTS = Path(__file__).parent


def test_the_plan_buckets_by_dtype_and_size_sends_tied_weights_once_and_round_trips():
    shared = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    state = {"a": shared, "tied": shared, "b": torch.ones(4), "c": torch.full((3,), 2.0), "h": torch.ones(2, dtype=torch.bfloat16)}
    plan, values = plan_sync(state, version=7, bucket_bytes=40)  # 10 float32s a bucket
    assert [m.name for m in plan.tensors] == ["a", "b", "c", "h"]  # "tied" is the storage of "a"
    assert [(b.dtype, b.tensors, b.numel) for b in plan.buckets] == [
        ("float32", (0, 1), 10), ("float32", (2,), 3), ("bfloat16", (3,), 2)]
    assert plan.version == 7 and plan.nbytes == 4 * 13 + 2 * 2
    flats = [bucket_tensor(bucket, values) for bucket in plan.buckets]
    assert flats[1].data_ptr() == state["c"].data_ptr()  # a lone tensor travels without a copy
    received = {}
    for bucket, flat in zip(plan.buckets, flats):
        received.update(unflatten(plan, bucket, flat.clone()))
    assert all(torch.equal(received[name], state[name]) for name in ("a", "b", "c", "h"))
    # CRC-32 of the bytes: 1.0f is 00 00 80 3f; one changed word, or two swapped, changes it
    assert checksum(torch.tensor([1.0])) == zlib.crc32(bytes([0, 0, 0x80, 0x3F]))
    assert checksum(torch.tensor([1.0, 2.0])) != checksum(torch.tensor([2.0, 1.0]))
    assert checksum(torch.tensor([1.0, 2.0])) != checksum(torch.tensor([1.0, 2.5]))


@pytest.fixture(scope="module")
def local_ray():
    # the hung-worker test's reward (tests/user_code.py) is imported by name on the workers
    ray.init(address="local", num_cpus=3, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
                                       "USER_CODE_SLOW_S": "10"}})
    yield
    ray.shutdown()


def changed_weights(seed: int) -> dict[str, torch.Tensor]:
    model, _ = build_tiny_model("gpt2", seed=seed)
    return model.state_dict()


def test_a_broadcast_reaches_every_worker_and_the_group_follows_joins_and_leaves(local_ray):
    spec = WorkerSpec(policy="rlhf-ray/tiny-gpt2", reward="envs.builtin:sentiment_reward",
                      params=SamplingParams(max_new_tokens=4), num_cpus=0.5)
    pool = RolloutPool(spec, num_workers=3, name="sync", limits=PoolLimits(sync_timeout_s=20))
    try:
        pool.wait_ready(timeout=120)
        for version, seed in ((1, 11), (2, 12)):
            weights = changed_weights(seed)
            pool.set_weights_collective(weights, version, bucket_bytes=64 << 10)  # several buckets
            assert set(pool.weights_digests().values()) == {state_dict_digest(weights)}
        assert pool.collective.generation == 1  # the same members: the same group
        gone = pool.remove_worker()
        pool.set_weights_collective(changed_weights(13), 3)
        assert pool.collective.generation == 2 and gone not in pool.collective.members
        # a worker that died since the last sync (its node went away): its transfer fails, it is dropped, the
        # others get the weights, and the next sync makes a group without it
        killed = sorted(pool.workers)[0]
        ray.kill(pool.workers[killed], no_restart=True)
        weights = changed_weights(17)
        pool.set_weights_collective(weights, 4)
        assert killed not in pool.workers and len(pool) == 1 and pool.collective.members is None
        assert set(pool.weights_digests().values()) == {state_dict_digest(weights)}
        joined = pool.add_worker()
        pool.set_weights_collective(changed_weights(14), 5)  # the starting worker gets the object-store copy
        generation = pool.collective.generation
        pool.wait_ready(timeout=120)
        weights = changed_weights(15)
        pool.set_weights_collective(weights, 6)
        assert joined in pool.collective.members and pool.collective.generation == generation + 1
        assert set(pool.weights_digests().values()) == {state_dict_digest(weights)}
        # episodes after a collective sync carry its version
        episodes = pool.generate([[3, 4, 5]] * 4, [0, 1, 2, 3])
        assert {e.policy_version for e in episodes} == {6}
        # a worker added after a collective sync (none was starting) loads the newest weights, not older ones
        pool.add_worker()
        pool.wait_ready(timeout=120)
        assert set(pool.weights_digests().values()) == {state_dict_digest(weights)}
        # LoRA: only the adapters travel, and every worker merges them into the base weights it keeps
        base, _ = build_tiny_model("gpt2", seed=0)
        lora = LoraSettings(r=4, alpha=8.0, target_modules=["c_attn"])
        adapted = add_adapters(build_tiny_model("gpt2", seed=0)[0], lora)
        with torch.no_grad():
            for name, param in adapted.named_parameters():
                if "lora_B" in name:
                    param.copy_(torch.randn(param.shape, generator=torch.Generator().manual_seed(1)) * 0.1)
        payload = adapter_payload(adapted.state_dict(), lora.alpha / lora.r)
        pool.set_weights(base.state_dict(), 7)  # the base weights, by the object store
        pool.set_weights_collective(payload, 8)
        merged = merged_state_dict(base, base.state_dict(), payload)
        assert set(pool.weights_digests().values()) == {state_dict_digest(merged)} != {state_dict_digest(base.state_dict())}
        # a bucket that does not match its CRC-32 is refused, and the worker keeps its weights
        plan, values = plan_sync(changed_weights(16), 9)
        members = pool.collective.members
        calls = [pool.workers[w].receive_weights.remote(plan, 9) for w in members]
        flats = [bucket_tensor(bucket, values) for bucket in plan.buckets]
        sums = torch.tensor([checksum(flat) for flat in flats], dtype=torch.int64)
        wrong = sums + torch.tensor([1] + [0] * (len(flats) - 1))  # what rank 1 gets: bucket 0 "differs"
        for tag, payload in enumerate([*flats, sums]):
            for rank in range(1, len(members) + 1):
                pool.collective.group.send(wrong if tag == len(flats) and rank == 1 else payload, rank, tag).wait()
        with pytest.raises(ray.exceptions.RayTaskError, match=rf"worker {members[0]}: bucket 0 of policy version 9 "
                                                             r"arrived corrupted"):
            ray.get(calls[0], timeout=60)
        assert ray.get(calls[1:], timeout=60) == [9] * (len(members) - 1)
        assert pool.weights_digests()[members[0]] == state_dict_digest(merged)
    finally:
        pool.shutdown()


def block(pool, worker_id):
    """Keep a worker busy for 10 s (a chunk whose reward is slow), as the pool sees it; the call's ref."""
    _, tokenizer = load_policy("rlhf-ray/tiny-gpt2")
    dull = tokenizer("the movie was dull", add_special_tokens=False)["input_ids"]
    pool.busy[worker_id] = (1, time.monotonic())
    return pool.workers[worker_id].generate.remote([dull], [0], pool.policy_version)


def hung_pool(name):
    spec = WorkerSpec(policy="rlhf-ray/tiny-gpt2", reward="user_code:by_last_word",
                      params=SamplingParams(max_new_tokens=4), num_cpus=0.5)
    pool = RolloutPool(spec, num_workers=2, name=name, limits=PoolLimits(sync_timeout_s=4))
    pool.wait_ready(timeout=120)
    return pool


@pytest.mark.parametrize("when", ["join", "receive"])
def test_a_worker_that_does_not_join_or_receive_is_named_within_the_sync_timeout(local_ray, when):
    """A worker busy when the group forms, or when the buckets come: the sync fails in `rollout.sync_timeout_s`
    naming it and what it was doing (the driver then stops the run)."""
    pool = hung_pool(f"hung-{when}")
    try:
        busy = sorted(pool.workers)[1]
        if when == "join":
            expected = (rf"the weight-sync group did not form within rollout.sync_timeout_s=4 s: worker {busy} "
                        r"\(generating 1 prompts for \d+ s\) did not join")
        else:  # the group formed at version 1
            pool.set_weights_collective(changed_weights(21), 1)
            expected = (rf"weight sync \(policy version 2\) did not finish within rollout.sync_timeout_s=4 s: "
                        rf"worker {busy} \(generating 1 prompts for \d+ s\) did not receive the weights")
        blocker = block(pool, busy)
        started = time.monotonic()
        with pytest.raises(WaitTimeout, match=expected):
            pool.set_weights_collective(changed_weights(22), 2)
        assert time.monotonic() - started < 20  # a hang detector
        assert pool.collective.members is None  # a later sync would make a new group
        ray.get(blocker, timeout=60)
    finally:
        pool.shutdown()
