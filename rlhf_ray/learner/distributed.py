"""Process-group helpers for learners that run as Ray Train workers (torch.distributed, gloo or NCCL).

Ray Train's `TorchTrainer` creates the default process group before the training function starts and
sets RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR and MASTER_PORT; DeepSpeed then adopts
that group. Nothing here imports DeepSpeed, so the functions work (and are testable) in one process too.
"""

from __future__ import annotations

import os
from typing import Any

import ray
import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def require_process_group() -> str:
    """The backend of the default process group; a clear error when there is none."""
    if not is_distributed():
        raise RuntimeError(
            "no torch.distributed process group: DeepSpeed engines must be created inside a Ray Train worker "
            "(TorchTrainer with TorchConfig(backend='gloo') on CPU, 'nccl' on GPU) or after "
            "torch.distributed.init_process_group()"
        )
    return dist.get_backend()


def barrier() -> None:
    """Wait for every rank (nothing to wait for in one process)."""
    if get_world_size() > 1:
        dist.barrier()


def broadcast_object(obj: Any) -> Any:
    """Rank 0's `obj` (any picklable object) on every rank; what the other ranks pass is ignored."""
    box = [obj if get_rank() == 0 else None]
    if get_world_size() > 1:
        dist.broadcast_object_list(box, src=0)
    return box[0]


def _all_reduce(tensor: torch.Tensor, op) -> torch.Tensor:
    """`op` of `tensor` over all ranks, as a new tensor (the input is left alone)."""
    total = tensor.detach().clone()
    if get_world_size() > 1:
        dist.all_reduce(total, op=op)
    return total


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """The sum of `tensor` over all ranks (a new tensor; the input is left alone)."""
    return _all_reduce(tensor, dist.ReduceOp.SUM)


def all_reduce_max(tensor: torch.Tensor) -> torch.Tensor:
    """The maximum of `tensor` over all ranks (a new tensor; the input is left alone)."""
    return _all_reduce(tensor, dist.ReduceOp.MAX)


class Reducer:
    """Sums, maxima and means over the data-parallel ranks; this base class is the single-process identity.

    Code that must run both in one process (the reference computations in the tests) and sharded over
    Ray Train ranks takes a `Reducer`; `DistributedReducer` is the real one.
    """

    world_size = 1
    rank = 0

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def max(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def mean(self, total: torch.Tensor | float, count: torch.Tensor | float) -> float:
        """The mean over all ranks of sums `total` over `count` items each (float64; no items: 0)."""
        sums = self.sum(torch.tensor([float(total), float(count)], dtype=torch.float64))
        return float(sums[0] / sums[1].clamp(min=1))


class DistributedReducer(Reducer):
    """Reduces over the default process group (Ray Train's), whatever its size when called."""

    @property
    def world_size(self) -> int:
        return get_world_size()

    @property
    def rank(self) -> int:
        return get_rank()

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        return all_reduce_sum(tensor)

    def max(self, tensor: torch.Tensor) -> torch.Tensor:
        return all_reduce_max(tensor)


def global_mean(total: torch.Tensor | float, count: torch.Tensor | float) -> float:
    """The mean over all ranks of sums `total` over `count` items each."""
    return DistributedReducer().mean(total, count)


def global_token_mean_loss(per_token: torch.Tensor, mask: torch.Tensor, total_tokens: torch.Tensor | float | None = None,
                           gradient_accumulation_steps: int = 1) -> torch.Tensor:
    """This rank's share of a masked mean over every token of the step, pre-scaled for DeepSpeed.

    DeepSpeed averages gradients over the data-parallel ranks, and `engine.backward` divides the loss by
    `gradient_accumulation_steps`. A rank whose micro-batch loss is
    `sum(per_token * mask) / total_tokens * world_size * gradient_accumulation_steps` therefore ends the
    step with the gradient of `sum over all ranks and micro-batches / total_tokens`: the token mean of the
    whole batch, whatever the number of tokens on each rank. A plain per-rank `masked_mean` would weight
    every rank equally instead, which differs as soon as ranks hold different numbers of response tokens.

    `total_tokens` is the number of mask tokens in the whole step (all ranks, all micro-batches); when it is
    None it is all-reduced from this micro-batch's mask, which is right only without gradient accumulation.
    The returned value is for `backward`; its number is not the global mean (log `all_reduce_sum` of sums).
    """
    if total_tokens is None:
        total_tokens = all_reduce_sum(mask.sum().to(torch.float64)).item()
    scale = get_world_size() * gradient_accumulation_steps / max(float(total_tokens), 1.0)
    return (per_token * mask).sum() * scale


def use_worker_cpus(cpus: int, use_gpu: bool, threads: int | None = None, node_is_idle: bool = False) -> int:
    """Set this learner rank's torch threads on CPU, and return them (Ray sets OMP_NUM_THREADS=1 in workers).

    `threads` when given; else, when nothing else computes on the node while the rank does (`node_is_idle`:
    rollouts that do not overlap the update wait for it, and a supervised stage runs alone), the node's Ray
    CPUs shared among the learner ranks on it, since a rank held to its own `cpus` Ray CPUs would leave the
    rollout workers' cores idle through every update; else its `cpus`. Never more than the cores this
    process may run on (a local Ray may count more logical CPUs than the machine has).
    """
    if use_gpu:
        return torch.get_num_threads()
    if threads is None:
        threads = cpus
        if node_is_idle and ray.is_initialized():
            node = ray.get_runtime_context().get_node_id()
            node_cpus = next((n["Resources"].get("CPU", 0) for n in ray.nodes() if n["NodeID"] == node), 0)
            cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
            threads = max(cpus, min(int(node_cpus), cores) // max(1, local_world_size()))
    torch.set_num_threads(threads)
    return threads


def local_world_size() -> int:
    """Learner ranks on this node (LOCAL_WORLD_SIZE, which Ray Train sets; 1 outside it)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


def deepspeed_worker_env(use_gpu: bool) -> dict[str, str]:
    """Environment for Ray Train workers (`RunConfig(worker_runtime_env={"env_vars": ...})`).

    DeepSpeed picks its accelerator once, when it is first imported; on a machine with CUDA, CPU workers
    (use_gpu=False) would otherwise get the CUDA accelerator and a gloo group that does not match it.
    """
    return {"DS_ACCELERATOR": "cuda" if use_gpu else "cpu"}

