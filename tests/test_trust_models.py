"""Model files and registered models from other people: opening one runs no code, a logged model
is weights and JSON served by this package's own code, and the champion alias moves only on an
error the store's own runs back, measured on the same validation set.

    .venv/bin/pytest -q tests/test_trust_models.py
"""
from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

from deepimage import mlflow_client
from deepimage.model import DeepImageNet, ModelSpec
from deepimage.modelfile import load_checkpoint, save_checkpoint
from deepimage.registry import champion, classifier
from deepimage.registry.load import load_classifier


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


# ------------------------------------------------------------------ logged models are data
def _val_posteriors(folder: Path, shards: Path, model: Path) -> Path:
    """posteriors.npz of `model` on `shards`, written by the evaluate stage's own function."""
    from deepimage.evaluate import evaluate

    arrays, _ = evaluate(str(model), str(shards), 64, "whole")
    path = folder / "posteriors.npz"
    np.savez(path, **arrays)
    return path


@pytest.fixture(scope="module")
def store(tmp_path_factory, val_shards):
    """A throw-away store with one tiny 16 px model trained on nothing (seeded), its posteriors,
    and helpers to run the real ensemble stage against the store in any experiment."""
    tmp = tmp_path_factory.mktemp("store")
    classes = json.loads((val_shards / "manifest.json").read_text())["classes"]
    spec = ModelSpec(num_classes=len(classes), conv=[[4]], fc_hidden=[8, 8])
    torch.manual_seed(0)
    save_checkpoint(tmp / "model.pt", spec, DeepImageNet(spec).state_dict(), classes, 16)
    post = _val_posteriors(tmp, val_shards, tmp / "model.pt")
    return {"dir": tmp, "uri": f"sqlite:///{tmp / 'mlflow.db'}", "model": tmp / "model.pt",
            "posteriors": post, "shards": val_shards, "client": mlflow_client.client(f"sqlite:///{tmp / 'mlflow.db'}")}


