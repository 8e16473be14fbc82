"""Exact resume with real workers: training stopped by SIGTERM mid-epoch under horovodrun and
rerun ends with the uninterrupted run's weights, bit for bit at the same worker count and within
1e-5 at another; a checkpoint of another config is refused naming the keys; the resumed job
continues the same MLflow run with one value per epoch; mismatched validation classes stop
training before it starts.

    .venv/bin/pytest -q tests/test_resume.py
"""
from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from data_fixtures import synthetic_source
from deepimage.shard import ShardParams, build, plan_split

RES = 16
MODEL = {"conv": [[4]], "fc_hidden": [8, 8], "dropout": 0.2, "norm": "group"}
# 3 classes x 16 = 48 samples, global batch 8: 6 steps per epoch, 12 in all.
TRAIN = {"epochs": 2, "batch_size": 8, "lr": 0.05, "bucket_mib": 1, "augment": {},
         "checkpoint": {"on_signal_min_age_s": 0}}


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """Train and val shards of a 3-class synthetic set at 16 px (once for the module)."""
    root = tmp_path_factory.mktemp("resume-data")
    source = synthetic_source(root / "syn", classes=3, per_class=16, image_size=32)
    for split in ("train", "val"):
        build(plan_split(source, split), root / "shards" / split, ShardParams(resolution=RES))
    return root / "shards"


def train(out: Path, shards: Path, np: int = 2, model: dict | None = None, train: dict | None = None,
          sigterm_at: str | None = None, val: Path | None = None) -> subprocess.CompletedProcess:
    """One training job: `np` workers under horovodrun, MLflow in out's parent folder; with
    `sigterm_at` ("<step>:<rank>"), that rank sends itself SIGTERM right after that global step
    (tests/workers/sigterm_train.py)."""
    cfg = {"seed": 0, "model": model or MODEL, "train": {**TRAIN, **(train or {})}}
    worker = "tests.workers.sigterm_train" if sigterm_at else "deepimage.train"
    cmd = [sys.executable, "-m", "deepimage.launch", "--launcher", "horovod", "--np", str(np),
           "--threads", str(np), worker, "--resolution", str(RES),
           "--train-shards", str(shards / "train"), "--val-shards", str(val or shards / "val"),
           "--out", str(out), "--config-json", json.dumps(cfg),
           "--tracking-uri", f"sqlite:///{out.parent / 'mlflow.db'}", "--experiment", "resume",
           "--parent-file", str(out.parent / "none.json"), "--run-record", str(out / "mlflow_run.json")]
    import os

    from workflow import ROOT

    env = {**os.environ, "OMP_NUM_THREADS": "1", **({"SIGTERM_AT": sigterm_at} if sigterm_at else {})}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)


def weights(out: Path) -> dict[str, torch.Tensor]:
    return torch.load(out / "model.pt", map_location="cpu", weights_only=False)["state_dict"]


def interrupted(out: Path, shards: Path, at: str, **kw) -> subprocess.CompletedProcess:
    """A job that receives SIGTERM after global step `at` ("<step>:<rank>"): it must stop with a
    checkpoint of that step and a non-zero exit."""
    r = train(out, shards, sigterm_at=at, **kw)
    assert r.returncode != 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "stopped by SIGTERM" in r.stdout and not (out / "model.pt").exists(), r.stdout[-3000:]
    return r


@pytest.fixture(scope="module")
def reference(shards, tmp_path_factory) -> Path:
    """The uninterrupted 2-worker run (dropout on)."""
    out = tmp_path_factory.mktemp("ref") / "out"
    r = train(out, shards)
    assert r.returncode == 0, r.stdout[-3000:]
    return out


