"""A job's MLflow run: a child of the workflow's parent run, its writes batched and retried, and
kept in the job's pending file while a tracking server does not answer.

    with tracking.stage_run(args, "evaluate", params) as run:   # FINISHED, or FAILED if it raises
        run.log_metrics({"top1_error": 0.3})

REPLAY holds the writes a pending record may stand for, by kind: a check of the record's fields
(types, and files inside the results folder; deepimage.tracking.pending), and the record's
fields in, the same MLflow call out (Pending.send, deepimage.tracking.workflow.send_pending).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import time
from pathlib import Path
from typing import Any, Callable, Iterator

from deepimage import lineage
from deepimage.io import write_json
from deepimage.mlflow_client import client, retry
from deepimage.redact import redact, reveal
from deepimage.tracking.pending import (
    Pending,
    Replay,
    check_artifact,
    check_dataset,
    check_metrics,
    check_params,
    check_tag,
    check_terminated,
    check_trained_model,
    pending_for,
)
from deepimage.tracking.store import (
    DEFAULT_EXPERIMENT,
    DEFAULT_PARENT_FILE,
    DEFAULT_URI,
    experiment_id,
    flatten,
    is_remote,
    unreachable,
)


class StageRun:
    """A live MLflow run: batched metrics, params and artifacts, every call retried. With a
    `pending` file, a write the server does not take goes there instead (see the module doc)."""

    RETRY_AFTER_S = 10.0  # while the server is down, how often a write tries it again

    def __init__(self, tracking_uri: str, run_id: str, pending: Pending | None = None):
        self.tracking_uri, self.run_id = reveal(tracking_uri), run_id
        self._client = client(tracking_uri)
        self.pending = pending if pending is not None and is_remote(tracking_uri) else None
        self._down_since: float | None = None  # monotonic time of the first failed write
        self._last_try = 0.0

    def _write(self, record: dict, send: Callable[[], Any]) -> None:
        """send() now, after what is pending; into the pending file while the server is down."""
        if self.pending is None:
            retry(send)
            return
        record = {"tracking_uri": redact(self.tracking_uri), "run_id": self.run_id, **record}
        if self._down_since is not None and time.monotonic() - self._last_try < self.RETRY_AFTER_S:
            self.pending.add(record)  # do not spend seconds on every write while it is down
            return
        try:
            self.flush()
            retry(send)
        except Exception as e:
            if not unreachable(e):
                raise
            self.pending.add(record)
            self._mark_down(e)

    def _mark_down(self, error: BaseException) -> None:
        self._last_try = time.monotonic()
        if self._down_since is None:
            self._down_since = self._last_try
            print(f"tracking: MLflow server {redact(self.tracking_uri)} unreachable ({redact(error)[:200]}); "
                  f"training goes on, its records are kept in {self.pending.path} and sent when "
                  f"the server answers again", flush=True)

    def flush(self) -> None:
        """Send what is pending (raises if the server still does not answer)."""
        if self.pending is None or not self.pending.path.is_file():
            return
        n = self.pending.send(REPLAY, self.tracking_uri, not_workflow_run)
        if self._down_since is not None:
            print(f"tracking: MLflow server {redact(self.tracking_uri)} answers again after "
                  f"{time.monotonic() - self._down_since:.0f} s; sent the {n} record(s) kept meanwhile",
                  flush=True)
        self._down_since = None

    def log_params(self, params: dict) -> None:
        from mlflow.entities import Param

        items = [Param(k, v[:6000]) for k, v in flatten(params).items()]
        for i in range(0, len(items), 100):  # MLflow's batch limit is 100 params
            chunk = items[i:i + 100]
            self._write({"kind": "params", "params": [[p.key, p.value] for p in chunk]},
                        lambda chunk=chunk: self._client.log_batch(self.run_id, params=chunk))

    def _log_metric_items(self, items: list) -> None:
        for i in range(0, len(items), 1000):
            chunk = items[i:i + 1000]
            self._write({"kind": "metrics", "metrics": [[m.key, m.value, m.timestamp, m.step] for m in chunk]},
                        lambda chunk=chunk: self._client.log_batch(self.run_id, metrics=chunk))

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._log_metric_items([Metric(k, float(v), now, step or 0) for k, v in metrics.items()])

    def log_metric_series(self, key: str, values: list[float]) -> None:
        """One metric over steps 0..n-1 (e.g. loss per epoch) in one write."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._log_metric_items([Metric(key, float(v), now, i) for i, v in enumerate(values)])

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self._write({"kind": "artifact", "path": str(Path(path).resolve()), "artifact_path": artifact_path},
                    lambda: self._client.log_artifact(self.run_id, str(path), artifact_path))

    def set_tag(self, key: str, value: str) -> None:
        self._write({"kind": "tag", "key": key, "value": value},
                    lambda: self._client.set_tag(self.run_id, key, value))

    def log_trained_model(self, checkpoint: str, shard_dir: str, name: str | None = None) -> None:
        """Log and register a trained model (deepimage.registry.log_trained_model); deferred like
        any write while the server is down."""
        # Imported here: the registry loads torch and mlflow.pyfunc, which most stages never need.
        from deepimage import registry

        if self.pending is None:
            registry.log_trained_model(self, checkpoint, shard_dir, name)  # no retry: not idempotent
            return
        self._write({"kind": "log_trained_model", "args": [checkpoint, shard_dir, name]},
                    lambda: registry.log_trained_model(self, checkpoint, shard_dir, name))

    def log_dataset(self, shard_dir: str, context: str) -> None:
        """Record a split of shards as this run's dataset input (deepimage.lineage.log_dataset);
        deferred like any write while the server is down."""
        self._write({"kind": "dataset", "shard_dir": str(Path(shard_dir).resolve()), "context": context},
                    lambda: lineage.log_dataset(self, shard_dir, context))

    def metric_steps(self, key: str) -> set[int]:
        """The steps at which this run holds metric `key` (e.g. the epochs a resumed job logged)."""
        return {m.step for m in self._client.get_metric_history(self.run_id, key)}

    def terminate(self, status: str) -> None:
        """Mark the run ended; if the server is still down, say so and leave the pending file
        (with this status last) for the next invocation."""
        end = int(time.time() * 1000)
        self._last_try = 0.0  # the end of the job: try once more whatever happened before
        self._write({"kind": "terminated", "status": status, "end_time": end},
                    lambda: self._client.set_terminated(self.run_id, status, end_time=end))
        if self.pending is not None and self.pending.path.is_file():
            print(f"tracking: MLflow server {redact(self.tracking_uri)} still unreachable at the end of the job: "
                  f"{len(self.pending)} record(s) of run {self.run_id} left in {self.pending.path}; "
                  f"the next snakemake invocation sends them", flush=True)


