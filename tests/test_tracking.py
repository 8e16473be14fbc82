"""MLflow logging: parent/child runs, failure status, and concurrent jobs on one sqlite store."""
import argparse
import json
import multiprocessing as mp

import pytest

from deepimage import mlflow_client, tracking


def _args(tmp_path, **kw):
    p = argparse.ArgumentParser()
    tracking.add_args(p)
    a = p.parse_args(["--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", "--experiment", "t",
                      "--parent-file", str(tmp_path / "parent.json")])
    for k, v in kw.items():
        setattr(a, k, v)
    return a


def _job(tmp_path, i, steps):
    """One concurrent 'job': its own child run, many small writes."""
    with tracking.stage_run(_args(tmp_path, run_name=f"job{i}"), "stress", {"i": i}) as run:
        for s in range(steps):
            run.log_metrics({"value": float(i * 1000 + s), "other": 1.0}, step=s)
        run.log_metric_series("series", [float(x) for x in range(steps)])


def _config(tmp_path):
    return {"mlflow": {"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "experiment": "t"}}


def test_concurrent_jobs_neither_fail_nor_lose_metrics(tmp_path):
    parent = tracking.start_workflow(_config(tmp_path), str(tmp_path / "parent.json"))
    jobs, steps = 6, 40
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_job, args=(tmp_path, i, steps)) for i in range(jobs)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
    assert [p.exitcode for p in procs] == [0] * jobs
    client = mlflow_client.client(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([tracking.experiment_id(client.tracking_uri, "t")],
                              filter_string=f"tags.mlflow.parentRunId = '{parent}'")
    assert sorted(r.info.run_name for r in runs) == sorted(f"job{i}" for i in range(jobs))
    for r in runs:
        i = int(r.data.params["i"])
        history = client.get_metric_history(r.info.run_id, "value")
        assert sorted(m.value for m in history) == [float(i * 1000 + s) for s in range(steps)]
        assert len(client.get_metric_history(r.info.run_id, "series")) == steps
        assert r.info.status == "FINISHED"


def test_failed_job_is_marked_failed_and_writes_no_record(tmp_path):
    args = _args(tmp_path, run_record=str(tmp_path / "rec.json"))
    with pytest.raises(RuntimeError):
        with tracking.stage_run(args, "train", {"lr": 0.1}):
            raise RuntimeError("boom")
    client = mlflow_client.client(args.tracking_uri)
    (run,) = client.search_runs([tracking.experiment_id(args.tracking_uri, "t")])
    assert run.info.status == "FAILED"
    assert run.data.params["lr"] == "0.1"
    assert not (tmp_path / "rec.json").exists()


def test_child_run_records_its_parent_and_only_rank0_logs(tmp_path):
    parent = tracking.start_workflow({**_config(tmp_path), "train": {"np": 2}}, str(tmp_path / "parent.json"))
    args = _args(tmp_path, run_record=str(tmp_path / "rec.json"))
    with tracking.stage_run(args, "evaluate", {}, enabled=False) as run:
        run.log_metrics({"ignored": 1.0})  # a non-zero rank: no run at all
    with tracking.stage_run(args, "evaluate", {}) as run:
        run.log_metrics({"top1_error": 0.25})
    rec = json.loads((tmp_path / "rec.json").read_text())
    assert rec["parent_run_id"] == parent and rec["stage"] == "evaluate"
    client = mlflow_client.client(args.tracking_uri)
    child = client.get_run(rec["run_id"])
    assert child.data.tags["mlflow.parentRunId"] == parent
    assert child.data.metrics == {"top1_error": 0.25}
    assert client.get_run(parent).data.params["train.np"] == "2"
    exp = tracking.experiment_id(args.tracking_uri, "t")
    assert len(client.search_runs([exp])) == 2  # parent + one child, none from the disabled rank


def test_pending_records_replay_through_the_table_and_an_unknown_kind_is_set_aside(tmp_path, capsys):
    """The onstart replay sends each record through tracking.REPLAY by its kind; a record of a
    kind the table lacks (here one naming a function to call) is not executed: it is set aside in
    rejected/ with one line naming it, and the records after it are sent."""
    args = _args(tmp_path)
    uri = args.tracking_uri
    client = mlflow_client.client(uri)
    job = tmp_path / "results" / "train" / "64"
    tags = {tracking.JOB_TAG: str(job.resolve())}
    run_id = client.create_run(tracking.experiment_id(uri, "t"), tags=tags).info.run_id
    marker = tmp_path / "executed"
    pending = tracking.Pending(job / tracking.PENDING_NAME)
    base = {"tracking_uri": uri, "run_id": run_id}
    pending.add({**base, "kind": "metrics", "metrics": [["loss", 0.5, 1000, 0], ["loss", 0.25, 2000, 1]]})
    pending.add({**base, "kind": "call", "target": "os:system", "args": [f"touch {marker}"]})
    pending.add({**base, "kind": "tag", "key": "k", "value": "v"})
    pending.add({**base, "kind": "terminated", "status": "FINISHED", "end_time": 3000})
    assert tracking.send_pending(tmp_path / "results", uri) == 3
    assert not marker.exists()
    assert not pending.path.exists()
    aside = [json.loads(line) for line in (job / "rejected" / tracking.PENDING_NAME).read_text().splitlines()]
    assert [r["record"]["kind"] for r in aside] == ["call"]
    assert "unknown kind 'call'" in capsys.readouterr().out
    run = client.get_run(run_id)
    assert sorted(m.value for m in client.get_metric_history(run_id, "loss")) == [0.25, 0.5]
    assert run.data.tags["k"] == "v" and run.info.status == "FINISHED"


def test_importing_tracking_leaves_the_environment_alone_and_a_client_bounds_http():
    """No import-time side effects: the MLflow HTTP bounds are set where a client is made."""
    import subprocess
    import sys

    code = ("import os; before = dict(os.environ); import deepimage.tracking; "
            "assert dict(os.environ) == before, set(os.environ) ^ set(before); "
            "from deepimage import mlflow_client; mlflow_client.client('http://127.0.0.1:9'); "
            "print(os.environ['MLFLOW_HTTP_REQUEST_MAX_RETRIES'], os.environ['MLFLOW_HTTP_REQUEST_TIMEOUT'], "
            "os.environ['MLFLOW_DISABLE_TELEMETRY'])")
    env = {k: v for k, v in __import__("os").environ.items()
           if not k.startswith("MLFLOW_HTTP_REQUEST") and k != "MLFLOW_DISABLE_TELEMETRY"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["2", "10", "true"]
