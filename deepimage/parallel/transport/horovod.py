"""The transport of processes started by horovodrun: rank and size from Horovod.

    horovodrun -np 2 python -m <module>   # the module calls init_transport("auto")

Which path each call takes (`_via_hvd`):
- CPU tensors (data_path "auto", "cma" or "gloo"): tagged point-to-point messages over the data
  path the transport holds (datapath.py), in a torch.distributed gloo group set up from
  Horovod's rendezvous (rank 0 opens a TCPStore and broadcasts its address with
  hvd.broadcast_object); allreduce/broadcast/barrier as gloo collectives. The store listens on
  loopback when every rank is on this host, else on the address of the interface the job uses
  (HOROVOD_GLOO_IFACE): never on every address of the host.
- CUDA tensors, and every tensor with data_path="horovod": Horovod's operations (hvd.alltoall /
  allgather / allreduce / broadcast / barrier; NCCL when Horovod was built with it).
"""
from __future__ import annotations

import os
import socket
from datetime import timedelta

import torch

from deepimage.parallel.transport import cpu
from deepimage.parallel.transport.base import (Pending, Transport, TransportError, check_data_path,
                                               comm_timeout_s, drop_own, into)
from deepimage.parallel.transport.datapath import CHOICES, DataPaths, blocking_pair
from deepimage.parallel.transport.store import listening_store


IDLE_CYCLE_MS = 100  # Horovod's cycle where no tensor goes through it (CPU data paths)


