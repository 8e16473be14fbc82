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

Bounded failure: the launcher runs in a process group of its own; under horovodrun and torchrun
each worker runs below a small guard (`--rank-guard`) that waits for it and, when it dies,
records its rank, pid and signal or exit code. The first such record makes this process print
one line naming the lost rank, give the other ranks STOP_GRACE_S to exit (they notice the closed
connections), then stop the launcher's group and every process it started (SIGTERM, SIGKILL).
Under srun, `--kill-on-bad-exit` does the same and srun names the task. The guards' records go
to a temporary folder named after the launcher's host and pid; a SIGKILLed launcher cannot remove
it, so each launch first removes those of this host's launchers that are no longer running.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import runpy
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

LAUNCHERS = ("auto", "srun", "horovod", "torchrun")
# srun workers meet on MASTER_PORT = _PORT_BASE + job id % _PORT_SPAN: two jobs sharing a node
# (two resolutions trained at once) get different ports without asking each other.
_PORT_BASE, _PORT_SPAN = 20000, 20000
# After the first lost rank: seconds the others get to exit on their own, then SIGTERM, then
# SIGKILL after as long again. A worker blocked in a collective with a dead peer fails within a
# second or two (its connections close), so 10 s is ample and keeps the whole stop under 30 s.
STOP_GRACE_S = 10.0
_POLL_S = 0.5
FAILURE_DIR_ENV = "DEEPIMAGE_FAILURE_DIR"  # where each rank's guard records a failure
# Exit codes of a worker that stopped on purpose after SIGTERM / SIGINT (deepimage.train
# finishes the step and checkpoints, all ranks after the same step): no failure, no early stop,
# rank 0 may still be writing the checkpoint.
STOPPED_CODES = (128 + signal.SIGTERM, 128 + signal.SIGINT)
COMM_TIMEOUT_ENV = "DEEPIMAGE_COMM_TIMEOUT_S"  # read by deepimage.parallel.transport.base
# "1": each worker pins itself to its share of the cores (apply_thread_limit). The scaling stage
# asks for it (scaling.pin); training does not: Snakemake may run two training jobs at once
# without giving them disjoint cores, and both would pin to the same first cores.
PIN_ENV = "DEEPIMAGE_PIN"


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
    # Under horovodrun and torchrun each worker runs below its rank guard (see the module doc).
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
    to that share with `pin`, see pin_to_share)."""
    per_worker = max(1, threads // np)
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS=str(per_worker), MKL_NUM_THREADS=str(per_worker),
               DEEPIMAGE_THREADS=str(per_worker), **{PIN_ENV: "1" if pin else "0"})
    return env


def run(launcher: str, np: int, module: str, args: list[str], threads: int, pin: bool = False) -> None:
    """Run the workers to completion; raise with the command line if any of them fails, and
    stop them all within STOP_GRACE_S (twice, at worst) of the first one that dies."""
    launcher = resolve_launcher(launcher, np)
    cmd = launch_command(launcher, np, module, args, hosts=slurm_hosts(np) if launcher == "horovod" else None)
    env = worker_env(threads, np, pin)
    if launcher == "srun":
        env.update(srun_rendezvous())
        print(f"launch: rendezvous {env['MASTER_ADDR']}:{env['MASTER_PORT']}", flush=True)
    print("launch:", " ".join(cmd), flush=True)
    remove_stale_failure_dirs()
    with tempfile.TemporaryDirectory(prefix=failure_dir_prefix(os.getpid())) as failures:
        env[FAILURE_DIR_ENV] = failures
        # A group of its own: stopping the job reaches the launcher's whole group, not ours.
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, bufsize=1, start_new_session=True)
        watch = Watch(proc, failures)
        with watch.forwarding_signals():
            threading.Thread(target=watch.run, name="deepimage-launch-watch", daemon=True).start()
            copy_output(proc, launcher)
            proc.wait()
            watch.finished.wait()
    if watch.lost is not None:
        raise SystemExit(f"launch: {launcher} with {np} workers of {module} failed: {describe(watch.lost)}; "
                         f"all workers stopped {watch.stop_seconds:.1f} s after it was noticed")
    if proc.returncode != 0:
        raise SystemExit(f"launch: {launcher} with {np} workers of {module} failed "
                         f"(exit {proc.returncode}); the workers' output is above")


def failure_dir_prefix(pid: int) -> str:
    """Name prefix of the failure folder of the launch whose launcher has this pid (on this host)."""
    return f"{_host_prefix()}{pid}-"


def _host_prefix() -> str:
    return f"deepimage-launch-{socket.gethostname()}-"


def remove_stale_failure_dirs(parent: str | None = None) -> list[str]:
    """Remove the failure folders (in parent, default the temporary folder) of launches on this
    host whose launcher is gone; returns their paths. A launch removes its own folder when it ends,
    but a SIGKILLed one (a killed job, a preempted node) cannot. A folder whose launcher's pid is
    running is kept, whoever runs under that pid now."""
    import psutil

    parent = parent or tempfile.gettempdir()
    mine = re.compile(re.escape(_host_prefix()) + r"(\d+)-")
    removed = []
    for entry in os.scandir(parent):
        found = mine.match(entry.name)
        if found and entry.is_dir(follow_symlinks=False) and not psutil.pid_exists(int(found.group(1))):
            shutil.rmtree(entry.path, ignore_errors=True)
            removed.append(entry.path)
    if removed:
        print(f"launch: removed {len(removed)} failure folder(s) of killed launches in {parent}", flush=True)
    return removed


def copy_output(proc: subprocess.Popen, launcher: str) -> None:
    """The launcher's output to ours, line by line, until every writer has closed it."""
    hiding = False
    for line in proc.stdout:
        # horovodrun ends a failed job with its own traceback; the workers' lines (prefixed
        # [rank]<stream>) above it already say why, and our one-line summary follows.
        hiding = hiding or (launcher == "horovod" and line.startswith("Traceback (most recent call last)"))
        if not hiding:
            sys.stdout.write(line)
    sys.stdout.flush()


