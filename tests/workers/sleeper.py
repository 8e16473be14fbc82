"""Worker for tests/test_transport.py's timed-out launch: writes <out>/rank<r>.pid, then sleeps
far longer than the launch may run. Imports nothing heavy, so it starts at once.

    torchrun --standalone --nproc-per-node 2 -m tests.workers.sleeper --out DIR
"""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path


def main(argv=None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args(argv)
    rank = os.environ.get("HOROVOD_RANK", os.environ.get("RANK", "0"))
    (a.out / f"rank{rank}.pid").write_text(str(os.getpid()))
    time.sleep(3600)


if __name__ == "__main__":
    main()
