"""The scaling stage: the step's time split, CPU pinning, the resolution it measures at and its
all-reduce sweep under torchrun, on tiny shards (one stage run shared by the module).

    .venv/bin/pytest -q tests/test_scaling.py
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from workflow import snakemake, tiny_config

SPLIT = ("compute", "comm_wait", "data", "other")
TINY = {"seed": 0, "resolutions": [16],
        "model": {"conv": [[8], [16]], "fc_hidden": [64, 64], "per_resolution": {}},
        "train": {"launcher": "torchrun"},
        "scaling": {"np": [1, 2], "steps": 4, "warmup_steps": 1, "batch_size": 8,
                    "allreduce_mib": 0.5, "pin": True}}


@pytest.fixture(scope="module")
def stage(tmp_path_factory):
    """`python -m deepimage.scaling` under torchrun on 2 cores: (scaling.json, MLflow client, run id)."""
    from data_fixtures import tiny_train_shards

    from deepimage import mlflow_client

    tmp = tmp_path_factory.mktemp("scaling")
    shards = tiny_train_shards(tmp)
    uri, out, record = f"sqlite:///{tmp / 'mlflow.db'}", tmp / "scaling.json", tmp / "run.json"
    cmd = [sys.executable, "-m", "deepimage.scaling", "--threads", "2", "--train-shards", str(shards),
           "--config-json", json.dumps(TINY), "--out", str(out), "--allreduce-repeats", "1",
           "--tracking-uri", uri, "--experiment", "scaling", "--parent-file", str(tmp / "parent.json"),
           "--run-record", str(record)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return json.loads(out.read_text()), mlflow_client.client(uri), json.loads(record.read_text())["run_id"]


def test_split_parts_are_non_negative_and_sum_to_the_step_time(stage):
    """Each part >= 0; they add up to split_wall_s exactly (the laps partition the step), and
    that mean step time agrees with the timed steps' own mean within 20 %: the split is the
    rank-mean, the step times the rank-max, and the ranks run each step in lockstep (a
    collective at its start and end), so the two differ only by the ranks' skew leaving the
    barrier, a scheduler slice against a step of tens of ms."""
    sc, _, _ = stage
    for row in sc["rows"]:
        split = row["split"]
        assert set(split) == set(SPLIT) and all(v >= 0 for v in split.values()), split
        assert sum(split.values()) == pytest.approx(row["split_wall_s"], rel=1e-9)
        mean_step = sum(row["step_times_s"]) / len(row["step_times_s"])
        assert row["split_wall_s"] == pytest.approx(mean_step, rel=0.2)
        assert row["step_s"] == row["median_step_s"] > 0
    two = next(r for r in sc["rows"] if r["np"] == 2)
    assert two["split"]["comm_wait"] > 0  # split FC and the butterfly cost 2 workers some wait


def test_split_is_logged_to_mlflow_per_worker_count(stage):
    sc, client, run_id = stage
    for part in SPLIT:
        history = client.get_metric_history(run_id, f"split_{part}_s")
        assert sorted(m.step for m in history) == [1, 2]
        by_np = {m.step: m.value for m in history}
        for row in sc["rows"]:
            assert by_np[row["np"]] == pytest.approx(row["split"][part])


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="two pinned workers need two cores")
def test_pinning_gives_each_rank_its_own_cores(stage):
    sc, _, _ = stage
    assert sc["pinned"] is True
    for row in sc["rows"]:
        cores = [set(c) for c in row["cores"]]
        assert row["pinned"] and len(cores) == row["np"]
        assert all(len(c) == sc["threads_per_worker"] for c in cores)
        assert len(set.union(*cores)) == sum(len(c) for c in cores)  # pairwise disjoint


def test_allreduce_sweep_runs_under_torchrun_without_the_benchmark_modules(stage):
    """train.launcher: torchrun (no horovodrun); the stage process never imported deepimage.bench."""
    sc, client, run_id = stage
    ar = sc["allreduce"]
    assert ar["np"] == 2 and ar["method"] == "butterfly" and ar["launcher"] == "torchrun"
    assert [p["bytes"] for p in ar["points"]] == sorted(p["bytes"] for p in ar["points"])
    assert len(ar["points"]) >= 4 and all(p["seconds"] > 0 for p in ar["points"])
    assert set(ar["median_s"]) == {"butterfly", "torch"}  # no Horovod under torchrun
    assert not any(m.startswith("deepimage.bench") for m in sc["stage_modules"])
    assert client.get_run(run_id).data.metrics["allreduce_ratio_vs_torch_0.5MiB"] > 0


def test_resolution_defaults_to_the_highest_of_resolutions(tmp_path):
    """scaling.resolution null: the stage shards and measures max(resolutions) only."""
    from deepimage.measure import scaling_resolution

    assert scaling_resolution(None, [16, 32]) == 32 and scaling_resolution(24, [16, 32]) == 24
    cfg = tiny_config(tmp_path)
    cfg["resolutions"] = [32]
    cfg["scaling"].pop("resolution")
    r = snakemake(tmp_path, "-n", "-p", "results/scaling/scaling.json", config=cfg)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "results/shards/32/train/manifest.json" in r.stdout and "results/shards/64" not in r.stdout
    assert "--train-shards results/shards/32/train" in r.stdout


def test_a_timing_worker_with_a_bad_config_stops_before_its_transport_naming_the_key(tmp_path):
    """deepimage.bench.timed_steps (what measure_step launches) checks its config first."""
    r = subprocess.run([sys.executable, "-m", "deepimage.bench.timed_steps", "--resolution", "16",
                        "--train-shards", str(tmp_path), "--out", str(tmp_path / "out.json"),
                        "--config-json", json.dumps({"scaling": {"steps": 0}})],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and r.stderr.startswith("timed_steps: invalid configuration")
    assert "scaling.steps: 0 is less than the minimum of 1" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "out.json").exists()
