"""The workflow on a real two-node SLURM cluster (slurmctld, slurmdbd, two slurmd on this machine):

    sudo bash tests/cluster/install.sh && sudo bash tests/cluster/start.sh
    .venv/bin/pytest -q tests/test_slurm.py
    sudo bash tests/cluster/stop.sh

Every assertion about placement reads SLURM's own records (sacct, from slurmdbd). Without a
running cluster these tests skip with the reason; under CI=true that is a failure.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

from deepimage import checkpoint
from tracking_service import require_tracking_server
from workflow import ROOT, log_tail, snakemake, tiny_config

CLUSTER = ROOT / "tests" / "cluster"
ENV_FILE = Path(os.environ.get("DEEPIMAGE_SLURM_STATE", CLUSTER / ".state")) / "env"
PROFILE = ["--workflow-profile", str(ROOT / "profiles" / "slurm"),
           # the profile's 40 s first status check suits a site; a test of 10-second jobs polls sooner
           "--slurm-init-seconds-before-status-checks", "5"]


def _cluster_env() -> dict[str, str]:
    """os.environ plus SLURM_CONF of the test cluster; skip (fail under CI) when it is not up."""
    why = None
    if not ENV_FILE.is_file():
        why = f"SLURM test cluster not started ({ENV_FILE} missing): run tests/cluster/install.sh and start.sh as root"
    else:
        r = subprocess.run(["bash", str(CLUSTER / "status.sh")], capture_output=True, text=True, timeout=120)
        if r.returncode != 0:
            why = f"SLURM test cluster not ready: {r.stderr.strip()[-300:]}"
    if why:
        if os.environ.get("CI") == "true":
            pytest.fail(why)
        pytest.skip(why)
    conf = ENV_FILE.read_text().split("SLURM_CONF=", 1)[1].strip()
    return {**os.environ, "SLURM_CONF": conf}


@dataclass
class SlurmRun:
    workdir: Path
    config: dict
    env: dict
    stdout: str


def _run(workdir: Path, env: dict, *args: str, config: dict, timeout: float = 1500):
    """snakemake through the SLURM profile with the cluster's SLURM_CONF; (result, wall seconds)."""
    old = dict(os.environ)
    os.environ.update(env)
    try:
        t0 = time.perf_counter()
        r = snakemake(workdir, *PROFILE, *args, config=config, timeout=timeout)
        return r, time.perf_counter() - t0
    finally:
        os.environ.clear()
        os.environ.update(old)


def sacct_jobs(env: dict, job_ids: list[str]) -> dict[str, dict]:
    """SLURM's accounting record of each job: rule (from the plugin's --comment), state, and
    its steps' (nodes, tasks, node list)."""
    out = subprocess.run(["sacct", "-a", "-n", "-P", "-j", ",".join(job_ids), "-o",
                          "JobID,Comment,State,NNodes,NTasks,NodeList"],
                         capture_output=True, text=True, env=env, check=True).stdout
    jobs: dict[str, dict] = {}
    for line in out.splitlines():
        job_id, comment, state, nnodes, ntasks, nodelist = line.split("|")
        base, _, step = job_id.partition(".")
        if not step:
            rule = comment.removeprefix("rule_").split("_wildcards_")[0]
            jobs[base] = {"rule": rule, "state": state, "steps": []}
        elif step not in ("batch", "extern"):
            jobs[base]["steps"].append((int(nnodes), int(ntasks or 0), nodelist))
    return jobs


def submitted(stdout: str) -> list[str]:
    """SLURM job ids Snakemake reported submitting, in order."""
    return [line.split("SLURM jobid ")[1].split()[0] for line in stdout.splitlines()
            if "has been submitted with SLURM jobid" in line]


@pytest.fixture(scope="module")
def slurm_run(tmp_path_factory) -> SlurmRun:
    """The tiny config through profiles/slurm, training on 2 nodes (a second full workflow run),
    logging to the team tracking server on PostgreSQL (a SQLite file is refused on 2 nodes)."""
    env = _cluster_env()
    server = require_tracking_server()
    workdir = tmp_path_factory.mktemp("slurm")
    cfg = tiny_config(workdir)
    cfg["train"]["nodes"] = 2
    cfg["mlflow"] = {"tracking_uri": server.uri, "experiment": f"slurm-{uuid.uuid4().hex[:8]}"}
    r, wall = _run(workdir, env, config=cfg)
    out = r.stdout + r.stderr
    assert r.returncode == 0, f"{out[-4000:]}\n{log_tail(workdir)}"
    print(f"\nslurm: tiny config through profiles/slurm: {wall:.0f} s wall")
    return SlurmRun(workdir, cfg, env, out)


def test_every_rule_ran_as_a_slurm_job(slurm_run):
    ids = submitted(slurm_run.stdout)
    jobs = sacct_jobs(slurm_run.env, ids)
    assert sorted(jobs) == sorted(ids)
    assert all(j["state"] == "COMPLETED" for j in jobs.values()), jobs
    ran = {line.split()[1].rstrip(":") for line in slurm_run.stdout.splitlines() if line.startswith("rule ")}
    assert {j["rule"] for j in jobs.values()} == ran
    assert {"make_dataset", "shard_images", "train_model", "evaluate_model"} <= ran
    # rules that take seconds run on the submitting host (the Snakefile's localrules)
    local = {line.split()[1].rstrip(":") for line in slurm_run.stdout.splitlines() if line.startswith("localrule ")}
    assert {"ensemble_models", "write_report"} <= local and not local & ran


