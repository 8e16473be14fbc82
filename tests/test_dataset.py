"""Dataset stage: the deterministic two-scale synthetic set, and checks of a user's folder.

    pytest tests/test_dataset.py
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_fixtures import empty_class_folder, messy_folder, tracking_uri, tree_bytes
from deepimage import synthetic
from deepimage.data.layout import DataError, check_layout
from deepimage.dataset import describe_folder

__all__ = ["tracking_uri"]
ROOT = Path(__file__).resolve().parents[1]
SMALL = synthetic.SyntheticSpec(seed=4, classes=4, train_per_class=5, val_per_class=2,
                                image_size=64)


def dataset_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "deepimage.dataset", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_synthetic_files_are_byte_identical_for_a_seed_whatever_the_threads(tmp_path):
    assert synthetic.generate(SMALL, tmp_path / "a", threads=1) == {"train": 20, "val": 8}
    synthetic.generate(SMALL, tmp_path / "b", threads=2)
    a = tree_bytes(tmp_path / "a")
    assert a == tree_bytes(tmp_path / "b") and len(a) == 28
    assert not [p for p in a if Path(p).name.startswith(".")]           # no temporaries left
    other = synthetic.SyntheticSpec(**{**SMALL.__dict__, "seed": 5})
    synthetic.generate(other, tmp_path / "c", threads=1)
    assert tree_bytes(tmp_path / "c") != a
    img = Image.open(tmp_path / "a" / "train" / synthetic.class_names(4)[1] / "000005.jpg")
    assert img.format == "JPEG" and img.size == (64, 64) and img.mode == "RGB"


def test_class_names_sort_in_index_order_and_cross_shape_with_texture():
    names = synthetic.class_names(12)
    assert names == sorted(names) and len(set(names)) == 12
    assert names[0] == "00_disk_hstripes" and names[4] == "04_square_vstripes"
    assert {n.split("_")[1] for n in names} == {"disk", "square", "triangle", "cross"}
    with pytest.raises(ValueError, match=r"classes must be in \[2, 24\]"):
        synthetic.SyntheticSpec(classes=25)


def _orientation(img: np.ndarray, n: int) -> float:
    """log(vertical / horizontal second-difference energy) at the centre, after resizing to n."""
    a = np.asarray(Image.fromarray(img).resize((n, n), Image.Resampling.BICUBIC).convert("L"),
                   np.float64)
    c = a[n // 4:3 * n // 4, n // 4:3 * n // 4]
    return float(np.log(np.abs(np.diff(c, 2, axis=0)).mean() / np.abs(np.diff(c, 2, axis=1)).mean()))


def test_texture_evidence_survives_at_64px_but_mostly_not_at_32px():
    """The stored sizes of 64 and 32 px training are 72 and 36 px (crop margin 0.125)."""
    spec = synthetic.SyntheticSpec()
    def separation(n):
        h = np.array([_orientation(synthetic.render(spec, "train", i)[0], n) for i in range(24)])
        v = np.array([_orientation(synthetic.render(spec, "train", 240 + i)[0], n)
                      for i in range(24)])                       # class 0 hstripes, 1 vstripes
        return (h.mean() - v.mean()) / np.sqrt((h.var() + v.var()) / 2)
    fine, coarse = separation(72), separation(36)
    assert fine > 6 and coarse < fine / 3, (fine, coarse)


def test_shape_evidence_survives_at_32px():
    spec = synthetic.SyntheticSpec()
    img, label = synthetic.render(spec, "train", 0)          # a disk centred within 13 %
    small = np.asarray(Image.fromarray(img).resize((36, 36), Image.Resampling.BICUBIC), float)
    assert label == 0
    corner = small[:6, :6].mean(axis=(0, 1))                  # (3,) background colour
    assert np.abs(small[18, 18] - corner).sum() > 30      # the object stands out from the corner


def test_cli_synthetic_writes_source_json_and_logs_to_mlflow(tmp_path, tracking_uri):
    out = tmp_path / "dataset"
    synth = {"classes": 4, "train_per_class": 5, "val_per_class": 2, "image_size": 64}
    proc = dataset_cli("--out", str(out), "--config-json",
                       json.dumps({"seed": 4, "dataset": {"source": "synthetic", "synthetic": synth}}),
                       "--threads", "2", "--tracking-uri", tracking_uri,
                       "--parent-file", str(tmp_path / "none.json"))
    assert proc.returncode == 0, proc.stderr
    desc = json.loads((out / "source.json").read_text())
    assert desc["source"] == "synthetic" and desc["root"] == str((out / "synthetic").resolve())
    assert desc["classes"] == synthetic.class_names(4)
    assert desc["counts"] == {"train": 20, "val": 8}
    assert desc["params"]["seed"] == 4 and desc["params"]["image_size"] == 64
    synthetic.generate(SMALL, tmp_path / "api", threads=1)               # same spec via the API
    assert tree_bytes(out / "synthetic") == tree_bytes(tmp_path / "api")
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name("deepimage")
    run, = client.search_runs([exp.experiment_id], "tags.`deepimage.stage` = 'dataset'")
    assert run.data.metrics["train_images"] == 20 and run.data.metrics["images_per_s"] > 0


def test_user_folder_is_checked_not_copied(tmp_path):
    root = messy_folder(tmp_path / "data")
    desc = describe_folder(str(root))
    assert desc["classes"] == ["cat", "dog"] and desc["root"] == str(root.resolve())
    assert desc["counts"] == {"train": 14, "val": 2}       # hidden/stray ignored; bad files counted


def _no_val(root: Path) -> None:
    __import__("shutil").rmtree(root / "val")


def _val_lacks_dog(root: Path) -> None:
    (root / "val" / "dog" / "v0.jpg").unlink()
    (root / "val" / "dog").rmdir()


def _val_has_bird(root: Path) -> None:
    (root / "val" / "bird").mkdir()
    (root / "val" / "bird" / "x.jpg").write_bytes(b"x")


@pytest.mark.parametrize("breakage,message", [
    (_no_val, r"no val/ folder"),
    (_val_lacks_dog, r"\['dog'\] in train/ but missing from val/"),
    (_val_has_bird, r"\['bird'\] in val/ but missing from train/"),
])
def test_bad_layouts_are_named(tmp_path, breakage, message):
    root = messy_folder(tmp_path / "data")
    breakage(root)
    with pytest.raises(DataError, match=message):
        check_layout(root)


def test_cli_empty_class_folder_fails_with_one_line_naming_it(tmp_path):
    root = empty_class_folder(tmp_path / "data")
    proc = dataset_cli("--config-json", json.dumps({"dataset": {"source": str(root)}}),
                       "--out", str(tmp_path / "out"),
                       "--tracking-uri", f"sqlite:///{tmp_path}/unused.db")
    assert proc.returncode != 0
    assert proc.stderr.strip().count("\n") == 0 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("dataset: error:") and "train/empty: empty class folder" in proc.stderr
    assert not (tmp_path / "out" / "source.json").exists()
