"""One small interface to the collectives the parallel code needs, with one implementation per
launcher: Horovod (launched by `horovodrun`) and torch.distributed (launched by `torchrun`;
gloo on CPU, NCCL on GPU). The butterfly all-reduce and the split FC layers are written once
over `Transport`; nothing else in deepimage imports horovod or torch.distributed directly.

    transport = init_transport("auto")   # picks from the launcher's environment variables

What carries the bytes (measured on the 2-core development machine, 2 processes, 16 MiB
float32: hvd.allreduce 60 ms, hvd.alltoall 15 ms, hvd.allgather of 8 MiB 25 ms; torch gloo
all_reduce 17 ms, all_to_all_single 10 ms, one isend/irecv exchange of 8 MiB 8 ms):

- CPU tensors, both launchers: tagged point-to-point messages written straight into the
  result tensor. When every rank is on this host (data_path "auto", the default), each message
  is one kernel copy from the sender's tensor into the receiver's (cma.py: 16 MiB all-reduce
  several times faster than over TCP); otherwise, or with data_path="gloo", isend/irecv of a
  torch.distributed gloo process group. Under horovodrun, Horovod supplies rank, size and the
  rendezvous (rank 0 opens a TCPStore and broadcasts its address with hvd.broadcast_object);
  Horovod's own collectives are not used for CPU bytes unless HorovodTransport(
  data_path="horovod") asks for them. `transport.data_path` says which path is in use.
- CUDA tensors: NCCL. torchrun: torch.distributed's NCCL backend ("cpu:gloo,cuda:nccl");
  horovodrun: Horovod's operations (NCCL when Horovod was built with it).

Threads: alltoall/allgather are tagged point-to-point messages whose tags are reserved, in
call order, when the call is made; they may then complete on any thread (the butterfly's
progress thread does). allreduce/broadcast/barrier are ordinary collectives: call them from one
thread, in the same order on every rank.

Lanes: gloo sends the messages between two ranks over one connection, in order. lane=1 puts a
message on a second gloo group (its own connections), so urgent traffic (the first layers'
gradients, needed first by the next forward) does not queue behind bulk traffic on lane 0.
"""
from __future__ import annotations

import abc
import os
import threading
from typing import Callable, Sequence

import torch

KINDS = ("auto", "horovod", "torchrun", "local")
REDUCE_OPS = ("sum", "average", "max")
_TAG_SPACE = 2**31 - 1  # gloo tags are C ints


class TransportError(ValueError):
    """Bad arguments to a collective (names the argument and the values seen)."""


class Handle(abc.ABC):
    """An operation in flight; `wait()` returns its result tensor."""

    @abc.abstractmethod
    def wait(self) -> torch.Tensor: ...


class Done(Handle):
    """A handle whose result is already there."""

    def __init__(self, result: torch.Tensor):
        self._result = result

    def wait(self) -> torch.Tensor:
        return self._result


class Pending(Handle):
    """Waits for torch.distributed works (or Horovod handles via `finish`), then returns once."""

    def __init__(self, works: list, finish: Callable[[], torch.Tensor]):
        self._works, self._finish, self._result = works, finish, None

    def wait(self) -> torch.Tensor:
        if self._result is None:
            for work in self._works:
                work.wait()
            self._works = []
            self._result = self._finish()
        return self._result


