"""Models in MLflow after the tiny-config workflow: the registry, the champion alias, system
metrics, per-class files, and the ensemble pyfunc against the evaluation's own posteriors.

    .venv/bin/pytest -q tests/test_models.py
"""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from mlflow.models import Model

from deepimage.registry import champion, classifier, log
from deepimage.registry.load import load_classifier
from deepimage.data.layout import list_samples


@pytest.fixture(scope="module")
def tiny(tiny_workflow):
    """The tiny run, with mlflow's process-wide URIs on its store (models:/ look-ups) for this
    module only: they reach os.environ, and so every later test and its subprocesses."""
    import os

    import mlflow

    saved = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    mlflow.set_tracking_uri(tiny_workflow.config["mlflow"]["tracking_uri"])
    mlflow.set_registry_uri(tiny_workflow.config["mlflow"]["tracking_uri"])
    yield tiny_workflow
    mlflow.set_tracking_uri(None)
    mlflow.set_registry_uri(None)
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def _runs(t, stage):
    return t.client.search_runs([t.experiment_id], f"tags.`deepimage.stage` = '{stage}'")


def test_each_resolution_and_the_ensemble_are_registered_and_the_ensemble_is_champion(tiny):
    c = tiny.client
    names = {rm.name for rm in c.search_registered_models()}
    assert {"e2e-16px", "e2e-32px", "e2e-ensemble"} <= names      # <experiment>-...: the run's is e2e
    champion = c.get_model_version_by_alias("e2e-ensemble", "champion")
    ens = json.loads((tiny.workdir / "results/ensemble/metrics.json").read_text())
    assert float(champion.tags["val_top1_error"]) == pytest.approx(ens["ensemble"]["top1_error"])
    classes = json.loads((tiny.workdir / "results/dataset/source.json").read_text())["classes"]
    for res in (16, 32):
        (run,) = [r for r in _runs(tiny, "train") if r.info.run_name == f"train-{res}"][:1]
        registered = run.data.tags["deepimage.registered_model"]                # "name/version"
        assert registered.split("/")[0] == f"e2e-{res}px"
        info = Model.load(f"models:/{registered}")
        assert set(info.flavors) == {"python_function"} and info.signature is not None
        assert info.metadata["classes"] == classes and info.metadata["resolution"] == res


def test_the_ablation_model_is_registered_under_its_own_name(tiny):
    c = tiny.client
    noaug = c.search_model_versions("name = 'e2e-16px-noaug'")
    assert noaug and all(c.get_run(v.run_id).info.run_name == "train-16-noaug" for v in noaug)
    plain = c.search_model_versions("name = 'e2e-16px'")
    assert plain and all(c.get_run(v.run_id).info.run_name == "train-16" for v in plain)


def test_loading_the_ensemble_as_mlflow_serve_does_gives_no_type_hint_warning(tiny):
    """MLflow 3 warns once per process about a predict() without type hints: a fresh process."""
    code = ("import warnings; warnings.simplefilter('always'); import mlflow; "
            f"mlflow.set_tracking_uri({tiny.config['mlflow']['tracking_uri']!r}); "
            "mlflow.pyfunc.load_model('models:/e2e-ensemble@champion')")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "type hint" not in r.stderr.lower(), r.stderr


def test_a_worse_or_equal_version_does_not_take_champion_and_a_better_one_does(tiny):
    """Versions backed by runs of the experiment that logged their top1_error, on the same shards."""
    c = tiny.client
    name = "e2e-ensemble-promotion-test"  # own model: the workflow's champion stays put
    source = c.get_model_version_by_alias("e2e-ensemble", "champion")
    digest = source.tags[champion.DIGEST_TAG]
    c.create_registered_model(name)
    versions = []
    for error in (0.30, 0.30, 0.45, 0.10):
        run = c.create_run(tiny.experiment_id)
        c.log_metric(run.info.run_id, "top1_error", error)
        v = c.create_model_version(name, source.source, run_id=run.info.run_id).version
        c.set_model_version_tag(name, v, champion.ERROR_TAG, repr(error))
        c.set_model_version_tag(name, v, champion.DIGEST_TAG, digest)
        versions.append(v)
    promote = lambda v, e: champion.promote_if_better(c, name, v, e, digest, tiny.experiment_id)  # noqa: E731
    assert promote(versions[0], 0.30)["champion"] is True                      # no champion yet
    assert promote(versions[1], 0.30) == {"champion": False, "previous_champion_error": 0.30,
                                          "previous_champion_ignored": ""}     # equal
    assert promote(versions[2], 0.45)["champion"] is False                     # worse
    assert c.get_model_version_by_alias(name, "champion").version == versions[0]
    assert promote(versions[3], 0.10)["champion"] is True                      # better
    assert c.get_model_version_by_alias(name, "champion").version == versions[3]


