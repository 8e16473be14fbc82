"""deepimage.bench.multiscale on a tiny real-photo set, the high resolution warm-started.

    .venv/bin/pytest -q tests/test_multiscale.py

One real workflow run (shard, train 16 px, train 32 px from the 16 px model, evaluate,
ensemble) through the benchmark, one seed, no CPU lock (a plain test).
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

from deepimage import recipe
from deepimage.modelfile import load_checkpoint
from deepimage.model import ModelSpec, build_model

RECIPE = {
    "resolutions": [16, 32],
    "model": {"conv": [[8], [16]], "fc_hidden": [64, 64]},
    "train": {"np": 2, "epochs": 2, "batch_size": 16,
              "per_resolution": {"32": {"init_from": 16, "epochs": 1, "lr": 0.002}}},
    "evaluate": {"batch_size": 64},
}
SMALL_SET = ["--rp-classes", "4", "--rp-train", "12", "--rp-val", "4", "--rp-size", "40",
             "--rp-grid", "2", "--rp-per-photo", "2"]


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory):
    """(seed folder, last JSON line) of one benchmark run on the small real-photo set."""
    root = tmp_path_factory.mktemp("multiscale")
    recipe = root / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(RECIPE))
    r = subprocess.run([sys.executable, "-m", "deepimage.bench.multiscale", "--dataset", "realphoto",
                        "--seeds", "3", "--rp-data-seed", "5", "--config", str(recipe), "--workdir",
                        str(root / "runs"), "--lock", "", "--test-res", "--json", *SMALL_SET],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return root / "runs" / "realphoto-data5-seed3", json.loads(r.stdout.strip().splitlines()[-1])


def test_a_fixed_data_seed_gives_every_training_seed_the_one_set(bench_run, tmp_path):
    """--rp-data-seed: the set is drawn once with that seed and every seed's run reads it; without
    it each seed draws its own set in its own folder."""
    from deepimage.bench.multiscale import data_folder, parse, seed_config, seed_folder

    folder, out = bench_run
    source = yaml.safe_load((folder / "seed.yaml").read_text())["dataset"]["source"]
    assert json.loads((Path(source) / "classes.json").read_text())["seed"] == 5
    assert out["realphoto_data_seed"] == 5 and Path(source).parent == folder.parent
    for flag, same in ((["--rp-data-seed", "5"], True), ([], False)):
        args = parse(["--dataset", "realphoto", "--workdir", str(tmp_path), *flag])
        sources = {seed_config(args, s, seed_folder(args, s))["dataset"]["source"] for s in (0, 1)}
        assert (len(sources) == 1) == same
    fixed = parse(["--dataset", "realphoto", "--workdir", str(tmp_path), "--rp-data-seed", "5"])
    other_size = parse(["--dataset", "realphoto", "--workdir", str(tmp_path), "--rp-data-seed", "5", "--rp-train", "7"])
    assert data_folder(fixed, seed_folder(fixed, 0)) != data_folder(other_size, seed_folder(other_size, 0))


def test_json_has_every_model_every_seed_and_the_spread(bench_run):
    _, out = bench_run
    assert out["dataset"] == "realphoto" and out["seeds"] == [3]
    for model in ("16", "32", "ensemble"):
        for metric in ("top1_error", "top5_error"):
            assert 0.0 <= out["per_seed"]["3"][model][metric] <= 1.0
            assert set(out["summary"][model][metric]) == {"mean", "min", "max", "std"}
    assert out["per_seed"]["3"]["seconds"] > 0
    # test-time resolution: each model at its own and every higher shard size, two crops each
    assert set(out["per_seed"]["3"]["test_res"]) == {"16@16/16", "16@16/18", "16@32/32", "16@32/36",
                                                    "32@32/32", "32@32/36"}
    assert set(out["paired"]) == {"model_sd", "ensemble", "resolution", "ensemble_best_weight"}
    assert out["seed_control"] is None  # one seed: no pair of training seeds to average
    # the best fixed weight's gap bounds the plain average's in every seed
    assert all(b >= g - 1e-9 for b, g in zip(out["paired"]["ensemble_best_weight"]["per_seed"],
                                            out["paired"]["ensemble"]["per_seed"]))


def test_error_overlap_counts_each_val_image_once_and_reads_crop_scales(bench_run):
    """The overlap partitions the val images the two models miss, agrees with each model's and
    the ensemble's top-1 error, finds a weight no worse than either model or the plain average,
    and takes crop scales from the set's crops.tsv."""
    _, out = bench_run
    run, e = out["per_seed"]["3"], out["per_seed"]["3"]["errors"]
    assert e["val"] == 4 * 4
    assert e["both_wrong"] + e["only_low_wrong"] == round(run["16"]["top1_error"] * e["val"])
    assert e["both_wrong"] + e["only_high_wrong"] == round(run["32"]["top1_error"] * e["val"])
    assert e["ensemble_wrong"] == round(run["ensemble"]["top1_error"] * e["val"])
    assert e["both_same_class"] <= e["both_wrong"]
    # the best fixed weight does at least as well as each model alone and the plain average
    assert e["best_weight_wrong"] <= min(e["ensemble_wrong"], e["both_wrong"] + e["only_low_wrong"],
                                         e["both_wrong"] + e["only_high_wrong"])
    assert 0.0 <= e["best_weight"] <= 1.0
    assert 0.35 <= e["scale_median_all"] <= 1.0 and 0.0 <= e["under_half_all"] <= 1.0


