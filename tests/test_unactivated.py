"""`.venv/bin/snakemake` without activating the environment: rules run with its interpreter.

    .venv/bin/pytest -q tests/test_unactivated.py
"""
from __future__ import annotations

import json
import subprocess

import yaml

from workflow import ROOT, SNAKEMAKE, tiny_config


def test_venv_snakemake_runs_a_rule_with_no_venv_on_path(tmp_path):
    cfg = tiny_config(tmp_path)
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    # No .venv/bin and no python with mlflow on PATH, as for a user who did not `source activate`.
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([SNAKEMAKE, "--snakefile", str(ROOT / "Snakefile"), "--directory", str(tmp_path),
                        "--configfile", str(tmp_path / "cfg.yaml"), "--cores", "2",
                        "results/dataset/source.json"],
                       capture_output=True, text=True, timeout=600, env=env)
    log = (tmp_path / "logs" / "make_dataset.log")
    assert r.returncode == 0, f"{r.stderr[-3000:]}\n{log.read_text() if log.is_file() else ''}"
    assert "No module named" not in (log.read_text() if log.is_file() else "")
    assert json.loads((tmp_path / "results" / "dataset" / "source.json").read_text())["classes"]
