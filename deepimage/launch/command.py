"""The command line and environment that start N workers of a module under srun, horovodrun
or torchrun, each below its rank guard (deepimage.launch.supervise).

Each worker gets threads // np compute threads (OMP_NUM_THREADS and torch.set_num_threads via
DEEPIMAGE_THREADS, deepimage.runtime.apply_thread_limit), so N workers never oversubscribe the
cores the rule was given.
"""
from __future__ import annotations

import os
import shutil
import sys

from deepimage.launch.slurm import slurm_job
from deepimage.runtime import PIN_ENV

LAUNCHERS = ("auto", "srun", "horovod", "torchrun")


def launch_command(launcher: str, np: int, module: str, args: list[str],
                   hosts: str | None = None) -> list[str]:
    """The argv that starts `np` workers of `python -m module args...`."""
    if launcher not in LAUNCHERS or launcher == "auto":
        raise ValueError(f"train.launcher must be one of {LAUNCHERS} (auto resolved first), got {launcher!r}")
    if np < 1:
        raise ValueError(f"np must be >= 1, got {np}")
    # Under horovodrun and torchrun each worker runs below its rank guard (deepimage.launch.supervise).
    # (No --np: torchrun would take it for an abbreviation of its own --nproc-per-node.)
    worker = [sys.executable, "-m", "deepimage.launch", "--rank-guard", module, *args]
    if launcher == "srun":
        # One task per worker over all the job's nodes (given: the jobstep plugin drops
        # SLURM_NNODES, without which srun may pack the tasks on the first node); each task turns
        # its SLURM variables into RANK etc. (--srun-task).
        job = slurm_job() or {}
        nodes = ["--nodes", job["nnodes"]] if job.get("nnodes") else []
        return ["srun", "--ntasks", str(np), *nodes, "--kill-on-bad-exit=1", sys.executable, "-m",
                "deepimage.launch", "--srun-task", "--np", str(np), module, *args]
    if launcher == "horovod":
        # Prefer the horovodrun of this interpreter's environment (works without activation).
        beside = os.path.join(os.path.dirname(sys.executable), "horovodrun")
        exe = beside if os.path.exists(beside) else shutil.which("horovodrun")
        if exe is None:
            raise RuntimeError("horovodrun not found on PATH: run `make setup` (it builds Horovod), "
                               "or set train.launcher: torchrun")
        return [exe, "-np", str(np), "-H", hosts or f"localhost:{np}", "--gloo", *worker]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            "--nproc-per-node", str(np), *worker[1:]]


def worker_env(threads: int, np: int, pin: bool = False) -> dict[str, str]:
    """Environment for the workers: each limited to its share of `threads` cores (and pinned
    to that share with `pin`: deepimage.runtime.pin_to_share)."""
    per_worker = max(1, threads // np)
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS=str(per_worker), MKL_NUM_THREADS=str(per_worker),
               DEEPIMAGE_THREADS=str(per_worker), **{PIN_ENV: "1" if pin else "0"})
    return env

