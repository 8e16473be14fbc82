"""The training-step benchmark on a tiny configuration: real horovodrun workers train both
models with every method, DDP and lazy update with split FC included, and --json's last line
holds the documented keys with positive, finite values.

    pytest tests/test_train_step_bench.py
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

from deepimage.bench import train_step
from deepimage.config import defaults

TINY = ["--batch", "2", "--resolution", "16", "--block", "1", "--rounds", "1", "--fc-hidden", "64", "64"]


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "deepimage.bench.train_step", *args],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def _positive(value) -> bool:
    return isinstance(value, float | int) and math.isfinite(value) and value > 0


def test_json_has_ddp_lazy_split_and_both_models():
    proc = _run("--json", *TINY)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(result["models"]) == set(train_step.MODELS)
    for name, figures in result["models"].items():
        for method in train_step.METHODS:
            assert _positive(figures["step_ms"][method]), (name, method)
        ms = figures["step_ms"]
        assert figures["lazy_vs_ddp"] == round(ms["ddp"] / ms["lazy_split"], 3)
    assert _positive(result["lazy_vs_ddp"]) and _positive(result["lazy_vs_ddp_fc_heavy"])
    assert result["lazy_vs_ddp"] == result["models"]["default"]["lazy_vs_ddp"]
    assert result["lazy_vs_ddp_fc_heavy"] == result["models"]["fc_heavy"]["lazy_vs_ddp"]
    # The keys of earlier versions stay, for the FC-heavy model (--fc-hidden).
    for key in ("lazy_speedup_vs_sync", "lazy_speedup_vs_horovod", "communication_share"):
        assert math.isfinite(result[key]), key
    assert result["step_ms"] == result["models"]["fc_heavy"]["step_ms"]
    assert result["model"]["fc_hidden"] == [64, 64]
    # The default model is config.yaml's: its FC widths and dropout, not the FC-heavy ones.
    default = result["models"]["default"]["model"]
    assert default["fc_hidden"] == list(defaults().model.fc_hidden)
    assert default["dropout"] == defaults().model.dropout
    assert "DDP" in proc.stdout and "lazy + split FC" in proc.stdout


def test_rejects_an_fc_layer_narrower_than_the_process_count():
    proc = _run("--np", "4", "--fc-hidden", "3", "64")
    assert proc.returncode != 0
    assert proc.stderr.strip() == ("bench.train_step: --fc-hidden [3, 64] must be >= --np (4) "
                                   "(split FC gives every rank part of each layer)")