class NullRun(StageRun):
    """What non-zero ranks get: every call is a no-op (only rank 0 logs)."""

    def __init__(self):
        self.tracking_uri, self.run_id = "", ""

    def _noop(self, *a, **k):
        return None

    log_params = log_metrics = log_metric_series = log_artifact = set_tag = log_trained_model = _noop
    log_dataset = terminate = _noop

    def metric_steps(self, key: str) -> set[int]:
        return set()



def _send_metrics(rec: dict) -> None:
    from mlflow.entities import Metric

    client(rec["tracking_uri"]).log_batch(rec["run_id"], metrics=[Metric(k, v, t, s) for k, v, t, s in rec["metrics"]])


def _send_params(rec: dict) -> None:
    from mlflow.entities import Param

    client(rec["tracking_uri"]).log_batch(rec["run_id"], params=[Param(k, v) for k, v in rec["params"]])


def _send_tag(rec: dict) -> None:
    client(rec["tracking_uri"]).set_tag(rec["run_id"], rec["key"], rec["value"])


def _send_artifact(rec: dict) -> None:
    path = Path(rec["path"]).resolve()
    if path.exists():
        client(rec["tracking_uri"]).log_artifact(rec["run_id"], str(path), rec["artifact_path"])
    else:
        print(f"tracking: artifact {rec['path']} of run {rec['run_id']} is gone; not sent", flush=True)


