"""The robustness stage: graded transforms (deepimage.data.augment) and, on the tiny workflow run,
the stage's JSON, plot, report section and MLflow metrics."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from deepimage import robustness
from deepimage.data import augment
from deepimage.data.augment import GRADED, center_crop, graded_batch, hflip

STORED, OUT = 40, 32
GROWING = {"color_cast": [10, 30, 60], "rotation": [5, 20, 45], "vignetting": [0.25, 0.5, 1.0],
           "lens_distortion": [0.1, 0.2, 0.4], "crop": [0.125, 0.25, 0.5]}


def smooth_images(b: int = 6, seed: int = 0) -> torch.Tensor:
    """uint8 (b, 3, STORED, STORED) photographs' stand-in: smooth, so small moves change little."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(b, 3, 5, 5, generator=g) * 200 + 25                # (b, 3, 5, 5)
    return F.interpolate(coarse, size=STORED, mode="bicubic", align_corners=True).clamp(0, 255).round().to(torch.uint8)


@pytest.mark.parametrize("family", list(GRADED))
def test_strength_zero_is_the_evaluation_view(family):
    x, ids = smooth_images(), np.arange(6)
    assert torch.equal(graded_batch(x, ids, family, 0, seed=3, out_size=OUT), center_crop(x, OUT))


@pytest.mark.parametrize("family", list(GROWING))
def test_damage_grows_with_strength(family):
    x, ids = smooth_images(), np.arange(6)
    clean = center_crop(x, OUT)
    damage = [(graded_batch(x, ids, family, s, seed=0, out_size=OUT) - clean).abs().mean().item()
              for s in GROWING[family]]
    assert 0 < damage[0] < damage[1] < damage[2], damage


def test_flip_mirrors_the_evaluation_view():
    x, ids = smooth_images(), np.arange(6)
    assert torch.equal(graded_batch(x, ids, "flip", 1, seed=0, out_size=OUT), hflip(center_crop(x, OUT)))


@pytest.mark.parametrize("family,strength", [("color_cast", 40), ("rotation", 30), ("crop", 0.5)])
def test_deterministic_from_the_seed_and_independent_of_the_batch(family, strength):
    x, ids = smooth_images(), np.arange(100, 106)
    a = graded_batch(x, ids, family, strength, seed=7, out_size=OUT)
    assert torch.equal(a, graded_batch(x, ids, family, strength, seed=7, out_size=OUT))
    alone = graded_batch(x[2:3], ids[2:3], family, strength, seed=7, out_size=OUT)
    assert torch.equal(alone, a[2:3])               # a sample's draw depends on its id, not the batch
    assert not torch.equal(a, graded_batch(x, ids, family, strength, seed=8, out_size=OUT))


def test_color_cast_is_exactly_plus_or_minus_the_strength_per_channel():
    x = torch.full((4, 3, STORED, STORED), 128, dtype=torch.uint8)
    out = graded_batch(x, np.arange(4), "color_cast", 45, seed=0, out_size=OUT)
    shifts = (out - 128).flatten(2)                                    # (4, 3, OUT*OUT)
    assert torch.all(shifts == shifts[..., :1]) and set(shifts[..., 0].abs().flatten().tolist()) == {45.0}


def test_the_transforms_are_the_augment_modules_functions(monkeypatch):
    """graded_batch goes through the training code (warp, sampling_grid, color_cast, vignette,
    crop_flip), and the stage goes through graded_batch."""
    calls = []
    for name in ("warp", "sampling_grid", "color_cast", "vignette", "crop_flip"):
        real = getattr(augment, name)
        monkeypatch.setattr(augment, name, lambda *a, _r=real, _n=name, **k: calls.append(_n) or _r(*a, **k))
    x, ids = smooth_images(2), np.arange(2)
    expected = {"rotation": {"sampling_grid", "warp"}, "lens_distortion": {"sampling_grid", "warp"},
                "crop": {"sampling_grid", "warp"}, "color_cast": {"crop_flip", "color_cast"},
                "vignetting": {"crop_flip", "vignette"}, "flip": {"crop_flip"}}
    for family, names in expected.items():
        calls.clear()
        graded_batch(x, ids, family, GRADED[family][1] / 2 if family != "flip" else 1, seed=0, out_size=OUT)
        assert set(calls) == names, family
    assert robustness.graded_batch is augment.graded_batch


