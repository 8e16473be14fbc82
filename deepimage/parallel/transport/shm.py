"""Same-host pair all-reduce through one shared-memory segment per lane: two ranks, no messages,
no thread hand-offs; the calling thread does the whole exchange.

    pair = paths.current.pairs[lane]          # datapath.SameHost, two ranks on one host
    pair.allreduce(flat, out, op, ticket)      # ticket = pair.ticket() at launch, in launch order

The segment (a /dev/shm file both ranks map, unlinked as soon as both have it) holds, per rank,
two counters and two slots of CHUNK_BYTES. The buffer goes through in chunks; for chunk k (a
sequence number that runs on across calls, the same on both ranks):

    wait  partner.read  >= k - 2       # the partner is done with what slot k % 2 held
    copy  my chunk -> my slot k % 2;   fence;   my.wrote = k;   wake
    wait  partner.wrote >= k
    out chunk = my chunk + partner's slot k % 2      (butterfly._reduce_into: the same bits as
    my.read = k;   wake                               the butterfly, since a + b == b + a)

so each rank copies its chunk once and adds straight out of the partner's slot, and while one
rank adds chunk k the other may already copy chunk k + 1 (two slots). A wait polls the counter
for SPIN_S (the partner is usually microseconds away; sched_yield between polls cost a whole
time slice of another process on the loaded 2-core machine), then sleeps in a futex on it (the
writer wakes it), in slices of SLICE_S so that a partner that exited (its Unix socket of
cma.Channels hangs up) and the deadline (train.comm_timeout_s) are noticed.

Memory ordering (x86-64, the only host this path opens on): the counters are aligned 8-byte
stores and loads (memoryview 'q'), each a single access. TSO keeps loads in order and stores in
order and never moves a store before an earlier load, so the reader that sees wrote = k sees
the chunk, and the partner that sees read = k knows the reads of the slot are done. The one
exception is non-temporal stores, which a large memcpy may use for the chunk: `_fence()` (a
locked read-modify-write, which drains them) runs before every `wrote` store.

Other users and stray processes of the host share /dev/shm. Rank 0 creates each segment under a
fresh random name, exclusively (O_CREAT | O_EXCL | O_NOFOLLOW: a name another user planted, file
or symlink, is refused, never opened or followed), mode 0600 whatever the umask, and holds an
exclusive flock on it until it unlinks the name; rank 1 maps it only if it is a regular file of
this user that no one else may open. A rank that dies between creating and unlinking leaves its
segments behind: the next open_pairs of this user removes every segment of ours (our name
prefix, our uid) whose flock is free, i.e. whose creator is gone; a live job's segments keep
their lock and stay.
"""
from __future__ import annotations

import ctypes
import fcntl
import mmap
import os
import platform
import select
import stat
import threading
import time
import uuid
from typing import Callable

import torch

from deepimage.parallel.transport.deadline import after, left
CHUNK_BYTES = 1 << 20  # each slot; a chunk stays in the caches between copy and add
SPIN_S = 50e-6  # a wait polls its counter this long before it sleeps in the futex
SLICE_S = 0.01  # longest futex sleep before the partner's liveness and the deadline are checked
_HEADER = 4096  # counters: wrote and read of each rank, one 64-byte line each
_LANES = 3  # the butterfly's lanes 0 and 1, and BLOCKING_LANE
BLOCKING_LANE = 2  # Transport.allreduce's small blocking collectives, on the caller's thread
SHM_DIR, PREFIX = "/dev/shm", "deepimage-pair-"

_libc = ctypes.CDLL(None, use_errno=True)
_FUTEX, _WAIT, _WAKE = 202, 0, 1  # x86-64 syscall number; shared (not PRIVATE) futex ops


class _Timespec(ctypes.Structure):
    _fields_ = [("sec", ctypes.c_long), ("nsec", ctypes.c_long)]


_fence_lock = threading.Lock()


def _fence() -> None:
    """A full memory barrier: acquiring a lock is a locked cmpxchg on x86-64."""
    _fence_lock.acquire()
    _fence_lock.release()


class PairError(RuntimeError):
    """The partner did not answer in time or is gone; the segment is unusable afterwards."""