def _send_trained_model(rec: dict) -> None:
    checkpoint, shard_dir, name = rec["args"]
    StageRun(rec["tracking_uri"], rec["run_id"]).log_trained_model(
        str(Path(checkpoint).resolve()), str(Path(shard_dir).resolve()), name)


def _send_dataset(rec: dict) -> None:
    lineage.log_dataset(StageRun(rec["tracking_uri"], rec["run_id"]), str(Path(rec["shard_dir"]).resolve()),
                        rec["context"])


def _send_terminated(rec: dict) -> None:
    client(rec["tracking_uri"]).set_terminated(rec["run_id"], rec["status"], end_time=rec["end_time"])


# Every kind of record StageRun keeps while its server is down -> its check and the write that
# sends it.
REPLAY: dict[str, Replay] = {
    "metrics": Replay(check_metrics, _send_metrics), "params": Replay(check_params, _send_params),
    "tag": Replay(check_tag, _send_tag), "artifact": Replay(check_artifact, _send_artifact),
    "log_trained_model": Replay(check_trained_model, _send_trained_model),
    "dataset": Replay(check_dataset, _send_dataset), "terminated": Replay(check_terminated, _send_terminated)}


def add_args(p: argparse.ArgumentParser) -> None:
    """The tracking options every stage CLI takes."""
    g = p.add_argument_group("MLflow")
    g.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI", DEFAULT_URI))
    g.add_argument("--experiment", default=DEFAULT_EXPERIMENT)
    g.add_argument("--parent-file", default=DEFAULT_PARENT_FILE,
                   help="JSON naming the workflow's parent run (written at snakemake start)")
    g.add_argument("--run-name", default=None, help="default: the stage name")
    g.add_argument("--run-record", default=None,
                   help="write {stage, run_id, ...} here when the run ends (a rule output)")


def read_parent(parent_file: str | Path, tracking_uri: str) -> str | None:
    """The workflow's parent run id, if this job was started by a tracked invocation."""
    path = Path(parent_file)
    if not path.is_file():
        return None
    rec = json.loads(path.read_text())
    return rec["run_id"] if redact(rec.get("tracking_uri", "")) == redact(tracking_uri) else None


# Stages whose runs carry MLflow's system metrics (system/cpu_utilization_percentage,
# system/system_memory_usage_megabytes, system/gpu_* when nvidia-ml-py sees a GPU).
SYSTEM_METRICS_STAGES = {"train"}


def start_system_metrics(run: StageRun):
    """MLflow's SystemMetricsMonitor on this run (sampling every 5 s unless
    MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL says otherwise)."""
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    monitor = SystemMetricsMonitor(run.run_id, sampling_interval=5, tracking_uri=run.tracking_uri)
    monitor.start()
    return monitor


def stop_system_metrics(monitor) -> None:
    """Stop sampling and log one last sample, so a job shorter than the interval has one too."""
    monitor.finish()
    try:
        monitor.collect_metrics()
        monitor.publish_metrics(monitor.aggregate_metrics())
        retry(monitor.mlflow_logger.flush)
    except Exception as e:  # never fail a finished job over a monitoring sample
        print(f"system metrics: last sample not logged ({e})", flush=True)


def run_exists(tracking_uri: str, run_id: str) -> bool:
    """Whether the store at `tracking_uri` holds run `run_id` (a resumed job's checkpoint may
    name a run of another store, or one since deleted)."""
    try:
        client(tracking_uri).get_run(run_id)
        return True
    except Exception:  # MlflowException: RESOURCE_DOES_NOT_EXIST
        return False


# A run's results folder, resolved: a job's folder (a resumed run must carry its own), or the
# workflow's results folder for its parent run; pending records are replayed only to such runs.
JOB_TAG = "deepimage.job"


