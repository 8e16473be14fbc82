"""What a job reads back from shared folders and a shared tracking server, attacked: a checkpoint
whose random states are a pickle, pending MLflow records that name files outside the results
folder or that the server refuses, temporary files of killed checkpoint writers, and a
checkpoint naming someone else's MLflow run.

    .venv/bin/pytest -q tests/test_trust_replay.py
"""
from __future__ import annotations

import argparse
import json
import pickle
import random
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from deepimage import checkpoint, mlflow_client, tracking
from deepimage.config import Config
from deepimage.parallel.state import gather_training_state, restore_training_state
from deepimage.parallel.transport.local import LocalTransport


# ---------------------------------------------------------------------------------------------
# Random states in a checkpoint: plain tensors and numbers, never a pickle

class _Sync:
    """What gather / restore need of a GradientSync: one local rank, one optimizer."""

    def __init__(self, model: torch.nn.Module):
        self.transport = LocalTransport()
        self.opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)

    def optimizers(self):
        return [self.opt]

    def flush(self):
        pass


def _trained_linear() -> tuple[torch.nn.Module, _Sync]:
    model = torch.nn.Linear(3, 2)
    sync = _Sync(model)
    model(torch.randn(4, 3)).sum().backward()
    sync.opt.step()
    return model, sync


def _draws() -> tuple:
    return torch.rand(5).tolist(), np.random.rand(5).tolist(), [random.random() for _ in range(5)], \
        np.random.standard_normal(), random.gauss(0, 1)


def test_random_states_round_trip_through_a_checkpoint_file_as_plain_data(tmp_path):
    """Saved, written, loaded with weights_only and restored: the draws after restoring are the
    draws the saving process made next, for torch, numpy (its cached gaussian too) and random."""
    model, sync = _trained_linear()
    np.random.standard_normal()  # leaves a cached gaussian in numpy's state
    random.gauss(0, 1)           # and in Python's
    state = gather_training_state(model, sync)
    path = checkpoint.write(tmp_path, {**state, "config": {}}, 1, keep=1)
    expected = _draws()
    loaded = checkpoint.load(path)
    assert not any(isinstance(r, (bytes, bytearray)) for r in loaded["rng"])
    restore_training_state(model, sync, loaded, seed=0, global_step=1)
    assert _draws() == expected


class _Sentinel:
    """Unpickling it creates a file."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return open, (str(self.path), "w")


def test_a_checkpoint_whose_random_states_are_a_pickle_is_refused_and_runs_nothing(tmp_path):
    model, sync = _trained_linear()
    state = gather_training_state(model, sync)
    sentinel = tmp_path / "code-ran"
    state["rng"] = [pickle.dumps(_Sentinel(sentinel))]
    path = checkpoint.write(tmp_path / "ckpt", {**state, "config": {}}, 1, keep=1)
    loaded = checkpoint.load(path)  # weights_only: the bytes load as bytes
    with pytest.raises(ValueError, match="random states of rank 0"):
        restore_training_state(model, sync, loaded, seed=0, global_step=1)
    assert not sentinel.exists()


# ---------------------------------------------------------------------------------------------
# Pending MLflow records: only the workflow's own calls and files are replayed

def _store(tmp_path) -> tuple[str, object, str]:
    """A sqlite store and a run of a job in tmp_path/results (tagged as stage_run tags it)."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow_client.client(uri)
    job = str((tmp_path / "results" / "train" / "64").resolve())
    run_id = client.create_run(tracking.experiment_id(uri, "t"), tags={tracking.JOB_TAG: job}).info.run_id
    return uri, client, run_id


def _uploaded(client, run_id: str) -> list[str]:
    return sorted(a.path for a in client.list_artifacts(run_id))


