"""deepimage.predict and `mlflow models serve` on the tiny workflow's registered ensemble.

    .venv/bin/pytest -q tests/test_predict.py
"""
import base64
import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from deepimage import predict
from deepimage.data.decode import FORMATS
from deepimage.registry.load import load_classifier
from workflow import free_port

CHAMPION = "models:/e2e-ensemble@champion"   # the tiny run's experiment is e2e


@pytest.fixture(scope="module")
def tiny(tiny_workflow):
    return tiny_workflow


@pytest.fixture(scope="module")
def images(tiny, tmp_path_factory):
    """Five val images in nested folders, a hidden file, and a corrupt .jpg."""
    source = json.loads((tiny.workdir / "results/dataset/source.json").read_text())
    val = Path(source["root"]) / "val"
    folder = tmp_path_factory.mktemp("images")
    for i, cls in enumerate(source["classes"][:5]):
        src = sorted((val / cls).iterdir())[0]
        (folder / f"sub{i % 2}").mkdir(exist_ok=True)
        shutil.copy(src, folder / f"sub{i % 2}" / f"{cls}{src.suffix}")
    (folder / "broken.jpg").write_bytes(b"not a jpeg at all")
    (folder / ".hidden.jpg").write_bytes(b"ignored")
    return folder


def _predict(tiny, *args):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "deepimage.predict", "--tracking-uri",
                           tiny.config["mlflow"]["tracking_uri"], "--experiment", tiny.config["mlflow"]["experiment"],
                           *args],
                          capture_output=True, text=True, timeout=600, env=env)


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_predict_writes_one_row_per_image_and_lists_the_corrupt_file(tiny, images, tmp_path):
    out = tmp_path / "predictions.csv"
    r = _predict(tiny, "--model", CHAMPION, str(images), "--out", str(out))
    assert r.returncode == 0, r.stderr
    rows = _rows(out)
    assert sorted(Path(row["path"]).name for row in rows) == sorted(
        p.name for p in images.rglob("*") if p.is_file() and p.suffix and p.name[0] != "." and p.name != "broken.jpg")
    classes = json.loads((tiny.workdir / "results/dataset/source.json").read_text())["classes"]
    for row in rows:
        top5 = [item.rsplit(":", 1) for item in row["top5"].split(";")]
        assert len(top5) == 5 and all(c in classes for c, _ in top5)
        assert top5[0][0] == row["top1_class"] and float(top5[0][1]) == float(row["top1_prob"])
        probs = [float(p) for _, p in top5]
        assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-5
    assert "5 images classified, 1 skipped" in r.stderr
    assert (f"skipped {images / 'broken.jpg'}: UnidentifiedImageError: cannot identify image file "
            f"(accepted formats: {', '.join(FORMATS)})\n") in r.stderr


def test_nothing_classified_is_a_one_line_error(tiny, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "a.png").write_bytes(b"\x89PNG but truncated")
    r = _predict(tiny, str(bad), "--out", str(tmp_path / "p.csv"))   # default model: the champion
    assert r.returncode != 0 and "no image classified among 1 file(s)" in r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "p.csv").exists()


def test_runs_uri_and_local_folder_classify_like_the_registry_uri(tiny, images):
    import mlflow

    uri = tiny.config["mlflow"]["tracking_uri"]
    champion = tiny.client.get_model_version_by_alias("e2e-ensemble", "champion")
    mlflow.set_tracking_uri(uri)
    local = mlflow.artifacts.download_artifacts(artifact_uri=CHAMPION)
    files = predict.list_images([str(images)])
    results = {}
    for name, model_uri in [("registry", CHAMPION), ("runs", f"runs:/{champion.run_id}/ensemble"),
                            ("folder", local)]:
        preds, skipped = predict.classify(load_classifier(model_uri, uri), files, workers=0)
        assert [p for p, _ in skipped] == [str(images / "broken.jpg")]
        results[name] = np.stack([p.posteriors for p in preds])
    np.testing.assert_allclose(results["runs"], results["registry"], atol=1e-6)
    np.testing.assert_allclose(results["folder"], results["registry"], atol=1e-6)


