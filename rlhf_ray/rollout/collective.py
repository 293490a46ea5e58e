"""Collective weight sync (`rollout.sync: collective`; the pool's side is `CollectiveSync`): the learner's rank 0 sends the policy to the rollout
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


class CollectiveSync:
    """A rollout pool's side of `rollout.sync: collective`: the group of the moment, made anew when the pool's
    ready workers change, and the sends of each sync from this process (rank 0)."""

    def __init__(self, pool):
        self.pool = pool
        self.group: SyncGroup | None = None
        self.members: list[str] | None = None  # the workers of ranks 1..n; None: the next sync makes a group
        self.generation = 0  # groups made so far (each has a prefix of its own)

    def send(self, state_dict: dict[str, torch.Tensor], version: int, bucket_bytes: int | None = None) -> None:
        """Send the weights to every ready worker, within `rollout.sync_timeout_s`. A worker that dies meanwhile is
        dropped from the pool (the others get the weights); one that holds the sync up is named."""
        from rlhf_ray.errors import WaitTimeout

        pool, limit = self.pool, self.pool.limits.sync_timeout_s
        deadline = time.monotonic() + limit
        plan, values = plan_sync(state_dict, version, bucket_bytes or DEFAULT_BUCKET_BYTES)
        while self.members != sorted(pool.workers):  # a member that died while it formed: once more
            if not pool.workers:
                return
            self._form(sorted(pool.workers), deadline)
        members = self.members
        calls = {pool.workers[w].receive_weights.remote(plan, version): w for w in members}
        failed: dict[str, str] = {}  # worker -> why a send to it failed
        received = dict.fromkeys(members, 0)  # worker -> buckets it has received
        pending: dict = {}  # the sends of the last bucket, waited for once the next one has started
        sums, sending = [], None  # the bucket gloo may still read from
        for tag, bucket in enumerate(plan.buckets):
            flat = bucket_tensor(bucket, values)
            started = self._start_sends(flat, tag, failed)
            sums.append(checksum(flat))  # while gloo sends
            self._wait_sends(pending, failed, received, deadline)
            pending, sending = started, flat
        self._wait_sends(pending, failed, received, deadline)
        del sending
        crc = torch.tensor(sums, dtype=torch.int64)
        self._wait_sends(self._start_sends(crc, len(sums), failed), failed, received, deadline)
        done, late = ray_wait(list(calls), deadline)
        errors: list[Exception] = []  # the workers' own (a corrupted bucket; a receive cut off by the others' failure)
        lost = pool._drop_lost({ref: calls[ref] for ref in done}, errors)
        if failed or lost or errors:
            self.members = None  # the next sync makes a new group
        late = [calls[ref] for ref in late if calls[ref] not in lost]
        if late:
            # who held the sync up: the workers that got the fewest buckets (the others waited behind them)
            hung = [w for w in late if received[w] == min(received[w] for w in late)]
            why = "; ".join(f"{w}: {failed[w]}" for w in hung if w in failed)
            behind = [w for w in late if w not in hung]
            raise WaitTimeout(f"weight sync (policy version {version}) did not finish within rollout.sync_timeout_s="
                              f"{limit:g} s: {pool.describe(hung)} did not receive the weights"
                              + (f" ({why})" if why else "")
                              + (f"; {', '.join(behind)} waited behind {'it' if len(hung) == 1 else 'them'}"
                                 if behind else ""))
        if errors:
            raise errors[0]

    def _start_sends(self, tensor: torch.Tensor, tag: int, failed: dict) -> dict:
        """Start sending `tensor` to every member that has not failed; {worker: work}."""
        from rlhf_ray.errors import one_line

        works = {}
        for rank, worker in enumerate(self.members, start=1):
            if worker not in failed:
                try:
                    works[worker] = self.group.send(tensor, rank, tag)
                except RuntimeError as err:  # its connection is gone: it died
                    failed[worker] = one_line(err)
        return works

    @staticmethod
    def _wait_sends(works: dict, failed: dict, received: dict, deadline: float) -> None:
        from rlhf_ray.errors import one_line

        for worker, work in works.items():
            try:
                work.wait(remaining(deadline))
                received[worker] += 1
            except RuntimeError as err:  # the worker died, or did not receive in time
                failed.setdefault(worker, one_line(err))

    def _form(self, members: list[str], deadline: float) -> None:
        """A new group of rank 0 (this process) and `members` (ranks 1..n). Members that die before they arrive
        are dropped from the pool and the group abandoned (the caller makes one of the others); members that do
        not arrive by `deadline` are named."""
        import ray

        from rlhf_ray.errors import WaitTimeout

        pool, limit = self.pool, self.pool.limits.sync_timeout_s
        self.group, self.members = None, None
        self.generation += 1
        host, port = ray.util.get_node_ip_address(), free_port()
        prefix, world = f"{pool.name}-sync-{self.generation}", len(members) + 1
        timeout = max(deadline - time.monotonic(), 0.1)
        group = SyncGroup(host, port, 0, world, prefix, timeout)
        calls = {pool.workers[w].join_sync_group.remote(host, port, rank, world, prefix, timeout): w
                 for rank, w in enumerate(members, start=1)}
        while group.missing():
            done, _ = ray.wait(list(calls), num_returns=len(calls), timeout=0.05)
            lost = pool._drop_lost({ref: calls[ref] for ref in done})
            if lost or time.monotonic() > deadline:
                group.decide(go=False)
                if lost:
                    return
                raise WaitTimeout(f"the weight-sync group did not form within rollout.sync_timeout_s={limit:g} s: "
                                  f"{pool.describe([members[r - 1] for r in group.missing()])} did not join")
        group.decide(go=True)
        group.connect()  # every member has arrived: milliseconds
        done, late = ray_wait(list(calls), deadline)
        if late:
            raise WaitTimeout(f"the weight-sync group did not form within rollout.sync_timeout_s={limit:g} s: "
                              f"{pool.describe([calls[r] for r in late])} did not join")
        if not pool._drop_lost({ref: calls[ref] for ref in done}):
            self.group, self.members = group, members


def ray_wait(refs: list, deadline: float) -> tuple[list, list]:
    """`ray.wait` for all of `refs` until `deadline` (`time.monotonic()`): (done, late)."""
    import ray

    return ray.wait(refs, num_returns=len(refs), timeout=max(deadline - time.monotonic(), 0))