def _ensemble_stage(store, experiment: str, posteriors: Path | None = None) -> dict:
    """`python -m deepimage.ensemble --models ...` as the workflow runs it; its metrics.json."""
    out = store["dir"] / f"ensemble-{experiment}-{len(list(store['dir'].glob('ensemble-*')))}.json"
    args = ["--posteriors", str(posteriors or store["posteriors"]), "--models", str(store["model"]),
            "--shards", str(store["shards"]), "--out", str(out), "--tracking-uri", store["uri"],
            "--experiment", experiment, "--parent-file", str(store["dir"] / "none.json"),
            "--run-record", str(out.with_suffix(".run.json"))]
    r = subprocess.run([sys.executable, "-m", "deepimage.ensemble", *args], capture_output=True, text=True,
                       timeout=300, cwd=store["dir"], env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def logged(store):
    """The honest ensemble of experiment `honest`: (its metrics.json, its local model folder)."""
    import mlflow

    result = _ensemble_stage(store, "honest")
    source = store["client"].get_model_version_download_uri("honest-ensemble", result["registered"]["version"])
    folder = mlflow.artifacts.download_artifacts(artifact_uri=source, tracking_uri=store["uri"],
                                                 dst_path=str(store["dir"] / "honest-model"))
    return result, Path(folder)


def test_a_logged_model_is_weights_and_json_and_loads_without_unpickling(logged, monkeypatch):
    import cloudpickle
    from mlflow.models import Model

    result, folder = logged
    info = Model.load(str(folder))
    assert set(info.flavors) == {"python_function"}
    pyfunc = info.flavors["python_function"]
    assert "python_model" not in pyfunc and pyfunc["model_code_path"]
    assert (folder / "code" / "deepimage" / "registry" / "pyfunc.py").is_file()
    assert not list(folder.rglob("*.pkl")) and not list(folder.rglob("*.pickle"))
    for weights in folder.glob("artifacts/*.pt"):
        torch.load(weights, weights_only=True)
    refuse = lambda *a, **k: pytest.fail("load_classifier unpickled with cloudpickle")  # noqa: E731
    monkeypatch.setattr(cloudpickle, "load", refuse)
    monkeypatch.setattr(cloudpickle, "loads", refuse)
    ens = load_classifier(str(folder))
    assert [m.resolution for m in ens.members] == [16]


class _TrappedModel:
    """A 'python model' whose cloudpickle writes a sentinel when loaded."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (exec, (f"open({self.path!r}, 'w').write('ran')",))


def test_a_pickled_model_folder_is_refused_unread_by_load_classifier_and_predict(tmp_path, logged):
    import cloudpickle
    from mlflow.models import Model

    sentinel = tmp_path / "sentinel"
    folder = tmp_path / "pickled"
    shutil.copytree(logged[1], folder)
    (folder / "python_model.pkl").write_bytes(cloudpickle.dumps(_TrappedModel(str(sentinel))))
    info = Model.load(str(folder))
    conf = info.flavors["python_function"]
    conf.pop("model_code_path")
    conf["python_model"] = "python_model.pkl"
    info.save(str(folder / "MLmodel"))
    with pytest.raises(ValueError, match="pickled model.*refused unread"):
        load_classifier(str(folder))
    image = _an_image(tmp_path, logged[1])
    r = subprocess.run([sys.executable, "-m", "deepimage.predict", "--model", str(folder), str(image),
                        "--out", str(tmp_path / "p.csv"), "--workers", "0"], capture_output=True, text=True,
                       timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode != 0 and "refused unread" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not sentinel.exists()


def test_a_booby_trapped_weights_file_in_a_logged_model_is_refused_naming_it(tmp_path, logged):
    folder = tmp_path / "trapped"
    shutil.copytree(logged[1], folder)
    (weights,) = folder.glob("artifacts/model_16px.pt")
    trapped, sentinel = _booby_trapped(tmp_path)
    weights.write_bytes(trapped.read_bytes())
    with pytest.raises(ValueError, match="model_16px.pt: not plain data"):
        load_classifier(str(folder))
    assert not sentinel.exists()


def _an_image(tmp_path: Path, model_folder: Path) -> Path:
    """The model's own input example (a PNG of a stored val image) as a file."""
    example = json.loads((model_folder / "input_example.json").read_text())
    path = tmp_path / "image.png"
    path.write_bytes(base64.b64decode(example["data"][0][0]))
    return path


def _fresh_venv(tmp: Path) -> Path:
    """A virtual environment that sees this project's packages but not this checkout: the shared
    site-packages as a path line in a .pth (its own .pth files, the editable install among them,
    are not run), so `deepimage` is importable only from a model's own code."""
    import sysconfig

    venv = tmp / "venv"
    subprocess.run([sys._base_executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    (site,) = venv.glob("lib/python3*/site-packages")
    (site / "shared.pth").write_text(str(Path(sysconfig.get_paths()["purelib"]).resolve()) + "\n")
    return venv / "bin" / "python"


def _clean_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "MLFLOW_"))}
    return {**env, "OMP_NUM_THREADS": "1", **extra}


