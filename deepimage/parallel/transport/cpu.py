"""The CPU collectives of the gloo-backed transports (torch.py, horovod.py): alltoall and
allgather as tagged messages over a data path (datapath.py), written straight into the result
tensor; allreduce, broadcast and barrier as torch.distributed gloo collectives, except that
the allreduce of two ranks of one host goes through their shared-memory segment on the
caller's thread (`pair`: datapath.blocking_pair), 2-4 ms -> tens of microseconds per call.

    handle = cpu.alltoall(transport, paths.current, tensor, splits, recv_splits, tag, True, None, 0)

Arguments arrive checked by Transport's public methods.
"""
from __future__ import annotations

import torch

from deepimage.parallel.transport.base import (Pending, Transport, TransportError, check_out, check_sizes, offsets)
from deepimage.parallel.transport.datapath import DataPath


def fresh(like: torch.Tensor, shape) -> torch.Tensor:
    """A new receive buffer with its pages already mapped: one byte written per 4 KiB page
    here is cheaper than the kernel faulting each page in while it copies a message there."""
    out = like.new_empty(shape)
    if out.numel() * out.element_size() >= 2**18:
        out.view(-1).view(torch.uint8)[::4096].zero_()
    return out


def exchange_counts(t: Transport, path: DataPath, counts: list[int], tag: int) -> list[int]:
    """Send counts[j] to rank j; return what each rank sent here (one int per rank)."""
    mine = torch.tensor(counts, dtype=torch.int64)
    got = torch.empty(t.size, dtype=torch.int64)
    got[t.rank] = mine[t.rank]
    peers = [p for p in range(t.size) if p != t.rank]
    for work in path.send_recv([(mine[p:p + 1], p) for p in peers],
                               [(got[p:p + 1], p) for p in peers], tag):
        work.wait()
    return got.tolist()


def alltoall(t: Transport, path: DataPath, tensor, splits, recv_splits, tag, include_self, out,
             lane) -> Pending:
    """Transport.alltoall_async of a CPU tensor: one message per peer and direction."""
    if recv_splits is None:
        recv_splits = exchange_counts(t, path, splits, t.reserve_tags(1))
    recv_splits = list(recv_splits)
    me = t.rank
    if not include_self:
        recv_splits[me] = 0
    shape = (sum(recv_splits), *tensor.shape[1:])
    out = fresh(tensor, shape) if out is None else check_out(out, tensor, "alltoall", shape)
    so, ro = offsets(splits), offsets(recv_splits)
    if include_self:
        out[ro[me]:ro[me + 1]].copy_(tensor[so[me]:so[me + 1]])  # own rows never leave
    peers = [p for p in range(t.size) if p != me]
    works = path.send_recv([(tensor[so[p]:so[p + 1]], p) for p in peers],
                           [(out[ro[p]:ro[p + 1]], p) for p in peers], tag, lane)
    return Pending(works, lambda: out)


def allgather(t: Transport, path: DataPath, tensor, sizes, out, tag, lane) -> Pending:
    """Transport.allgather_async of a CPU tensor: this rank's rows to every peer."""
    if sizes is None:
        sizes = exchange_counts(t, path, [tensor.shape[0]] * t.size, t.reserve_tags(1))
        sizes = check_sizes(sizes, tensor, t.rank, t.size)
    shape = (sum(sizes), *tensor.shape[1:])
    out = fresh(tensor, shape) if out is None else check_out(out, tensor, "allgather", shape)
    off = offsets(sizes)
    me = t.rank
    mine = out[off[me]:off[me + 1]]
    if mine.data_ptr() != tensor.data_ptr() or mine.numel() == 0:
        mine.copy_(tensor)
    peers = [p for p in range(t.size) if p != me]
    works = path.send_recv([(tensor, p) for p in peers],
                           [(out[off[p]:off[p + 1]], p) for p in peers], tag, lane)
    return Pending(works, lambda: out)


# The pair path's dtypes: those whose sum, max and average give gloo's bits (a + b == b + a;
# half types are left to gloo, which rounds its own way).
PAIR_DTYPES = (torch.float32, torch.float64, torch.int32, torch.int64)


def allreduce(tensor: torch.Tensor, op: str, size: int, pair=None) -> torch.Tensor:
    """Transport.allreduce with torch.distributed (gloo on CPU, or NCCL for CUDA tensors), or
    through `pair` (shm.Pair of two ranks, datapath.blocking_pair) for a CPU tensor of
    PAIR_DTYPES: the same bits, without gloo's 2-4 ms per call on the loaded 2-core machine."""
    import torch.distributed as dist

    if op == "average" and not tensor.is_floating_point():
        raise TransportError(f"allreduce: op 'average' needs a floating tensor, got {tensor.dtype}")
    out = tensor.clone(memory_format=torch.contiguous_format)
    if pair is not None and not out.is_cuda and out.dtype in PAIR_DTYPES and out.numel():
        flat = out.view(-1)  # (*shape) -> (numel,), reduced in place
        pair.allreduce(flat, flat, op, pair.ticket(), _pair_reduce)
        return out
    dist.all_reduce(out, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return out.div_(size) if op == "average" else out


def _pair_reduce(mine: torch.Tensor, others: torch.Tensor, op: str, out: torch.Tensor) -> None:
    """out (S,) = mine (S,) op the partner's others (1, S): gloo's two-rank result, bit for bit
    (sum: a + b == b + a; average: that sum / 2 as allreduce divides it; max: either order)."""
    other = others[0]  # (1, S) -> (S,)
    if op == "max":
        torch.maximum(mine, other, out=out)
        return
    torch.add(mine, other, out=out)
    if op == "average":
        out.div_(2)


def broadcast(tensor: torch.Tensor, root: int) -> torch.Tensor:
    """Transport.broadcast with torch.distributed."""
    import torch.distributed as dist

    out = tensor.clone()
    dist.broadcast(out, src=root)
    return out


def barrier() -> None:
    import torch.distributed as dist

    dist.barrier()


def release_group(owned: bool) -> None:
    """Destroy the default process group if this transport created it."""
    import torch.distributed as dist

    if owned and dist.is_initialized():
        dist.destroy_process_group()
