"""The transport of processes started by torchrun or srun: torch.distributed (RANK / WORLD_SIZE /
MASTER_ADDR in the environment), gloo for CPU tensors and NCCL for CUDA tensors. Under srun,
rank 0's rendezvous store listens on MASTER_ADDR only (store.py); under torchrun, the agent's.

    torchrun --nproc-per-node 2 -m <module>   # the module calls init_transport("auto")

CPU alltoall/allgather are tagged point-to-point messages over the data path the transport
holds (datapath.py: the same-host path when every rank is on this host, else gloo);
allreduce/broadcast/barrier are torch.distributed collectives ("cpu:gloo,cuda:nccl"), except the
CPU allreduce of two ranks of one host: their shared-memory segment (cpu.allreduce).
"""
from __future__ import annotations

import os
from datetime import timedelta

import torch

from deepimage.parallel.transport import cpu
from deepimage.parallel.transport.base import (Pending, Transport, check_data_path, comm_timeout_s,
                                               drop_own, into)
from deepimage.parallel.transport.datapath import CHOICES, DataPaths, blocking_pair
from deepimage.parallel.transport.store import env_store


class TorchTransport(Transport):
    """torch.distributed, as started by torchrun. CPU tensors: tagged point-to-point messages
    over `paths.current`; CUDA tensors: NCCL collectives."""

    name = "torchrun"

    def __init__(self, data_path: str = "auto"):
        import torch.distributed as dist

        check_data_path(data_path, CHOICES, "TorchTransport")
        self._owns_group = not dist.is_initialized()
        if self._owns_group:
            nccl = torch.cuda.is_available() and dist.is_nccl_available()
            # The timeout bounds every collective: a hung peer fails the job (train.comm_timeout_s).
            timeout = timedelta(seconds=comm_timeout_s())
            store = {}
            if "TORCHELASTIC_RUN_ID" not in os.environ:   # srun tasks: no agent holds a store
                rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
                store = {"store": env_store(rank, size, timeout), "rank": rank, "world_size": size}
            dist.init_process_group("cpu:gloo,cuda:nccl" if nccl else "gloo", timeout=timeout, **store)
        super().__init__(dist.get_rank(), dist.get_world_size())
        self.paths = DataPaths(self.rank, self.size, data_path)

    @property
    def data_path(self) -> str:
        """The path CPU messages take: "cma" (same host) or "gloo"."""
        return self.paths.current.name

    @property
    def data_path_note(self) -> str:
        return self.paths.note

    def use_data_path(self, data_path: str) -> None:
        """Switch CPU messages between the paths this transport opened (benchmarks compare them)."""
        self.paths.use(data_path)

    def _alltoall_async(self, tensor, splits, recv_splits, tag, include_self, out, lane):
        if tensor.is_cuda:
            return into(self._nccl_alltoall(tensor, splits, recv_splits, include_self), out)
        return cpu.alltoall(self, self.paths.current, tensor, splits, recv_splits, tag,
                            include_self, out, lane)

    def _allgather_async(self, tensor, sizes, out, tag, lane):
        if tensor.is_cuda:
            return self._nccl_allgather(tensor, sizes, out)
        return cpu.allgather(self, self.paths.current, tensor, sizes, out, tag, lane)

    def _allreduce(self, tensor, op):
        return cpu.allreduce(tensor, op, self.size, blocking_pair(self))

    def _broadcast(self, tensor, root):
        return cpu.broadcast(tensor, root)

    def _barrier(self):
        cpu.barrier()

    def _close(self) -> None:
        self.paths.close()
        cpu.release_group(self._owns_group)
        self._owns_group = False

    def _nccl_alltoall(self, tensor, splits, recv_splits, include_self):
        import torch.distributed as dist

        if recv_splits is None:
            got = torch.empty(self.size, dtype=torch.int64, device=tensor.device)
            dist.all_to_all_single(got, torch.tensor(splits, device=tensor.device))
            recv_splits = got.tolist()
        out = tensor.new_empty((sum(recv_splits), *tensor.shape[1:]))
        work = dist.all_to_all_single(out, tensor, output_split_sizes=list(recv_splits),
                                      input_split_sizes=splits, async_op=True)
        return Pending([work], lambda: out if include_self else drop_own(out, recv_splits, self.rank))

    def _nccl_allgather(self, tensor, sizes, out):
        import torch.distributed as dist

        if sizes is None:
            got = torch.empty(self.size, dtype=torch.int64, device=tensor.device)
            dist.all_gather_into_tensor(got, torch.tensor([tensor.shape[0]], device=tensor.device))
            sizes = got.tolist()
        # NCCL gathers equal blocks: pad every rank's rows to the largest, then drop the padding.
        rows = max(sizes)
        padded = tensor.new_zeros((rows, *tensor.shape[1:]))  # (b_r, ...) -> (rows, ...)
        padded[:tensor.shape[0]].copy_(tensor)
        blocks = tensor.new_empty((self.size * rows, *tensor.shape[1:]))  # (N * rows, ...)
        work = dist.all_gather_into_tensor(blocks, padded, async_op=True)

        def finish():
            parts = [blocks[r * rows:r * rows + n] for r, n in enumerate(sizes)]
            return torch.cat(parts, out=out) if out is not None else torch.cat(parts)

        return Pending([work], finish)