def describe(record: dict) -> str:
    """'rank 1 (pid 123) was killed by SIGKILL' from a guard's record."""
    code = record["returncode"]
    how = (f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with code {code}")
    oom = " (the kernel's out-of-memory killer, or kill -9)" if code == -signal.SIGKILL else ""
    return f"rank {record['rank']} (pid {record['pid']}) {how}{oom}"


class Watch:
    """Watches one launch: remembers every process it starts, notices the first rank whose
    guard recorded a failure, and stops the rest (see the module doc)."""

    def __init__(self, proc: subprocess.Popen, failure_dir: str):
        self.proc, self.failure_dir = proc, failure_dir
        self.lost: dict | None = None  # the first failed rank's record
        self.stop_seconds = 0.0
        self.finished = threading.Event()
        self._seen: dict[int, object] = {}  # pid -> psutil.Process, everything below the launcher

    def run(self) -> None:
        try:
            while self.proc.poll() is None:
                self._remember()
                if self.lost is None:
                    self.lost = self._first_failure()
                    if self.lost is not None:
                        self._stop_after_failure()
                        break
                time.sleep(_POLL_S)
            self._remember_if_running()
            self.lost = self.lost or self._first_failure()
            self.kill_leftovers()
        finally:
            self.finished.set()

    def _first_failure(self) -> dict | None:
        records = []
        for name in os.listdir(self.failure_dir):
            try:
                with open(os.path.join(self.failure_dir, name)) as f:
                    records.append(json.load(f))
            except (OSError, ValueError):
                continue  # being written: next poll
        records = [r for r in records if r["returncode"] not in STOPPED_CODES]
        # A rank killed by a signal is the cause; the others exited after it (closed connections).
        return min(records, key=lambda r: (r["returncode"] >= 0, r["time"])) if records else None

    def _stop_after_failure(self) -> None:
        t0 = time.monotonic()
        print(f"launch: {describe(self.lost)}; stopping the job (the other ranks get "
              f"{STOP_GRACE_S:g} s to exit)", flush=True)
        deadline = t0 + STOP_GRACE_S
        while self.proc.poll() is None and time.monotonic() < deadline:
            self._remember()
            time.sleep(_POLL_S / 5)
        self.stop_tree()
        self.stop_seconds = time.monotonic() - t0

    def _remember(self) -> None:
        """Add the processes now below the launcher (one may leave it: setsid, re-parenting)."""
        import psutil

        try:
            for p in psutil.Process(self.proc.pid).children(recursive=True):
                self._seen.setdefault(p.pid, p)
        except psutil.Error:
            pass  # the launcher exited meanwhile

    def _remember_if_running(self) -> None:
        if self.proc.poll() is None:
            self._remember()

    def _alive(self) -> list:
        import psutil

        alive = []
        for p in self._seen.values():
            try:  # is_running() also checks the start time: a reused pid is not ours
                if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                    alive.append(p)
            except psutil.Error:
                pass
        return alive

    def _signal_all(self, sig: signal.Signals) -> None:
        try:
            os.killpg(self.proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass
        for p in self._alive():
            try:
                p.send_signal(sig)
            except Exception:  # psutil.Error: gone meanwhile
                pass

    def stop_tree(self) -> None:
        """SIGTERM to the launcher's group and everything it started; SIGKILL after the grace."""
        self._remember_if_running()
        self._signal_all(signal.SIGTERM)
        self._signal_all(signal.SIGCONT)  # a stopped (hung) process acts on SIGTERM only once resumed
        deadline = time.monotonic() + STOP_GRACE_S
        while (self.proc.poll() is None or self._alive()) and time.monotonic() < deadline:
            time.sleep(_POLL_S / 5)
        self._signal_all(signal.SIGKILL)
        self.proc.wait()

    def kill_leftovers(self) -> None:
        """No process of the launch outlives it (e.g. a worker its launcher did not stop)."""
        if self._alive():
            self.stop_tree()

    @contextlib.contextmanager
    def forwarding_signals(self):
        """SIGTERM / SIGINT to this process (Snakemake stopping the job, SLURM's time limit)
        reach the workers, whose group is not ours."""
        def forward(signum, frame):
            self._remember_if_running()
            self._signal_all(signal.Signals(signum))
        old = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield
        finally:
            for s, handler in old.items():
                signal.signal(s, handler)


def run_rank_guard(module: str, args: list[str]) -> None:
    """Run one worker as a child; if it fails, record its rank, pid and signal or exit code
    where the launch's Watch looks, and exit as it did. The worker dies with its guard."""
    rank = os.environ.get("HOROVOD_RANK", os.environ.get("RANK", "?"))
    child = subprocess.Popen([sys.executable, "-m", module, *args], preexec_fn=_die_with_parent)
    for sig in (signal.SIGTERM, signal.SIGINT):  # the worker decides what a signal means
        signal.signal(sig, lambda signum, frame: child.send_signal(signum))
    code = child.wait()
    if code != 0:
        record = {"rank": rank, "pid": child.pid, "returncode": code, "time": time.time()}
        print(f"launch: {describe(record)}", file=sys.stderr, flush=True)
        folder = os.environ.get(FAILURE_DIR_ENV)
        if folder and os.path.isdir(folder):
            tmp = os.path.join(folder, f".rank{rank}.tmp")
            with open(tmp, "w") as f:
                json.dump(record, f)
            os.replace(tmp, os.path.join(folder, f"rank{rank}.json"))
    sys.exit(code if code >= 0 else 128 - code)


def _die_with_parent() -> None:
    """In the worker, before exec: SIGKILL when its guard dies (Linux prctl PR_SET_PDEATHSIG)."""
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1: PR_SET_PDEATHSIG


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


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--launcher", choices=LAUNCHERS, default="auto")
    p.add_argument("--np", type=int, help="number of workers (required to launch)")
    p.add_argument("--srun-task", action="store_true",
                   help="internal: run the module as this srun task's worker")
    p.add_argument("--rank-guard", action="store_true",
                   help="internal: run the module as a child and record how it failed")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                   help="cores for all workers together (the rule's threads)")
    p.add_argument("module", help="worker module, e.g. deepimage.train")
    p.add_argument("args", nargs=argparse.REMAINDER)
    a = p.parse_args(argv)
    args = a.args[1:] if a.args[:1] == ["--"] else a.args
    if a.srun_task:
        run_srun_task(a.module, args)
    elif a.rank_guard:
        run_rank_guard(a.module, args)
    elif a.np is None:
        p.error("--np is required")
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
