"""The command line and environment that start N workers of a module under srun, horovodrun
or torchrun, each below its rank guard (deepimage.launch.supervise).

Each worker gets threads // np compute threads (OMP_NUM_THREADS and torch.set_num_threads via
DEEPIMAGE_THREADS, deepimage.runtime.apply_thread_limit), so N workers never oversubscribe the
cores the rule was given.

horovodrun writes every variable of its environment into each worker's command line (`sh -c
env K=V ... python ...`, there for the worker's life), which every user of the host reads in
`ps`. The variables that hold credentials (a tracking URI with a password, MLflow's or a cloud's
password / token / secret key) are set aside in a file only this user reads (set_secrets_aside)
and each worker's rank guard takes them back (take_secrets).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import socket
import sys

from deepimage.launch.slurm import slurm_job
from deepimage.redact import redact
from deepimage.runtime import PIN_ENV

SECRETS_ENV = "DEEPIMAGE_LAUNCH_SECRETS"  # the file of the variables set aside, for the rank guards
_SECRET_NAME = re.compile(r"PASSWORD|TOKEN|SECRET|CREDENTIAL|PRIVATE_KEY|ACCESS_KEY", re.IGNORECASE)

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


def secret_names(env: dict[str, str]) -> list[str]:
    """The variables of `env` that hold a credential: by their name, or a URI with a password or
    a token in their value."""
    return sorted(k for k, v in env.items() if _SECRET_NAME.search(k) or redact(v) != v)


def set_secrets_aside(env: dict[str, str], folder: str, hosts: str | None = None) -> dict[str, str]:
    """`env` without its secrets (secret_names), which go to a file in `folder` (a private
    temporary folder of the launch) that only this user reads; SECRETS_ENV names it. `env` as it
    is when a host of `hosts` is another one (horovodrun's ssh launch would not carry the file)."""
    local = {"localhost", "127.0.0.1", socket.gethostname()}
    if hosts and any(h.rsplit(":", 1)[0] not in local for h in hosts.split(",")):
        return env
    secret = {k: env[k] for k in secret_names(env)}
    if not secret:
        return env
    os.makedirs(os.path.join(folder, "secrets"), mode=0o700)  # a folder: no rank's failure record
    path = os.path.join(folder, "secrets", "env.json")
    with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as f:
        json.dump(secret, f)
    return {**{k: v for k, v in env.items() if k not in secret}, SECRETS_ENV: path}


def take_secrets(env=None) -> None:
    """Put the variables set aside (set_secrets_aside) back into `env` (default os.environ)."""
    env = os.environ if env is None else env
    path = env.pop(SECRETS_ENV, None)
    if path:
        with open(path) as f:
            env.update(json.load(f))
