"""An in-process stand-in for N ranks: one thread per rank, collectives meet at a barrier.

    from tests.fake_transport import run_ranks
    results = run_ranks(3, lambda t: t.allgather(torch.tensor([t.rank])))   # one result per rank

Each FakeTransport records what every call sends (`sent`: list of (op, bytes)), counted the way
deepimage.bench.split_fc counts real calls, so tests can check the arithmetic and the traffic of
collective code without launching processes.
"""
from __future__ import annotations

import threading
from typing import Any, Callable

import torch

from deepimage.parallel.transport import Done, Handle, Transport


class FakeGroup:
    """Shared slots and a barrier for `size` FakeTransports living in threads of one process."""

    def __init__(self, size: int, timeout: float = 60.0):
        self.size = size
        self.slots: list[Any] = [None] * size
        self.barrier = threading.Barrier(size, timeout=timeout)

    def exchange(self, rank: int, value: Any) -> list[Any]:
        """Publish `value`, wait for every rank, return all ranks' values in rank order."""
        self.slots[rank] = value
        self.barrier.wait()
        values = list(self.slots)
        self.barrier.wait()  # nobody overwrites a slot before everyone has read them
        return values


class FakeTransport(Transport):
    """One rank of a FakeGroup; the semantics of deepimage.parallel.transport.Transport (its
    public methods check the arguments, then call the hooks below). One connection: lane is
    accepted and ignored."""

    name = "fake"

    def __init__(self, group: FakeGroup, rank: int):
        super().__init__(rank, group.size)
        self.group = group
        self.sent: list[tuple[str, int]] = []

    def _alltoall_async(self, tensor, splits, recv_splits, tag, include_self, out, lane) -> Handle:
        pieces = tensor.split(splits)
        self.sent.append(("alltoall", sum(p.numel() * p.element_size()
                                          for j, p in enumerate(pieces) if j != self.rank)))
        received = [pieces_j[self.rank] for pieces_j in self.group.exchange(self.rank, pieces)]
        got = [r.shape[0] for r in received]
        if recv_splits is not None and list(recv_splits) != got:
            raise ValueError(f"alltoall: recv_splits {list(recv_splits)}, but ranks sent {got} rows")
        if not include_self:
            received[self.rank] = received[self.rank][:0]
        result = torch.cat(received)
        return Done(out.copy_(result) if out is not None else result.clone())

    def _allgather_async(self, tensor, sizes, out, tag, lane) -> Handle:
        self.sent.append(("allgather", tensor.numel() * tensor.element_size() * (self.size - 1)))
        parts = self.group.exchange(self.rank, tensor.clone())
        got = [p.shape[0] for p in parts]
        if sizes is not None and list(sizes) != got:
            raise ValueError(f"allgather: sizes {list(sizes)}, but ranks sent {got} rows")
        result = torch.cat(parts)
        return Done(out.copy_(result) if out is not None else result)

    def _allreduce(self, tensor: torch.Tensor, op: str) -> torch.Tensor:
        nbytes = tensor.numel() * tensor.element_size()
        self.sent.append(("allreduce", 2 * (self.size - 1) * nbytes // self.size))
        stacked = torch.stack(self.group.exchange(self.rank, tensor.clone()))  # (N, ...)
        if op == "max":
            return stacked.max(0).values
        total = stacked.sum(0)
        return total / self.size if op == "average" else total

    def _broadcast(self, tensor: torch.Tensor, root: int) -> torch.Tensor:
        if self.rank == root:
            self.sent.append(("broadcast", tensor.numel() * tensor.element_size() * (self.size - 1)))
        return self.group.exchange(self.rank, tensor.clone())[root].clone()

    def _barrier(self) -> None:
        self.group.exchange(self.rank, None)


def run_ranks(size: int, fn: Callable[[FakeTransport], Any], timeout: float = 60.0) -> list[Any]:
    """Run fn(transport) on `size` threads, one per rank; results in rank order. An exception on
    any rank breaks the barrier (so the others stop waiting) and is raised here."""
    group = FakeGroup(size, timeout)
    results: list[Any] = [None] * size
    errors: list[BaseException] = []

    def body(rank: int) -> None:
        try:
            results[rank] = fn(FakeTransport(group, rank))
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            errors.append(exc)
            group.barrier.abort()

    threads = [threading.Thread(target=body, args=(r,), daemon=True) for r in range(size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    real = [e for e in errors if not isinstance(e, threading.BrokenBarrierError)]
    if real or errors:
        raise (real or errors)[0]
    if any(t.is_alive() for t in threads):
        raise TimeoutError(f"run_ranks: a rank did not finish within {timeout} s")
    return results
