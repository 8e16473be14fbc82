"""MLflow logging for every stage: one parent run per `snakemake` invocation, each job a child.

    python -m deepimage.tracking start --config-json results/config.json   # Snakefile onstart
    python -m deepimage.tracking end --status FINISHED                      # onsuccess / onerror

The parent's id is kept in a small JSON file (default results/mlflow/parent_run.json) that every
job reads when it starts, so single-rule reruns and cluster jobs attach to the invocation that
started them. Several jobs may log to one sqlite store at once: every write goes through
`_retry`, which backs off while SQLite reports the database locked, and metrics are sent in
batches so a job holds the write lock briefly and rarely.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import random
import time
from pathlib import Path
from typing import Any, Callable, Iterator

from deepimage.config import defaults as _defaults

# The schema's mlflow defaults (a stage run by hand, outside Snakemake, logs where a workflow would).
DEFAULT_URI = _defaults().mlflow.tracking_uri
DEFAULT_EXPERIMENT = _defaults().mlflow.experiment
DEFAULT_PARENT_FILE = "results/mlflow/parent_run.json"
_LOCK_MARKERS = ("database is locked", "database table is locked", "unable to open database")


def _retry(fn: Callable[[], Any], attempts: int = 30) -> Any:
    """Call fn, backing off (with jitter, up to ~2 min in all) while SQLite is locked."""
    for i in range(attempts):
        try:
            return fn()
        except Exception as e:  # MlflowException wraps sqlalchemy's OperationalError
            if i == attempts - 1 or not any(m in str(e).lower() for m in _LOCK_MARKERS):
                raise
            time.sleep(min(8.0, 0.05 * 2 ** i) * (0.5 + random.random()))


def artifact_root(tracking_uri: str) -> str | None:
    """For a sqlite store, artifacts live in `mlartifacts/` beside the database file."""
    if tracking_uri.startswith("sqlite:///"):
        db = Path(tracking_uri.removeprefix("sqlite:///")).resolve()
        return (db.parent / "mlartifacts").as_uri()
    return None


def client(tracking_uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri)


# MLflow 3 reads an experiment's kind from this tag: model training, not GenAI (traces, judges,
# prompts). The 3.17 UI also opens on its GenAI pages unless its "Model training" switch (kept by
# the browser) or the URL (?workflowType=machine_learning, as deepimage.report prints it) says so.
EXPERIMENT_TAGS = {"mlflow.experimentKind": "custom_model_development"}


def experiment_id(tracking_uri: str, name: str) -> str:
    """Id of experiment `name`, created (race-safe) if missing, tagged as model training."""
    c = client(tracking_uri)

    def get_or_create():
        exp = c.get_experiment_by_name(name)
        if exp is not None:
            for k, v in EXPERIMENT_TAGS.items():  # experiments made before the tag (a kind the
                if k not in exp.tags:               # user picked in the UI is kept)
                    c.set_experiment_tag(exp.experiment_id, k, v)
            return exp.experiment_id
        try:
            return c.create_experiment(name, artifact_location=artifact_root(tracking_uri),
                                       tags=EXPERIMENT_TAGS)
        except Exception as e:
            if "already exists" in str(e).lower() or "unique constraint" in str(e).lower():
                return c.get_experiment_by_name(name).experiment_id
            raise

    return _retry(get_or_create)


def flatten(d: dict, prefix: str = "") -> dict[str, str]:
    """{"train": {"lr": 0.1}} -> {"train.lr": "0.1"} (MLflow params are flat strings); a config
    section (deepimage.config) flattens like the dict it was built from."""
    out: dict[str, str] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if dataclasses.is_dataclass(v) and not isinstance(v, type):
            v = dataclasses.asdict(v)
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = json.dumps(v) if isinstance(v, (list, tuple)) else str(v)
    return out


class StageRun:
    """A live MLflow run: batched metrics, params and artifacts, every call retried."""

    def __init__(self, tracking_uri: str, run_id: str):
        self.tracking_uri, self.run_id = tracking_uri, run_id
        self._client = client(tracking_uri)

    def log_params(self, params: dict) -> None:
        from mlflow.entities import Param

        items = [Param(k, v[:6000]) for k, v in flatten(params).items()]
        for i in range(0, len(items), 100):  # MLflow's batch limit is 100 params
            _retry(lambda chunk=items[i:i + 100]: self._client.log_batch(self.run_id, params=chunk))

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step or 0) for k, v in metrics.items()]
        for i in range(0, len(items), 1000):
            _retry(lambda chunk=items[i:i + 1000]: self._client.log_batch(self.run_id, metrics=chunk))

    def log_metric_series(self, key: str, values: list[float]) -> None:
        """One metric over steps 0..n-1 (e.g. loss per epoch) in one write."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(key, float(v), now, i) for i, v in enumerate(values)]
        _retry(lambda: self._client.log_batch(self.run_id, metrics=items))

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        _retry(lambda: self._client.log_artifact(self.run_id, str(path), artifact_path))

    def set_tag(self, key: str, value: str) -> None:
        _retry(lambda: self._client.set_tag(self.run_id, key, value))