def test_sigterm_mid_epoch_then_rerun_equals_the_uninterrupted_run_bit_for_bit(shards, reference, tmp_path):
    """Rank 1 gets SIGTERM after step 4 of 6 of epoch 0 (dropout, lazy update, split FC); the
    rerun, with no flag, resumes from that checkpoint and ends with identical weights; its MLflow
    run is the first job's, with one loss value per epoch."""
    out = tmp_path / "out"
    r = interrupted(out, shards, "4:1")
    assert "train (rank 1): stopped by SIGTERM after step 4: checkpoint written by rank 0" in r.stdout
    assert "train (rank 0): stopped by SIGTERM after step 4: checkpoint " in r.stdout
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["ckpt-000000004.pt"]
    r = train(out, shards)
    assert r.returncode == 0, r.stdout[-3000:]
    assert "resumed from" in r.stdout and "epoch 0, step 4" in r.stdout, r.stdout[-2000:]
    got, want = weights(out), weights(reference)
    assert got.keys() == want.keys()
    for k in want:
        assert torch.equal(got[k], want[k]), k
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{out.parent / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("resume").experiment_id])
    assert len(runs) == 1, [r.info.run_id for r in runs]
    run_id = json.loads((out / "mlflow_run.json").read_text())["run_id"]
    assert runs[0].info.run_id == run_id and runs[0].info.status == "FINISHED"
    for key in ("loss", "val_top1_error", "epoch_seconds"):
        assert sorted(m.step for m in client.get_metric_history(run_id, key)) == [0, 1], key
    ref_loss = json.loads((reference / "metrics.json").read_text())["history"]["loss"]
    assert json.loads((out / "metrics.json").read_text())["history"]["loss"] == ref_loss


def test_resume_at_an_epoch_end_checkpoint_equals_the_uninterrupted_run(shards, reference, tmp_path):
    """Stopped right after epoch 0's end-of-epoch checkpoint (the signal arrives at step 7), the
    rerun continues from step 7 and matches bit for bit; keep: 2 leaves two checkpoints."""
    out = tmp_path / "out"
    interrupted(out, shards, "7:0")
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["ckpt-000000006.pt", "ckpt-000000007.pt"]
    assert train(out, shards).returncode == 0
    got, want = weights(out), weights(reference)
    assert all(torch.equal(got[k], want[k]) for k in want)


@pytest.mark.parametrize("np_after", [1, 3])
def test_resume_at_another_worker_count_matches_within_1e_5(shards, tmp_path_factory, np_after):
    """2 workers stopped after step 3, resumed on 1 and on 3 with dropout 0.2 (masks a pure
    function of seed, step, layer, row and column): final weights within 1e-5 relative of the
    uninterrupted 2-worker run."""
    base = tmp_path_factory.getbasetemp() / "cross"
    model = MODEL
    assert model["dropout"] == 0.2
    if not (base / "ref" / "model.pt").exists():
        assert train(base / "ref", shards, model=model).returncode == 0
        interrupted(base / "stopped", shards, "3:0", model=model)
    out = base / f"np{np_after}"
    shutil.copytree(base / "stopped", out)
    r = train(out, shards, np=np_after, model=model)
    assert r.returncode == 0, r.stdout[-3000:]
    assert f"saved by 2 workers, now {np_after}" in r.stdout
    got, want = weights(out), weights(base / "ref")
    for k in want:
        rel = (got[k] - want[k]).norm() / want[k].norm().clamp_min(1e-12)
        assert rel < 1e-5, (k, float(rel))


def test_a_checkpoint_of_another_config_is_refused_naming_the_keys(shards, tmp_path):
    out = tmp_path / "out"
    interrupted(out, shards, "2:0")
    r = train(out, shards, train={"lr": 0.1, "epochs": 3}, model={**MODEL, "fc_hidden": [8, 6]})
    assert r.returncode != 0
    assert ("was made with another config: model.fc_hidden ([8, 8] -> [8, 6]), train.lr (0.05 -> 0.1)"
            in r.stdout), r.stdout
    assert "train.resume: false to start over" in r.stdout and "Traceback" not in r.stdout
    r = train(out, shards, train={"lr": 0.1, "resume": False})  # starts over, replaces the old ones
    assert r.returncode == 0, r.stdout[-3000:]
    assert "resumed from" not in r.stdout
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["ckpt-000000006.pt", "ckpt-000000012.pt"]


