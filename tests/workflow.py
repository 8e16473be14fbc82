"""Run the real Snakemake workflow in a scratch folder (shared by the workflow tests)."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
SNAKEMAKE = str(Path(sys.executable).with_name("snakemake"))


def mlflow_server_env() -> dict[str, str]:
    """The environment for a test's `mlflow server`: without MLflow's job runner (GenAI
    evaluation jobs, which nothing here uses). Its huey store, a tempfile.mkdtemp(dir="/dev/shm")
    folder, is made at every server start and never removed: one left per start otherwise."""
    return {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_mlflow_server(store_uri: str, port: int, log: Path, timeout: float = 120) -> subprocess.Popen:
    """`mlflow server` on 127.0.0.1:port over store_uri, in its own process group (stopped as a
    group), started with mlflow_server_env(); returned once /health answers 200. The log is
    appended to, so a restarted server keeps its first start's lines."""
    with log.open("a") as out:
        proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri", store_uri,
                                 "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                                cwd=log.parent, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                env=mlflow_server_env())
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"mlflow server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return proc
        except OSError:
            time.sleep(0.3)
    stop_process_group(proc)
    raise AssertionError(f"mlflow server not up on port {port} after {timeout:.0f} s:\n{log.read_text()[-3000:]}")


def stop_process_group(proc: subprocess.Popen) -> None:
    """SIGTERM to a process started with start_new_session (a server and its workers), SIGKILL if
    it lingers past 20 s."""
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=20)


def snakemake(workdir: Path, *args: str, config: dict | None = None,
              timeout: float = 600) -> subprocess.CompletedProcess:
    """`snakemake --snakefile <repo>/Snakefile --directory workdir ...`, output captured."""
    cmd = [SNAKEMAKE, "--snakefile", str(ROOT / "Snakefile"), "--directory", str(workdir), *args]
    if config is not None:
        path = workdir / "test-config.yaml"
        path.write_text(yaml.safe_dump(config))
        cmd += ["--configfile", str(path)]
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


def tiny_config(workdir: Path) -> dict:
    cfg = yaml.safe_load((ROOT / "tests" / "configs" / "tiny.yaml").read_text())
    cfg["mlflow"] = {"tracking_uri": f"sqlite:///{workdir / 'mlflow.db'}", "experiment": "e2e"}
    return cfg


def log_tail(workdir: Path, lines: int = 60) -> str:
    """The last lines of every job log, for assertion messages."""
    out = []
    for log in sorted((workdir / "logs").rglob("*.log")) if (workdir / "logs").is_dir() else []:
        out.append(f"--- {log}\n" + "\n".join(log.read_text(errors="replace").splitlines()[-lines:]))
    return "\n".join(out)


def remove_orphaned_semaphores(since: float) -> list[str]:
    """Unlink Python multiprocessing's named semaphores (/dev/shm/sem.mp-*) changed at or after
    `since` (a time.time()) that no living process maps; returns their names. A job SIGKILLed as a
    whole (as a node failure or a scheduler's kill would) takes with it the resource tracker that
    would have unlinked them (horovodrun's spawn children hold about ten per job). glibc maps a
    semaphore under its temporary name, so the match is by device and inode, not by path; files
    this user may not remove are left."""
    shm = Path("/dev/shm")
    candidates = {}
    for path in shm.glob("sem.mp-*") if shm.is_dir() else ():
        try:
            st = path.stat()
        except FileNotFoundError:
            continue
        if st.st_mtime >= since:
            candidates[(st.st_dev, st.st_ino)] = path
    if not candidates:
        return []
    mapped = set()
    for maps in Path("/proc").glob("[0-9]*/maps"):
        try:
            lines = maps.read_text().splitlines()
        except OSError:  # gone meanwhile, or not ours to read
            continue
        for line in lines:
            f = line.split(maxsplit=5)  # address perms offset dev inode path
            if len(f) == 6 and f[5].startswith("/dev/shm/"):
                major, minor = (int(x, 16) for x in f[3].split(":"))
                mapped.add((os.makedev(major, minor), int(f[4])))
    removed = []
    for key, path in candidates.items():
        if key not in mapped:
            try:
                path.unlink()
                removed.append(path.name)
            except (FileNotFoundError, PermissionError):
                pass
    return sorted(removed)
