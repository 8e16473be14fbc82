"""Test helper: start a worker module under horovodrun or torchrun and read its per-rank reports;
a launch that runs past its timeout is stopped together with every process it started.

    from workers.transport_launch import launch_worker
    reports = launch_worker("torchrun", 3, "tests.workers.transport_check", tmp_path, "--expect", "torchrun")
"""
from __future__ import annotations

import collections
import json
import os
import signal
import subprocess
from pathlib import Path

from deepimage.launch import launch_command, worker_env

ROOT = Path(__file__).resolve().parents[2]
LAUNCH_TIMEOUT = 180
STOP_GRACE_S = 10.0  # SIGTERM lets torchrun / horovodrun stop their workers; then SIGKILL


def launch_worker(launcher: str, np: int, module: str, out: Path, *args: str) -> list[dict]:
    """Run `python -m module --out out args...` on np processes (one thread each); return every
    rank's <out>/rank<r>.json, after asserting the launch exited 0."""
    out.mkdir(parents=True, exist_ok=True)
    cmd = launch_command(launcher, np, module, ["--out", str(out), *args])
    proc = run_launch(cmd, worker_env(threads=np, np=np), LAUNCH_TIMEOUT)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(np)]


def run_launch(cmd: list[str], env: dict | None, timeout: float) -> subprocess.CompletedProcess:
    """subprocess.run(cmd, capture_output=True, text=True) from the repository root, except that
    on timeout the launcher and all its workers are stopped before TimeoutError is raised."""
    return finish_launch(start_launch(cmd, env), cmd, timeout)


def start_launch(cmd: list[str], env: dict | None) -> subprocess.Popen:
    """The launcher in a session (process group) of its own, so that stopping it reaches what
    it started in that group."""
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def finish_launch(proc: subprocess.Popen, cmd: list[str], timeout: float) -> subprocess.CompletedProcess:
    """Wait for the launch; past `timeout`, stop it with its workers and raise TimeoutError."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        stop_tree(proc)
        out, err = proc.communicate()
        raise TimeoutError(f"{' '.join(cmd)} ran past {timeout} s; stopped it and its workers:\n"
                           f"{out[-3000:]}\n{err[-3000:]}") from None
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def descendants(pid: int) -> list[int]:
    """Every living process below `pid` (children, their children, ...), from /proc."""
    children = collections.defaultdict(list)
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue  # exited while we looked
        ppid = int(stat.rsplit(")", 1)[1].split()[1])  # after "(comm)": state, ppid
        children[ppid].append(int(entry))
    found, todo = [], [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        found += kids
        todo += kids
    return found


def stop_tree(proc: subprocess.Popen, grace: float = STOP_GRACE_S) -> None:
    """SIGTERM, then after `grace` SIGKILL, to the launcher's process group and to every process
    below it. Listing the processes first matters: torchrun starts each worker in a session of
    its own (outside the launcher's group), and a worker whose launcher died is re-parented to
    init, after which nothing links it to the launch."""
    pids = descendants(proc.pid)
    _signal(proc.pid, pids, signal.SIGTERM)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        pass
    _signal(proc.pid, pids + descendants(proc.pid), signal.SIGKILL)
    proc.wait()


def _signal(group: int, pids: list[int], sig: signal.Signals) -> None:
    for send, target in [(os.killpg, group)] + [(os.kill, p) for p in pids]:
        try:
            send(target, sig)
        except ProcessLookupError:
            pass  # already gone
