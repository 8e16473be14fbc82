"""Model files and registered models from other people: opening one runs no code, a logged model
is weights and JSON served by this package's own code, and the champion alias moves only on an
error the store's own runs back, measured on the same validation set.

    .venv/bin/pytest -q tests/test_trust_models.py
"""
from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

from deepimage import mlflow_client, registry
from deepimage.model import DeepImageNet, ModelSpec
from deepimage.modelfile import load_checkpoint, save_checkpoint
from workflow import free_port, start_mlflow_server, stop_process_group  # noqa: F401

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ["a", "b", "c"]


class _Sentinel:
    """Unpickling this writes `path`: what a booby-trapped model.pt would do."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (exec, (f"open({self.path!r}, 'w').write('ran')",))


def _booby_trapped(folder: Path) -> tuple[Path, Path]:
    """(a model.pt whose pickle writes a sentinel file when loaded, that sentinel's path)."""
    sentinel = folder / "sentinel"
    spec = ModelSpec(num_classes=3, conv=[[4]], fc_hidden=[8, 8])
    torch.manual_seed(0)
    payload = {"spec": spec.to_dict(), "state_dict": DeepImageNet(spec).state_dict(), "classes": CLASSES,
               "resolution": 16, "train": _Sentinel(str(sentinel))}
    path = folder / "model.pt"
    torch.save(payload, path)
    return path, sentinel


@pytest.fixture(scope="module")
def val_shards(tmp_path_factory) -> Path:
    """16 px val shards of a 3-class synthetic set (stored at 18 px)."""
    from data_fixtures import synthetic_source
    from deepimage.shard import ShardParams, build, plan_split

    tmp = tmp_path_factory.mktemp("val")
    plan = plan_split(synthetic_source(tmp / "syn", classes=3, per_class=8, image_size=32), "val")
    build(plan, tmp / "shards", ShardParams(resolution=16))
    return tmp / "shards"


# ------------------------------------------------------------------- opening a model file
def test_a_model_file_whose_pickle_runs_code_is_refused_naming_the_file(tmp_path):
    path, sentinel = _booby_trapped(tmp_path)
    with pytest.raises(ValueError, match=f"{path}.*not plain data"):
        load_checkpoint(path)
    assert not sentinel.exists()


def test_a_saved_model_file_is_plain_data_and_loads_back(tmp_path):
    spec = ModelSpec(num_classes=3, conv=[[4]], fc_hidden=[8, 8])
    torch.manual_seed(0)
    net = DeepImageNet(spec)
    save_checkpoint(tmp_path / "model.pt", spec, net.state_dict(), CLASSES, 16,
                    extra={"train": {"lr": 0.01, "augment": {"flip": True}}, "np": 2})
    torch.load(tmp_path / "model.pt", weights_only=True)   # nothing in it needs the full unpickler
    model, ckpt = load_checkpoint(tmp_path / "model.pt")
    assert ckpt["classes"] == CLASSES and ckpt["resolution"] == 16 and ckpt["train"]["lr"] == 0.01
    for key, value in net.state_dict().items():
        assert torch.equal(model.state_dict()[key], value)


@pytest.mark.parametrize("stage", ["evaluate", "ensemble"])
def test_evaluate_and_ensemble_refuse_a_booby_trapped_model_without_running_it(tmp_path, stage, val_shards):
    """The stage CLIs in their own processes: one line naming the file, the sentinel never written."""
    path, sentinel = _booby_trapped(tmp_path)
    if stage == "evaluate":
        args = ["--model", str(path), "--val-shards", str(val_shards), "--out", str(tmp_path / "out")]
    else:
        post = tmp_path / "posteriors.npz"
        np.savez(post, probs=np.full((2, 3), 1 / 3, np.float32), labels=np.array([0, 1]),
                 sample_ids=np.array([1, 2]), classes=np.array(CLASSES), resolution=np.array(16), crop=np.array(18))
        args = ["--posteriors", str(post), "--models", str(path), "--shards", str(val_shards),
                "--out", str(tmp_path / "out.json")]
    args += ["--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", "--experiment", "trust",
             "--parent-file", str(tmp_path / "parent.json"), "--run-record", str(tmp_path / "run.json")]
    r = subprocess.run([sys.executable, "-m", f"deepimage.{stage}", *args], capture_output=True, text=True,
                       timeout=300, cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode != 0
    assert f"{path}" in r.stderr and "not plain data" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr, r.stderr
    assert not sentinel.exists()