def test_paired_gaps_and_both_spread_criteria():
    from deepimage.bench.multiscale import paired

    def seed(lo, hi, ens):
        return {"32": {"top1_error": lo}, "64": {"top1_error": hi}, "ensemble": {"top1_error": ens}}
    g = paired({0: seed(0.30, 0.20, 0.15), 1: seed(0.32, 0.22, 0.18), 2: seed(0.34, 0.24, 0.19)})
    assert g["resolution"]["per_seed"] == pytest.approx([0.10, 0.10, 0.10])
    assert g["ensemble"]["per_seed"] == pytest.approx([0.05, 0.04, 0.05])
    assert g["model_sd"]["32"] == pytest.approx(0.02)  # sample sd (n - 1)
    assert g["resolution"]["beats_paired_spread"] and g["resolution"]["beats_model_spread"]
    assert g["ensemble"]["beats_paired_spread"] and g["ensemble"]["beats_model_spread"]
    # one seed the other way: fails (a) however large the mean; a mean below a model's sd fails (b)
    g = paired({0: seed(0.30, 0.20, 0.21), 1: seed(0.40, 0.30, 0.25), 2: seed(0.50, 0.40, 0.35)})
    assert g["ensemble"]["per_seed"][0] < 0 and not g["ensemble"]["beats_paired_spread"]
    assert g["ensemble"]["mean"] < g["model_sd"]["64"] and not g["ensemble"]["beats_model_spread"]


def _posteriors(folder: Path, res: int, p0: list[float], ids: list[int]) -> None:
    """A two-class posteriors.npz whose label is always class 0, rows in the order of `ids`."""
    import numpy as np

    (folder / f"results/evaluate/{res}").mkdir(parents=True, exist_ok=True)
    p0 = np.array(p0, dtype=np.float32)
    np.savez(folder / f"results/evaluate/{res}/posteriors.npz", probs=np.stack([p0, 1 - p0], 1),
             labels=np.zeros(len(ids), dtype=np.int64), sample_ids=np.array(ids), classes=np.array(["a", "b"]))