def test_train_runs_log_system_metrics(tiny):
    for run in _runs(tiny, "train"):
        keys = set(run.data.metrics)
        assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= keys, \
            f"{run.info.run_name}: {sorted(keys)}"


@pytest.mark.parametrize("where", ["evaluate/16", "evaluate/32", "ensemble"])
def test_per_class_tables_and_confusion_plots_are_written_and_logged(tiny, where):
    folder = tiny.workdir / "results" / where
    lines = (folder / "per_class.tsv").read_text().splitlines()
    header, rows = lines[0].split("\t"), [dict(zip(lines[0].split("\t"), l.split("\t"))) for l in lines[1:]]
    assert header[:4] == ["class", "samples", "top1_error", "top5_error"]
    counts = json.loads((tiny.workdir / "results/dataset/source.json").read_text())["counts"]
    assert sum(int(r["samples"]) for r in rows) == counts["val"]
    metrics = json.loads((tiny.workdir / "results/ensemble/metrics.json").read_text())
    top1 = metrics["ensemble"] if where == "ensemble" else metrics["models"][where.split("/")[1]]
    weighted = sum(int(r["samples"]) * float(r["top1_error"]) for r in rows) / counts["val"]
    assert weighted == pytest.approx(top1["top1_error"], abs=1e-6)
    assert (folder / "confusion.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    run_id = json.loads((folder / "mlflow_run.json").read_text())["run_id"]
    logged = {Path(a.path).name for a in tiny.client.list_artifacts(run_id, "per_class")}
    assert logged == {"per_class.tsv", "confusion.png"}


def test_ensemble_pyfunc_on_source_images_equals_the_average_of_the_evaluation_posteriors(tiny):
    """Same decode, resize and centre crop as the shards the models were evaluated on."""
    ens = load_classifier("models:/e2e-ensemble@champion")
    source = json.loads((tiny.workdir / "results/dataset/source.json").read_text())
    val = Path(source["root"]) / "val"
    samples = list_samples(val, source["classes"])[:12]
    views = classifier.stack_views([ens.decode(str(val / s.relpath)) for s in samples], len(ens.members))
    probs = ens.posteriors(views)                                             # (12, K)
    expected = []
    for res in (16, 32):
        with np.load(tiny.workdir / f"results/evaluate/{res}/posteriors.npz") as z:
            by_id = dict(zip(z["sample_ids"].tolist(), z["probs"]))
        expected.append(np.stack([by_id[s.sample_id] for s in samples]))
    np.testing.assert_allclose(probs, np.mean(expected, axis=0), atol=1e-5)


def test_evaluation_sees_the_configured_view_and_the_registered_ensemble_sees_the_same(tiny):
    """evaluate.view whole (the default): each model sees its whole stored image, (1 + crop_margin)
    x its resolution; the posteriors record that side and the registered ensemble's members crop
    to it. centre gives the training crop; an unknown view is refused by name."""
    from deepimage.data.manifest import load_manifest
    from deepimage.evaluate import evaluate

    stored = {res: load_manifest(tiny.workdir / f"results/shards/{res}/val").stored_size for res in (16, 32)}
    assert stored == {16: 18, 32: 36}
    for res in (16, 32):
        metrics = json.loads((tiny.workdir / f"results/evaluate/{res}/metrics.json").read_text())
        assert (metrics["view"], metrics["crop"]) == ("whole", stored[res])
        with np.load(tiny.workdir / f"results/evaluate/{res}/posteriors.npz") as z:
            assert int(z["crop"]) == stored[res]
            whole = z["probs"]
    info = Model.load("models:/e2e-ensemble@champion")
    assert info.metadata["test_crops"] == [18, 36]
    ens = load_classifier("models:/e2e-ensemble@champion")
    assert [(m.resolution, m.crop) for m in ens.members] == [(16, 18), (32, 36)]

    model, val = str(tiny.workdir / "results/train/32/model.pt"), str(tiny.workdir / "results/shards/32/val")
    arrays, metrics = evaluate(model, val, 64, "centre")
    assert (metrics["view"], metrics["crop"], int(arrays["crop"])) == ("centre", 32, 32)
    assert arrays["probs"].shape == whole.shape and not np.allclose(arrays["probs"], whole, atol=1e-4)
    with pytest.raises(ValueError, match="evaluate.view 'corner'"):
        evaluate(model, val, 64, "corner")
    with pytest.raises(ValueError, match="evaluated on 40 px crops.*32 px model stored at 36 px"):
        log.ensemble_spec([model], [val], [40])
