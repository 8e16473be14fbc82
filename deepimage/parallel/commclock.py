"""Seconds the compute thread spends blocked on communication: a clock around a transport's
collectives and a GradientSync's deferred waits, for the training step's time split.

    clock = instrument(transport, sync)   # once, on the thread that runs the steps
    before = clock.seconds; ...; waited = clock.seconds - before

Only calls made on the instrumenting thread count (the progress threads' own work overlaps
compute and is not a wait), and nested calls count once: a butterfly run inline by its wait()
posts alltoalls through the same transport, inside the timed wait. Costs two perf_counter
calls per collective; nothing is synchronised.
"""
from __future__ import annotations

import functools
import threading
import time

from deepimage.parallel.transport.base import Handle, Transport

# The public collectives a training step calls on the compute thread (base.Transport).
_BLOCKING = ("allreduce", "broadcast", "barrier")
_ASYNC = ("alltoall_async", "allgather_async")


class CommClock:
    """Accumulates wall seconds of the outermost timed call on one thread."""

    def __init__(self):
        self.seconds = 0.0
        self.by_call: dict[str, float] = {}  # the same seconds by the outermost call's name
        self._thread = threading.get_ident()
        self._depth = 0

    def timed(self, fn, name: str | None = None):
        """fn, timed when called on this clock's thread (outermost call only)."""
        name = name or fn.__name__

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            if threading.get_ident() != self._thread:
                return fn(*args, **kwargs)
            self._depth += 1
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self._depth -= 1
                if self._depth == 0:
                    took = time.perf_counter() - start
                    self.seconds += took
                    self.by_call[name] = self.by_call.get(name, 0.0) + took
        return wrapper


class _TimedHandle(Handle):
    """A transport handle whose wait() counts on the clock."""

    def __init__(self, handle: Handle, clock: CommClock, name: str):
        self._handle = handle
        self._wait = clock.timed(handle.wait, f"{name}.wait")

    def wait(self):
        return self._wait()

    def __getattr__(self, name):  # anything else a caller reads of the handle
        return getattr(self._handle, name)


def instrument(transport: Transport, sync=None) -> CommClock:
    """Time `transport`'s collectives and `sync`'s deferred waits (lazy.GradientSync._wait)
    on the calling thread; instance attributes shadow the methods, the classes are untouched."""
    clock = CommClock()
    for name in _BLOCKING:
        setattr(transport, name, clock.timed(getattr(transport, name)))
    for name in _ASYNC:
        start = clock.timed(getattr(transport, name))
        setattr(transport, name, functools.wraps(start)(
            lambda *a, _start=start, _name=name, **kw: _TimedHandle(_start(*a, **kw), clock, _name)))
    if sync is not None:  # lazy waits in forward pre-hooks, step(), flush()
        sync._wait = clock.timed(sync._wait, "gradient_sync.wait")
    return clock
