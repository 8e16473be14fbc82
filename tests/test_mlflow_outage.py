"""MLflow through outages, against a real `mlflow server` (sqlite backend, free localhost port):
stopped during a training job and started again, the job finishes and every epoch's metric is in
the server exactly once; a job that ends while the server is down leaves its pending file and the
next invocation sends it; a server down at the start stops the workflow within 30 s naming its
URI; a parent run left RUNNING by a killed Snakemake is marked KILLED by the next invocation.

    .venv/bin/pytest -q tests/test_mlflow_outage.py -s    # -s prints the measured times
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from workflow import ROOT, SNAKEMAKE, free_port, start_mlflow_server, stop_process_group, tiny_config

START_TIMEOUT_S = 240.0  # the shared 2-core machine: torch, Horovod and MLflow imports
CONFIG = {"seed": 0,
          "train": {"lr": 0.05, "momentum": 0.9, "weight_decay": 0.0, "bucket_mib": 1, "lazy_update": True,
                    "split_fc": True, "bf16": False, "epochs": 10, "batch_size": 8, "augment": {}},
          "model": {"conv": [[4]], "fc_hidden": [8, 8], "dropout": 0.0, "norm": "group"}}


class Server:
    """`mlflow server` on one port and one sqlite store, stopped and started again at will."""

    def __init__(self, folder: Path):
        self.folder, self.port = folder, free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.proc = start_mlflow_server(f"sqlite:///{self.folder / 'mlflow.db'}", self.port, self.folder / "server.log")

    def stop(self) -> None:
        if self.proc is not None:
            stop_process_group(self.proc)

    def client(self):
        from mlflow import MlflowClient

        return MlflowClient(tracking_uri=self.uri)


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """One server for the module (a first start migrates the store: the slow part)."""
    s = Server(tmp_path_factory.mktemp("server"))
    s.start()
    yield s
    s.stop()


@pytest.fixture
def server(mlflow_server):
    """The module's server, running (a test may leave it stopped)."""
    if mlflow_server.proc.poll() is not None:
        mlflow_server.start()
    return mlflow_server


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """Tiny 16 px train shards: 3 classes x 24 images, 9 steps of 8 per epoch."""
    from data_fixtures import tiny_train_shards

    return tiny_train_shards(tmp_path_factory.mktemp("outage"))


