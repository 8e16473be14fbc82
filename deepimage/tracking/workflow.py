"""The workflow's parent run: opened by Snakemake's onstart, closed by onsuccess / onerror.

    python -m deepimage.tracking start --config-json results/config.json   # Snakefile onstart
    python -m deepimage.tracking end --status FINISHED                      # onsuccess / onerror

The parent's id is kept in a small JSON file (default results/mlflow/parent_run.json) that every
job reads when it starts (deepimage.tracking.runs.stage_run), so single-rule reruns and cluster
jobs attach to the invocation that started them. `start_workflow` stops the workflow within
seconds, naming the URI, when a tracking server does not answer; it also marks a parent run of
this workflow (its deepimage.job tag the results folder) that a killed Snakemake left RUNNING as
KILLED, and sends what earlier jobs kept in their pending files while the server was down.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from deepimage import lineage
from deepimage.io import write_json
from deepimage.mlflow_client import client, retry
from deepimage.redact import redact
from deepimage.tracking.pending import PENDING_NAME, REJECTED_NAME, Pending
from deepimage.tracking.runs import JOB_TAG, REPLAY, StageRun, not_workflow_run, read_parent
from deepimage.tracking.store import DEFAULT_PARENT_FILE, check_reachable, experiment_id


def send_pending(root: str | Path, tracking_uri: str) -> int:
    """Send every job's pending file under the results folder `root` to `tracking_uri` (onstart,
    after a job ended while its server was down); returns the records sent. Files a record names
    must lie inside `root`; records set aside (deepimage.tracking.pending) stay in rejected/."""
    sent = 0
    for path in sorted(Path(root).rglob(PENDING_NAME)) if Path(root).is_dir() else []:
        if path.parent.name == REJECTED_NAME.parent.name:
            continue
        n = Pending(path, root).send(REPLAY, tracking_uri, not_workflow_run)
        print(f"tracking: sent {n} MLflow record(s) that {path} kept while the server was down", flush=True)
        sent += n
    return sent


def start_workflow(config: dict, parent_file: str = DEFAULT_PARENT_FILE, results: str = "results") -> str:
    """Create the invocation's parent run, log the resolved config, record its id. First: stop
    (TrackingUnreachable, naming the URI) if the server does not answer; mark the previous
    invocation's parent KILLED if a killed Snakemake left it RUNNING; send what jobs kept in
    their pending files while the server was down."""
    uri, name = config["mlflow"]["tracking_uri"], config["mlflow"]["experiment"]
    config = {**config, "mlflow": {**config["mlflow"], "tracking_uri": redact(uri)}}  # as logged
    check_reachable(uri)
    mark_killed_parent(parent_file, uri, results)
    send_pending(results, uri)
    exp = experiment_id(uri, name)
    c = client(uri)
    tags = {"deepimage.stage": "workflow", JOB_TAG: str(Path(results).resolve()), **lineage.lineage_tags(config)}
    info = retry(lambda: c.create_run(exp, run_name=time.strftime("workflow-%Y%m%d-%H%M%S"), tags=tags))
    StageRun(uri, info.info.run_id).log_params(config)
    write_json(parent_file, {"run_id": info.info.run_id, "experiment_id": exp, "tracking_uri": redact(uri)})
    return info.info.run_id


def mark_killed_parent(parent_file: str | Path, tracking_uri: str, results: str | Path = "results") -> str | None:
    """The previous invocation's parent run, if still RUNNING (its Snakemake was killed before
    onsuccess / onerror), and its RUNNING children, marked KILLED; returns the parent's id. Only
    a parent of this workflow (its JOB_TAG the results folder `results`): another is left as it is."""
    run_id = read_parent(parent_file, tracking_uri)
    if run_id is None:
        return None
    c = client(tracking_uri)
    try:
        run = retry(lambda: c.get_run(run_id))
    except Exception as e:
        if "not found" in str(e).lower() or "does not exist" in str(e).lower():
            return None  # another store behind the same URI (a fresh database)
        raise
    if run.info.status != "RUNNING":
        return None
    if run.data.tags.get(JOB_TAG) != str(Path(results).resolve()):
        print(f"tracking: parent run {run_id} named in {parent_file} is not this workflow's (its {JOB_TAG} tag is "
              f"{run.data.tags.get(JOB_TAG)!r}, not {str(Path(results).resolve())!r}): left as it is", flush=True)
        return None
    children = retry(lambda: c.search_runs([run.info.experiment_id], max_results=1000,
                                            filter_string=f"tags.mlflow.parentRunId = '{run_id}' "
                                                          f"and attributes.status = 'RUNNING'"))
    for r in [*children, run]:
        retry(lambda r=r: c.set_terminated(r.info.run_id, "KILLED"))
    print(f"tracking: parent run {run_id} of an earlier invocation was still RUNNING (its snakemake "
          f"was killed): marked KILLED, with {len(children)} running child run(s)", flush=True)
    return run_id


def end_workflow(status: str, parent_file: str = DEFAULT_PARENT_FILE) -> None:
    """Mark the parent run FINISHED or FAILED."""
    path = Path(parent_file)
    if not path.is_file():
        return
    rec = json.loads(path.read_text())
    # A server down at the end: the status waits in results/mlflow/ for the next invocation.
    StageRun(rec["tracking_uri"], rec["run_id"], Pending(path.parent / PENDING_NAME)).terminate(status)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m deepimage.tracking",
                                description="MLflow's parent run of one snakemake invocation.")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("start")
    s.add_argument("--config-json", required=True)
    s.add_argument("--parent-file", default=DEFAULT_PARENT_FILE)
    e = sub.add_parser("end")
    e.add_argument("--status", choices=["FINISHED", "FAILED"], required=True)
    e.add_argument("--parent-file", default=DEFAULT_PARENT_FILE)
    a = p.parse_args(argv)
    if a.cmd == "start":
        print(start_workflow(json.loads(Path(a.config_json).read_text()), a.parent_file))
    else:
        end_workflow(a.status, a.parent_file)

