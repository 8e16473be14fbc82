"""Same-host message path: each tagged message is copied once, by the kernel, straight from the
sender's tensor into the receiver's (cross-memory attach, Linux's process_vm_readv).

Over loopback TCP (gloo) a message is copied twice, into the kernel's socket buffers and out
again, in small segments with a system call each; on this 2-core machine that made a 64 MiB
all-reduce cost 55-65 ms against 5 ms for one memcpy of the buffer. Here a Unix socket per
pair of ranks carries only 32-byte envelopes:

    sender:   SEND(tag, address, nbytes)  ->  the message stays put until ACK
    receiver: matches (peer, tag) with its posted receive, process_vm_readv(peer's address)
              straight into the receive tensor, then ACK(tag)  ->  the sender's work completes

No thread of its own reads the sockets: the thread that waits for a message reads its peer's
envelopes (one reader per socket at a time; it acts on every envelope it reads, for any
waiter) and does the copy once the socket is free for the next reader, or the thread that
posts a receive does it when the envelope came first. So a message costs no hand-off to a
receiver thread and no wake-up of one; a waiter polls its socket for SPIN_S before it sleeps
in poll(). A SEND is read once its receiver waits on that peer, which every butterfly and
collective does (each rank posts all its sends before it waits). cma_setup.open_channels sets
this up only where it works: every rank on one host (same hostname and boot id) and every rank able to
read every other's memory (same user, no ptrace restriction; each rank checks by reading a
probe buffer of each peer). Otherwise it returns the reason and the caller keeps gloo.

Every wait is bounded: a peer that exits (SIGKILL, out of memory) closes its socket, which
fails at once every message pending with it and every later one; a peer that hangs alive fails
a wait after `timeout_s` (train.comm_timeout_s).
"""
from __future__ import annotations

import ctypes
import functools
import os
import select
import socket
import struct
import threading
import time
from typing import Callable

import torch

from deepimage.parallel.transport.deadline import after, left, left_ms

_ENVELOPE = struct.Struct("<I4xqQQ")  # kind, tag, address, nbytes: 32 bytes
SEND, ACK, FAIL = 1, 2, 3


class _IOVec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


_libc = ctypes.CDLL(None, use_errno=True)
_readv = getattr(_libc, "process_vm_readv", None)
if _readv is not None:
    _readv.argtypes = [ctypes.c_int, ctypes.POINTER(_IOVec), ctypes.c_ulong,
                       ctypes.POINTER(_IOVec), ctypes.c_ulong, ctypes.c_ulong]
    _readv.restype = ctypes.c_ssize_t


def read_remote(pid: int, address: int, into: torch.Tensor) -> None:
    """Copy `into.nbytes` bytes at `address` in process `pid` into the contiguous CPU tensor
    `into` (the GIL is released for the copy)."""
    if _readv is None:
        raise OSError("process_vm_readv is not available in this C library")
    nbytes, done = into.numel() * into.element_size(), 0
    base = into.data_ptr()
    while done < nbytes:
        local = _IOVec(base + done, nbytes - done)
        remote = _IOVec(address + done, nbytes - done)
        got = _readv(pid, ctypes.byref(local), 1, ctypes.byref(remote), 1, 0)
        if got <= 0:
            err = ctypes.get_errno()
            raise OSError(err, f"process_vm_readv from pid {pid}: {os.strerror(err) if got < 0 else 'read 0 bytes'}")
        done += got


class Work:
    """One message in flight; wait() returns once it is copied (raises if it failed, or if
    nothing happened for timeout_s seconds). wait() reads the peer's envelopes itself (`pump`),
    so a work is a flag, not an Event: no lock or condition to build per message."""

    def __init__(self, what: str, tensor: torch.Tensor, timeout_s: float | None,
                 pump: Callable[["Work"], bool]):
        self.what, self.tensor = what, tensor  # the tensor stays alive while the peer reads it
        self.timeout_s = timeout_s
        self._pump = pump  # reads the peer's envelopes on the waiting thread until this is done
        self.finished = False
        self.arriving = False  # another thread copies it now: wait, do not read for it
        self._error: str | None = None

    def done(self, error: str | None = None) -> None:
        """Set once: by the thread that matched the ACK or did the copy (its waiters are then
        notified through the channel's turn), or by irecv before anyone can wait."""
        self._error, self.tensor, self.finished = error, None, True

    def wait(self) -> None:
        if not self._pump(self):
            raise RuntimeError(f"{self.what}: no answer in {self.timeout_s:g} s (train.comm_timeout_s); "
                               f"that rank hangs or its host is gone")
        if self._error is not None:
            raise RuntimeError(f"{self.what}: {self._error}")


