"""The transport interface: `Transport`, whose public collectives check their arguments once and
then call the implementation's `_alltoall_async`, `_allgather_async`, ... (local.py, torch.py,
horovod.py); the handles they return; the argument checks; `TransportError`.

    from deepimage.parallel.transport import init_transport
    transport = init_transport("auto")   # see __init__.py

Threads: alltoall/allgather are tagged point-to-point messages whose tags are reserved, in
call order, when the call is made; they may then complete on any thread (the butterfly's
progress thread does). allreduce/broadcast/barrier are ordinary collectives: call them from one
thread, in the same order on every rank.

Lanes: lane=1 puts a message on a second connection, so urgent traffic (the first layers'
gradients, needed first by the next forward) does not queue behind bulk traffic on lane 0.
"""
from __future__ import annotations

import abc
import os
import threading
from typing import Callable, Sequence

import torch

from deepimage.config import default
from deepimage.parallel.transport.progress import Progress

REDUCE_OPS = ("sum", "average", "max")
# train.comm_timeout_s as the training stage hands it to its transport (deepimage.launch
# set_comm_timeout), before the process group exists; the schema's default otherwise.
COMM_TIMEOUT_ENV = "DEEPIMAGE_COMM_TIMEOUT_S"
LANES = (0, 1)
_TAG_SPACE = 2**31 - 1  # gloo tags are C ints


def comm_timeout_s() -> float:
    """Seconds a collective or message may wait before it fails (train.comm_timeout_s)."""
    seconds = os.environ.get(COMM_TIMEOUT_ENV)
    return float(seconds) if seconds is not None else float(default("train.comm_timeout_s"))


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

    Every rank must call each collective in the same order with matching shapes/splits. The
    public methods check their arguments and reserve a tag when none is given, then call the
    implementation's underscore method with checked, complete arguments."""

    name: str = "abstract"

    def __init__(self, rank: int = 0, size: int = 1):
        self.rank, self.size = rank, size
        self.closed = False
        self._next_tag = 0
        self._tag_lock = threading.Lock()
        self._progress: dict[int, Progress] = {}  # lane -> its progress thread
        self._progress_lock = threading.Lock()
        self._closers: list[Callable[[], None]] = []

    # -- the collectives (public: checked once here) ------------------------------------------

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
        check_rows(tensor, "alltoall")
        check_lane(lane)
        splits = check_counts(splits, self.size, "splits", "alltoall", tensor.shape[0])
        if recv_splits is not None:
            recv_splits = check_counts(recv_splits, self.size, "recv_splits", "alltoall")
        tag = self.reserve_tags(1) if tag is None else tag
        return self._alltoall_async(tensor, splits, recv_splits, tag, include_self, out, lane)

    def allgather_async(self, tensor: torch.Tensor, *, sizes: Sequence[int] | None = None,
                        out: torch.Tensor | None = None, tag: int | None = None,
                        lane: int = 0) -> Handle:
        """Concatenate every rank's `tensor` along dim 0, in rank order (dim 0 may differ).

        sizes: every rank's dim 0 when known (saves an exchange); out: where to write it;
        tag and lane as for alltoall_async."""
        check_rows(tensor, "allgather")
        check_lane(lane)
        if sizes is not None:
            sizes = check_sizes(sizes, tensor, self.rank, self.size)
        tag = self.reserve_tags(1) if tag is None else tag
        return self._allgather_async(tensor, sizes, out, tag, lane)

    def allreduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """Element-wise reduce over ranks, op in {"sum", "average", "max"}; for small tensors."""
        if op not in REDUCE_OPS:
            raise TransportError(f"allreduce: op must be one of {REDUCE_OPS}, got {op!r}")
        return self._allreduce(tensor, op)

    def broadcast(self, tensor: torch.Tensor, root: int = 0) -> torch.Tensor:
        """Return root's `tensor` on every rank."""
        if not 0 <= root < self.size:
            raise TransportError(f"broadcast: root must be in [0, {self.size}), got {root}")
        return self._broadcast(tensor, root)

    def barrier(self) -> None:
        """Return once every rank has called barrier()."""
        self._barrier()

    def allgather(self, tensor: torch.Tensor) -> torch.Tensor:
        return self.allgather_async(tensor).wait()

    def alltoall(self, tensor: torch.Tensor, splits: Sequence[int]) -> torch.Tensor:
        return self.alltoall_async(tensor, splits).wait()

    # -- what an implementation provides (arguments already checked; tag never None) ---------
    # Not abstract: a wrapper that overrides the public methods (bench/split_fc.py's
    # CountingTransport) need not provide them.

    def _alltoall_async(self, tensor: torch.Tensor, splits: list[int],
                        recv_splits: list[int] | None, tag: int, include_self: bool,
                        out: torch.Tensor | None, lane: int) -> Handle:
        raise NotImplementedError(f"{type(self).__name__} has no alltoall")

    def _allgather_async(self, tensor: torch.Tensor, sizes: list[int] | None,
                         out: torch.Tensor | None, tag: int, lane: int) -> Handle:
        raise NotImplementedError(f"{type(self).__name__} has no allgather")

    def _allreduce(self, tensor: torch.Tensor, op: str) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} has no allreduce")

    def _broadcast(self, tensor: torch.Tensor, root: int) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} has no broadcast")

    def _barrier(self) -> None:
        raise NotImplementedError(f"{type(self).__name__} has no barrier")

    def _close(self) -> None:
        """Release what the implementation opened (data paths, the process group)."""

    # -- state the transport owns -------------------------------------------------------------

    def reserve_tags(self, n: int) -> int:
        """First of `n` consecutive message tags; every rank gets the same ones in call order."""
        with self._tag_lock:
            first = self._next_tag
            self._next_tag = (self._next_tag + n) % _TAG_SPACE
        return first

    def progress(self, lane: int) -> Progress:
        """The progress thread of `lane` (started on first use; each lane streams its jobs
        independently), stopped by shutdown()."""
        check_lane(lane)
        with self._progress_lock:
            if lane not in self._progress:
                self._progress[lane] = Progress(f"deepimage-progress-{lane}")
            return self._progress[lane]

    def on_shutdown(self, closer: Callable[[], None]) -> None:
        """Run `closer` at shutdown(), before the process group goes."""
        self._closers.append(closer)

    def shutdown(self) -> None:
        """Stop the progress threads and closers, then release the process group (idempotent)."""
        with self._progress_lock:
            progress, self._progress = list(self._progress.values()), {}
        closers, self._closers = self._closers, []
        for p in progress:
            p.close()
        for closer in closers:
            closer()
        if not self.closed:
            self.closed = True
            self._close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(rank={self.rank}, size={self.size})"


