"""Run the real Snakemake workflow in a scratch folder (shared by the workflow tests)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
SNAKEMAKE = str(Path(sys.executable).with_name("snakemake"))


def snakemake(workdir: Path, *args: str, config: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
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
