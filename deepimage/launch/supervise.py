"""Run N workers to completion and stop them all, in bounded time, when one of them is lost.

    python -m deepimage.launch --launcher auto --np 2 --threads 2 -- deepimage.train --help

Launchers (deepimage.launch.command): "srun" starts one worker per task of the SLURM allocation
this runs in (deepimage.launch.slurm), "horovod" runs horovodrun (on one machine local workers,
on several SLURM nodes a host list from `scontrol show hostnames`; needs passwordless ssh between
them), "torchrun" runs torch.distributed.run on this machine. "auto" (the default) is srun
inside a SLURM allocation that has np tasks, horovod elsewhere.

Bounded failure: the launcher runs in a process group of its own; under horovodrun and torchrun
each worker runs below a small guard (`--rank-guard`) that waits for it and, when it dies,
records its rank, pid and signal or exit code. The first such record makes this process print
one line naming the lost rank, give the other ranks STOP_GRACE_S to exit (they notice the closed
connections), then stop the launcher's group and every process it started (SIGTERM, SIGKILL).
Under srun, `--kill-on-bad-exit` does the same and srun names the task. The guards' records go
to a temporary folder named after the launcher's host and pid; a SIGKILLed launcher cannot remove
it, so each launch first removes those of this host's launchers that are no longer running.
A launch given a time limit (`run(..., timeout_s=)`, the benchmarks) is stopped the same way
when it runs past it.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

from deepimage.launch.command import LAUNCHERS, launch_command, set_secrets_aside, take_secrets, worker_env
from deepimage.launch.slurm import resolve_launcher, run_srun_task, slurm_hosts, srun_rendezvous

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


class LaunchFailed(SystemExit):
    """A launch whose workers failed or ran past its time limit: the one-line message, and
    `reason` (what went wrong, without the command) for callers that add their own context."""

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


def run(launcher: str, np: int, module: str, args: list[str], threads: int, pin: bool = False,
        timeout_s: float | None = None, out=None) -> None:
    """Run the workers to completion; raise LaunchFailed (a SystemExit with one line) if any of
    them fails, and stop them all within STOP_GRACE_S (twice, at worst) of the first one that
    dies, or of `timeout_s` when given. `out` (default stdout) gets the launch's lines and the
    workers' output."""
    out = out or sys.stdout
    launcher = resolve_launcher(launcher, np)
    hosts = slurm_hosts(np) if launcher == "horovod" else None
    cmd = launch_command(launcher, np, module, args, hosts=hosts)
    env = worker_env(threads, np, pin)
    if launcher == "srun":
        env.update(srun_rendezvous())
        print(f"launch: rendezvous {env['MASTER_ADDR']} (port from the job and step ids)", file=out,
              flush=True)
    print("launch:", " ".join(cmd), file=out, flush=True)
    remove_stale_failure_dirs(out=out)
    with tempfile.TemporaryDirectory(prefix=failure_dir_prefix(os.getpid())) as failures:
        env[FAILURE_DIR_ENV] = failures
        if launcher == "horovod":
            env = set_secrets_aside(env, failures, hosts)
        # A group of its own: stopping the job reaches the launcher's whole group, not ours.
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, bufsize=1, start_new_session=True)
        watch = Watch(proc, failures, out, timeout_s)
        with watch.forwarding_signals():
            threading.Thread(target=watch.run, name="deepimage-launch-watch", daemon=True).start()
            copy_output(proc, launcher, out)
            proc.wait()
            watch.finished.wait()
    what = f"launch: {launcher} with {np} workers of {module}"
    if watch.timed_out:
        reason = f"ran past {timeout_s:g} s"
        raise LaunchFailed(f"{what} {reason}; all workers stopped", reason)
    if watch.lost is not None:
        reason = f"failed: {describe(watch.lost)}"
        raise LaunchFailed(f"{what} {reason}; all workers stopped {watch.stop_seconds:.1f} s after it "
                           f"was noticed", reason)
    if proc.returncode != 0:
        reason = f"failed (exit {proc.returncode})"
        raise LaunchFailed(f"{what} {reason}; the workers' output is above", reason)


def failure_dir_prefix(pid: int) -> str:
    """Name prefix of the failure folder of the launch whose launcher has this pid (on this host)."""
    return f"{_host_prefix()}{pid}-"


def _host_prefix() -> str:
    return f"deepimage-launch-{socket.gethostname()}-"


def remove_stale_failure_dirs(parent: str | None = None, out=None) -> list[str]:
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
        print(f"launch: removed {len(removed)} failure folder(s) of killed launches in {parent}",
              file=out or sys.stdout, flush=True)
    return removed


def copy_output(proc: subprocess.Popen, launcher: str, out) -> None:
    """The launcher's output to `out`, line by line, until every writer has closed it."""
    hiding = False
    for line in proc.stdout:
        # horovodrun ends a failed job with its own traceback; the workers' lines (prefixed
        # [rank]<stream>) above it already say why, and our one-line summary follows.
        hiding = hiding or (launcher == "horovod" and line.startswith("Traceback (most recent call last)"))
        if not hiding:
            out.write(line)
    out.flush()


def describe(record: dict) -> str:
    """'rank 1 (pid 123) was killed by SIGKILL' from a guard's record."""
    code = record["returncode"]
    how = (f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with code {code}")
    oom = " (the kernel's out-of-memory killer, or kill -9)" if code == -signal.SIGKILL else ""
    return f"rank {record['rank']} (pid {record['pid']}) {how}{oom}"


class Watch:
    """Watches one launch: remembers every process it starts, notices the first rank whose
    guard recorded a failure (or the time limit passing), and stops the rest (see the module doc)."""

    def __init__(self, proc: subprocess.Popen, failure_dir: str, out=None, timeout_s: float | None = None):
        self.proc, self.failure_dir, self.out = proc, failure_dir, out or sys.stdout
        self.deadline = None if timeout_s is None else time.monotonic() + timeout_s
        self.lost: dict | None = None  # the first failed rank's record
        self.timed_out = False
        self.stop_seconds = 0.0
        self.finished = threading.Event()
        self._seen: dict[int, object] = {}  # pid -> psutil.Process, everything below the launcher

    def run(self) -> None:
        try:
            while self.proc.poll() is None:
                self._remember()
                if self.deadline is not None and time.monotonic() > self.deadline:
                    self.timed_out = True
                    self.stop_tree()
                    break
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
              f"{STOP_GRACE_S:g} s to exit)", file=self.out, flush=True)
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
        reach the workers, whose group is not ours. Only the main thread can set handlers: a
        launch from another thread leaves the signals as they are."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return

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
    take_secrets()
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


def main(argv: list[str] | None = None) -> None:
    """python -m deepimage.launch: start the workers, or (internal) be one srun task or one rank's guard."""
    p = argparse.ArgumentParser(
        prog="python -m deepimage.launch",
        description="Start N worker processes of a deepimage module under srun, horovodrun or torchrun.")
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