def test_bad_family_or_strength_names_the_key():
    x = smooth_images(1)
    with pytest.raises(ValueError, match=r"robustness.strengths.rotation: 200"):
        graded_batch(x, np.arange(1), "rotation", 200, seed=0, out_size=OUT)
    with pytest.raises(ValueError, match="unknown transformation family 'blur'"):
        robustness.check_strengths({"blur": [0, 1]})
    with pytest.raises(ValueError, match="robustness.strengths.flip"):
        robustness.check_strengths({"flip": [0.5]})


# ---- the stage in the tiny-config workflow run (tests/conftest.py) ------------------------------

def test_stage_ran_with_every_family_and_strength_for_each_model_and_the_ensemble(tiny_workflow):
    w, cfg = tiny_workflow.workdir, tiny_workflow.config
    result = json.loads((w / "results/robustness/robustness.json").read_text())
    low = min(cfg["resolutions"])
    members = {str(r) for r in cfg["resolutions"]} | {f"{low}-noaug"}
    assert set(result["errors"]) == members | {"ensemble"}
    assert result["models"][f"{low}-noaug"]["augmented"] is False
    assert all(result["models"][str(r)]["augmented"] for r in cfg["resolutions"])
    assert sorted(result["ensemble_of"]) == sorted(str(r) for r in cfg["resolutions"])
    for name, fams in result["errors"].items():
        assert set(fams) == set(cfg["robustness"]["strengths"]), name
        for family, rows in fams.items():
            assert [r["strength"] for r in rows] == cfg["robustness"]["strengths"][family]
            for r in rows:
                assert 0 <= r["top5_error"] <= r["top1_error"] <= 1
            assert rows[0]["top1_error"] == result["clean"][name]["top1_error"]  # strength 0 = clean
    assert (w / "results/robustness/robustness.png").stat().st_size > 0
    assert (w / "results/benchmarks/evaluate_robustness.tsv").is_file()


def test_ablation_model_was_trained_without_augmentation(tiny_workflow):
    w, cfg = tiny_workflow.workdir, tiny_workflow.config
    ckpt = torch.load(w / f"results/train/{min(cfg['resolutions'])}-noaug/model.pt", weights_only=False)
    assert ckpt["train"]["augment"] == {"color_cast": False, "vignetting": False, "lens_distortion": False,
                                        "rotation_deg": 0, "flip": False, "random_crop": False}


def test_report_has_the_robustness_table_and_plot(tiny_workflow):
    w, cfg = tiny_workflow.workdir, tiny_workflow.config
    report = (w / "results/report.md").read_text()
    assert "## Robustness to the trained transformations" in report
    assert "![robustness](robustness/robustness.png)" in report
    low = min(cfg["resolutions"])
    assert f"| {low} px, no augmentation |" in report and "| ensemble |" in report
    for family in cfg["robustness"]["strengths"]:
        assert f"| {family} |" in report


def test_mlflow_run_holds_the_same_figures(tiny_workflow):
    w, client = tiny_workflow.workdir, tiny_workflow.client
    result = json.loads((w / "results/robustness/robustness.json").read_text())
    record = json.loads((w / "results/robustness/mlflow_run.json").read_text())
    run = client.get_run(record["run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["deepimage.stage"] == "robustness"
    assert run.data.tags["mlflow.parentRunId"] == record["parent_run_id"]
    expected = robustness.metrics(result)
    assert expected and {k: run.data.metrics[k] for k in expected} == pytest.approx(expected)
    assert "top1_error/ensemble/rotation/45" in run.data.metrics
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"robustness.json", "robustness.png"} <= artifacts
