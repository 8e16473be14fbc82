"""MLflow logging: parent/child runs, failure status, and concurrent jobs on one sqlite store."""
import argparse
import json
import multiprocessing as mp

import pytest

from deepimage import tracking


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
    client = tracking.client(f"sqlite:///{tmp_path / 'mlflow.db'}")
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
    client = tracking.client(args.tracking_uri)
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
    client = tracking.client(args.tracking_uri)
    child = client.get_run(rec["run_id"])
    assert child.data.tags["mlflow.parentRunId"] == parent
    assert child.data.metrics == {"top1_error": 0.25}
    assert client.get_run(parent).data.params["train.np"] == "2"
    exp = tracking.experiment_id(args.tracking_uri, "t")
    assert len(client.search_runs([exp])) == 2  # parent + one child, none from the disabled rank