class Job:
    """A 2-worker training job logging to `uri`, its results under <folder>/results/train/16."""

    def __init__(self, folder: Path, shards: Path, uri: str, epochs: int):
        self.out = folder / "results" / "train" / "16"
        # A replay sends only files inside the workflow's results folder: the shards are there.
        shards = Path(shutil.copytree(shards, folder / "results" / "shards" / "16" / "train"))
        cfg = {**CONFIG, "train": {**CONFIG["train"], "epochs": epochs}}
        cmd = [sys.executable, "-m", "deepimage.launch", "--launcher", "horovod", "--np", "2", "--threads", "2",
               "deepimage.train", "--resolution", "16", "--train-shards", str(shards), "--out", str(self.out),
               "--config-json", json.dumps(cfg), "--tracking-uri", uri, "--experiment", "outage",
               "--parent-file", str(folder / "none.json"), "--run-record", str(self.out / "mlflow_run.json")]
        self.proc = subprocess.Popen(cmd, cwd=folder, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     start_new_session=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        self.lines: list[str] = []
        self._reader = threading.Thread(target=lambda: self.lines.extend(self.proc.stdout), daemon=True)
        self._reader.start()

    @property
    def text(self) -> str:
        return "".join(self.lines)

    def wait_for(self, needle: str) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while needle not in self.text:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.kill()
                pytest.fail(f"{needle!r} never printed (exit {self.proc.poll()}):\n{self.text[-4000:]}")
            time.sleep(0.2)

    def finish(self) -> str:
        try:
            self.proc.wait(timeout=START_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"the job did not finish:\n{self.text[-4000:]}")
        self._reader.join(timeout=10)
        return self.text

    def kill(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass  # already gone
        self.proc.wait()

    def workers(self) -> list:
        """The two deepimage.train processes (psutil.Process), below their launcher and guards."""
        import psutil

        found = [p for p in psutil.Process(self.proc.pid).children(recursive=True)
                 if p.cmdline()[1:3] == ["-m", "deepimage.train"]]
        assert len(found) == 2, found
        return found

    @property
    def pending(self) -> Path:
        return self.out / "mlflow_pending.jsonl"

    def run_id(self) -> str:
        return json.loads((self.out / "mlflow_run.json").read_text())["run_id"]


def assert_each_epoch_once(client, run_id: str, epochs: int) -> None:
    """Every per-epoch metric has exactly one value per epoch, none missing, none twice."""
    for key in ("loss", "train_top1_error", "lr", "epoch_seconds"):
        steps = sorted(m.step for m in client.get_metric_history(run_id, key))
        assert steps == list(range(epochs)), f"{key}: steps {steps}"


EPOCHS = 40  # about 0.3 s each here: the job outlives the outage's first writes by seconds


def test_a_test_server_start_leaves_no_folder_in_dev_shm(server):
    """Started as the tests start it (start_mlflow_server), `mlflow server` makes no job-runner store
    in /dev/shm; MLflow would make one per start and never remove it."""
    server.stop()
    since = time.time() - 1.0
    server.start()  # up when /health answers; MLflow makes its store before it starts the server
    made = [p.name for p in Path("/dev/shm").glob("tmp*") if p.is_dir() and p.stat().st_mtime >= since]
    assert made == []


def test_server_stopped_mid_job_and_started_again_loses_nothing(server, shards, tmp_path):
    """Stop the server after epoch 1, start it again later: the job finishes (exit 0),
    its kept records are sent when the server answers, and each epoch's metrics are there once.
    The workers are paused (SIGSTOP) while the server starts again, which takes longer than
    this tiny job's remaining epochs."""
    job = Job(tmp_path, shards, server.uri, epochs=EPOCHS)
    job.wait_for("epoch 1: ")
    t0 = time.monotonic()
    server.stop()
    job.wait_for("unreachable")  # the next write found it down and kept its records
    workers = job.workers()
    for p in workers:
        p.suspend()
    assert job.pending.is_file(), job.text[-3000:]
    assert f"epoch {EPOCHS - 1}: " not in job.text, "the job ended before the server came back: make it longer"
    server.start()
    for p in workers:
        p.resume()
    out = job.finish()
    print(f"\nserver down for {time.monotonic() - t0:.1f} s of the job; job exit {job.proc.returncode}")
    assert job.proc.returncode == 0, out[-4000:]
    assert "answers again" in out, out[-4000:]
    assert not job.pending.exists()
    run = server.client().get_run(job.run_id())
    assert run.info.status == "FINISHED"
    assert_each_epoch_once(server.client(), job.run_id(), EPOCHS)


def test_job_ending_while_server_is_down_leaves_the_file_and_the_next_invocation_sends_it(server, shards, tmp_path):
    """Stop the server after epoch 0 of a 3-epoch job: the job finishes (exit 0), says the server
    is still down and leaves its pending file; with the server back, the workflow's onstart
    (`python -m deepimage.tracking start`) sends it: metrics once each, FINISHED, model registered."""
    job = Job(tmp_path, shards, server.uri, epochs=3)
    job.wait_for("epoch 0: ")
    server.stop()
    out = job.finish()
    assert job.proc.returncode == 0, out[-4000:]
    assert "still unreachable at the end of the job" in out and str(job.pending) in out, out[-4000:]
    assert job.pending.is_file()
    server.start()
    assert server.client().get_run(job.run_id()).info.status == "RUNNING"  # its end is in the file
    (tmp_path / "config.json").write_text(json.dumps({"mlflow": {"tracking_uri": server.uri, "experiment": "outage"}}))
    r = subprocess.run([sys.executable, "-m", "deepimage.tracking", "start", "--config-json", "config.json"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"that {job.pending.relative_to(tmp_path)} kept" in r.stdout, r.stdout
    assert not job.pending.exists()
    c = server.client()
    assert c.get_run(job.run_id()).info.status == "FINISHED"
    assert_each_epoch_once(c, job.run_id(), 3)
    assert c.search_model_versions("name='outage-16px'"), "the deferred model upload was not sent"


def _snakemake(workdir: Path, cfg: dict, *targets: str) -> subprocess.Popen:
    (workdir / "test-config.yaml").write_text(yaml.safe_dump(cfg))
    cmd = [SNAKEMAKE, *targets, "--snakefile", str(ROOT / "Snakefile"), "--directory", str(workdir),
           "--cores", "1", "--configfile", str(workdir / "test-config.yaml")]
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, env=env)


def test_server_down_at_start_stops_the_workflow_within_30_s_naming_the_uri(tmp_path):
    """Nothing listens on the configured port: snakemake fails within 30 s, naming the URI, and no
    job ran (no results folder)."""
    cfg = tiny_config(tmp_path)
    uri = f"http://127.0.0.1:{free_port()}"
    cfg["mlflow"] = {"tracking_uri": uri, "experiment": "outage"}
    t0 = time.monotonic()
    proc = _snakemake(tmp_path, cfg, "results/dataset/source.json")
    out, _ = proc.communicate(timeout=120)
    elapsed = time.monotonic() - t0
    print(f"\nworkflow stopped {elapsed:.1f} s after it started (tracking server down)")
    assert proc.returncode != 0
    assert f"MLflow tracking server {uri} does not answer" in out, out[-3000:]
    assert elapsed < 30
    assert not (tmp_path / "results" / "dataset").exists()


def test_parent_left_running_by_a_killed_snakemake_is_marked_killed_next_time(tmp_path):
    """SIGKILL snakemake (and its jobs) once its parent run exists; the next invocation marks that
    parent KILLED before it starts its own."""
    from deepimage import mlflow_client, tracking

    cfg = tiny_config(tmp_path)
    uri = cfg["mlflow"]["tracking_uri"]
    parent_file = tmp_path / tracking.DEFAULT_PARENT_FILE
    proc = _snakemake(tmp_path, cfg, "results/dataset/source.json")
    deadline = time.monotonic() + START_TIMEOUT_S
    while not parent_file.is_file():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0][-3000:]
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate()
    first = json.loads(parent_file.read_text())["run_id"]
    c = mlflow_client.client(uri)
    assert c.get_run(first).info.status == "RUNNING"  # killed before onsuccess / onerror
    assert _snakemake(tmp_path, cfg, "--unlock").wait(timeout=300) == 0  # the lock a kill leaves
    second = _snakemake(tmp_path, cfg, "results/dataset/source.json", "--forcerun", "make_dataset")
    out, _ = second.communicate(timeout=600)
    assert second.returncode == 0, out[-3000:]
    assert f"parent run {first} of an earlier invocation was still RUNNING" in out, out[-3000:]
    assert c.get_run(first).info.status == "KILLED"
    assert json.loads(parent_file.read_text())["run_id"] != first