def test_seed_control_averages_pairs_of_seeds_aligned_by_sample_id(tmp_path):
    """The control's errors, worked by hand on four val images (ids 10-13, class 0 right when its
    posterior > 0.5), each file's rows in its own order; four seeds add the x2 / x4 averages."""
    from deepimage.bench.multiscale import seed_control

    ids = [10, 11, 12, 13]
    p = {(32, 0): [0.9, 0.4, 0.4, 0.9], (64, 0): [0.8, 0.8, 0.3, 0.45],  # wrong on 11, 12 / 12, 13
         (32, 1): [0.3, 0.9, 0.9, 0.9], (64, 1): [0.9, 0.9, 0.9, 0.2]}   # wrong on 10 / 13
    folders = {s: tmp_path / f"seed{s}" for s in (0, 1)}
    for (res, s), p0 in p.items():
        order = [3, 1, 0, 2] if s else [0, 1, 2, 3]
        _posteriors(folders[s], res, [p0[i] for i in order], [ids[i] for i in order])
    c = seed_control(folders, [32, 64])
    # seed 0: mean p0 0.85 0.6 0.35 0.675 -> wrong on 12; seed 1: 0.6 0.9 0.9 0.55 -> none wrong
    assert c["mixed"] == [0.25, 0.0]
    # 32 px s0+s1: 0.6 0.65 0.65 0.9 -> none; 64 px: 0.85 0.85 0.6 0.325 -> wrong on 13
    assert c["same_32"] == [0.0] and c["same_64"] == [0.25] and c["pairs"] == [[0, 1]]
    assert "mixed_x2" not in c and seed_control({0: folders[0]}, [32, 64]) is None

    for s in (2, 3):  # copies of seeds 0 and 1: a four-seed control, checked against its pairs
        folders[s] = tmp_path / f"seed{s}"
        for res in (32, 64):
            _posteriors(folders[s], res, p[res, s - 2], ids)
    c = seed_control(folders, [32, 64])
    assert len(c["pairs"]) == 6 and c["fours"] == [[0, 1, 2, 3]]
    i = c["pairs"].index([0, 2])  # seed 0 twice: the four-model average is seed 0's average
    assert c["mixed_x2"][i] == 0.25 and c["mixed_x2_gain"][i] == 0.5 - 0.25
    # all four seeds of 32 px: 2 x (0.6 0.65 0.65 0.9) -> none wrong; of 64 px: 13 wrong
    assert c["same_32_x4"] == [0.0] and c["same_64_x4"] == [0.25]

    _posteriors(folders[3], 64, p[64, 1][:3], ids[:3])  # one model evaluated on fewer images
    with pytest.raises(ValueError, match="seed3/results/evaluate/64/posteriors.npz: evaluated on different samples"):
        seed_control(folders, [32, 64])


def test_warm_start_starts_from_the_lower_models_weights(bench_run):
    folder, _ = bench_run
    low, low_ckpt = load_checkpoint(folder / "results/train/16/model.pt")
    high, high_ckpt = load_checkpoint(folder / "results/train/32/model.pt")
    metrics = json.loads((folder / "results/train/32/metrics.json").read_text())
    assert metrics["init_from"] == "results/train/16/model.pt" and metrics["epochs"] == 1
    assert high_ckpt["train"]["lr"] == 0.002 and low_ckpt["train"]["lr"] == 0.01
    # One short fine-tuning epoch moves the weights little: the 32 px model sits far closer to
    # the 16 px model it started from than that model is to a fresh initialisation.
    fresh = build_model(ModelSpec(**high_ckpt["spec"]), seed=3)
    def dist(a, b):
        return sum((a[k].float() - b[k].float()).norm() ** 2 for k in a if k.endswith("weight")) ** 0.5
    low_w, high_w = low.state_dict(), high.state_dict()
    assert dist(high_w, low_w) < 0.2 * dist(fresh.state_dict(), low_w)
    # and warm_start itself copies every tensor
    net = build_model(ModelSpec(**high_ckpt["spec"]), seed=3)
    recipe.warm_start(net, str(folder / "results/train/16/model.pt"), low_ckpt["classes"])
    assert all(torch.equal(v, low_w[k]) for k, v in net.state_dict().items())


def test_mlflow_records_the_recipe(bench_run):
    folder, _ = bench_run
    client = MlflowClient(f"sqlite:///{folder / 'mlflow.db'}")
    exp = client.get_experiment_by_name("multiscale")
    runs = {r.data.tags.get("deepimage.resolution"): r for r in client.search_runs([exp.experiment_id])
            if r.data.tags.get("mlflow.runName", "").startswith("train-")}
    assert runs["32"].data.tags["deepimage.init_from"] == "results/train/16/model.pt"
    assert "deepimage.init_from" not in runs["16"].data.tags
    params = runs["32"].data.params
    assert params["train.per_resolution.32.init_from"] == "16" and params["train.epochs"] == "1"


def test_warm_start_refuses_another_network(tmp_path, bench_run):
    folder, _ = bench_run
    _, ckpt = load_checkpoint(folder / "results/train/16/model.pt")
    other = build_model(ModelSpec(num_classes=4, conv=[[8], [16], [16]], fc_hidden=[64, 64]))
    with pytest.raises(ValueError, match="give both the same network"):
        recipe.warm_start(other, str(folder / "results/train/16/model.pt"), ckpt["classes"])