def test_pending_records_naming_files_outside_the_results_folder_are_set_aside_unsent(tmp_path, capsys):
    """A pending file (as a co-user of the results folder could write it) naming /etc/passwd,
    a ../ escape, a symlink out of the folder, another tracking server, a model file and shard
    folder outside: each is moved to rejected/ with one line naming it and why; nothing of them
    is uploaded; the one artifact inside the results folder is."""
    uri, client, run_id = _store(tmp_path)
    results = tmp_path / "results"
    job = results / "train" / "64"
    job.mkdir(parents=True)
    (job / "metrics.json").write_text("{}")
    (tmp_path / "secret.txt").write_text("not for the server")
    (job / "link.txt").symlink_to(tmp_path / "secret.txt")
    pending = tracking.Pending(job / tracking.PENDING_NAME)
    base = {"tracking_uri": uri, "run_id": run_id}
    bad = [{**base, "kind": "artifact", "path": "/etc/passwd", "artifact_path": None},
           {**base, "kind": "artifact", "path": str(job / ".." / ".." / ".." / "secret.txt"), "artifact_path": None},
           {**base, "kind": "artifact", "path": str(job / "link.txt"), "artifact_path": None},
           {**base, "kind": "artifact", "path": str(job / "metrics.json"), "artifact_path": "../../escape"},
           {**base, "tracking_uri": "http://127.0.0.1:9", "kind": "tag", "key": "k", "value": "v"},
           {**base, "kind": "log_trained_model", "args": [str(tmp_path / "secret.txt"), str(job), None]},
           {**base, "kind": "dataset", "shard_dir": "/etc", "context": "training"},
           {**base, "kind": "tag", "key": ["not", "a", "string"], "value": "v"},
           {**base, "kind": "terminated", "status": "DELETED_BY_SOMEONE", "end_time": 1}]
    for rec in bad:
        pending.add(rec)
    pending.add({**base, "kind": "artifact", "path": str(job / "metrics.json"), "artifact_path": "out"})
    pending.add({**base, "kind": "tag", "key": "k", "value": "v"})
    assert tracking.send_pending(results, uri) == 2
    assert _uploaded(client, run_id) == ["out"]
    assert client.get_run(run_id).data.tags.get("k") == "v"
    assert not pending.path.exists()
    aside = [json.loads(line) for line in (job / "rejected" / "mlflow_pending.jsonl").read_text().splitlines()]
    assert [a["record"] for a in aside] == bad
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if "set aside" in line]
    assert len(lines) == len(bad), out
    assert "/etc/passwd" in lines[0] and "outside" in lines[0] and "secret.txt" in lines[2]
    assert "http://127.0.0.1:9" in lines[4]


def test_a_record_the_server_rejects_is_set_aside_and_later_records_and_runs_are_sent(tmp_path, capsys):
    """A tag on a run the store does not hold, and a param changed after it was logged: the store
    refuses both; each is set aside with one line and the records after it, and another job's
    pending file, are still sent. A record ending someone else's run (one this workflow did not
    make) is set aside too, the run left RUNNING."""
    uri, client, run_id = _store(tmp_path)
    client.log_param(run_id, "lr", "0.1")
    exp = tracking.experiment_id(uri, "t")
    theirs = client.create_run(exp, tags={tracking.JOB_TAG: str(tmp_path / "bob" / "results")}).info.run_id
    untagged = client.create_run(exp).info.run_id
    results = tmp_path / "results"
    first = tracking.Pending(results / "a" / tracking.PENDING_NAME)
    base = {"tracking_uri": uri, "run_id": run_id}
    others = [{**base, "run_id": r, "kind": "terminated", "status": "KILLED", "end_time": 5}
              for r in (theirs, untagged)]
    refused = [{**base, "run_id": "0" * 32, "kind": "tag", "key": "k", "value": "v"},
               {**base, "kind": "params", "params": [["lr", "99"]]}]
    for rec in others:
        first.add(rec)
    for rec in refused:
        first.add(rec)
    first.add({**base, "kind": "metrics", "metrics": [["loss", 0.5, 1000, 0]]})
    second = tracking.Pending(results / "b" / tracking.PENDING_NAME)
    second.add({**base, "kind": "terminated", "status": "FINISHED", "end_time": 3000})
    assert tracking.send_pending(results, uri) == 2
    assert [m.value for m in client.get_metric_history(run_id, "loss")] == [0.5]
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.params["lr"] == "0.1"
    assert [client.get_run(r).info.status for r in (theirs, untagged)] == ["RUNNING", "RUNNING"]
    aside = [json.loads(line)["record"] for line in
             (results / "a" / "rejected" / "mlflow_pending.jsonl").read_text().splitlines()]
    assert aside == others + refused
    assert not first.path.exists() and not second.path.exists()
    lines = [line for line in capsys.readouterr().out.splitlines() if "set aside" in line]
    assert sum("refused" in line for line in lines) == 2
    assert sum("is not this workflow's" in line for line in lines) == 2
    assert tracking.send_pending(results, uri) == 0  # the rejected folder is not replayed again


# ---------------------------------------------------------------------------------------------
# Temporary files of killed writers