def test_validation_classes_that_differ_stop_training_before_it_starts(tmp_path):
    """Val shards from a 4-class set beside train shards of its first 3 classes: one line naming
    the class found on one side only, before any checkpoint exists."""
    root = tmp_path
    source = synthetic_source(root / "syn", classes=3, per_class=8, image_size=32)
    build(plan_split(source, "train"), root / "shards" / "train", ShardParams(resolution=RES))
    other = synthetic_source(root / "syn2", classes=4, per_class=8, image_size=32)
    build(plan_split(other, "val"), root / "shards" / "val", ShardParams(resolution=RES))
    r = train(root / "out", root / "shards")
    assert r.returncode != 0
    line = [x for x in r.stdout.splitlines() if "validation classes differ" in x]
    assert line, r.stdout[-3000:]
    assert "only in train: []" in line[0] and "only in val: [" in line[0], line[0]
    assert "Traceback" not in r.stdout and not (root / "out" / "checkpoints").exists()


def kill_tree(pid: int) -> None:
    """SIGKILL a process and every descendant (stopped first, so none can start another or
    finish its work in between), as a node failure or a scheduler's kill would."""
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for sig in (signal.SIGSTOP, signal.SIGKILL):
        for p in procs:
            try:
                p.send_signal(sig)
            except psutil.NoSuchProcess:
                pass


