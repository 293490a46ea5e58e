"""Collective weight sync (`rollout.sync: collective`): the learner's rank 0 sends the policy to the rollout
workers over a gloo process group of their own, in buckets, instead of through the object store.

The group is not torch.distributed's default group (the learner ranks have that one among themselves): it is a
`ProcessGroupGloo` over a `TCPStore` that rank 0 hosts, made for the pool's current members. When workers join
or leave (elasticity, faults), the next sync makes a new group with a new prefix and the members of the moment,
so a run never waits for a worker that is gone. The whole sync is bounded by `rollout.sync_timeout_s`, and a
wait that runs out names the workers that did not answer (a hung sync is the peers' most reported failure).

A sync: rank 0 sends each worker the plan (names, shapes, dtypes, buckets, the policy version) with a Ray call
that the worker answers after its last bucket; then it sends the buckets (each one flat tensor of one dtype),
making the next bucket and the CRC-32 of the last while gloo sends, and last the CRC-32s. Every worker checks
each bucket's CRC-32 while the next one arrives, loads what it received (or merges LoRA adapters, which are all
that travels under LoRA) and answers with its version.

On GPUs NCCL's broadcast would not grow with the number of workers; it is not here because no GPU has run it.
"""

from __future__ import annotations

import datetime
import socket
import time
import zlib
from dataclasses import dataclass

import torch

DEFAULT_BUCKET_BYTES = 64 << 20


@dataclass(frozen=True)
class TensorMeta:
    name: str
    shape: tuple[int, ...]
    dtype: str  # torch dtype name without "torch."


@dataclass(frozen=True)
class Bucket:
    dtype: str
    tensors: tuple[int, ...]  # indices into SyncPlan.tensors, in order
    numel: int


@dataclass(frozen=True)
class SyncPlan:
    version: int
    tensors: tuple[TensorMeta, ...]
    buckets: tuple[Bucket, ...]

    @property
    def nbytes(self) -> int:
        return sum(b.numel * torch.empty(0, dtype=getattr(torch, b.dtype)).element_size() for b in self.buckets)


def checksum(flat: torch.Tensor) -> int:
    """CRC-32 of a flat tensor's bytes (any dtype; a device tensor is copied to the host first): it changes with
    any changed, lost or reordered byte, at about 2.5 GB/s on one CPU core."""
    data = flat.detach().contiguous().view(torch.uint8).cpu().numpy()
    return zlib.crc32(memoryview(data))