class Transport(abc.ABC):
    """Collectives over `size` processes. Tensors are contiguous; dim 0 is the split axis.

    Every rank must call each collective in the same order with matching shapes/splits.
    """

    name: str = "abstract"
    rank: int = 0
    size: int = 1

    _next_tag = 0  # class defaults: implementations need not call Transport.__init__

    @abc.abstractmethod
    def alltoall_async(self, tensor: torch.Tensor, splits: Sequence[int], *,
                       recv_splits: Sequence[int] | None = None, tag: int | None = None,
                       include_self: bool = True, out: torch.Tensor | None = None,
                       lane: int = 0) -> Handle:
        """Send rows splits[j] (in order) of `tensor` to rank j; the result concatenates, in
        rank order, the rows every rank sent to this one (so its dim 0 may differ per rank).

        recv_splits (rows from each rank), when the caller knows them, saves one exchange of
        counts; tag, from reserve_tags(), lets the call be made out of order across threads;
        include_self=False leaves this rank's own rows out of the result (no copy of them);
        out: where to write the result (a contiguous tensor of exactly its shape);
        lane 1: a second connection, so a message is not queued behind lane 0's bulk traffic."""

    @abc.abstractmethod
    def allgather_async(self, tensor: torch.Tensor, *, sizes: Sequence[int] | None = None,
                        out: torch.Tensor | None = None, tag: int | None = None,
                        lane: int = 0) -> Handle:
        """Concatenate every rank's `tensor` along dim 0, in rank order (dim 0 may differ).

        sizes: every rank's dim 0 when known (saves an exchange); out: where to write it;
        tag and lane as for alltoall_async."""

    @abc.abstractmethod
    def allreduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """Element-wise reduce over ranks, op in {"sum", "average", "max"}; for small tensors."""

    @abc.abstractmethod
    def broadcast(self, tensor: torch.Tensor, root: int = 0) -> torch.Tensor:
        """Return root's `tensor` on every rank."""

    @abc.abstractmethod
    def barrier(self) -> None: ...

    def allgather(self, tensor: torch.Tensor) -> torch.Tensor:
        return self.allgather_async(tensor).wait()

    def alltoall(self, tensor: torch.Tensor, splits: Sequence[int]) -> torch.Tensor:
        return self.alltoall_async(tensor, splits).wait()

    def reserve_tags(self, n: int) -> int:
        """First of `n` consecutive message tags; every rank gets the same ones in call order."""
        with self.__dict__.setdefault("_tag_lock", threading.Lock()):  # setdefault is atomic
            first = self._next_tag
            self._next_tag = (self._next_tag + n) % _TAG_SPACE
        return first

    def on_shutdown(self, closer: Callable[[], None]) -> None:
        """Run `closer` before the process group goes (e.g. stop a progress thread)."""
        self.__dict__.setdefault("_closers", []).append(closer)

    def shutdown(self) -> None:
        """Release the process group (idempotent)."""
        closers, self._closers = self.__dict__.get("_closers", []), []
        for closer in closers:
            closer()
        _forget(self)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(rank={self.rank}, size={self.size})"


# ---------------------------------------------------------------------------------------------
# Argument checks shared by the implementations


def _check_rows(tensor: torch.Tensor, what: str) -> None:
    if tensor.dim() == 0:
        raise TransportError(f"{what}: tensor must have a dim 0 to split, got a 0-d tensor")
    if not tensor.is_contiguous():
        raise TransportError(f"{what}: tensor must be contiguous (call .contiguous() first)")


def _check_counts(counts: Sequence[int], size: int, name: str, what: str,
                  total: int | None = None) -> list[int]:
    counts = [int(c) for c in counts]
    if len(counts) != size or any(c < 0 for c in counts):
        raise TransportError(f"{what}: {name} must list {size} non-negative row counts, got {counts}")
    if total is not None and sum(counts) != total:
        raise TransportError(f"{what}: {name} {counts} sum to {sum(counts)}, but the tensor has "
                             f"{total} rows")
    return counts


def _check_sizes(sizes: Sequence[int], tensor: torch.Tensor, rank: int, size: int) -> list[int]:
    sizes = _check_counts(sizes, size, "sizes", "allgather")
    if sizes[rank] != tensor.shape[0]:
        raise TransportError(f"allgather: sizes[{rank}] = {sizes[rank]} but this rank's tensor "
                             f"has {tensor.shape[0]} rows")
    return sizes


def _check_lane(lane: int) -> None:
    if lane not in (0, 1):
        raise TransportError(f"lane must be 0 or 1, got {lane!r}")