# ---------------------------------------------------------------------------------------------
# Argument checks (the public methods above; a few more from the implementations)


def check_rows(tensor: torch.Tensor, what: str) -> None:
    if tensor.dim() == 0:
        raise TransportError(f"{what}: tensor must have a dim 0 to split, got a 0-d tensor")
    if not tensor.is_contiguous():
        raise TransportError(f"{what}: tensor must be contiguous (call .contiguous() first)")


def check_counts(counts: Sequence[int], size: int, name: str, what: str,
                 total: int | None = None) -> list[int]:
    counts = [int(c) for c in counts]
    if len(counts) != size or any(c < 0 for c in counts):
        raise TransportError(f"{what}: {name} must list {size} non-negative row counts, got {counts}")
    if total is not None and sum(counts) != total:
        raise TransportError(f"{what}: {name} {counts} sum to {sum(counts)}, but the tensor has "
                             f"{total} rows")
    return counts


def check_sizes(sizes: Sequence[int], tensor: torch.Tensor, rank: int, size: int) -> list[int]:
    sizes = check_counts(sizes, size, "sizes", "allgather")
    if sizes[rank] != tensor.shape[0]:
        raise TransportError(f"allgather: sizes[{rank}] = {sizes[rank]} but this rank's tensor "
                             f"has {tensor.shape[0]} rows")
    return sizes


def check_lane(lane: int) -> None:
    if lane not in LANES:
        raise TransportError(f"lane must be 0 or 1, got {lane!r}")


def check_data_path(data_path: str, allowed: tuple[str, ...], who: str) -> None:
    if data_path not in allowed:
        raise TransportError(f"{who}: data_path must be one of {allowed}, got {data_path!r}")


def check_out(out: torch.Tensor, like: torch.Tensor, what: str, shape=None) -> torch.Tensor:
    shape = tuple(like.shape) if shape is None else tuple(shape)
    if tuple(out.shape) != shape or out.dtype != like.dtype or not out.is_contiguous():
        raise TransportError(f"{what}: out must be a contiguous {like.dtype} tensor of shape "
                             f"{shape}, got {out.dtype} {tuple(out.shape)}")
    return out


# ---------------------------------------------------------------------------------------------
# Result helpers shared by the implementations


def into(handle: Handle, out: torch.Tensor | None) -> Handle:
    """`handle`, its result copied into `out` when one is given (paths that cannot write there)."""
    if out is None:
        return handle

    def finish():
        result = handle.wait()
        return check_out(out, result, "alltoall").copy_(result)

    return Pending([], finish)


def offsets(counts: Sequence[int]) -> list[int]:
    """Start of each part and the end: [0, c0, c0 + c1, ..., sum]."""
    out = [0]
    for c in counts:
        out.append(out[-1] + c)
    return out


def drop_own(out: torch.Tensor, recv_splits: Sequence[int], rank: int) -> torch.Tensor:
    """The alltoall result without the rows this rank sent to itself."""
    off = offsets(recv_splits)
    return torch.cat([out[:off[rank]], out[off[rank + 1]:]])