class HorovodTransport(Transport):
    """Processes started by horovodrun (see the module doc for which path carries what)."""

    name = "horovod"

    def __init__(self, data_path: str = "auto"):
        check_data_path(data_path, (*CHOICES, "horovod"), "HorovodTransport")
        import horovod.torch as hvd

        if data_path != "horovod" and not torch.cuda.is_available():
            # Horovod's background thread then carries nothing but the rendezvous, yet at its
            # default 1 ms cycle it negotiates with the other ranks every cycle, on the worker's
            # pinned core: 130 ms of CPU over 12 steps of the FC-heavy model at np=2 (~7 % of each
            # step); at 100 ms the step was 5-8 % shorter. HOROVOD_CYCLE_TIME set by the user wins.
            os.environ.setdefault("HOROVOD_CYCLE_TIME", str(IDLE_CYCLE_MS))
        hvd.init()
        self._hvd = hvd
        super().__init__(hvd.rank(), hvd.size())
        self._owns_group = False
        self.paths: DataPaths | None = None  # None: every byte through Horovod
        if data_path != "horovod":
            self._owns_group = self._init_gloo_group()
            # A group this transport did not create gets no second lane (lane 1 falls back to
            # the default group): opening one would be a collective its creator did not plan.
            self.paths = DataPaths(self.rank, self.size, data_path, second_lane=self._owns_group)

    def _init_gloo_group(self) -> bool:
        """Rank 0 opens a TCPStore; its address reaches the others by hvd.broadcast_object.
        Returns whether this created the group."""
        import torch.distributed as dist

        if dist.is_initialized():
            return False
        if os.environ.get("HOROVOD_GLOO_IFACE"):
            # The interface horovodrun found common to all hosts; gloo would guess otherwise.
            os.environ.setdefault("GLOO_SOCKET_IFNAME", os.environ["HOROVOD_GLOO_IFACE"])
        store, addr = None, None
        timeout = timedelta(seconds=comm_timeout_s())  # bounds every collective of the group
        if self.rank == 0:
            try:
                store, addr = listening_store(self._store_address(), 0, self.size, timeout)
            except TransportError as err:
                addr = str(err)  # every rank fails with it, none waits for a store that is not there
        addr = self._hvd.broadcast_object(addr, root_rank=0, name="deepimage.rendezvous")
        if isinstance(addr, str):
            raise TransportError(addr)
        host, port = addr
        if store is None:
            store = dist.TCPStore(host, port, self.size, is_master=False, timeout=timeout)
        dist.init_process_group("gloo", store=store, rank=self.rank, world_size=self.size,
                                timeout=timeout)
        return True

    def _store_address(self) -> str:
        """The address rank 0's store listens on and the others connect to."""
        if self._hvd.local_size() == self.size:
            return "127.0.0.1"
        iface = os.environ.get("HOROVOD_GLOO_IFACE")
        if iface:
            import psutil

            found = [a.address for a in psutil.net_if_addrs().get(iface, [])
                     if a.family == socket.AF_INET]
            if not found:
                raise TransportError(f"HOROVOD_GLOO_IFACE={iface}: no IPv4 address on that "
                                     f"interface of this host; name the interface the hosts share")
            return found[0]
        host = os.environ.get("HOROVOD_HOSTNAME") or socket.gethostname()
        try:
            address = socket.gethostbyname(host)
        except OSError as err:
            address, why = "", str(err)
        else:
            why = "a loopback address"
        if not address or address.startswith("127."):
            raise TransportError(f"rank 0's host name {host!r} resolves to {why}, which the other "
                                 f"hosts cannot reach: set HOROVOD_GLOO_IFACE to the network "
                                 f"interface the hosts share")
        return address

    @property
    def data_path(self) -> str:
        """The path CPU messages take: "cma" (same host), "gloo" or "horovod"."""
        return "horovod" if self.paths is None else self.paths.current.name

    @property
    def data_path_note(self) -> str:
        return "" if self.paths is None else self.paths.note

    def use_data_path(self, data_path: str) -> None:
        """Switch CPU messages between the paths this transport opened (benchmarks compare them)."""
        if self.paths is None:
            raise TransportError(f"use_data_path: {data_path!r} is not open here (data_path "
                                 f"'horovod': every byte goes through Horovod)")
        self.paths.use(data_path)

    def _via_hvd(self, tensor: torch.Tensor) -> bool:
        return self.paths is None or tensor.is_cuda

    def _name(self, what: str, tag: int) -> str:
        # Horovod matches operations across ranks by name; tags are the same on every rank.
        return f"deepimage.{what}.{tag}"

    def _alltoall_async(self, tensor, splits, recv_splits, tag, include_self, out, lane):
        if not self._via_hvd(tensor):
            return cpu.alltoall(self, self.paths.current, tensor, splits, recv_splits, tag,
                                include_self, out, lane)
        hvd = self._hvd
        handle = hvd.alltoall_async(tensor, torch.tensor(splits, dtype=torch.int32),
                                    name=self._name("alltoall", tag))

        def finish():
            rows, got = hvd.synchronize(handle)  # (rows, rows received from each rank)
            return rows if include_self else drop_own(rows, got.tolist(), self.rank)

        return into(Pending([], finish), out)

    def _allgather_async(self, tensor, sizes, out, tag, lane):
        if not self._via_hvd(tensor):
            return cpu.allgather(self, self.paths.current, tensor, sizes, out, tag, lane)
        hvd = self._hvd
        handle = hvd.allgather_async(tensor, name=self._name("allgather", tag))

        def finish():
            result = hvd.synchronize(handle)
            return out.copy_(result) if out is not None else result

        return Pending([], finish)

    def _allreduce(self, tensor, op):
        if not self._via_hvd(tensor):
            return cpu.allreduce(tensor, op, self.size, blocking_pair(self))
        hvd = self._hvd
        hop = {"sum": hvd.Sum, "average": hvd.Average, "max": hvd.Max}[op]
        return hvd.allreduce(tensor, op=hop, name=self._name("allreduce", self.reserve_tags(1)))

    def _broadcast(self, tensor, root):
        if not self._via_hvd(tensor):
            return cpu.broadcast(tensor, root)
        return self._hvd.broadcast(tensor, root_rank=root,
                                   name=self._name("broadcast", self.reserve_tags(1)))

    def _barrier(self):
        if self.paths is None:
            self._hvd.barrier()
        else:
            cpu.barrier()

    def _close(self) -> None:
        if self.paths is not None:
            self.paths.close()
        cpu.release_group(self._owns_group)
        self._owns_group = False