def test_a_new_saver_sweeps_the_temporary_files_of_killed_writers_and_nothing_else(tmp_path):
    out = tmp_path / "results" / "train" / "64"
    folder = out / "checkpoints"
    folder.mkdir(parents=True)
    ours = [folder / ".ckpt-000000004.pt.tmp12345", folder / ".ckpt-000000008.pt.tmp7", out / ".model.pt.tmp"]
    theirs = [folder / "notes.txt", folder / ".ckpt-x.pt.tmp1", folder / "ckpt-000000008.pt",
              out / "model.pt", out / ".other.tmp", tmp_path / ".model.pt.tmp"]
    for p in ours + theirs:
        p.write_bytes(b"partial")
    cfg = Config.from_dict({})

    def saver(rank: int) -> checkpoint.Saver:
        return checkpoint.Saver(folder, cfg.train.checkpoint, checkpoint.run_config(cfg, 64), cfg.seed,
                                SimpleNamespace(rank=rank, size=2), ["a", "b"], 4, "", fresh=False)

    saver(1)
    assert all(p.exists() for p in ours)  # rank 0's to do
    saver(0)
    assert not any(p.exists() for p in ours)
    assert all(p.exists() for p in theirs)


# ---------------------------------------------------------------------------------------------
# Resuming an MLflow run: only this job's own

def _args(tmp_path, job: Path) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    tracking.add_args(p)
    return p.parse_args(["--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", "--experiment", "t",
                         "--parent-file", str(tmp_path / "parent.json"),
                         "--run-record", str(job / "mlflow_run.json")])


def test_a_planted_run_id_of_someone_elses_run_is_not_reopened(tmp_path, capsys):
    """A checkpoint naming another job's finished run: that run stays FINISHED, untouched, and
    this job logs to a new run, saying so; its own earlier run is reopened."""
    theirs, mine = tmp_path / "bob" / "results" / "train" / "64", tmp_path / "results" / "train" / "64"
    with tracking.stage_run(_args(tmp_path, theirs), "train", {"lr": 0.1}) as run:
        other = run.run_id
    with pytest.raises(RuntimeError):
        with tracking.stage_run(_args(tmp_path, mine), "train", {"lr": 0.1}) as run:
            own = run.run_id
            raise RuntimeError("killed")
    client = mlflow_client.client(f"sqlite:///{tmp_path / 'mlflow.db'}")
    before = client.get_run(other)
    with tracking.stage_run(_args(tmp_path, mine), "train", {"lr": 0.1}, run_id=other) as run:
        assert run.run_id != other
        assert client.get_run(other).info.status == "FINISHED"
        run.log_metrics({"loss": 1.0})
    after = client.get_run(other)
    assert (after.info.status, after.info.end_time, after.data.metrics) == \
        (before.info.status, before.info.end_time, before.data.metrics)
    assert f"MLflow run {other} is not this job's" in capsys.readouterr().out
    with tracking.stage_run(_args(tmp_path, mine), "train", {"lr": 0.1}, run_id=own) as run:
        assert run.run_id == own
        assert client.get_run(own).info.status == "RUNNING"
    assert client.get_run(own).info.status == "FINISHED"


def test_a_planted_parent_run_of_another_workflow_is_not_marked_killed(tmp_path, capsys):
    """results/mlflow/parent_run.json naming another workflow's running parent run: the next
    invocation leaves that run (and its running child) RUNNING; its own killed parent is marked
    KILLED as before."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    config = {"mlflow": {"tracking_uri": uri, "experiment": "t"}}
    bob, mine = tmp_path / "bob", tmp_path / "mine"
    other = tracking.start_workflow(config, str(bob / "results" / "mlflow" / "parent_run.json"),
                                    results=str(bob / "results"))
    client = mlflow_client.client(uri)
    child = client.create_run(tracking.experiment_id(uri, "t"), tags={"mlflow.parentRunId": other}).info.run_id
    parent_file = mine / "results" / "mlflow" / "parent_run.json"
    parent_file.parent.mkdir(parents=True)
    parent_file.write_text(json.dumps({"run_id": other, "experiment_id": "1", "tracking_uri": uri}))
    first = tracking.start_workflow(config, str(parent_file), results=str(mine / "results"))
    assert client.get_run(other).info.status == "RUNNING" and client.get_run(child).info.status == "RUNNING"
    out = capsys.readouterr().out
    assert f"parent run {other} named in {parent_file} is not this workflow's" in out, out
    tracking.start_workflow(config, str(parent_file), results=str(mine / "results"))  # first was killed
    assert client.get_run(first).info.status == "KILLED"
    assert client.get_run(other).info.status == "RUNNING"
