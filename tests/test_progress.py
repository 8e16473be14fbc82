"""deepimage.progress: a tqdm bar on a terminal, plain periodic lines in log files.

    .venv/bin/pytest -q tests/test_progress.py
"""
from __future__ import annotations

import fcntl
import io
import os
import pty
import select
import struct
import termios

import pytest

from deepimage.progress import progress


def test_log_form_prints_plain_lines_with_count_rate_and_postfix():
    out = io.StringIO()  # not a terminal, like a Snakemake log file
    bar = progress(range(5), desc="shard train 32 px", unit="img", every_s=0, file=out)
    for i in bar:
        bar.set_postfix(loss=0.5 / (i + 1))
    text = out.getvalue()
    assert "\r" not in text
    lines = text.splitlines()
    assert len(lines) == 6  # one per item (every_s=0) and the closing one
    assert lines[-1].startswith("shard train 32 px: 5/5 img (100.0 %), ")
    assert " img/s, " in lines[-1] and " elapsed, loss=0.1, done" in lines[-1]


def test_log_form_waits_every_s_between_lines():
    out = io.StringIO()
    for _ in progress(range(1000), desc="evaluate", every_s=3600, file=out):
        pass
    assert out.getvalue().splitlines() == [out.getvalue().strip()]  # only the closing line
    assert out.getvalue().startswith("evaluate: 1000/1000 (100.0 %), ")


def test_manual_form_counts_updates_and_closes_once():
    out = io.StringIO()
    with progress(total=4, desc="train", unit="step", every_s=3600, file=out) as bar:
        bar.update(3)
        bar.set_postfix(epoch="1/2", step=3)
    bar.close()
    assert out.getvalue().count("\n") == 1
    assert "train: 3/4 step (75.0 %)" in out.getvalue() and "epoch=1/2, step=3, done" in out.getvalue()


def test_terminal_gets_a_tqdm_bar():
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # 24 x 100 terminal
    try:
        with os.fdopen(slave, "w", closefd=False) as term:
            for _ in progress(range(3), desc="bar-test", unit="img", file=term):
                pass
            term.flush()
        shown = b""
        while select.select([master], [], [], 0.2)[0]:  # all that tqdm wrote to the terminal
            shown += os.read(master, 65536)
        shown = shown.decode()
    finally:
        os.close(master)
        os.close(slave)
    assert "bar-test" in shown and "3/3" in shown and "\r" in shown  # tqdm redraws in place


def test_disabled_prints_nothing_and_still_iterates():
    out = io.StringIO()
    bar = progress(range(3), desc="rank 1", file=out, enabled=False)
    assert list(bar) == [0, 1, 2]
    bar.set_postfix(loss=1.0)
    bar.update()
    assert out.getvalue() == ""


def test_environment_override(monkeypatch):
    out = io.StringIO()
    monkeypatch.setenv("DEEPIMAGE_PROGRESS", "off")
    assert list(progress(range(2), file=out)) == [0, 1] and out.getvalue() == ""
    monkeypatch.setenv("DEEPIMAGE_PROGRESS", "fancy")
    with pytest.raises(ValueError, match="DEEPIMAGE_PROGRESS='fancy': use one of bar, log, off"):
        progress(range(2), file=out)
