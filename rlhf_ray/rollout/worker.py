"""The rollout worker: a Ray actor holding a full policy copy, the sampler and the reward function.

Actors stay thin (shared/STYLE.md): the sampling is `Sampler.generate`, which tests call without
Ray. Rollout workers never generate through the sharded learner engine; they receive full weights
by `set_weights` after every update (the TRL / DeepSpeed-Chat ZeRO-3 generation bottleneck), or under
LoRA only the adapters, which they merge into the base weights they keep (`rlhf_ray.models.lora`).
"""

from __future__ import annotations

import hashlib
import os
import time
import warnings
from dataclasses import dataclass

import numpy as np

import ray
import torch

from rlhf_ray.models import load_policy
from rlhf_ray.models.loading import DTYPES
from rlhf_ray.models.lora import AdapterMerger, is_adapter_payload
from rlhf_ray.rewards.composite import build_reward
from rlhf_ray.decoding import keep_freed_memory
from rlhf_ray.rollout.sampler import Episode, Sampler, SamplingParams



def state_dict_digest(state_dict: dict[str, torch.Tensor]) -> str:
    """A hash of parameter names and values, to check that two copies of a model are equal."""
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        tensor = state_dict[name].detach().to("cpu").contiguous()
        digest.update(name.encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


# numpy has no bfloat16: such tensors travel as their int16 bit patterns
_AS_NUMPY = {torch.bfloat16: torch.int16}


def to_shared_arrays(state_dict: dict[str, torch.Tensor]) -> dict[str, tuple[np.ndarray, str]]:
    """A state dict as numpy arrays for `ray.put`, each tensor once (tied weights share one array).

    Ray stores numpy arrays out of band and a reader maps them straight from the node's shared-memory
    object store, where a torch tensor would be pickled into bytes and unpickled into a new copy by
    every worker (unless RAY_ENABLE_ZERO_COPY_TORCH_TENSORS is set). A worker then copies each array
    once, into its parameter.
    """
    arrays, seen = {}, {}
    for name, tensor in state_dict.items():
        key = (tensor.data_ptr(), tensor.dtype, tuple(tensor.shape))
        if key not in seen:
            data = tensor.detach().to("cpu").contiguous()
            seen[key] = (data.view(_AS_NUMPY.get(data.dtype, data.dtype)).numpy(), str(data.dtype).removeprefix("torch."))
        arrays[name] = seen[key]
    return arrays


def from_shared_arrays(arrays: dict[str, tuple[np.ndarray, str]]) -> dict[str, torch.Tensor]:
    """The tensors of `to_shared_arrays`, viewing the (read-only) shared arrays without a copy."""
    with warnings.catch_warnings():  # read-only shared memory: load_state_dict only reads them
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return {name: torch.from_numpy(array).view(getattr(torch, dtype)) for name, (array, dtype) in arrays.items()}


@dataclass
class RolloutChunk:
    """A worker's answer to one chunk of prompts: its episodes, in order, and the chunk's timing (once)."""

    episodes: list[Episode]
    worker_id: str
    generate_s: float  # sampling and scoring the chunk
    reward_s: float  # of which in the reward function


class RolloutWorker:
    """Generates episodes for chunks of prompts with the policy of a given version."""

    def __init__(self, worker_id: str, policy: str, reward: str | dict, params: SamplingParams,
                 max_length: int | None = None, dtype: str = "float32", use_gpu: bool = False,
                 max_batch: int | None = None, torch_threads: int = 1):
        self.worker_id = worker_id
        self.policy_version = 0
        self.adapters: AdapterMerger | None = None  # LoRA: the base weights of the adapted layers
        self.sync_group = None  # the collective weight-sync group (rlhf_ray.rollout.collective), once joined
        # A failing constructor would kill the actor, and Ray would report only "died while starting"; kept
        # here, the error reaches the pool by `info()` with its own type and message (a reward that cannot
        # be imported is the user's error: no restart can fix it).
        self.start_error: Exception | None = None
        try:
            keep_freed_memory()  # each decoding step's (B, V) tensors reuse the last step's memory
            if not use_gpu:
                torch.set_num_threads(torch_threads)
            device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
            self.model, self.tokenizer = load_policy(policy, dtype=DTYPES[dtype], device=device)
            self.sampler = Sampler(self.model, self.tokenizer, build_reward(reward, device=device), params,
                                   max_length, max_batch)
        except Exception as error:
            self.start_error = error

    def generate(self, prompt_ids: list[list[int]], seeds: list[int], version: int) -> RolloutChunk:
        if version != self.policy_version:
            raise RuntimeError(f"worker {self.worker_id} holds policy version {self.policy_version}, "
                               f"asked to generate with version {version}")
        start = time.perf_counter()
        episodes = self.sampler.generate(prompt_ids, seeds)
        for episode in episodes:
            episode.policy_version = self.policy_version
            episode.worker_id = self.worker_id
        return RolloutChunk(episodes, self.worker_id, time.perf_counter() - start, self.sampler.last_reward_s)

    def set_weights(self, state_dict: dict, version: int) -> int:
        """Load the policy's weights: a state dict or LoRA adapters (`adapter_payload`), or `to_shared_arrays`
        of one (what the pool sends)."""
        if state_dict and isinstance(next(iter(state_dict.values())), tuple):
            state_dict = from_shared_arrays(state_dict)
        if is_adapter_payload(state_dict):  # LoRA: only adapters travel; W = W0 + B A on the kept base
            if self.adapters is None:
                self.adapters = AdapterMerger(self.model)
            self.adapters.apply(state_dict)
            self.policy_version = version
            return version
        missing, unexpected = self.model.load_state_dict(state_dict, strict=False)
        # a tied weight (lm_head = embedding) may be sent once, under either name
        tensors = self.model.state_dict(keep_vars=True)
        loaded = {tensors[name].data_ptr() for name in state_dict if name in tensors}
        missing = [name for name in missing if tensors[name].data_ptr() not in loaded]
        if missing or unexpected:
            raise ValueError(f"worker {self.worker_id}: weights do not fit the policy: "
                             f"missing {missing[:5]}, unexpected {unexpected[:5]}")
        self.policy_version = version
        return version

    def join_sync_group(self, host: str, port: int, rank: int, world: int, prefix: str, timeout_s: float) -> bool:
        """Join the weight-sync group `prefix` (`rlhf_ray.rollout.collective`) as `rank`, unless rank 0 abandons it
        (False); a group this worker was in before is dropped."""
        from rlhf_ray.rollout.collective import SyncGroup

        self.sync_group = None
        group = SyncGroup(host, port, rank, world, prefix, timeout_s)
        if not group.join():
            return False
        self.sync_group = group
        return True

    def receive_weights(self, plan, version: int) -> int:
        """Receive the buckets of `plan` from rank 0 of the sync group, then their CRC-32s, check each bucket's
        (while the next one arrives), and load them (`set_weights`: full weights, or LoRA adapters to merge); a
        corrupted bucket leaves the weights as they were."""
        from rlhf_ray.rollout.collective import checksum, unflatten

        if self.sync_group is None:
            raise RuntimeError(f"worker {self.worker_id} is in no weight-sync group")
        group, count = self.sync_group, len(plan.buckets)
        flats = [torch.empty(b.numel, dtype=getattr(torch, b.dtype)) for b in plan.buckets]
        expected = torch.empty(count, dtype=torch.int64)
        works = [group.start_receive(flat, tag) for tag, flat in enumerate(flats)]
        works.append(group.start_receive(expected, count))
        sums = []
        for flat, work in zip(flats, works):
            group.wait(work)
            sums.append(checksum(flat))  # while the next bucket arrives
        group.wait(works[-1])
        bad = [i for i, (got, sent) in enumerate(zip(sums, expected.tolist())) if got != sent]
        if bad:
            raise RuntimeError(f"worker {self.worker_id}: bucket {bad[0]} of policy version {version} arrived "
                               "corrupted (its CRC-32 differs from the learner's)")
        received: dict[str, torch.Tensor] = {}
        for bucket, flat in zip(plan.buckets, flats):
            received.update(unflatten(plan, bucket, flat))
        return self.set_weights(received, version)

    def weights_digest(self) -> str:
        return state_dict_digest(self.model.state_dict())

    def info(self) -> dict:
        """Who and where the worker is, once it is ready; its constructor's error if it could not start."""
        if self.start_error is not None:
            raise self.start_error
        return {"worker_id": self.worker_id, "pid": os.getpid(), "policy_version": self.policy_version,
                "node_id": ray.get_runtime_context().get_node_id(), "torch_threads": torch.get_num_threads()}


RemoteRolloutWorker = ray.remote(RolloutWorker)