def unique_tensors(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The state dict with each storage once (a tied weight travels under its first name)."""
    seen, kept = set(), {}
    for name, tensor in state_dict.items():
        key = (tensor.data_ptr(), tensor.dtype, tuple(tensor.shape), tuple(tensor.stride()))
        if not tensor.numel() or key not in seen:  # empty tensors share the address 0
            seen.add(key)
            kept[name] = tensor
    return kept


def plan_sync(state_dict: dict[str, torch.Tensor], version: int,
              bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> tuple[SyncPlan, list[torch.Tensor]]:
    """The plan of a sync: tensors grouped by dtype, in order, into buckets of at most `bucket_bytes` (a larger
    tensor alone); and the tensors, each storage once, that `bucket_tensor` flattens."""
    tensors = unique_tensors(state_dict)
    metas = tuple(TensorMeta(name, tuple(t.shape), str(t.dtype).removeprefix("torch.")) for name, t in tensors.items())
    values = [t.detach() for t in tensors.values()]
    buckets = []
    by_dtype: dict[str, list[int]] = {}
    for index, meta in enumerate(metas):
        by_dtype.setdefault(meta.dtype, []).append(index)
    for dtype, indices in by_dtype.items():
        current, size = [], 0
        for index in indices + [None]:
            nbytes = 0 if index is None else values[index].numel() * values[index].element_size()
            if current and (index is None or size + nbytes > bucket_bytes):
                buckets.append(Bucket(dtype, tuple(current), sum(values[i].numel() for i in current)))
                current, size = [], 0
            if index is not None:
                current.append(index)
                size += nbytes
    return SyncPlan(version, metas, tuple(buckets)), values


def bucket_tensor(bucket: Bucket, values: list[torch.Tensor]) -> torch.Tensor:
    """One bucket as one flat tensor: a view of a lone contiguous tensor, else a concatenation."""
    if len(bucket.tensors) == 1:
        return values[bucket.tensors[0]].reshape(-1)
    return torch.cat([values[i].reshape(-1) for i in bucket.tensors])


def unflatten(plan: SyncPlan, bucket: Bucket, flat: torch.Tensor) -> dict[str, torch.Tensor]:
    """The tensors of one received bucket, by name (views of `flat`)."""
    out, offset = {}, 0
    for index in bucket.tensors:
        meta = plan.tensors[index]
        numel = int(torch.Size(meta.shape).numel())
        out[meta.name] = flat[offset:offset + numel].view(meta.shape)
        offset += numel
    return out


class SyncGroup:
    """One member's handle on a stateless gloo process group: rank 0 hosts the store and sends.

    A group forms in two steps, so that no member ever waits inside gloo for one that is gone: every member
    marks its arrival in the store, and waits there until rank 0 says `go` (all arrived: then they connect,
    which takes milliseconds) or `abandon` (one died or did not come in time: they return at once, and rank 0
    makes a group of the others).

    Rank 0 sends each bucket to each member point to point, which is what a gloo broadcast does over TCP too
    (one copy per receiver from the root), so that a member that dies fails only its own transfer and one
    that hangs is named: a collective would fail, or wait for, everyone."""

    POLL_S = 0.005

    def __init__(self, host: str, port: int, rank: int, world: int, prefix: str, timeout_s: float):
        import torch.distributed as dist

        self.rank, self.world, self.prefix = rank, world, prefix
        self.timeout = datetime.timedelta(seconds=timeout_s)
        self.store = dist.TCPStore(host, port, world, rank == 0, timeout=self.timeout, wait_for_workers=False)
        self.group = None
        if rank:
            self.store.set(self._key(f"arrived/{rank}"), "1")

    def _key(self, what: str) -> str:
        return f"{self.prefix}/{what}"

    def missing(self) -> list[int]:
        """Rank 0: the ranks that have not arrived."""
        return [r for r in range(1, self.world) if not self.store.check([self._key(f"arrived/{r}")])]

    def decide(self, go: bool) -> None:
        """Rank 0: let the members connect, or send them home."""
        self.store.set(self._key("go" if go else "abandon"), "1")

    def join(self) -> bool:
        """A member: wait for rank 0's decision (within the timeout); connect if it is `go`. False if abandoned."""
        deadline = time.monotonic() + self.timeout.total_seconds()
        while not self.store.check([self._key("go")]):
            if self.store.check([self._key("abandon")]):
                return False
            if time.monotonic() > deadline:
                raise TimeoutError(f"weight-sync group {self.prefix}: rank 0 did not decide within "
                                   f"{self.timeout.total_seconds():g} s")
            time.sleep(self.POLL_S)
        self.connect()
        return True

    def connect(self) -> SyncGroup:
        """Make the gloo group; it forms when every member connects."""
        import torch.distributed as dist

        self.group = dist.ProcessGroupGloo(dist.PrefixStore(self.prefix, self.store), self.rank, self.world,
                                           self.timeout)
        return self

    def send(self, tensor: torch.Tensor, rank: int, tag: int):
        """Rank 0: start sending `tensor` to `rank`; the work to `wait(timedelta)` on."""
        return self.group.send([tensor], rank, tag)

    def start_receive(self, tensor: torch.Tensor, tag: int):
        """A member: start receiving rank 0's tensor `tag` into `tensor`; the work to `wait` for."""
        return self.group.recv([tensor], 0, tag)

    def wait(self, work) -> None:
        """Wait for a receive, within the group's timeout."""
        work.wait(self.timeout)


def remaining(deadline: float) -> datetime.timedelta:
    return datetime.timedelta(seconds=max(deadline - time.monotonic(), 0.05))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]
