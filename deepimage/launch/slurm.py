"""Where the workers run under SLURM: the job this runs in, the launcher "auto" picks, the srun
workers' rendezvous and each srun task's rank.

"srun" starts one worker per task of the SLURM allocation this runs in (the batch script of a
job with --ntasks=np); each task's rank, world size and local rank come from SLURM
(SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID), the rendezvous address is the first node's NodeAddr
and the port is derived from the job id and the step id (each task reads both from srun), so the
workers meet over torch.distributed and no ssh between nodes is needed. Under horovodrun on
several SLURM nodes the host list comes from `scontrol show hostnames` (slurm_hosts).
"""
from __future__ import annotations

import os
import runpy
import shutil
import subprocess
import sys

# srun workers meet on MASTER_PORT = _PORT_BASE + (job id * _STEP_SLOTS + step id) % _PORT_SPAN:
# two jobs sharing a node, and two srun steps of one allocation (two resolutions trained at once
# in one batch script), get different ports without asking each other. Each job has _STEP_SLOTS
# ports; a job's steps from _STEP_SLOTS on reuse the next job's, and only clash with it if that
# job shares the node at the same time.
_PORT_BASE, _PORT_SPAN, _STEP_SLOTS = 20000, 20000, 32


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
    """MASTER_ADDR for the srun workers of this SLURM job (each task adds MASTER_PORT, which
    depends on its step: srun_worker_env)."""
    job = slurm_job(env)
    if not job or not job["nodelist"]:
        raise RuntimeError("launcher srun: no SLURM job here (SLURM_JOB_ID not set): run it inside "
                           "a SLURM allocation (sbatch, salloc), or set train.launcher: horovod")
    first = expand_nodelist(job["nodelist"])[0]
    return {"MASTER_ADDR": node_address(first)}


def rendezvous_port(job_id: str, step_id: str) -> int:
    """The port the tasks of one srun step meet on (see _STEP_SLOTS)."""
    try:
        job, step = int(job_id), int(step_id)
    except ValueError:
        raise SystemExit(f"launch --srun-task: SLURM_JOB_ID={job_id!r} / SLURM_STEP_ID={step_id!r} "
                         f"are not numbers: this runs as a task of srun") from None
    return _PORT_BASE + (job * _STEP_SLOTS + step) % _PORT_SPAN


def srun_worker_env(env: dict) -> dict[str, str]:
    """torch.distributed's variables for one srun task, from that task's SLURM variables."""
    try:
        return {"RANK": env["SLURM_PROCID"], "WORLD_SIZE": env["SLURM_NTASKS"],
                "LOCAL_RANK": env["SLURM_LOCALID"],
                "LOCAL_WORLD_SIZE": env.get("SLURM_NTASKS_PER_NODE", "").split("(")[0]
                or str(-(-int(env["SLURM_NTASKS"]) // int(env.get("SLURM_NNODES", "1")))),
                "MASTER_PORT": str(rendezvous_port(env["SLURM_JOB_ID"], env["SLURM_STEP_ID"]))}
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


def run_srun_task(module: str, args: list[str]) -> None:
    """In one srun task: set RANK / WORLD_SIZE / LOCAL_RANK, then run the module as __main__
    (its transport then sees a torchrun-style environment)."""
    os.environ.update(srun_worker_env(os.environ))
    sys.argv = [module, *args]
    runpy.run_module(module, run_name="__main__", alter_sys=True)

