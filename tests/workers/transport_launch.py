"""Test helper: start a worker module under horovodrun or torchrun and read its per-rank reports.

    from workers.transport_launch import launch_worker
    reports = launch_worker("torchrun", 3, "tests.workers.transport_check", tmp_path, "--expect", "torchrun")
"""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

from deepimage.launch import launch_command, worker_env

ROOT = Path(__file__).resolve().parents[2]
LAUNCH_TIMEOUT = 180


def launch_worker(launcher: str, np: int, module: str, out: Path, *args: str) -> list[dict]:
    """Run `python -m module --out out args...` on np processes (one thread each); return every
    rank's <out>/rank<r>.json, after asserting the launch exited 0."""
    out.mkdir(parents=True, exist_ok=True)
    cmd = launch_command(launcher, np, module, ["--out", str(out), *args])
    proc = subprocess.run(cmd, cwd=ROOT, env=worker_env(threads=np, np=np), capture_output=True,
                          text=True, timeout=LAUNCH_TIMEOUT)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(np)]