def test_snakemake_sigkilled_during_training_then_rerun_resumes_to_the_uninterrupted_weights(tmp_path):
    """The whole workflow on a dataset folder whose path has spaces and non-ASCII characters.
    Snakemake and everything it started are SIGKILLed once the 16 px job has a checkpoint; after
    `snakemake --unlock`, the rerun (no flag) runs the whole workflow, the training job resuming
    from that checkpoint in the same MLflow run (one loss value per epoch); forcing that job again
    trains from scratch (the checkpoints are of a finished run) and gives the same weights bit for
    bit."""
    import os
    import time

    from deepimage import synthetic
    from workflow import ROOT, SNAKEMAKE, log_tail, tiny_config

    data = tmp_path / "données d'entraînement" / "set 1 ñ"
    synthetic.generate(synthetic.SyntheticSpec(seed=0, classes=3, train_per_class=16, val_per_class=4,
                                               image_size=32), data, threads=1)
    cfg = tiny_config(tmp_path)
    cfg["dataset"] = {"source": str(data)}
    cfg["resolutions"] = [16]
    cfg["model"]["dropout"] = 0.2
    cfg["train"] = {**cfg["train"], "epochs": 8, "batch_size": 8}
    cfg["scaling"] = {**cfg["scaling"], "resolution": 16}
    cfg["study"] = {"ablation": False, "scaling": False, "perfmodel": False}  # training is what is tested
    (tmp_path / "test-config.yaml").write_text(json.dumps(cfg))
    base = [SNAKEMAKE, "--snakefile", str(ROOT / "Snakefile"), "--directory", str(tmp_path)]
    opts = ["--cores", "2", "--configfile", str(tmp_path / "test-config.yaml")]  # nargs: last
    # TMPDIR in the test's folder, to see the launcher's temporary folder that the SIGKILL leaves
    (tmp_path / "tmp").mkdir()
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp_path / "tmp")}
    ckpts = tmp_path / "results" / "train" / "16" / "checkpoints"
    first = tmp_path / "first-invocation.log"
    with open(first, "w") as log:
        proc = subprocess.Popen([*base, "results/train/16/model.pt", *opts], stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True, env=env)
    try:
        deadline = time.monotonic() + 400
        while not (ckpts.is_dir() and any(ckpts.glob("ckpt-*.pt"))):
            assert proc.poll() is None, first.read_text()[-3000:] + log_tail(tmp_path)
            assert time.monotonic() < deadline, log_tail(tmp_path)
            time.sleep(0.05)
    finally:
        kill_tree(proc.pid)  # snakemake, the launcher (its own session) and every worker
        proc.wait()
    assert not (tmp_path / "results" / "train" / "16" / "model.pt").exists(), "training finished first"
    assert len(list((tmp_path / "tmp").glob("deepimage-launch-*"))) == 1  # the killed launch's
    killed_run = torch.load(sorted(ckpts.glob("ckpt-*.pt"))[-1], weights_only=True)["run_id"]

    # Snakemake's own lock outlives a SIGKILL (it cannot tell a dead invocation from a live one):
    # --unlock once, as its message says; the rerun then needs no flag (profiles/default says
    # rerun-incomplete, and training finds its checkpoint by itself).
    assert subprocess.run([*base, "--unlock", *opts], capture_output=True, env=env).returncode == 0
    r = subprocess.run([*base, *opts], capture_output=True, text=True, timeout=900, env=env)
    assert r.returncode == 0, f"{r.stderr[-3000:]}\n{log_tail(tmp_path)}"
    train_log = (tmp_path / "logs" / "train_model" / "16.log").read_text()
    assert "resumed from" in train_log, train_log[-3000:]
    assert not list((tmp_path / "tmp").glob("deepimage-launch-*"))  # the rerun's launches removed it
    assert (tmp_path / "results" / "report.md").is_file()
    record = json.loads((tmp_path / "results" / "train" / "16" / "mlflow_run.json").read_text())
    assert record["run_id"] == killed_run
    from mlflow import MlflowClient

    client = MlflowClient(cfg["mlflow"]["tracking_uri"])
    assert sorted(m.step for m in client.get_metric_history(killed_run, "loss")) == list(range(8))
    resumed = weights(tmp_path / "results" / "train" / "16")

    r = subprocess.run([*base, "--forcerun", "train_model", "--until", "train_model", *opts],
                       capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, f"{r.stderr[-3000:]}\n{log_tail(tmp_path)}"
    train_log = (tmp_path / "logs" / "train_model" / "16.log").read_text()
    assert "resumed from" not in train_log and "is of a finished run: training starts over" in train_log
    fresh = weights(tmp_path / "results" / "train" / "16")
    assert all(torch.equal(resumed[k], fresh[k]) for k in fresh)


def test_sigterm_to_the_launcher_stops_every_worker_after_its_step_with_a_checkpoint(shards, tmp_path):
    """SIGTERM to deepimage.launch (what `kill` or a scheduler reaches): every worker finishes
    its step, rank 0 writes a checkpoint of that step, the job exits non-zero within seconds."""
    import os
    import time

    out = tmp_path / "out"
    cfg = {"seed": 0, "model": MODEL, "train": {**TRAIN, "epochs": 1000, "checkpoint": {"on_signal_min_age_s": 0}}}
    cmd = [sys.executable, "-m", "deepimage.launch", "--launcher", "horovod", "--np", "2", "--threads", "2",
           "deepimage.train", "--resolution", str(RES), "--train-shards", str(shards / "train"),
           "--out", str(out), "--config-json", json.dumps(cfg), "--tracking-uri",
           f"sqlite:///{tmp_path / 'mlflow.db'}", "--parent-file", str(tmp_path / "none.json")]
    log = tmp_path / "launch.log"
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + 240
    while not (out / "checkpoints").is_dir() or not list((out / "checkpoints").glob("ckpt-*.pt")):
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.1)
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=120)
    elapsed = time.monotonic() - t0
    text = log.read_text()
    print(f"\nSIGTERM to the launcher: job exited {elapsed:.1f} s later")
    assert proc.returncode != 0 and elapsed < 60
    step = re.search(r"train \(rank 0\): stopped by SIGTERM after step (\d+): checkpoint (\S+);", text)
    assert step and "train (rank 1): stopped by SIGTERM after step " + step.group(1) in text, text[-3000:]
    assert Path(step.group(2)).name == f"ckpt-{int(step.group(1)):09d}.pt" and Path(step.group(2)).is_file()