class NullRun(StageRun):
    """What non-zero ranks get: every call is a no-op (only rank 0 logs)."""

    def __init__(self):
        self.tracking_uri, self.run_id = "", ""

    def _noop(self, *a, **k):
        return None

    log_params = log_metrics = log_metric_series = log_artifact = set_tag = _noop


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
    return rec["run_id"] if rec.get("tracking_uri") == tracking_uri else None


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
        _retry(monitor.mlflow_logger.flush)
    except Exception as e:  # never fail a finished job over a monitoring sample
        print(f"system metrics: last sample not logged ({e})", flush=True)


@contextlib.contextmanager
def stage_run(args: argparse.Namespace, stage: str, params: dict,
              enabled: bool = True, tags: dict[str, str] | None = None) -> Iterator[StageRun]:
    """Open a child run of the workflow for one job; FAILED if the body raises."""
    if not enabled:
        yield NullRun()
        return
    uri = args.tracking_uri
    exp = experiment_id(uri, args.experiment)
    parent = read_parent(args.parent_file, uri)
    all_tags = {"deepimage.stage": stage, **(tags or {})}
    if parent:
        all_tags["mlflow.parentRunId"] = parent
    c = client(uri)
    run_info = _retry(lambda: c.create_run(exp, run_name=args.run_name or stage, tags=all_tags))
    run = StageRun(uri, run_info.info.run_id)
    run.log_params(params)
    monitor = start_system_metrics(run) if stage in SYSTEM_METRICS_STAGES else None
    status = "FAILED"
    try:
        yield run
        status = "FINISHED"
    finally:
        if monitor is not None:
            stop_system_metrics(monitor)
        _retry(lambda: c.set_terminated(run.run_id, status))
        if args.run_record and status == "FINISHED":
            write_json(args.run_record, {"stage": stage, "run_id": run.run_id, "run_name":
                                         args.run_name or stage, "parent_run_id": parent,
                                         "experiment_id": exp, "tracking_uri": uri})


def write_json(path: str | Path, obj: Any) -> None:
    """Atomic JSON write: a reader never sees a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def start_workflow(config: dict, parent_file: str = DEFAULT_PARENT_FILE) -> str:
    """Create the invocation's parent run, log the resolved config, record its id."""
    uri, name = config["mlflow"]["tracking_uri"], config["mlflow"]["experiment"]
    exp = experiment_id(uri, name)
    c = client(uri)
    info = _retry(lambda: c.create_run(exp, run_name=time.strftime("workflow-%Y%m%d-%H%M%S"),
                                       tags={"deepimage.stage": "workflow"}))
    StageRun(uri, info.info.run_id).log_params(config)
    write_json(parent_file, {"run_id": info.info.run_id, "experiment_id": exp, "tracking_uri": uri})
    return info.info.run_id


def end_workflow(status: str, parent_file: str = DEFAULT_PARENT_FILE) -> None:
    """Mark the parent run FINISHED or FAILED."""
    path = Path(parent_file)
    if not path.is_file():
        return
    rec = json.loads(path.read_text())
    _retry(lambda: client(rec["tracking_uri"]).set_terminated(rec["run_id"], status))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
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


if __name__ == "__main__":
    main()