def test_a_pool_of_workers_classifies_like_one_process_in_input_order(tiny, images):
    ensemble = load_classifier(CHAMPION, tiny.config["mlflow"]["tracking_uri"])
    files = predict.list_images([str(images)])                          # 5 images and broken.jpg
    alone, alone_skipped = predict.classify(ensemble, files, batch_size=2, workers=0)
    pooled, pooled_skipped = predict.classify(ensemble, files, batch_size=2, workers=2)   # 3 batches
    assert [p.path for p in pooled] == [p.path for p in alone] == [f for f in files if "broken" not in f]
    assert pooled_skipped == alone_skipped and [p for p, _ in pooled_skipped] == [str(images / "broken.jpg")]
    np.testing.assert_allclose(np.stack([p.posteriors for p in pooled]),
                               np.stack([p.posteriors for p in alone]), atol=1e-6)


def test_benchmark_reports_both_sides_and_they_agree(tiny, images):
    r = subprocess.run([sys.executable, "-m", "deepimage.bench.predict", "--json", "--repeats", "1",
                        "--images", str(images), "--batch-size", "2", "--model", CHAMPION, "--tracking-uri",
                        tiny.config["mlflow"]["tracking_uri"]],
                       capture_output=True, text=True, timeout=600, cwd=tiny.workdir,
                       env={**os.environ, "OMP_NUM_THREADS": "1", "DEEPIMAGE_PROGRESS": "off"})
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert result["images"] == 5 and result["models"] == 2 and result["top1_agreement"] == 1.0
    for side in ("predict", "loop"):
        assert result[f"{side}_images_per_s"] > 0 and result[f"{side}_cpu_ms_per_image"] > 0
    assert result["speedup"] == pytest.approx(result["predict_images_per_s"] / result["loop_images_per_s"])


def _wait_ready(proc, url, log_path, timeout=300):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"mlflow models serve exited with {proc.returncode}; see {log_path}")
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(1)
    raise AssertionError(f"no answer from {url} in {timeout} s")


def _stop(proc):
    """SIGTERM the server's process group (mlflow's CLI and its uvicorn), SIGKILL if it lingers."""
    for sig, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, None)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:  # the group is gone already
            pass
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def test_served_champion_answers_an_image_like_deepimage_predict(tiny, images, tmp_path):
    uri = tiny.config["mlflow"]["tracking_uri"]
    image = sorted((images / "sub0").iterdir())[0]
    out = tmp_path / "p.csv"
    r = _predict(tiny, str(image), "--out", str(out))
    assert r.returncode == 0, r.stderr
    (expected,) = _rows(out)
    port = free_port()
    log = open(tmp_path / "serve.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "models", "serve", "--env-manager", "local",
                             "-m", CHAMPION, "--host", "127.0.0.1", "-p", str(port), "-w", "1"],
                            env={**os.environ, "MLFLOW_TRACKING_URI": uri, "OMP_NUM_THREADS": "1",
                                 # mlflow execs `uvicorn` by name: the one beside this interpreter
                                 "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"},
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_ready(proc, f"http://127.0.0.1:{port}/ping", tmp_path / "serve.log")
        body = {"dataframe_split": {"columns": ["image"],
                                    "data": [[base64.b64encode(image.read_bytes()).decode()]]}}
        req = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as resp:
            (answer,) = json.loads(resp.read())["predictions"]
    finally:
        _stop(proc)
        log.close()
    assert answer["top1_class"] == expected["top1_class"]
    assert answer["top1_prob"] == pytest.approx(float(expected["top1_prob"]), abs=1e-6)
    served = ";".join(f"{c}:{p:.6f}" for c, p in zip(answer["top5_classes"], answer["top5_probs"]))
    assert served == expected["top5"]
    assert len(answer["posteriors"]) == len(json.loads(
        (tiny.workdir / "results/dataset/source.json").read_text())["classes"])
