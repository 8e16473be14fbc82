"""The one-process transports: LocalTransport (one rank: every collective returns a copy of its
input) and MirrorTransport (rank 0 of N ranks that hold the same tensors, for profiling).

    from deepimage.parallel.transport import init_transport
    transport = init_transport("local")
"""
from __future__ import annotations

import torch

from deepimage.parallel.transport.base import Done, Transport, check_out


class LocalTransport(Transport):
    """One process, no process group: every collective returns (a copy of) its input."""

    name = "local"

    def __init__(self):
        super().__init__(rank=0, size=1)

    def _alltoall_async(self, tensor, splits, recv_splits, tag, include_self, out, lane):
        result = tensor if include_self else tensor[:0]
        return Done(result.clone() if out is None else check_out(out, result, "alltoall").copy_(result))

    def _allgather_async(self, tensor, sizes, out, tag, lane):
        return Done(tensor.clone() if out is None else out.copy_(tensor))

    def _allreduce(self, tensor, op):
        return tensor.clone()

    def _broadcast(self, tensor, root):
        return tensor.clone()

    def _barrier(self):
        pass


class MirrorTransport(Transport):
    """Rank 0 of `size` ranks that all hold this process's tensors, in one process: what a rank
    computes in a collective step, without the communication (deepimage.perfmodel profiles the
    split FC head's per-rank shard with it). allgather returns `size` copies; alltoall returns
    rank 0's rows from every rank; allreduce sums `size` copies (max and average: a copy)."""

    name = "mirror"

    def __init__(self, size: int):
        super().__init__(rank=0, size=size)

    def _alltoall_async(self, tensor, splits, recv_splits, tag, include_self, out, lane):
        mine = tensor[:splits[0]]
        result = torch.cat([mine] * (self.size if include_self else self.size - 1))
        return Done(result if out is None else check_out(out, result, "alltoall").copy_(result))

    def _allgather_async(self, tensor, sizes, out, tag, lane):
        result = torch.cat([tensor] * self.size)
        return Done(result if out is None else out.copy_(result))

    def _allreduce(self, tensor, op):
        return tensor * self.size if op == "sum" else tensor.clone()

    def _broadcast(self, tensor, root):
        return tensor.clone()

    def _barrier(self):
        pass
