"""What runs inside each worker before its transport: the thread limit and core pinning the
launcher granted (deepimage.launch.worker_env), the bound on every collective, and the stop
signals a worker turns into a clean stop after its current step.

    runtime.apply_thread_limit()           # first, in every worker
    runtime.set_comm_timeout(cfg.train.comm_timeout_s)
    stop = runtime.StopSignal()            # SIGTERM / SIGINT: stop.signum, no exit
    raise runtime.Stopped(stop.signum, ...) # after the step every rank agreed to stop at
"""
from __future__ import annotations

import contextlib
import os
import signal
from pathlib import Path

COMM_TIMEOUT_ENV = "DEEPIMAGE_COMM_TIMEOUT_S"  # read by deepimage.parallel.transport.base
# "1": each worker pins itself to its share of the cores (apply_thread_limit). The scaling stage
# asks for it (scaling.pin); training does not: Snakemake may run two training jobs at once
# without giving them disjoint cores, and both would pin to the same first cores.
PIN_ENV = "DEEPIMAGE_PIN"


def set_comm_timeout(seconds: float) -> None:
    """Call in a worker before its transport: train.comm_timeout_s bounds every collective
    (gloo process groups, the same-host path, Horovod's own gloo context)."""
    os.environ[COMM_TIMEOUT_ENV] = str(seconds)
    os.environ["HOROVOD_GLOO_TIMEOUT_SECONDS"] = str(int(max(1, seconds)))


def apply_thread_limit() -> int:
    """Call first in a worker: limit torch to the threads the launcher granted this process
    (and pin it to its share of the cores when the launch asked for it: pin_to_share)."""
    import torch

    threads = int(os.environ.get("DEEPIMAGE_THREADS", "0")) or max(1, (os.cpu_count() or 1))
    if os.environ.get(PIN_ENV) == "1":
        pin_to_share(threads)
    torch.set_num_threads(threads)
    return threads


def pin_to_share(threads: int) -> list[int]:
    """Pin this worker (every thread it has, and so every thread it starts) to cores
    [r*T, (r+1)*T) of the cores it was given (its affinity at start: a SLURM cgroup or taskset
    included), r its local rank, T `threads`; returns them. A share past the last core wraps."""
    given = sorted(os.sched_getaffinity(0))
    local = int(os.environ.get("LOCAL_RANK", os.environ.get("HOROVOD_LOCAL_RANK", "0")))
    share = [given[(local * threads + i) % len(given)] for i in range(min(threads, len(given)))]
    for tid in os.listdir("/proc/self/task"):  # threads started before this call (torch's)
        with contextlib.suppress(OSError):
            os.sched_setaffinity(int(tid), share)
    return share


class StopSignal:
    """Records SIGTERM / SIGINT instead of dying, so the step in progress can finish; the
    training loop reads `signum` (0: none) after each step."""

    def __init__(self):
        self.signum = 0
        for s in (signal.SIGTERM, signal.SIGINT):
            signal.signal(s, self.handle)

    def handle(self, signum, _frame) -> None:
        self.signum = signum


class Stopped(Exception):
    """Every rank stopped after the same step because a worker received SIGTERM or SIGINT; the
    worker exits with 128 + signum (deepimage.launch.supervise.STOPPED_CODES: not a failure)."""

    def __init__(self, signum: int, global_step: int, written: bool, path: Path | None):
        name = signal.Signals(signum).name
        where = (f"checkpoint {path}" if path else "checkpoint written by rank 0") if written \
            else "the last checkpoint is recent enough, none written"
        super().__init__(f"stopped by {name} after step {global_step}: {where}; rerun to resume")
        self.signum = signum