def test_a_fresh_environment_loads_and_serves_the_model_like_deepimage_predict(tmp_path, logged):
    from workflow import free_port, stop_process_group

    _, folder = logged
    image = _an_image(tmp_path, folder)
    out = tmp_path / "p.csv"
    r = subprocess.run([sys.executable, "-m", "deepimage.predict", "--model", str(folder), str(image),
                        "--out", str(out), "--workers", "0"], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stderr
    (expected,) = [dict(zip(out.read_text().splitlines()[0].split(","), row.split(",")))
                   for row in out.read_text().splitlines()[1:]]
    python = _fresh_venv(tmp_path)
    away = tmp_path / "elsewhere"
    away.mkdir()
    code = f"""
import base64, json, sys
import pandas as pd
try:
    import deepimage
    sys.exit("deepimage importable outside the model")
except ImportError:
    pass
import mlflow
model = mlflow.pyfunc.load_model({str(folder)!r})
image = open({str(image)!r}, "rb").read()
row = model.predict(pd.DataFrame({{"image": [image]}})).iloc[0]
top5 = ";".join(f"{{c}}:{{p:.6f}}" for c, p in zip(row.top5_classes, row.top5_probs))
answers = {{"top1_class": row.top1_class, "top5": top5, "code": sys.modules["deepimage"].__file__}}
for name, frame in [("count", pd.DataFrame({{"image": [image] * {classifier.MAX_REQUEST_IMAGES + 1}}})),
                    ("bytes", pd.DataFrame({{"image": [image + bytes({classifier.MAX_IMAGE_BYTES})]}}))]:
    try:
        model.predict(frame)
        answers[name] = "answered"
    except Exception as e:
        answers[name] = str(e)
print(json.dumps(answers))
"""
    r = subprocess.run([str(python), "-c", code], capture_output=True, text=True, timeout=300, cwd=away,
                       env=_clean_env())
    assert r.returncode == 0, r.stderr[-3000:]
    answers = json.loads(r.stdout.strip().splitlines()[-1])
    assert answers["top1_class"] == expected["top1_class"] and answers["top5"] == expected["top5"]
    assert Path(answers["code"]).is_relative_to(folder / "code"), answers["code"]   # the model's own copy
    assert f"at most {classifier.MAX_REQUEST_IMAGES}" in answers["count"]
    assert f"over the {classifier.MAX_IMAGE_BYTES} byte limit" in answers["bytes"]

    port = free_port()
    log = open(tmp_path / "serve.log", "w")
    proc = subprocess.Popen([str(python), "-m", "mlflow", "models", "serve", "--env-manager", "local",
                             "-m", str(folder), "--host", "127.0.0.1", "-p", str(port), "-w", "1"], cwd=away,
                            env=_clean_env(PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"),
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_ready(proc, port, tmp_path / "serve.log")
        one = base64.b64encode(image.read_bytes()).decode()
        (answer,) = _invoke(port, [one])["predictions"]
        assert answer["top1_class"] == expected["top1_class"]
        served = ";".join(f"{c}:{p:.6f}" for c, p in zip(answer["top5_classes"], answer["top5_probs"]))
        assert served == expected["top5"]
        with pytest.raises(urllib.error.HTTPError) as refused:
            _invoke(port, [one] * (classifier.MAX_REQUEST_IMAGES + 1))
        assert refused.value.code == 400
        assert f"at most {classifier.MAX_REQUEST_IMAGES}" in refused.value.read().decode()
    finally:
        stop_process_group(proc)
        log.close()


def _invoke(port: int, images: list[str]) -> dict:
    body = {"dataframe_split": {"columns": ["image"], "data": [[i] for i in images]}}
    req = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as resp:
        return json.loads(resp.read())


def _wait_ready(proc, port: int, log: Path, timeout: float = 240) -> None:
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text()[-3000:]
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"not serving after {timeout} s:\n{log.read_text()[-3000:]}")


# ------------------------------------------------------------------ the champion is earned
ATTACKER = """
import sys
from mlflow import MlflowClient
uri, name, source, kind, digest = sys.argv[1:6]
c = MlflowClient(uri, registry_uri=uri)
exp = c.get_experiment_by_name("honest" if kind != "other-experiment" else "attacker")
exp_id = exp.experiment_id if exp else c.create_experiment("attacker")
run = c.create_run(exp_id)
if kind == "other-experiment":
    c.log_metric(run.info.run_id, "top1_error", 0.0)
mv = c.create_model_version(name, source, run_id=run.info.run_id)
c.set_model_version_tag(name, mv.version, "val_top1_error", "0.0")
c.set_model_version_tag(name, mv.version, "val_digest", "0" * 64 if kind == "other-digest" else digest)
c.set_registered_model_alias(name, "champion", mv.version)
print(mv.version)
"""


@pytest.mark.parametrize("kind", ["no-run-metric", "other-digest", "other-experiment"])
def test_a_forged_champion_does_not_keep_the_alias_from_the_next_honest_run(store, logged, kind):
    """Another user of the store registers a version tagged val_top1_error=0.0 and gives it the
    alias; the next honest ensemble run (same validation shards) takes the alias back."""
    c = store["client"]
    honest = c.get_model_version("honest-ensemble", logged[0]["registered"]["version"])
    r = subprocess.run([sys.executable, "-c", ATTACKER, store["uri"], "honest-ensemble", honest.source, kind,
                        honest.tags[champion.DIGEST_TAG]], capture_output=True, text=True, timeout=120,
                       cwd=store["dir"])
    assert r.returncode == 0, r.stderr
    forged = r.stdout.strip().splitlines()[-1]
    assert str(c.get_model_version_by_alias("honest-ensemble", "champion").version) == forged
    result = _ensemble_stage(store, "honest")
    assert result["registered"]["champion"] is True, result["registered"]
    assert f"version {forged}:" in result["registered"]["previous_champion_ignored"]
    now = c.get_model_version_by_alias("honest-ensemble", "champion").version
    assert str(now) == str(result["registered"]["version"])


def test_an_honest_champion_is_kept_against_a_worse_run_and_experiments_keep_their_own(store, logged, tmp_path):
    c = store["client"]
    champion = c.get_model_version_by_alias("honest-ensemble", "champion").version
    with np.load(store["posteriors"]) as z:   # a worse model: every posterior uniform
        worse = {k: z[k] for k in z.files}
    worse["probs"] = np.full_like(worse["probs"], 1.0 / worse["probs"].shape[1])
    worse["probs"][:, 0] += 1e-3              # ties broken towards class 0: mostly wrong
    np.savez(tmp_path / "worse.npz", **worse)
    with np.load(store["posteriors"]) as z:   # a perfect model, in another experiment
        best = {k: z[k] for k in z.files}
    best["probs"] = np.eye(best["probs"].shape[1], dtype=np.float32)[best["labels"]]
    np.savez(tmp_path / "best.npz", **best)
    result = _ensemble_stage(store, "honest", tmp_path / "worse.npz")
    assert result["ensemble"]["top1_error"] > result_error(c, champion)
    assert result["registered"]["champion"] is False and not result["registered"]["previous_champion_ignored"]
    other = _ensemble_stage(store, "other", tmp_path / "best.npz")
    assert other["ensemble"]["top1_error"] == 0.0
    assert other["registered"]["name"] == "other-ensemble" and other["registered"]["champion"] is True
    assert c.get_model_version_by_alias("honest-ensemble", "champion").version == champion
    assert {v.name for v in c.search_model_versions("run_id = '%s'" % c.get_model_version(
        "other-ensemble", other["registered"]["version"]).run_id)} == {"other-ensemble"}


def result_error(client, version: str) -> float:
    return float(client.get_model_version("honest-ensemble", version).tags[champion.ERROR_TAG])


@pytest.mark.parametrize("mlflow_cfg, names", [
    ({"experiment": "team-a"}, {"team-a-16px", "team-a-32px", "team-a-ensemble"}),
    ({"experiment": "team-a", "registry_prefix": "shared.v2"},
     {"shared.v2-16px", "shared.v2-32px", "shared.v2-ensemble"}),
    ({"experiment": "team/a"}, "mlflow.experiment 'team/a': registered model names"),
])
def test_the_workflow_registers_under_the_experiment_or_the_configured_prefix(tmp_path, mlflow_cfg, names):
    """What `snakemake -n -p` would run: each training and ensemble job's --registered-name."""
    from workflow import snakemake, tiny_config

    cfg = tiny_config(tmp_path)
    cfg["mlflow"].update(mlflow_cfg)
    cfg["study"] = {"enabled": False}
    r = snakemake(tmp_path, "-n", "-p", "results/ensemble/metrics.json", config=cfg, timeout=300)
    if isinstance(names, str):
        assert r.returncode != 0 and names in r.stdout + r.stderr, r.stdout + r.stderr
        return
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert set(re.findall(r"--registered-name (\S+)", r.stdout)) == names
