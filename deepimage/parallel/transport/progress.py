"""A transport's progress threads: one per lane, advancing multi-message jobs (the butterfly's
pieces) in launch order, and the reusable receive buffers they draw from.

    transport.progress(lane).submit(job)   # job.pieces: each has post(), complete(), fail()

A job is a list of pieces; each piece posts its first messages (`post(scratch)`), then later
waits for them and posts what follows (`complete(scratch)`). The thread keeps WINDOW pieces
posted at a time, in submission order, which is the same order on every rank, so the window
never waits for a piece a peer has not posted. An error in a step goes to `piece.fail(err)`;
the pieces of a failed job (`piece.failed`) are skipped. A job with a `claim()` method is run
by the thread only if claim() returns True: its owner may claim it first and run its pieces
itself (`run_pieces`), which a caller that waits at once does (no hand-off to this thread and
back, two thread wake-ups per call).
"""
from __future__ import annotations

import collections
import queue
import threading
from typing import Protocol

import torch


class Piece(Protocol):
    failed: bool

    def post(self, scratch: "Scratch") -> None: ...

    def complete(self, scratch: "Scratch") -> None: ...

    def fail(self, error: BaseException) -> None: ...


class Scratch:
    """Receive buffers reused across calls: fresh large tensors cost a page fault per 4 KiB."""

    def __init__(self):
        self._free: list[torch.Tensor] = []
        self._lock = threading.Lock()

    def take(self, numel: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(block, view): a (numel,) view of a reusable byte block; give the block back."""
        nbytes = numel * like.element_size()
        with self._lock:
            for i, block in enumerate(self._free):
                if block.numel() >= nbytes and block.device == like.device:
                    block = self._free.pop(i)
                    break
            else:
                block = torch.empty(nbytes, dtype=torch.uint8, device=like.device)
        return block, block[:nbytes].view(like.dtype)

    def give(self, block: torch.Tensor) -> None:
        with self._lock:
            self._free.append(block)


class Progress:
    """A daemon thread that streams the pieces of every submitted job, in submission order,
    WINDOW pieces posted at a time (see the module doc)."""

    WINDOW = 2

    def __init__(self, name: str = "deepimage-progress"):
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._todo: collections.deque = collections.deque()
        self._closing = False
        self.scratch = Scratch()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, job) -> None:
        """Queue `job` (anything with a `pieces` list) behind the jobs submitted before it."""
        self._jobs.put(job)

    def _next_piece(self, block: bool) -> Piece | None:
        while not self._todo and not self._closing:
            try:
                job = self._jobs.get(block=block)
            except queue.Empty:
                return None
            if job is None:
                self._closing = True
            elif getattr(job, "claim", None) is None or job.claim():
                self._todo.extend(job.pieces)
        return self._todo.popleft() if self._todo else None

    def _run(self) -> None:
        inflight: collections.deque = collections.deque()
        while True:
            while len(inflight) < self.WINDOW:
                piece = self._next_piece(block=not inflight)
                if piece is None:
                    break
                if not piece.failed and self._guard(piece, piece.post):
                    inflight.append(piece)
            if not inflight:
                return  # closing, and nothing left
            piece = inflight.popleft()
            self._guard(piece, piece.complete)

    def _guard(self, piece: Piece, step) -> bool:
        return guard(piece, step, self.scratch)

    def close(self) -> None:
        """Finish the queued jobs, then stop the thread."""
        self._jobs.put(None)
        self._thread.join()


def guard(piece: Piece, step, scratch: Scratch) -> bool:
    """Run one step of a piece; an error fails its job (re-raised by the job's wait())."""
    try:
        step(scratch)
        return True
    except BaseException as err:
        piece.fail(err)
        return False


def run_pieces(pieces: list, scratch: Scratch, window: int = Progress.WINDOW) -> None:
    """Run one job's pieces on the calling thread as the progress thread would: `window`
    posted at a time, each completed in order; stops posting once the job failed."""
    inflight: collections.deque = collections.deque()
    for piece in pieces:
        if piece.failed:
            break
        if guard(piece, piece.post, scratch):
            inflight.append(piece)
        if len(inflight) == window:
            piece = inflight.popleft()
            guard(piece, piece.complete, scratch)
    while inflight:
        piece = inflight.popleft()
        guard(piece, piece.complete, scratch)