def test_training_ran_as_2_tasks_on_2_nodes_over_the_network_path(slurm_run):
    jobs = sacct_jobs(slurm_run.env, submitted(slurm_run.stdout))
    train = [j for j in jobs.values() if j["rule"] == "train_model"]
    assert len(train) == len(slurm_run.config["resolutions"])
    for j in train:
        assert (2, 2, "n[1-2]") in j["steps"], j  # the srun step: 2 tasks, one on each node
    for res in slurm_run.config["resolutions"]:
        m = json.loads((slurm_run.workdir / f"results/train/{res}/metrics.json").read_text())
        assert m["np"] == 2 and m["launcher"] == "torchrun"
        assert m["data_path"] == "gloo" and "ranks on 2 nodes" in m["data_path_note"], m


def test_mlflow_holds_one_parent_with_every_job_a_child(slurm_run):
    from mlflow import MlflowClient

    uri = slurm_run.config["mlflow"]["tracking_uri"]
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(slurm_run.config["mlflow"]["experiment"])
    parents = client.search_runs([exp.experiment_id], "tags.`deepimage.stage` = 'workflow'")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    records = [json.loads(p.read_text()) for p in (slurm_run.workdir / "results").rglob("mlflow_run.json")]
    local = [line for line in slurm_run.stdout.splitlines()
             if line.startswith("localrule ") and not line.startswith("localrule all:")]
    assert len(records) == len(submitted(slurm_run.stdout)) + len(local)  # a run per job, local ones too
    for rec in records:
        run = client.get_run(rec["run_id"])
        assert run.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id, rec


def test_forcerun_evaluate_runs_only_that_rule_as_a_slurm_job_under_a_new_parent(slurm_run):
    from mlflow import MlflowClient

    r, _ = _run(slurm_run.workdir, slurm_run.env, "--forcerun", "evaluate_model", "--until",
                "evaluate_model", config=slurm_run.config)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-4000:]
    jobs = sacct_jobs(slurm_run.env, submitted(out))
    assert {j["rule"] for j in jobs.values()} == {"evaluate_model"}
    assert len(jobs) == len(slurm_run.config["resolutions"])
    client = MlflowClient(tracking_uri=slurm_run.config["mlflow"]["tracking_uri"])
    exp = client.get_experiment_by_name(slurm_run.config["mlflow"]["experiment"])
    newest = client.search_runs([exp.experiment_id], "tags.`deepimage.stage` = 'workflow'",
                                order_by=["attributes.start_time DESC"])[0]
    children = client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{newest.info.run_id}'")
    assert sorted(c.data.tags["deepimage.stage"] for c in children) == ["evaluate"] * len(jobs)


def test_training_past_its_time_limit_fails_and_a_rerun_resumes_it(slurm_run):
    """A 1-minute limit on a training job that needs more: SLURM ends it (TIMEOUT) mid-training
    and the workflow fails; the same command with a longer limit resubmits it, and the new job
    resumes from the killed job's last epoch-end checkpoint (train.resume) and completes.
    1,200 epochs of the tiny config are about twice what fits in the limit here (about 600 did
    before SLURM's kill); with 600, the job could finish training inside the limit and lose only
    its clean-up, and the rerun then started over. The rerun asks for 20 epochs past that
    checkpoint (train.epochs may change on resume), so it ends soon after resuming."""
    cfg = {**slurm_run.config, "train": {**slurm_run.config["train"], "epochs": 1200}}
    target = "results/train/16/model.pt"
    r, _ = _run(slurm_run.workdir, slurm_run.env, target, "--set-resources", "train_model:runtime=1", config=cfg)
    out = r.stdout + r.stderr
    assert r.returncode != 0, out[-3000:]
    first = sacct_jobs(slurm_run.env, submitted(out))
    assert [j["state"] for j in first.values() if j["rule"] == "train_model"] == ["TIMEOUT"], first
    found = checkpoint.load_latest(slurm_run.workdir / "results" / "train" / "16" / "checkpoints")
    assert found is not None, out[-3000:]
    saved = found[0]["position"]["epoch"]
    cfg["train"]["epochs"] = saved + 20
    r, _ = _run(slurm_run.workdir, slurm_run.env, target, "--set-resources", "train_model:runtime=30", config=cfg)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-3000:]
    again = sacct_jobs(slurm_run.env, submitted(out))
    assert [j["state"] for j in again.values() if j["rule"] == "train_model"] == ["COMPLETED"]
    assert not set(again) & set(first)  # a new SLURM job, not the old one
    log = (slurm_run.workdir / "logs" / "train_model" / "16.log").read_text()  # the new job's
    resumed = re.search(r"resumed from \S+: epoch (\d+)", log)
    assert resumed and int(resumed.group(1)) == saved > 0, log[-3000:]


def test_a_sqlite_store_with_training_on_two_nodes_stops_before_any_job(tmp_path):
    """Jobs on several nodes cannot share one SQLite file: the workflow refuses it in one line
    naming the key and the fix, before submitting anything."""
    cfg = tiny_config(tmp_path)
    cfg["train"]["nodes"] = 2
    cfg["mlflow"]["tracking_uri"] = f"sqlite:///{tmp_path / 'mlflow.db'}"
    r = snakemake(tmp_path, "-n", config=cfg)
    out = r.stdout + r.stderr
    assert r.returncode != 0
    assert "is a SQLite file, but train.nodes is 2" in out and "make tracking-server" in out
    assert "Traceback" not in out and "submitted" not in out