def job_folder(args: argparse.Namespace) -> str | None:
    """The job's results folder, resolved (its run record's folder), or None without one."""
    return str(Path(args.run_record).resolve().parent) if getattr(args, "run_record", None) else None


def not_own_run(tracking_uri: str, run_id: str, experiment: str, stage: str, job: str | None) -> str | None:
    """None if run `run_id` is this job's (its experiment, stage and JOB_TAG), else why not."""
    if job is None:
        return "this job has no --run-record to recognise its runs by"
    try:
        run = retry(lambda: client(tracking_uri).get_run(run_id))
    except Exception as e:  # MlflowException: RESOURCE_DOES_NOT_EXIST
        return f"the store does not give it ({str(e).strip()[:120]})"
    tags = run.data.tags
    if tags.get(JOB_TAG) != job:
        return f"its {JOB_TAG} tag is {tags.get(JOB_TAG)!r}, not {job!r}"
    if tags.get("deepimage.stage") != stage or run.info.experiment_id != experiment:
        return f"it is a {tags.get('deepimage.stage')!r} run of experiment {run.info.experiment_id}"
    return None


def not_workflow_run(tracking_uri: str, run_id: str, root: Path) -> str | None:
    """None if run `run_id` is one the workflow whose results folder is `root` (resolved) made:
    its JOB_TAG inside `root` (a job's folder, or `root` itself for the parent run); else why not.
    Raises what the store raises (a run it does not hold, a server that does not answer)."""
    tag = retry(lambda: client(tracking_uri).get_run(run_id)).data.tags.get(JOB_TAG)
    if tag is None or not Path(tag).is_relative_to(root):
        return f"run {run_id} is not this workflow's (its {JOB_TAG} tag is {tag!r}, not inside {root})"
    return None


@contextlib.contextmanager
def stage_run(args: argparse.Namespace, stage: str, params: dict, enabled: bool = True,
              tags: dict[str, str] | None = None, run_id: str | None = None) -> Iterator[StageRun]:
    """Open a child run of the workflow for one job; FAILED if the body raises. With `run_id`
    (a resumed job: the id its checkpoint holds) that run continues instead, RUNNING again,
    its params already logged, if it is this job's (its JOB_TAG the job's results folder);
    another's is left as it is and a new run opened, with one line saying so."""
    if not enabled:
        yield NullRun()
        return
    uri = args.tracking_uri
    exp = experiment_id(uri, args.experiment)
    parent = read_parent(args.parent_file, uri)
    c = client(uri)
    job = job_folder(args)
    why = not_own_run(uri, run_id, exp, stage, job) if run_id is not None else None
    if why:
        print(f"tracking: MLflow run {run_id} is not this job's ({why}): left as it is, logging to a "
              f"new run", flush=True)
        run_id = None
    if run_id is None:
        all_tags = {"deepimage.stage": stage, **lineage.lineage_tags(params), **(tags or {})}
        if parent:
            all_tags["mlflow.parentRunId"] = parent
        if job:
            all_tags[JOB_TAG] = job
        run_id = retry(lambda: c.create_run(exp, run_name=args.run_name or stage, tags=all_tags)).info.run_id
        run = StageRun(uri, run_id, pending_for(args))
        run.log_params(params)
    else:
        retry(lambda: c.update_run(run_id, status="RUNNING"))
        run = StageRun(uri, run_id, pending_for(args))
    monitor = start_system_metrics(run) if stage in SYSTEM_METRICS_STAGES else None
    status = "FAILED"
    try:
        yield run
        status = "FINISHED"
    finally:
        if monitor is not None:
            stop_system_metrics(monitor)
        run.terminate(status)
        if args.run_record and status == "FINISHED":
            write_json(args.run_record, {"stage": stage, "run_id": run.run_id, "run_name":
                                         args.run_name or stage, "parent_run_id": parent,
                                         "experiment_id": exp, "tracking_uri": redact(uri)})

