"""Benchmarks, one module per measured target; each prints a table and, with --json, ends
with one JSON object. The multi-process ones launch their own workers with `run_workers`."""
from __future__ import annotations

import json
import subprocess
import tempfile
from pathlib import Path


class BenchError(RuntimeError):
    """A failed launch or a bad argument (one-line message for the CLI)."""


def run_workers(module: str, np: int, args: list[str], launcher: str = "horovod",
                threads: int | None = None, timeout: float = 300) -> dict:
    """Start `np` workers of `python -m module --worker --out F args...`; return rank 0's JSON F."""
    from deepimage.launch import launch_command, worker_env

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        cmd = launch_command(launcher, np, module, ["--worker", "--out", str(out), *args])
        try:
            proc = subprocess.run(cmd, env=worker_env(threads=threads or np, np=np),
                                  capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as e:
            raise BenchError(f"{module}: {launcher} with {np} workers ran past {timeout} s") from e
        if proc.returncode != 0 or not out.exists():
            tail = (proc.stdout + proc.stderr).strip().splitlines()[-15:]
            raise BenchError(f"{module}: {launcher} with {np} workers failed (exit {proc.returncode}):\n"
                             + "\n".join(tail))
        return json.loads(out.read_text())
