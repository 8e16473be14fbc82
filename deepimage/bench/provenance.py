"""What a benchmark's figures were measured with: command, date, commit, machine, libraries.

    info = run_info("deepimage.bench.loader", argv, ["torch", "torchvision", "simplejpeg"])
"""
from __future__ import annotations

import datetime
import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path


def _commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent,
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 else "unknown"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def run_info(module: str, argv: list[str], packages: list[str]) -> dict:
    """{command, date (UTC), commit, machine: {...}, versions: {package: version}}."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "command": " ".join(["python", "-m", module, *argv]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": _commit(),
        "machine": {"cpu": _cpu_model(), "cores": cores, "cpu_count": os.cpu_count(),
                    "platform": platform.platform()},
        "versions": {"python": sys.version.split()[0], **{p: _version(p) for p in packages}},
    }
