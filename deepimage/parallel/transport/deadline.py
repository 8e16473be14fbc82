"""Deadlines of the same-host data paths' waits (cma, shm): a monotonic time, or None for none.

    deadline = after(timeout_s)       # None when timeout_s is None: wait for ever
    cond.wait(left(deadline))         # seconds still to wait, at least 0
    poller.poll(left_ms(deadline))    # the same in whole milliseconds, rounded up
"""
from __future__ import annotations

import time


def after(timeout_s: float | None) -> float | None:
    """The monotonic time `timeout_s` seconds from now (None: no deadline)."""
    return None if timeout_s is None else time.monotonic() + timeout_s


def left(deadline: float | None) -> float | None:
    """Seconds to `deadline` (None: no deadline), at least 0."""
    return None if deadline is None else max(0.0, deadline - time.monotonic())


def left_ms(deadline: float | None) -> int | None:
    """Milliseconds to `deadline` for poll() (None: no deadline), rounded up."""
    remaining = left(deadline)
    return None if remaining is None else int(remaining * 1000) + 1
