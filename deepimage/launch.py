"""Start N worker processes of a deepimage module under srun, horovodrun or torchrun.

    python -m deepimage.launch --launcher auto --np 2 --threads 2 -- deepimage.train --help

Launchers: "srun" starts one worker per task of the SLURM allocation this runs in (the batch
script of a job with --ntasks=np); each task's rank, world size and local rank come from SLURM
(SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID), the rendezvous address is the first node's NodeAddr
and the port is derived from the job id, so the workers meet over torch.distributed and no ssh
between nodes is needed. "horovod" runs horovodrun: on one machine local workers, on several
SLURM nodes a host list from `scontrol show hostnames` (needs passwordless ssh between them).
"torchrun" runs torch.distributed.run on this machine. "auto" (the default) is srun inside a
SLURM allocation that has np tasks, horovod elsewhere.

Each worker gets threads // np compute threads (OMP_NUM_THREADS and torch.set_num_threads via
DEEPIMAGE_THREADS), so N workers never oversubscribe the cores the rule was given.
"""
from __future__ import annotations

import argparse
import os
import runpy
import shutil
import subprocess
import sys

LAUNCHERS = ("auto", "srun", "horovod", "torchrun")
# srun workers meet on MASTER_PORT = _PORT_BASE + job id % _PORT_SPAN: two jobs sharing a node
# (two resolutions trained at once) get different ports without asking each other.
_PORT_BASE, _PORT_SPAN = 20000, 20000


def slurm_job(env: dict | None = None) -> dict[str, str] | None:
    """{"job_id", "nodelist", "ntasks", "nnodes"} of the SLURM job this runs in, else None.

    From the environment where SLURM set it, else from `scontrol show job`: the Snakemake
    jobstep plugin runs a rule's shell with only SLURM_JOB_ID left of the SLURM variables."""
    env = os.environ if env is None else env
    job_id = env.get("SLURM_JOB_ID")
    if not job_id:
        return None
    job = {"job_id": job_id, "nodelist": env.get("SLURM_JOB_NODELIST", ""),
           "ntasks": env.get("SLURM_NTASKS", ""), "nnodes": env.get("SLURM_NNODES", "")}
    if not all(job.values()) and shutil.which("scontrol"):
        out = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True).stdout
        fields = dict(f.split("=", 1) for f in out.split() if "=" in f)
        job["nodelist"] = job["nodelist"] or fields.get("NodeList", "")
        job["ntasks"] = job["ntasks"] or fields.get("NumTasks", "")
        job["nnodes"] = job["nnodes"] or fields.get("NumNodes", "")
    return job


def resolve_launcher(launcher: str, np: int, env: dict | None = None) -> str:
    """"auto" -> "srun" in a SLURM batch script whose allocation has >= np tasks, else "horovod".

    Inside a job step (SLURM_STEP_ID set, e.g. a rule the jobstep plugin wrapped in `srun -n1`)
    a nested srun would wait for CPUs its own step holds, so auto stays local there."""
    if launcher != "auto":
        return launcher
    env = os.environ if env is None else env
    job = None if "SLURM_STEP_ID" in env else slurm_job(env)
    tasks = int(job["ntasks"] or 0) if job else 0
    return "srun" if tasks >= np else "horovod"


def expand_nodelist(nodelist: str) -> list[str]:
    """`n[1-2],gpu07` -> ["n1", "n2", "gpu07"] (scontrol needs no running cluster for this)."""
    out = subprocess.run(["scontrol", "show", "hostnames", nodelist], check=True,
                         capture_output=True, text=True).stdout
    return out.split()


def node_address(node: str) -> str:
    """The address other nodes reach `node` at: its NodeAddr (node names need not resolve)."""
    out = subprocess.run(["scontrol", "show", "node", node], capture_output=True, text=True).stdout
    for field in out.split():
        if field.startswith("NodeAddr="):
            return field.removeprefix("NodeAddr=")
    return node  # not known to scontrol: the name is the address (a DNS name)


