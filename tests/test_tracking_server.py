"""The team tracking server (MLflow on PostgreSQL, envs/tracking_server.sh) under real load and a
real database fault, and the lineage every run records.

    make tracking-server
    .venv/bin/pytest -q tests/test_tracking_server.py -s    # -s prints the load figures

- four workflows at once (two experiments, two resolutions) and a logging stress against the one
  server, checked through MlflowClient (deepimage.bench.tracking_load, small), with the same
  stress against SQLite for comparison;
- PostgreSQL stopped (`pg_ctl stop -m fast`) while a job trains and started again: the job goes
  on, its records wait in its pending file, and each lands once;
- a private server started and stopped by the script in a folder of its own: nothing it started
  is left, and the shared server is untouched;
- every run's commit, config digest and dataset input; a SQLite store with training on several
  nodes is refused in one line.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import psutil
import pytest

from test_mlflow_outage import Job, assert_each_epoch_once
from tracking_service import SCRIPT, TrackingServer, answers, require_tracking_server
from workflow import free_port

from deepimage import lineage, mlflow_client, tracking
from deepimage.store_guard import StoreError, check_tracking_store

WORKFLOWS, WRITERS, STRESS_S = 4, 4, 5
JOBS_PER_WORKFLOW = 6  # make_dataset, shard train and val, train, evaluate, ensemble
EPOCHS = 40  # the database fault's job: about 0.3 s an epoch here, it outlives the fault's first writes


@pytest.fixture(scope="module")
def server() -> TrackingServer:
    return require_tracking_server()


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    from data_fixtures import tiny_train_shards

    return tiny_train_shards(tmp_path_factory.mktemp("shards"))


def test_four_workflows_and_a_logging_stress_share_the_server(server, tmp_path):
    """Four snakemake invocations at once, then writer processes logging per step: every run has its
    parent, every epoch's metric is stored once, every model version is registered, `champion` is on
    the best ensemble; no write that returned is lost or stored twice (also on SQLite)."""
    cmd = [sys.executable, "-m", "deepimage.bench.tracking_load", "--tracking-uri", server.uri,
           "--workdir", str(tmp_path), "--workflows", str(WORKFLOWS), "--writers", str(WRITERS),
           "--seconds", str(STRESS_S), "--compare-sqlite", "--prefix", f"load-{uuid.uuid4().hex[:8]}", "--json"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=1500)
    print("\n" + r.stdout)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert result["problems"] == []
    w = result["workflows"]
    assert w["runs"] == WORKFLOWS * (JOBS_PER_WORKFLOW + 1)
    assert len(w["experiments"]) == 2 and len(set(w["resolutions"])) == 2
    for name, s in result["stress"].items():
        assert s["writes"] > 0 and s["lost_writes"] == 0 and s["duplicate_writes"] == 0, (name, s)
    # Read back here too: each experiment holds its two workflows' parents and their children.
    c = server.client()
    for exp_name in w["experiments"]:
        exp = c.get_experiment_by_name(exp_name)
        runs = c.search_runs([exp.experiment_id], max_results=1000)
        parents = {x.info.run_id for x in runs if x.data.tags.get("deepimage.stage") == "workflow"}
        assert len(parents) == 2
        assert all(x.data.tags.get("mlflow.parentRunId") in parents for x in runs if x.info.run_id not in parents)
        assert len(runs) == 2 * (JOBS_PER_WORKFLOW + 1)


def test_database_stopped_mid_job_and_started_again_loses_nothing(server, shards, tmp_path):
    """`pg_ctl stop -m fast` after epoch 1 of a training job: MLflow server answers with errors, the
    job keeps training and queues its records; with PostgreSQL back they land once each, the run
    ends FINISHED and its model is registered."""
    job = Job(tmp_path, shards, server.uri, epochs=EPOCHS)
    job.wait_for("epoch 1: ")
    t0 = time.monotonic()
    server.script("db-stop")
    try:
        job.wait_for("unreachable")  # a write found the database gone and kept its records
        workers = job.workers()
        for p in workers:
            p.suspend()  # restarting PostgreSQL takes longer than the job's remaining epochs
        assert job.pending.is_file(), job.text[-3000:]
        assert f"epoch {EPOCHS - 1}: " not in job.text, "the job ended before the database came back"
    finally:
        server.script("db-start")
    for p in workers:
        p.resume()
    out = job.finish()
    print(f"\ndatabase down for {time.monotonic() - t0:.1f} s of the job; job exit {job.proc.returncode}")
    assert job.proc.returncode == 0, out[-4000:]
    assert "answers again" in out, out[-4000:]
    assert not job.pending.exists()
    c = server.client()
    run = c.get_run(job.run_id())
    assert run.info.status == "FINISHED"
    assert_each_epoch_once(c, job.run_id(), EPOCHS)
    name, version = run.data.tags["deepimage.registered_model"].rsplit("/", 1)
    assert c.get_model_version(name, version).run_id == job.run_id()
    assert {d.dataset.name.rsplit("-", 1)[-1] for d in run.inputs.dataset_inputs} == {"train"}


def test_the_script_stops_exactly_what_it_started(server):
    """A second server in a private folder with its own ports: up, then stopped; none of its
    processes is left, and the shared server still answers."""
    folder = Path(tempfile.mkdtemp(prefix="tracking-server-", dir="/tmp"))
    folder.chmod(0o755)  # PostgreSQL's user must reach its cluster inside
    port = free_port()
    env = {**os.environ, "TRACKING_SERVER_DIR": str(folder), "TRACKING_PORT": str(port),
           "TRACKING_PG_PORT": str(free_port()), "TRACKING_WORKERS": "1"}
    try:
        up = subprocess.run(["bash", str(SCRIPT), "start"], capture_output=True, text=True, env=env, timeout=300)
        assert up.returncode == 0, up.stdout + up.stderr
        assert answers(f"http://127.0.0.1:{port}")
        started = started_by(folder)
        assert len(started) >= 2  # the postmaster and mlflow server, with their children
        down = subprocess.run(["bash", str(SCRIPT), "stop"], capture_output=True, text=True, env=env, timeout=180)
        assert down.returncode == 0, down.stdout + down.stderr
        assert started_by(folder) == []
        assert not (folder / "mlflow.pid").exists()
        assert answers(server.uri)
    finally:
        subprocess.run(["bash", str(SCRIPT), "stop"], capture_output=True, env=env, timeout=180)
        shutil.rmtree(folder, ignore_errors=True)


def started_by(folder: Path) -> list[int]:
    """Pids of the processes whose command line names folder (postgres -D, mlflow's store URI)."""
    pids = []
    for p in psutil.process_iter(["cmdline"]):
        if str(folder) in " ".join(p.info["cmdline"] or []):
            pids.append(p.pid)
    return pids


def test_a_stage_run_records_its_commit_config_digest_and_dataset(shards, tmp_path):
    """A stage run (sqlite store here) carries MLflow's commit tag, the dirty flag, the digest of
    its params, and its shards as a dataset input with the manifest's sha256 and image counts."""
    import argparse

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = argparse.Namespace(tracking_uri=uri, experiment="lineage", parent_file=str(tmp_path / "none.json"),
                              run_name=None, run_record=None)
    params = {"resolution": 16, "train": {"lr": 0.1}}
    with tracking.stage_run(args, "train", params) as run:
        run.log_dataset(str(shards), "training")
    got = mlflow_client.client(uri).get_run(run.run_id)
    commit = subprocess.run(["git", "-C", str(lineage.CODE_DIR), "rev-parse", "HEAD"], capture_output=True,
                            text=True, check=True).stdout.strip()
    assert got.data.tags[lineage.COMMIT_TAG] == commit
    assert got.data.tags[lineage.DIRTY_TAG] in ("true", "false")
    assert got.data.tags[lineage.CONFIG_DIGEST_TAG] == lineage.config_digest(params)
    assert lineage.config_digest({"train": {"lr": 0.1}, "resolution": 16}) == lineage.config_digest(params)
    assert lineage.config_digest({**params, "resolution": 32}) != lineage.config_digest(params)
    [inp] = got.inputs.dataset_inputs
    sha = lineage.manifest_sha256(shards)
    profile = json.loads(inp.dataset.profile)
    manifest = json.loads((shards / "manifest.json").read_text())
    assert inp.dataset.digest == sha[:lineage.DIGEST_CHARS]
    assert profile["images"] == manifest["num_samples"] and profile["split"] == "train"
    assert json.loads(inp.dataset.source)["uri"] == shards.resolve().as_uri()
    assert {t.key: t.value for t in inp.tags}["mlflow.data.context"] == "training"
    assert got.data.tags["deepimage.dataset.training.manifest_sha256"] == sha
    record = {"run_id": run.run_id, "run_name": "train", "tracking_uri": uri}
    assert lineage.report_lines([record])[2] == (
        f"| train | `{commit[:10]}{' (dirty)' if got.data.tags[lineage.DIRTY_TAG] == 'true' else ''}` | "
        f"`{lineage.config_digest(params)[:12]}` | {inp.dataset.name} ({sha[:12]}, {manifest['num_samples']}) |")


@pytest.mark.parametrize("uri,nodes,refused", [("sqlite:///mlflow.db", 2, True), ("sqlite:///mlflow.db", 1, False),
                                               ("http://127.0.0.1:5055", 4, False)])
def test_sqlite_with_training_on_several_nodes_is_refused_in_one_line(uri, nodes, refused):
    cfg = {"mlflow": {"tracking_uri": uri}, "train": {"nodes": nodes}}
    if not refused:
        check_tracking_store(cfg)
        return
    with pytest.raises(StoreError) as e:
        check_tracking_store(cfg)
    msg = str(e.value)
    assert "\n" not in msg and uri in msg and f"train.nodes is {nodes}" in msg and "make tracking-server" in msg