class Pair:
    """One lane's segment between this rank and its partner (see the module doc)."""

    def __init__(self, mm: mmap.mmap, rank: int, timeout_s: float | None,
                 gone: Callable[[], str | None]):
        self._mm, self.rank, self.timeout_s, self._gone = mm, rank, timeout_s, gone
        self._counters = memoryview(mm)[:_HEADER].cast("q")  # (512,) int64
        self._base = ctypes.addressof(ctypes.c_char.from_buffer(mm))
        data = torch.frombuffer(mm, dtype=torch.uint8, offset=_HEADER)  # (4 * CHUNK_BYTES,)
        self._slots = [[data[(2 * r + s) * CHUNK_BYTES:(2 * r + s + 1) * CHUNK_BYTES]
                        for s in range(2)] for r in range(2)]  # [rank][slot] (CHUNK_BYTES,) uint8
        self._seq = 0  # chunks exchanged so far on this lane
        self._tickets = 0  # handed out at launch
        self._serving = 0  # the ticket whose exchange may run now
        self._turn = threading.Condition()
        self._broken: str | None = None

    # counter indices (int64 units): one 64-byte line each
    def _wrote(self, r: int) -> int:
        return 16 * r

    def _read(self, r: int) -> int:
        return 16 * r + 8

    def ticket(self) -> int:
        """Called at launch: exchanges on this lane run in launch order, the same on both ranks."""
        with self._turn:
            self._tickets += 1
            return self._tickets - 1

    def allreduce(self, flat: torch.Tensor, out: torch.Tensor, op: str, ticket: int,
                  reduce_into) -> None:
        """out (n,) = flat (n,) + the partner's flat (n,) [/ 2 for average], when `ticket`'s turn
        comes. reduce_into(mine, others (1, S), op, out) does the arithmetic."""
        deadline = after(self.timeout_s)
        with self._turn:
            while self._serving != ticket:
                if not self._turn.wait(left(deadline)):
                    raise PairError(f"pair all-reduce: an earlier all-reduce on this lane did not "
                                    f"finish in {self.timeout_s:g} s (train.comm_timeout_s)")
        try:
            if self._broken:
                raise PairError(f"pair all-reduce: unusable after an earlier failure ({self._broken})")
            self._exchange(flat, out, op, reduce_into)
        except PairError as err:
            self._broken = self._broken or str(err)
            raise
        finally:
            with self._turn:
                self._serving += 1
                self._turn.notify_all()

    def _exchange(self, flat, out, op, reduce_into) -> None:
        me, peer = self.rank, 1 - self.rank
        src, dst = flat.view(torch.uint8), out.view(torch.uint8)  # (n,) -> (n * itemsize,)
        step = CHUNK_BYTES - CHUNK_BYTES % flat.element_size()
        c = self._counters
        for lo in range(0, src.numel(), step):
            hi = min(lo + step, src.numel())
            k = self._seq + 1
            slot = k % 2
            self._wait(self._read(peer), k - 2)
            self._slots[me][slot][:hi - lo].copy_(src[lo:hi])
            _fence()
            c[self._wrote(me)] = k
            self._wake(self._wrote(me))
            self._wait(self._wrote(peer), k)
            other = self._slots[peer][slot][:hi - lo].view(flat.dtype).view(1, -1)  # (1, S)
            reduce_into(src[lo:hi].view(flat.dtype), other, op, out=dst[lo:hi].view(flat.dtype))
            c[self._read(me)] = k
            self._wake(self._read(me))
            self._seq = k

    def _wait(self, index: int, target: int) -> None:
        """Until counter `index` >= target: spin with yields, then futex slices (see the doc)."""
        c = self._counters
        if c[index] >= target:
            return
        spin_until = time.perf_counter() + SPIN_S
        while time.perf_counter() < spin_until:
            if c[index] >= target:
                return
        deadline = after(self.timeout_s)
        address = self._base + 8 * index
        while True:
            seen = c[index]
            if seen >= target:
                return
            why = self._gone()
            if why:
                raise PairError(f"pair all-reduce: {why}")
            remaining = left(deadline)
            if remaining == 0.0:
                raise PairError(f"pair all-reduce: no answer from the partner in "
                                f"{self.timeout_s:g} s (train.comm_timeout_s); that rank hangs")
            wait_s = SLICE_S if remaining is None else min(SLICE_S, remaining)
            spec = _Timespec(0, int(wait_s * 1e9))
            # Sleeps only while the low 32 bits still read `seen` (futex compares atomically).
            _libc.syscall(_FUTEX, ctypes.c_void_p(address), _WAIT, ctypes.c_uint32(seen & 0xFFFFFFFF),
                          ctypes.byref(spec), None, 0)

    def _wake(self, index: int) -> None:
        _libc.syscall(_FUTEX, ctypes.c_void_p(self._base + 8 * index), _WAKE, 1, None, None, 0)

    def close(self) -> None:
        with self._turn:
            self._broken = self._broken or "the transport was shut down"
        self._counters.release()
        self._slots = []
        try:
            self._mm.close()
        except BufferError:  # a view still exported (the ctypes base): freed with the object
            pass


