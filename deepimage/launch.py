"""Start N worker processes of a deepimage module under horovodrun or torchrun.

    python -m deepimage.launch --launcher horovod --np 2 --threads 2 -- deepimage.train --help

Each worker gets threads // np compute threads (OMP_NUM_THREADS and torch.set_num_threads via
DEEPIMAGE_THREADS), so N workers never oversubscribe the cores the rule was given. On SLURM with
several nodes, the host list comes from `scontrol show hostnames` (horovodrun needs passwordless
ssh between them); on one machine the workers are local and no ssh is used.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys

LAUNCHERS = ("horovod", "torchrun")


def slurm_hosts(np: int) -> str | None:
    """`host:slots,...` for horovodrun when the SLURM allocation spans several nodes, else None."""
    nodelist = os.environ.get("SLURM_JOB_NODELIST")
    if not nodelist or not shutil.which("scontrol"):
        return None
    hosts = subprocess.run(["scontrol", "show", "hostnames", nodelist], check=True,
                           capture_output=True, text=True).stdout.split()
    if len(hosts) <= 1:
        return None
    slots = -(-np // len(hosts))  # ceil: np workers spread over the allocated nodes
    return ",".join(f"{h}:{slots}" for h in hosts)


def launch_command(launcher: str, np: int, module: str, args: list[str],
                   hosts: str | None = None) -> list[str]:
    """The argv that starts `np` workers of `python -m module args...`."""
    if launcher not in LAUNCHERS:
        raise ValueError(f"train.launcher must be one of {LAUNCHERS}, got {launcher!r}")
    if np < 1:
        raise ValueError(f"np must be >= 1, got {np}")
    worker = [sys.executable, "-m", module, *args]
    if launcher == "horovod":
        # Prefer the horovodrun of this interpreter's environment (works without activation).
        beside = os.path.join(os.path.dirname(sys.executable), "horovodrun")
        exe = beside if os.path.exists(beside) else shutil.which("horovodrun")
        if exe is None:
            raise RuntimeError("horovodrun not found on PATH: run `make setup` (it builds Horovod), "
                               "or set train.launcher: torchrun")
        return [exe, "-np", str(np), "-H", hosts or f"localhost:{np}", "--gloo", *worker]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            "--nproc-per-node", str(np), "-m", module, *args]


def worker_env(threads: int, np: int) -> dict[str, str]:
    """Environment for the workers: each limited to its share of `threads` cores."""
    per_worker = max(1, threads // np)
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS=str(per_worker), MKL_NUM_THREADS=str(per_worker),
               DEEPIMAGE_THREADS=str(per_worker))
    return env


def run(launcher: str, np: int, module: str, args: list[str], threads: int) -> None:
    """Run the workers to completion; raise with the command line if any of them fails."""
    cmd = launch_command(launcher, np, module, args, hosts=slurm_hosts(np) if launcher == "horovod" else None)
    print("launch:", " ".join(cmd), flush=True)
    proc = subprocess.Popen(cmd, env=worker_env(threads, np), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, bufsize=1)
    hiding = False
    for line in proc.stdout:
        # horovodrun ends a failed job with its own traceback; the workers' lines (prefixed
        # [rank]<stream>) above it already say why, and our one-line summary follows.
        hiding = hiding or (launcher == "horovod" and line.startswith("Traceback (most recent call last)"))
        if not hiding:
            sys.stdout.write(line)
    sys.stdout.flush()
    proc.wait()
    if proc.returncode != 0:
        raise SystemExit(f"launch: {launcher} with {np} workers of {module} failed "
                         f"(exit {proc.returncode}); the workers' output is above")


def apply_thread_limit() -> int:
    """Call first in a worker: limit torch to the threads the launcher granted this process."""
    import torch

    threads = int(os.environ.get("DEEPIMAGE_THREADS", "0")) or max(1, (os.cpu_count() or 1))
    torch.set_num_threads(threads)
    return threads


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--launcher", choices=LAUNCHERS, default="horovod")
    p.add_argument("--np", type=int, required=True)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                   help="cores for all workers together (the rule's threads)")
    p.add_argument("module", help="worker module, e.g. deepimage.train")
    p.add_argument("args", nargs=argparse.REMAINDER)
    a = p.parse_args(argv)
    args = a.args[1:] if a.args[:1] == ["--"] else a.args
    run(a.launcher, a.np, a.module, args, a.threads)


if __name__ == "__main__":
    main()