class Channels:
    """Tagged point-to-point messages between the ranks of one host (see the module doc)."""

    # A waiter polls its socket this long before it sleeps in poll(): the peer's envelope is
    # usually microseconds away, and a sleep costs a wake-up (milliseconds on a loaded machine).
    SPIN_S = 50e-6

    def __init__(self, rank: int, size: int, pids: list[int], peers: dict[int, socket.socket],
                 timeout_s: float | None = None):
        self.rank, self.size, self._pids, self._socks = rank, size, pids, peers
        self.timeout_s = timeout_s  # of every wait(); None waits for ever
        self._lock = threading.Lock()  # the tables below
        self._posted: dict[tuple[int, int], Work] = {}  # (peer, tag) -> receive waiting for data
        self._arrived: dict[tuple[int, int], tuple[int, int]] = {}  # (peer, tag) -> (address, nbytes)
        self._sending: dict[tuple[int, int], Work] = {}  # (peer, tag) -> send waiting for ACK
        self._gone: dict[int, str] = {}  # peer -> why its connection ended
        self._reading: set[int] = set()  # peers whose socket a waiting thread reads now
        self._turn = threading.Condition(self._lock)  # a reader finished an envelope
        self._send_locks = {p: threading.Lock() for p in peers}
        self._envelopes = {p: bytearray(_ENVELOPE.size) for p in peers}
        self._polls = {p: select.poll() for p in peers}  # used by the peer's reader only
        for p, sock in peers.items():
            self._polls[p].register(sock, select.POLLIN)
        self._pumpers = {p: functools.partial(self._pump, p) for p in peers}  # a Work's wait()
        self._closing = False

    # -- the two operations -----------------------------------------------------------------

    def isend(self, tensor: torch.Tensor, peer: int, tag: int) -> Work:
        """Offer `tensor` (contiguous, CPU) to `peer` under `tag`; keep it unchanged until wait()."""
        work = Work(f"send of {tensor.numel() * tensor.element_size()} bytes to rank {peer} "
                    f"(tag {tag})", _checked(tensor), self.timeout_s, self._pumpers[peer])
        with self._lock:
            self._raise_if_gone(peer)
            self._sending[(peer, tag)] = work
        self._envelope(peer, SEND, tag, tensor.data_ptr(), tensor.numel() * tensor.element_size())
        return work

    def irecv(self, tensor: torch.Tensor, peer: int, tag: int) -> Work:
        """Receive `peer`'s message under `tag` into `tensor` (contiguous, CPU, exactly its size)."""
        work = Work(f"receive of {tensor.numel() * tensor.element_size()} bytes from rank {peer} "
                    f"(tag {tag})", _checked(tensor), self.timeout_s, self._pumpers[peer])
        with self._lock:
            self._raise_if_gone(peer)
            offer = self._arrived.pop((peer, tag), None)
            if offer is None:
                self._posted[(peer, tag)] = work
                return work
        self._copy(peer, tag, work, *offer)
        return work

    # -- the waiting thread reads the envelopes ----------------------------------------------

    def _pump(self, peer: int, work: Work) -> bool:
        """Read `peer`'s envelopes on this thread until `work` is done (True) or timeout_s
        passes (False). One thread reads a socket at a time; other waiters on it sleep until
        their work is done or the socket is free. The copy an envelope asks for is done after
        the socket is free again, so two waiting threads copy two messages at once."""
        deadline = after(self.timeout_s)
        while not work.finished:
            with self._turn:
                while (peer in self._reading or work.arriving) and not work.finished:
                    if not self._turn.wait(left(deadline)):
                        return work.finished
                if work.finished:
                    break
                self._reading.add(peer)
            try:
                envelope = self._read_envelope(peer, deadline)
                copy = self._match(peer, *envelope) if envelope else None
            finally:
                with self._turn:
                    self._reading.discard(peer)
                    self._turn.notify_all()
            if envelope is None:
                return work.finished
            if copy is not None:
                copy()
                with self._turn:
                    self._turn.notify_all()  # the receive it finished may be another thread's
        return True

    def _read_envelope(self, peer: int, deadline: float | None) -> tuple | None:
        """One envelope from `peer` (kind, tag, address, nbytes); None if the deadline passed
        first; () if the connection was lost (the peer's messages are failed then)."""
        sock, buf = self._socks[peer], self._envelopes[peer]
        view, got = memoryview(buf), 0
        spin_until = time.perf_counter() + self.SPIN_S
        try:
            while got < len(buf):
                try:
                    n = sock.recv_into(view[got:], 0, socket.MSG_DONTWAIT)
                except BlockingIOError:  # nothing yet: poll a little longer, then sleep in poll()
                    if time.perf_counter() < spin_until:
                        continue
                    if not self._polls[peer].poll(left_ms(deadline)):
                        return None
                    continue
                if n == 0:
                    self._lose(peer, f"rank {peer} closed its connection (it exited or failed)")
                    return ()
                got += n
        except OSError as err:
            self._lose(peer, f"connection to rank {peer} failed: {err}")
            return ()
        return _ENVELOPE.unpack(buf)

    def _match(self, peer: int, kind: int, tag: int, address: int,
               nbytes: int) -> Callable[[], None] | None:
        """Act on an envelope while still reading: ACK/FAIL finishes the send; a SEND for a
        posted receive returns the copy to do once the socket is free (the receive is marked
        arriving meanwhile), else it is kept for irecv."""
        key = (peer, tag)
        with self._lock:
            if kind == SEND:
                work = self._posted.pop(key, None)
                if work is None:
                    self._arrived[key] = (address, nbytes)
                    return None
                work.arriving = True
                return functools.partial(self._copy, peer, tag, work, address, nbytes)
            work = self._sending.pop(key, None)
            if work is not None:
                work.done(None if kind == ACK else f"rank {peer} could not read the message "
                          f"(see that rank's error)")
        return None

    # -- internals --------------------------------------------------------------------------

    def _copy(self, peer: int, tag: int, work: Work, address: int, nbytes: int) -> None:
        """Read the peer's message into the receive; ACK (or FAIL) tells the sender."""
        want = work.tensor.numel() * work.tensor.element_size()
        error = None
        if nbytes != want:
            error = f"rank {peer} sent {nbytes} bytes under tag {tag}, but the receive expects {want}"
        else:
            try:
                read_remote(self._pids[peer], address, work.tensor)
            except OSError as err:
                error = str(err)
        work.done(error)  # first: a failing ACK below must not leave the receive unfinished
        self._envelope(peer, ACK if error is None else FAIL, tag, 0, 0)

    def _envelope(self, peer: int, kind: int, tag: int, address: int, nbytes: int) -> None:
        try:
            with self._send_locks[peer]:
                self._socks[peer].sendall(_ENVELOPE.pack(kind, tag, address, nbytes))
        except OSError as err:
            self._lose(peer, f"connection to rank {peer} failed: {err}")
            self._raise_if_gone(peer)

    def _lose(self, peer: int, why: str) -> None:
        """The peer is gone: fail every message that involves it."""
        with self._lock:
            if self._closing:
                why = "the transport was shut down"
            self._gone.setdefault(peer, why)
            failed = [w for (p, _), w in list(self._posted.items()) + list(self._sending.items()) if p == peer]
            for table in (self._posted, self._sending):
                for key in [k for k in table if k[0] == peer]:
                    del table[key]
            for work in failed:
                work.done(why)
            self._turn.notify_all()  # waiters not reading see their work failed

    def lost(self, peer: int) -> str | None:
        """Why the connection to `peer` ended (None while it is up)."""
        with self._lock:
            return self._gone.get(peer)

    def socket(self, peer: int) -> socket.socket:
        """The Unix socket to `peer` (shm.py polls it for a hang-up, never reads it)."""
        return self._socks[peer]

    def _raise_if_gone(self, peer: int) -> None:
        if peer in self._gone:
            raise RuntimeError(f"message to or from rank {peer}: {self._gone[peer]}")

    def close(self) -> None:
        """Shut the sockets: a thread reading one sees the end and fails what it waits for."""
        with self._lock:
            self._closing = True
        for sock in self._socks.values():
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for peer in self._socks:
            self._lose(peer, "the transport was shut down")
        for sock in self._socks.values():
            sock.close()


def _checked(tensor: torch.Tensor) -> torch.Tensor:
    if tensor.is_cuda or not tensor.is_contiguous():
        raise ValueError(f"cma: messages must be contiguous CPU tensors, got {tensor.device} "
                         f"contiguous={tensor.is_contiguous()}")
    return tensor