def _checked(train_per_res: dict, model_per_res: dict | None = None) -> None:
    from deepimage import config

    cfg = config.fill_defaults(config.normalize({
        "model": {"per_resolution": model_per_res or {}}, "train": {"per_resolution": train_per_res}}))
    config.validate(cfg)
    config.check(cfg)


def test_recipe_keys_are_checked_with_the_fix_in_the_message():
    from deepimage.config import ConfigError

    _checked({64: {"init_from": 32, "epochs": 4, "lr": 0.01}})  # the same network at both: fine
    _checked({64: {"init_from": None}}, {64: {"conv": [[16], [32], [64], [128, 128]]}})  # the plain recipe
    with pytest.raises(ConfigError, match=r"train.per_resolution.64.init_from: 64 must be a lower resolution"):
        _checked({64: {"init_from": 64}})
    _checked({128: {"init_from": 16}})  # not a resolution of this run: ignored
    with pytest.raises(ConfigError, match=r"init_from: 48 must be a lower resolution .* \(or null"):
        _checked({64: {"init_from": 48}})
    with pytest.raises(ConfigError, match=r"drop model.per_resolution.64"):
        _checked({64: {"init_from": 32}}, {64: {"conv": [[16], [32], [64], [128, 128]]}})


def test_recipe_replaces_epochs_and_lr_of_its_resolution_only():
    from deepimage.config import Config

    cfg = Config.from_dict({"train": {"per_resolution": {"64": {"init_from": 32, "epochs": 3, "lr": 0.002}}}})
    hi, lo = recipe.recipe(cfg, 64).train, recipe.recipe(cfg, 32).train
    assert (hi.epochs, hi.lr, hi.per_resolution) == (3, 0.002, {"64": {"init_from": 32, "epochs": 3, "lr": 0.002}})
    assert (lo.epochs, lo.lr, lo.per_resolution) == (cfg.train.epochs, cfg.train.lr, {})


def test_budget_only_entry_changes_epochs_without_a_warm_start():
    """train.per_resolution.32: {epochs: 10} alone (no init_from): 32 px trains 10 epochs from
    scratch, passes the config check, and 64 px still warm-starts from it."""
    from deepimage.config import Config

    recipes = {"32": {"init_from": None, "epochs": 10, "lr": None}, "64": {"init_from": 32, "epochs": 4, "lr": 0.01}}
    _checked(recipes)
    cfg = Config.from_dict({"train": {"per_resolution": recipes}})
    lo, hi = recipe.recipe(cfg, 32).train, recipe.recipe(cfg, 64).train
    assert (lo.epochs, lo.lr) == (10, cfg.train.lr)
    assert (hi.epochs, hi.lr, hi.per_resolution["64"]["init_from"]) == (4, 0.01, 32)


def test_report_says_which_claim_holds_in_the_run():
    from deepimage.report import multiscale_lines

    ens = {"models": {"32": {"top1_error": 0.10}, "64": {"top1_error": 0.07}}, "ensemble": {"top1_error": 0.076}}
    trained = [{"resolution": 32, "epochs": 6, "lr": 0.01, "init_from": None},
               {"resolution": 64, "epochs": 4, "lr": 0.01, "init_from": "results/train/32/model.pt"}]
    text = "\n".join(multiscale_lines(ens, trained))
    assert "64 px: warm start from results/train/32/model.pt, 4 epochs, peak lr 0.01" in text
    assert "Higher resolution beats lower (paper: 7.96 -> 7.42 % top-5): holds in this run" in text
    assert "(+3.00 points)" in text
    assert "every single model (paper: 7.42 -> 6.97 %): does not hold in this run" in text


def test_default_recipe_is_every_resolution_from_scratch_for_train_epochs():
    """config.yaml's recipe (the multi-scale study's choice): no warm start, no per-resolution
    budget, train.epochs for both, and 64 px with one more, narrow stage than 32 px."""
    from deepimage.config import Config
    from deepimage.model import ModelSpec

    raw = yaml.safe_load((Path(__file__).resolve().parents[1] / "config.yaml").read_text())
    _checked(raw["train"]["per_resolution"], raw["model"]["per_resolution"])
    cfg = Config.from_dict(raw)
    for res in (32, 64):
        assert (recipe.recipe(cfg, res).train.epochs, recipe.recipe(cfg, res).train.lr) == (40, cfg.train.lr)
    lo, hi = (ModelSpec.from_config(raw["model"], res, 24) for res in (32, 64))
    assert hi.conv == [[16], *lo.conv]


