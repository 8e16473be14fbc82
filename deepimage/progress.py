"""Progress of a long loop: a tqdm bar on a terminal, a periodic one-line status in a log file.

    from deepimage.progress import progress
    for batch in progress(loader, desc="evaluate 64 px", unit="batch"):
        ...
    bar = progress(total=epochs * steps, desc="train 64 px", unit="step", enabled=rank == 0)
    bar.update(); bar.set_postfix(epoch="2/6", loss=0.51)   # manual form
    bar.close()

Snakemake sends each job's stderr to its log file, where a bar's carriage returns would leave
one overwritten line per refresh; there the same loop prints a plain line (description,
count/total, rate, elapsed, postfix) every `every_s` seconds and a last one when it ends.
DEEPIMAGE_PROGRESS=bar|log|off overrides the choice (default: bar when the stream is a terminal).
"""
from __future__ import annotations

import os
import sys
import time
from typing import IO, Any, Iterable, Iterator

DEFAULT_EVERY_S = 15.0
MODES = ("bar", "log", "off")


class Progress:
    """Common interface of the three forms: iterate, or update() by hand; set_postfix(); close()."""

    def __init__(self, iterable: Iterable | None):
        self.iterable = iterable

    def __iter__(self) -> Iterator:
        if self.iterable is None:
            raise TypeError("progress(): nothing to iterate; call update() on a manual bar")
        try:
            for item in self.iterable:
                yield item
                self.update()
        finally:
            self.close()

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def update(self, n: int = 1) -> None:
        """Count n more items done."""

    def set_postfix(self, **values: Any) -> None:
        """Extra key=value fields shown after the rate (e.g. epoch, loss, images/s)."""

    def close(self) -> None:
        """Finish the bar (the log form prints its last line)."""


class _Off(Progress):
    """No output (non-zero ranks, DEEPIMAGE_PROGRESS=off)."""

    def __iter__(self) -> Iterator:
        if self.iterable is None:
            raise TypeError("progress(): nothing to iterate; call update() on a manual bar")
        return iter(self.iterable)


class _Bar(Progress):
    """tqdm's bar, for a terminal."""

    def __init__(self, iterable, total, desc, unit, file):
        super().__init__(iterable)
        from tqdm import tqdm

        self._bar = tqdm(total=total, desc=desc, unit=unit or "it", file=file, dynamic_ncols=True)

    def update(self, n: int = 1) -> None:
        self._bar.update(n)

    def set_postfix(self, **values: Any) -> None:
        # refresh=False: the bar redraws at its own pace (mininterval), not on every training step.
        self._bar.set_postfix({k: _fmt(v) for k, v in values.items()}, refresh=False)

    def close(self) -> None:
        self._bar.close()


class _Log(Progress):
    """One plain line every every_s seconds and one at the end; no carriage returns."""

    def __init__(self, iterable, total, desc, unit, file, every_s):
        super().__init__(iterable)
        self.total, self.desc, self.unit, self.file, self.every_s = total, desc, unit, file, every_s
        self.n, self.postfix, self.closed = 0, {}, False
        self.start = self.last = time.monotonic()

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self.last >= self.every_s:
            self.last = now
            self._print(now)

    def set_postfix(self, **values: Any) -> None:
        self.postfix = values

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._print(time.monotonic(), done=True)

    def line(self, now: float, done: bool = False) -> str:
        """'desc: 120/720 img (16.7 %), 45.2 img/s, 2.7 s elapsed, loss=0.512[, done]'."""
        elapsed = now - self.start
        unit = f" {self.unit}" if self.unit else ""
        count = f"{self.n}/{self.total}{unit}" if self.total else f"{self.n}{unit}"
        if self.total:
            count += f" ({100 * self.n / self.total:.1f} %)"
        parts = [count, f"{self.n / max(elapsed, 1e-9):.1f} {self.unit or 'it'}/s",
                 f"{_elapsed(elapsed)} elapsed", *(f"{k}={_fmt(v)}" for k, v in self.postfix.items())]
        return f"{self.desc + ': ' if self.desc else ''}{', '.join(parts)}{', done' if done else ''}"

    def _print(self, now: float, done: bool = False) -> None:
        print(self.line(now, done), file=self.file, flush=True)


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _elapsed(s: float) -> str:
    return f"{s:.1f} s" if s < 60 else f"{int(s // 3600)}:{int(s % 3600 // 60):02d}:{int(s % 60):02d}"


def choose_mode(file: IO) -> str:
    """'bar' on a terminal, 'log' otherwise, unless DEEPIMAGE_PROGRESS says which."""
    mode = os.environ.get("DEEPIMAGE_PROGRESS", "").strip().lower()
    if mode:
        if mode not in MODES:
            raise ValueError(f"DEEPIMAGE_PROGRESS={mode!r}: use one of {', '.join(MODES)} (or unset it)")
        return mode
    isatty = getattr(file, "isatty", None)
    return "bar" if isatty is not None and isatty() else "log"


def progress(iterable: Iterable | None = None, total: int | None = None, desc: str = "",
             unit: str = "", every_s: float = DEFAULT_EVERY_S, enabled: bool = True,
             file: IO | None = None) -> Progress:
    """Wrap `iterable` (or count by hand with update() when it is None) with progress output.

    total defaults to len(iterable) where it has one; enabled=False (non-zero ranks) prints
    nothing; file defaults to sys.stderr, which Snakemake rules send to the job's log."""
    file = file if file is not None else sys.stderr
    if total is None and iterable is not None and hasattr(iterable, "__len__"):
        total = len(iterable)
    mode = choose_mode(file) if enabled else "off"
    if mode == "off":
        return _Off(iterable)
    if mode == "bar":
        return _Bar(iterable, total, desc, unit, file)
    return _Log(iterable, total, desc, unit, file, every_s)