def srun_rendezvous(env: dict | None = None) -> dict[str, str]:
    """MASTER_ADDR / MASTER_PORT for the srun workers of this SLURM job."""
    job = slurm_job(env)
    if not job or not job["nodelist"]:
        raise RuntimeError("launcher srun: no SLURM job here (SLURM_JOB_ID not set): run it inside "
                           "a SLURM allocation (sbatch, salloc), or set train.launcher: horovod")
    first = expand_nodelist(job["nodelist"])[0]
    return {"MASTER_ADDR": node_address(first),
            "MASTER_PORT": str(_PORT_BASE + int(job["job_id"]) % _PORT_SPAN)}


def srun_worker_env(env: dict) -> dict[str, str]:
    """torch.distributed's variables for one srun task, from that task's SLURM variables."""
    try:
        return {"RANK": env["SLURM_PROCID"], "WORLD_SIZE": env["SLURM_NTASKS"],
                "LOCAL_RANK": env["SLURM_LOCALID"],
                "LOCAL_WORLD_SIZE": env.get("SLURM_NTASKS_PER_NODE", "").split("(")[0]
                or str(-(-int(env["SLURM_NTASKS"]) // int(env.get("SLURM_NNODES", "1"))))}
    except KeyError as e:
        raise SystemExit(f"launch --srun-task: {e.args[0]} is not set: this runs as a task of srun")


def slurm_hosts(np: int) -> str | None:
    """`host:slots,...` for horovodrun when the SLURM allocation spans several nodes, else None."""
    nodelist = os.environ.get("SLURM_JOB_NODELIST")
    if not nodelist or not shutil.which("scontrol"):
        return None
    hosts = expand_nodelist(nodelist)
    if len(hosts) <= 1:
        return None
    slots = -(-np // len(hosts))  # ceil: np workers spread over the allocated nodes
    return ",".join(f"{h}:{slots}" for h in hosts)


def launch_command(launcher: str, np: int, module: str, args: list[str],
                   hosts: str | None = None) -> list[str]:
    """The argv that starts `np` workers of `python -m module args...`."""
    if launcher not in LAUNCHERS or launcher == "auto":
        raise ValueError(f"train.launcher must be one of {LAUNCHERS} (auto resolved first), got {launcher!r}")
    if np < 1:
        raise ValueError(f"np must be >= 1, got {np}")
    worker = [sys.executable, "-m", module, *args]
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
    launcher = resolve_launcher(launcher, np)
    cmd = launch_command(launcher, np, module, args, hosts=slurm_hosts(np) if launcher == "horovod" else None)
    env = worker_env(threads, np)
    if launcher == "srun":
        env.update(srun_rendezvous())
        print(f"launch: rendezvous {env['MASTER_ADDR']}:{env['MASTER_PORT']}", flush=True)
    print("launch:", " ".join(cmd), flush=True)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE,
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
    p.add_argument("--launcher", choices=LAUNCHERS, default="auto")
    p.add_argument("--np", type=int, required=True)
    p.add_argument("--srun-task", action="store_true",
                   help="internal: run the module as this srun task's worker")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                   help="cores for all workers together (the rule's threads)")
    p.add_argument("module", help="worker module, e.g. deepimage.train")
    p.add_argument("args", nargs=argparse.REMAINDER)
    a = p.parse_args(argv)
    args = a.args[1:] if a.args[:1] == ["--"] else a.args
    if a.srun_task:
        run_srun_task(a.module, args)
    else:
        run(a.launcher, a.np, a.module, args, a.threads)


def run_srun_task(module: str, args: list[str]) -> None:
    """In one srun task: set RANK / WORLD_SIZE / LOCAL_RANK, then run the module as __main__
    (its transport then sees a torchrun-style environment)."""
    os.environ.update(srun_worker_env(os.environ))
    sys.argv = [module, *args]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