def _check_data_path(data_path: str, allowed: tuple[str, ...], who: str) -> None:
    if data_path not in allowed:
        raise TransportError(f"{who}: data_path must be one of {allowed}, got {data_path!r}")


def _check_op(op: str) -> None:
    if op not in REDUCE_OPS:
        raise TransportError(f"allreduce: op must be one of {REDUCE_OPS}, got {op!r}")


def _check_out(out: torch.Tensor, like: torch.Tensor, what: str, shape=None) -> torch.Tensor:
    shape = tuple(like.shape) if shape is None else tuple(shape)
    if tuple(out.shape) != shape or out.dtype != like.dtype or not out.is_contiguous():
        raise TransportError(f"{what}: out must be a contiguous {like.dtype} tensor of shape "
                             f"{shape}, got {out.dtype} {tuple(out.shape)}")
    return out


def _into(handle: Handle, out: torch.Tensor | None) -> Handle:
    """`handle`, its result copied into `out` when one is given (paths that cannot write there)."""
    if out is None:
        return handle

    def finish():
        result = handle.wait()
        return _check_out(out, result, "alltoall").copy_(result)

    return Pending([], finish)


def _drop_own(out: torch.Tensor, recv_splits: Sequence[int], rank: int) -> torch.Tensor:
    """The alltoall result without the rows this rank sent to itself."""
    off = _offsets(recv_splits)
    return torch.cat([out[:off[rank]], out[off[rank + 1]:]])


def _fresh(like: torch.Tensor, shape) -> torch.Tensor:
    """A new receive buffer with its pages already mapped: one byte written per 4 KiB page
    here is cheaper than the kernel faulting each page in while it copies a message there."""
    out = like.new_empty(shape)
    if out.numel() * out.element_size() >= 2**18:
        out.view(-1).view(torch.uint8)[::4096].zero_()
    return out


def _offsets(counts: Sequence[int]) -> list[int]:
    out = [0]
    for c in counts:
        out.append(out[-1] + c)
    return out


# ---------------------------------------------------------------------------------------------


class LocalTransport(Transport):
    """One process, no process group: every collective returns (a copy of) its input."""

    name = "local"

    def alltoall_async(self, tensor, splits, *, recv_splits=None, tag=None, include_self=True,
                       out=None, lane=0):
        _check_rows(tensor, "alltoall")
        _check_lane(lane)
        _check_counts(splits, 1, "splits", "alltoall", tensor.shape[0])
        result = tensor if include_self else tensor[:0]
        return Done(result.clone() if out is None else _check_out(out, result, "alltoall").copy_(result))

    def allgather_async(self, tensor, *, sizes=None, out=None, tag=None, lane=0):
        _check_rows(tensor, "allgather")
        _check_lane(lane)
        if sizes is not None:
            sizes = _check_sizes(sizes, tensor, self.rank, self.size)
        if out is None:
            return Done(tensor.clone())
        return Done(out.copy_(tensor))

    def allreduce(self, tensor, op="sum"):
        _check_op(op)
        return tensor.clone()

    def broadcast(self, tensor, root=0):
        if root != 0:
            raise TransportError(f"broadcast: root must be 0 with one process, got {root}")
        return tensor.clone()

    def barrier(self):
        pass