def segment_bytes() -> int:
    return _HEADER + 4 * CHUNK_BYTES


def open_pairs(rank: int, size: int, gather: Callable[[object], list], timeout_s: float | None,
               gone: Callable[[], str | None]) -> tuple[list[Pair] | None, str]:
    """Collective: one Pair per lane between two ranks of one host, or (None, why not); the
    last one (BLOCKING_LANE) carries Transport.allreduce, apart from the butterflies' queues.
    `gone()` says why the partner is unreachable (None while it is there)."""
    if size != 2:
        return None, f"{size} ranks (the shared-memory pair path is for 2)"
    why = "" if platform.machine() == "x86_64" else f"machine {platform.machine()} (needs x86-64)"
    names, held = None, []  # rank 0: the segments' names, and their fds that hold the flock
    try:
        if rank == 0 and not why:
            sweep_dead_segments()
            names = [_segment_name() for _ in range(_LANES)]
            try:
                for name in names:
                    held.append(_create_segment(name))
            except OSError as err:
                why = f"cannot create {name} ({err})"
            except ValueError as err:
                why = str(err)
        names, why0 = gather((names, why))[0]
        mms, why = [], why0
        if not why:
            try:
                for name in names:
                    mms.append(_map_segment(name))
            except (OSError, ValueError) as err:
                why = f"rank {rank} cannot map {name} ({err})"
        whys = [w for w in gather(why) if w]  # both mapped (or failed): the names may go
    finally:
        for name, fd in zip(names or [], held):
            _remove(name)
            os.close(fd)  # after the unlink: the flock says "in use" while the name exists
    if whys:
        for mm in mms:
            mm.close()
        return None, whys[0]
    return [Pair(mm, rank, timeout_s, gone) for mm in mms], ""


def _segment_name() -> str:
    return f"{SHM_DIR}/{PREFIX}{uuid.uuid4().hex}"


def _create_segment(path: str) -> int:
    """A new segment at `path` (fd, locked): only if the name is free; 0600 whatever the umask."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        raise ValueError(f"cannot create {path}: it exists (a file or link this job did not "
                         f"create; left in place, the job goes on without it)") from None
    try:
        os.fchmod(fd, 0o600)  # a default ACL on the folder may have added bits the umask did not
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.ftruncate(fd, segment_bytes())
    except OSError:
        os.close(fd)
        _remove(path)
        raise
    return fd


def _map_segment(path: str) -> mmap.mmap:
    """Map rank 0's segment: a regular file of this user, open to no one else, not a link."""
    fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
            raise ValueError(f"{path} is not a private segment of uid {os.getuid()} (uid "
                             f"{st.st_uid}, mode {stat.filemode(st.st_mode)}): not mapped")
        return mmap.mmap(fd, segment_bytes())
    finally:
        os.close(fd)


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def sweep_dead_segments(folder: str = SHM_DIR) -> list[str]:
    """Remove this user's leftover segments (PREFIX, our uid) whose creator is gone (their flock
    is free); return their paths. Another user's files, links and live jobs' segments stay."""
    removed = []
    try:
        entries = [e for e in os.scandir(folder) if e.name.startswith(PREFIX)]
    except OSError:
        return removed
    for entry in entries:
        try:
            fd = os.open(entry.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:  # a link, gone already, or not ours to open
            continue
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid():
                continue
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # held by a live creator: raises
            now = os.lstat(entry.path)
            if (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino):
                os.unlink(entry.path)
                removed.append(entry.path)
        except OSError:
            continue
        finally:
            os.close(fd)
    return removed


def socket_gone(sock, channels) -> Callable[[], str | None]:
    """gone() for open_pairs: the Unix socket to the partner hung up, or Channels lost it.
    Both lanes' progress threads call it at once: a poll object may not be polled by two
    threads ("concurrent poll() invocation"), so each call makes its own (one per 10 ms slice)."""

    def gone() -> str | None:
        lost = channels.lost(1 - channels.rank)
        if lost:
            return lost
        poller = select.poll()
        poller.register(sock, select.POLLRDHUP | select.POLLHUP | select.POLLERR)
        if poller.poll(0):
            return f"rank {1 - channels.rank} closed its connection (it exited or failed)"
        return None

    return gone