def test_study_states_each_paper_claim_per_dataset_from_the_measured_study():
    """The recorded multi-seed study: the paper's column beside one column per dataset, and per
    claim and dataset one verdict computed from the recorded per-seed errors."""
    from deepimage.bench import study

    def seeds(*rows):
        return {i: {"32": [lo, 0.0], "64": [hi, 0.0], "ensemble": [ens, 0.0]} for i, (lo, hi, ens) in enumerate(rows)}
    measured = {"recipe": "test recipe", "sets": [
        {"name": "clear", "val_images": 100,
         "per_seed": seeds((0.30, 0.20, 0.15), (0.32, 0.22, 0.18), (0.34, 0.24, 0.19))},
        {"name": "mixed", "val_images": 50,
         "per_seed": seeds((0.30, 0.20, 0.21), (0.40, 0.30, 0.25), (0.20, 0.30, 0.35))}]}
    text = "\n".join(study.study_lines(measured))
    assert ("| 32 x 32 | 32.00 % (sd 2.00); top-5 0.00 % | 30.00 % (sd 10.00); top-5 0.00 % "
            "| 256 x 256: 7.96 % |") in text
    assert "clear (100 val, 3 seeds)" in text and "average of both: 6.97 %" in text
    assert "  - clear: reproduced: +10.00 points" in text
    assert "  - mixed: in the paper's direction but not beyond the seed spread: +3.33 points" in text  # 2 of 3
    assert "  - mixed: not reproduced: -3.67 points" in text  # the average: -0.01, +0.05, -0.15
    assert "Control" not in text  # no set recorded a seed-pair control
    # a set with the bench's seed_control gets one sentence under the claims, against the better
    # resolution's average of two (and four) training seeds
    measured["sets"][0]["seed_control"] = {
        "mixed": [0.10, 0.12, 0.11, 0.11], "same_32": [0.20] * 6, "same_64": [0.12] * 6, "mixed_x2": [0.09] * 6,
        "mixed_x2_gain": [0.01, 0.03] * 3, "same_32_x4": [0.15], "same_64_x4": [0.08]}
    text = "\n".join(study.study_lines(measured))
    assert ("  - clear: the average of 32 and 64 px (4 seeds) 11.00 %, lower than 12.00 % (sd 0.00, 6 averages) "
            "of two 64 px models of different training seeds; two models of each resolution 9.00 %, higher than "
            "8.00 % (sd 0.00, 1 averages) of four 64 px models, and beat their best member by +2.00 points "
            "(sd 1.10).") in text
    # a difference inside the spread of the seed averages is called neither lower nor higher
    measured["sets"][0]["seed_control"]["same_64"] = [0.10, 0.12, 0.14, 0.10, 0.12, 0.14]  # 12.00 %, sd 1.79
    measured["sets"][0]["seed_control"]["mixed"] = [0.11, 0.12, 0.11, 0.12]  # 11.50 %
    assert "11.50 %, within the spread of 12.00 % (sd 1.79, 6 averages)" in "\n".join(study.study_lines(measured))
    # the recorded study renders: a column per recorded set, a verdict per claim and set
    recorded = yaml.safe_load(study.MEASURED.read_text())
    lines = study.study_lines(recorded)
    controls = sum(bool(st.get("seed_control")) for st in recorded["sets"])
    assert sum(line.startswith("  - ") for line in lines) == 2 * len(recorded["sets"]) + controls >= 4


def test_every_recipe_file_is_a_valid_config_over_the_default():
    """Each recipe under deepimage/bench/recipes (what --config passes on as a --configfile),
    merged over config.yaml the way Snakemake merges config files, passes the schema and the
    cross-key checks: a recipe the README quotes cannot drift from the schema unnoticed."""
    from snakemake.utils import update_config

    from deepimage import config

    root = Path(__file__).resolve().parents[1]
    recipes = sorted(p for p in (root / "deepimage" / "bench" / "recipes").glob("*.yaml") if p.name != "measured.yaml")
    assert len(recipes) >= 2
    for path in recipes:
        merged = yaml.safe_load((root / "config.yaml").read_text())
        update_config(merged, yaml.safe_load(path.read_text()))
        cfg = config.fill_defaults(config.normalize(merged))
        try:
            config.validate(cfg)
            config.check(cfg)
        except config.ConfigError as e:
            pytest.fail(f"{path.name}: {e}")