class _GlooP2P(Transport):
    """Bulk CPU bytes as tagged gloo isend/irecv, straight into the result tensor.

    Two lanes: the default group, and a second gloo group with its own connections, so that
    urgent messages (the first layers' gradients, needed first) overtake queued bulk ones."""

    _lanes: list = [None]
    _cma = None  # cma.Channels when CPU messages take the same-host path
    data_path = "gloo"
    data_path_note = ""  # why "auto" kept gloo

    def _open_lanes(self) -> None:
        """Create lane 1 (a collective: every rank, once, right after the process group)."""
        import torch.distributed as dist

        self._lanes = [None, dist.new_group(backend="gloo")]

    def _open_data_path(self, data_path: str) -> None:
        """Collective, after the process group: "auto" takes the same-host path (cma.py) when
        every rank can use it and keeps gloo otherwise; "cma" insists; "gloo" keeps gloo."""
        import torch.distributed as dist

        from deepimage.parallel import cma

        self.data_path = "gloo"
        if data_path == "gloo" or self.size == 1:
            return

        def gather(obj):
            out = [None] * self.size
            dist.all_gather_object(out, obj)
            return out

        channels, why = cma.open_channels(self.rank, self.size, gather)
        if channels is None:
            if data_path == "cma":
                raise TransportError(f"data_path 'cma' is not available: {why}")
            self.data_path_note = f"same-host path unavailable, gloo kept: {why}"
            return
        self._cma, self.data_path = channels, "cma"

    def use_data_path(self, data_path: str) -> None:
        """Switch CPU messages between the paths this transport opened (benchmarks compare them)."""
        if (data_path not in ("cma", "gloo") or (data_path == "cma" and self._cma is None)
                or self.data_path == "horovod"):
            raise TransportError(f"use_data_path: {data_path!r} is not open here (open: "
                                 f"{['gloo'] + (['cma'] if self._cma is not None else [])})")
        self.data_path = data_path

    def shutdown(self) -> None:
        """Stop the closers, the same-host path, then the process group if this opened it."""
        import torch.distributed as dist

        super().shutdown()
        if self._cma is not None:
            self._cma.close()
            self._cma = None
        if getattr(self, "_owns_group", False) and dist.is_initialized():
            dist.destroy_process_group()
        self._owns_group = False

    def _send_recv(self, sends, recvs, tag, lane=0):
        """Post (tensor, peer) sends and receives with one tag; return their works."""
        import torch.distributed as dist

        if self.data_path == "cma":  # one connection per pair, no queue: lanes do not apply
            works = [self._cma.irecv(t, peer, tag) for t, peer in recvs if t.numel()]
            return works + [self._cma.isend(t, peer, tag) for t, peer in sends if t.numel()]
        group = self._lanes[lane] if lane < len(self._lanes) else None
        works = [dist.isend(t, peer, group=group, tag=tag) for t, peer in sends if t.numel()]
        works += [dist.irecv(t, peer, group=group, tag=tag) for t, peer in recvs if t.numel()]
        return works

    def _exchange_counts(self, counts: list[int], tag: int) -> list[int]:
        """Send counts[j] to rank j; return what each rank sent here (one int per rank)."""
        mine = torch.tensor(counts, dtype=torch.int64)
        got = torch.empty(self.size, dtype=torch.int64)
        got[self.rank] = mine[self.rank]
        peers = [p for p in range(self.size) if p != self.rank]
        for work in self._send_recv([(mine[p:p + 1], p) for p in peers],
                                    [(got[p:p + 1], p) for p in peers], tag):
            work.wait()
        return got.tolist()

    def _p2p_alltoall(self, tensor, splits, recv_splits, tag, include_self, out, lane):
        if recv_splits is None:
            recv_splits = self._exchange_counts(splits, self.reserve_tags(1))
        recv_splits = _check_counts(recv_splits, self.size, "recv_splits", "alltoall")
        me = self.rank
        if not include_self:
            recv_splits[me] = 0
        shape = (sum(recv_splits), *tensor.shape[1:])
        out = _fresh(tensor, shape) if out is None else _check_out(out, tensor, "alltoall", shape)
        so, ro = _offsets(splits), _offsets(recv_splits)
        if include_self:
            out[ro[me]:ro[me + 1]].copy_(tensor[so[me]:so[me + 1]])  # own rows never leave
        peers = [p for p in range(self.size) if p != me]
        works = self._send_recv([(tensor[so[p]:so[p + 1]], p) for p in peers],
                                [(out[ro[p]:ro[p + 1]], p) for p in peers], tag, lane)
        return Pending(works, lambda: out)

    def _p2p_allgather(self, tensor, sizes, out, tag, lane):
        if sizes is None:
            sizes = self._exchange_counts([tensor.shape[0]] * self.size, self.reserve_tags(1))
        sizes = _check_sizes(sizes, tensor, self.rank, self.size)
        shape = (sum(sizes), *tensor.shape[1:])
        out = _fresh(tensor, shape) if out is None else _check_out(out, tensor, "allgather", shape)
        off = _offsets(sizes)
        me = self.rank
        mine = out[off[me]:off[me + 1]]
        if mine.data_ptr() != tensor.data_ptr() or mine.numel() == 0:
            mine.copy_(tensor)
        peers = [p for p in range(self.size) if p != me]
        works = self._send_recv([(tensor, p) for p in peers],
                                [(out[off[p]:off[p + 1]], p) for p in peers], tag, lane)
        return Pending(works, lambda: out)

    def _dist_allreduce(self, tensor, op):
        import torch.distributed as dist

        _check_op(op)
        if op == "average" and not tensor.is_floating_point():
            raise TransportError(f"allreduce: op 'average' needs a floating tensor, got {tensor.dtype}")
        out = tensor.clone()
        dist.all_reduce(out, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
        return out.div_(self.size) if op == "average" else out

    def _dist_broadcast(self, tensor, root):
        import torch.distributed as dist

        if not 0 <= root < self.size:
            raise TransportError(f"broadcast: root must be in [0, {self.size}), got {root}")
        out = tensor.clone()
        dist.broadcast(out, src=root)
        return out


class TorchTransport(_GlooP2P):
    """torch.distributed, as started by torchrun (RANK / WORLD_SIZE / MASTER_ADDR in the env).

    CPU tensors: tagged gloo point-to-point; CUDA tensors: NCCL collectives."""

    name = "torchrun"

    def __init__(self, data_path: str = "auto"):
        import torch.distributed as dist

        _check_data_path(data_path, ("auto", "cma", "gloo"), "TorchTransport")
        self._owns_group = not dist.is_initialized()
        if self._owns_group:
            nccl = torch.cuda.is_available() and dist.is_nccl_available()
            dist.init_process_group("cpu:gloo,cuda:nccl" if nccl else "gloo")
        self.rank, self.size = dist.get_rank(), dist.get_world_size()
        self._open_lanes()
        self._open_data_path(data_path)

    def alltoall_async(self, tensor, splits, *, recv_splits=None, tag=None, include_self=True,
                       out=None, lane=0):
        _check_rows(tensor, "alltoall")
        _check_lane(lane)
        splits = _check_counts(splits, self.size, "splits", "alltoall", tensor.shape[0])
        if tensor.is_cuda:
            return _into(self._nccl_alltoall(tensor, splits, recv_splits, include_self), out)
        return self._p2p_alltoall(tensor, splits, recv_splits,
                                  self.reserve_tags(1) if tag is None else tag, include_self, out, lane)

    def allgather_async(self, tensor, *, sizes=None, out=None, tag=None, lane=0):
        _check_rows(tensor, "allgather")
        _check_lane(lane)
        if sizes is not None:
            sizes = _check_sizes(sizes, tensor, self.rank, self.size)
        if tensor.is_cuda:
            return self._nccl_allgather(tensor, sizes, out)
        return self._p2p_allgather(tensor, sizes, out, self.reserve_tags(1) if tag is None else tag,
                                   lane)

    def allreduce(self, tensor, op="sum"):
        return self._dist_allreduce(tensor, op)

    def broadcast(self, tensor, root=0):
        return self._dist_broadcast(tensor, root)

    def barrier(self):
        import torch.distributed as dist

        dist.barrier()

    def _nccl_alltoall(self, tensor, splits, recv_splits, include_self):
        import torch.distributed as dist

        if recv_splits is None:
            got = torch.empty(self.size, dtype=torch.int64, device=tensor.device)
            dist.all_to_all_single(got, torch.tensor(splits, device=tensor.device))
            recv_splits = got.tolist()
        out = tensor.new_empty((sum(recv_splits), *tensor.shape[1:]))
        work = dist.all_to_all_single(out, tensor, output_split_sizes=list(recv_splits),
                                      input_split_sizes=splits, async_op=True)
        return Pending([work], lambda: out if include_self else _drop_own(out, recv_splits, self.rank))

    def _nccl_allgather(self, tensor, sizes, out):
        import torch.distributed as dist

        if sizes is None:
            got = torch.empty(self.size, dtype=torch.int64, device=tensor.device)
            dist.all_gather_into_tensor(got, torch.tensor([tensor.shape[0]], device=tensor.device))
            sizes = got.tolist()
        # NCCL gathers equal blocks: pad every rank's rows to the largest, then drop the padding.
        rows = max(sizes)
        padded = tensor.new_zeros((rows, *tensor.shape[1:]))
        padded[:tensor.shape[0]].copy_(tensor)
        blocks = tensor.new_empty((self.size * rows, *tensor.shape[1:]))
        work = dist.all_gather_into_tensor(blocks, padded, async_op=True)

        def finish():
            parts = [blocks[r * rows:r * rows + n] for r, n in enumerate(sizes)]
            return torch.cat(parts, out=out) if out is not None else torch.cat(parts)

        return Pending([work], finish)


class HorovodTransport(_GlooP2P):
    """Processes started by horovodrun: rank and size from Horovod.

    CPU bytes travel as point-to-point messages of a torch.distributed gloo group set up from
    Horovod's rendezvous, and with data_path "auto" (default) or "cma" over the same-host path
    when every rank is on this host (see the module doc); CUDA tensors go through Horovod's
    operations. data_path="horovod": every byte through Horovod's operations (hvd.alltoall /
    allgather / allreduce / broadcast / barrier)."""

    name = "horovod"

    def __init__(self, data_path: str = "auto"):
        _check_data_path(data_path, ("auto", "cma", "gloo", "horovod"), "HorovodTransport")
        import horovod.torch as hvd

        hvd.init()
        self._hvd = hvd
        self.rank, self.size = hvd.rank(), hvd.size()
        self._owns_group = False
        if data_path == "horovod":
            self.data_path = "horovod"
        else:
            self._init_gloo_group()
            self._open_data_path(data_path)

    def _init_gloo_group(self):
        """Rank 0 opens a TCPStore; its address reaches the others by hvd.broadcast_object."""
        import torch.distributed as dist

        if dist.is_initialized():
            return
        if os.environ.get("HOROVOD_GLOO_IFACE"):
            # The interface horovodrun found common to all hosts; gloo would guess otherwise.
            os.environ.setdefault("GLOO_SOCKET_IFNAME", os.environ["HOROVOD_GLOO_IFACE"])
        store, addr = None, None
        if self.rank == 0:
            store = dist.TCPStore("0.0.0.0", 0, self.size, is_master=True, wait_for_workers=False)
            addr = (os.environ.get("HOROVOD_HOSTNAME") or "127.0.0.1", store.port)
        host, port = self._hvd.broadcast_object(addr, root_rank=0, name="deepimage.rendezvous")
        if store is None:
            store = dist.TCPStore(host, port, self.size, is_master=False)
        dist.init_process_group("gloo", store=store, rank=self.rank, world_size=self.size)
        self._owns_group = True
        self._open_lanes()

    def _via_hvd(self, tensor: torch.Tensor) -> bool:
        return self.data_path == "horovod" or tensor.is_cuda

    def _name(self, what: str, tag: int | None) -> str:
        # Horovod matches operations across ranks by name; tags are the same on every rank.
        return f"deepimage.{what}.{self.reserve_tags(1) if tag is None else tag}"

    def alltoall_async(self, tensor, splits, *, recv_splits=None, tag=None, include_self=True,
                       out=None, lane=0):
        _check_rows(tensor, "alltoall")
        _check_lane(lane)
        splits = _check_counts(splits, self.size, "splits", "alltoall", tensor.shape[0])
        if not self._via_hvd(tensor):
            return self._p2p_alltoall(tensor, splits, recv_splits,
                                      self.reserve_tags(1) if tag is None else tag, include_self,
                                      out, lane)
        hvd = self._hvd
        handle = hvd.alltoall_async(tensor, torch.tensor(splits, dtype=torch.int32),
                                    name=self._name("alltoall", tag))

        def finish():
            rows, got = hvd.synchronize(handle)  # (rows, rows received from each rank)
            return rows if include_self else _drop_own(rows, got.tolist(), self.rank)

        return _into(Pending([], finish), out)

    def allgather_async(self, tensor, *, sizes=None, out=None, tag=None, lane=0):
        _check_rows(tensor, "allgather")
        _check_lane(lane)
        if sizes is not None:
            sizes = _check_sizes(sizes, tensor, self.rank, self.size)
        if not self._via_hvd(tensor):
            return self._p2p_allgather(tensor, sizes, out, self.reserve_tags(1) if tag is None else tag,
                                       lane)
        hvd = self._hvd
        handle = hvd.allgather_async(tensor, name=self._name("allgather", tag))

        def finish():
            result = hvd.synchronize(handle)
            return out.copy_(result) if out is not None else result

        return Pending([], finish)

    def allreduce(self, tensor, op="sum"):
        if not self._via_hvd(tensor):
            return self._dist_allreduce(tensor, op)
        _check_op(op)
        hvd = self._hvd
        hop = {"sum": hvd.Sum, "average": hvd.Average, "max": hvd.Max}[op]
        return hvd.allreduce(tensor, op=hop, name=self._name("allreduce", None))

    def broadcast(self, tensor, root=0):
        if not self._via_hvd(tensor):
            return self._dist_broadcast(tensor, root)
        if not 0 <= root < self.size:
            raise TransportError(f"broadcast: root must be in [0, {self.size}), got {root}")
        return self._hvd.broadcast(tensor, root_rank=root, name=self._name("broadcast", None))

    def barrier(self):
        if self.data_path == "horovod":
            self._hvd.barrier()
        else:
            import torch.distributed as dist

            dist.barrier()



# ---------------------------------------------------------------------------------------------

_ACTIVE: dict[str, Transport] = {}


def _forget(transport: Transport) -> None:
    for key, value in list(_ACTIVE.items()):
        if value is transport:
            del _ACTIVE[key]


def detect_kind() -> str:
    """The launcher this process was started by: horovod, torchrun or local."""
    if "HOROVOD_RANK" in os.environ:
        return "horovod"
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return "torchrun"
    return "local"


def init_transport(kind: str = "auto", **options) -> Transport:
    """The process's transport for `kind` (created once, then returned again).

    "auto": Horovod when HOROVOD_RANK is set, torch.distributed when RANK and WORLD_SIZE are
    (torchrun), else one local process. options go to the implementation (data_path=...)."""
    if kind not in KINDS:
        raise TransportError(f"transport kind must be one of {KINDS}, got {kind!r}")
    if kind == "auto":
        kind = detect_kind()
    key = f"{kind}{sorted(options.items())}"
    if key not in _ACTIVE:
        if kind == "horovod":
            _ACTIVE[key] = HorovodTransport(**options)
        elif kind == "torchrun":
            _ACTIVE[key] = TorchTransport(**options)
        else:
            _ACTIVE[key] = LocalTransport(**options)
    return _ACTIVE[key]


def default_transport() -> Transport:
    """The transport collectives use when none is passed: init_transport("auto")."""
    for transport in _ACTIVE.values():
        return transport
    return init_transport("auto")
