"""MLflow logging for every stage: one parent run per `snakemake` invocation, each job a child.

    python -m deepimage.tracking start --config-json results/config.json   # Snakefile onstart
    python -m deepimage.tracking end --status FINISHED                      # onsuccess / onerror

The parent's id is kept in a small JSON file (default results/mlflow/parent_run.json) that every
job reads when it starts, so single-rule reruns and cluster jobs attach to the invocation that
started them. Several jobs may log to one sqlite store at once: every write goes through
`_retry`, which backs off while SQLite reports the database locked, and metrics are sent in
batches so a job holds the write lock briefly and rarely.

Outages of a tracking server (http URIs): `start_workflow` stops the workflow within seconds,
naming the URI, when the server does not answer; it also marks a parent run that a killed
Snakemake left RUNNING as KILLED, and sends what earlier jobs could not (below). A job whose
server stops answering keeps training: its metrics, params, tags, artifacts and its final status
go, in order, to `mlflow_pending.jsonl` in its results folder (`Pending`), and are sent when the
server answers again, at the end of the job, or by the next invocation's onstart.
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

from deepimage import lineage
from deepimage.config import defaults as _defaults

# The MLflow client's own retries: by default 7 with exponential backoff and a 120 s timeout,
# minutes per call against a server that is down. Here a call gives up within seconds and the
# job keeps its metrics in its pending file instead (set these variables to override).
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")  # an int: waits 1, 2 s
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
# MLflow's telemetry thread, when it cannot reach its config URL (no network), removes an
# environment variable while a request of another thread reads os.environ: a KeyError fails the
# job's MLflow call (seen with four workflows on one server). Off unless set.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

# The schema's mlflow defaults (a stage run by hand, outside Snakemake, logs where a workflow would).
DEFAULT_URI = _defaults().mlflow.tracking_uri
DEFAULT_EXPERIMENT = _defaults().mlflow.experiment
DEFAULT_PARENT_FILE = "results/mlflow/parent_run.json"
PENDING_NAME = "mlflow_pending.jsonl"  # in a job's results folder, while its server is down
REACH_TIMEOUT_S = 10.0  # start_workflow's wait for a tracking server to answer
# What requests / urllib3 say, inside MlflowException, when no server answers.
_UNREACHABLE_MARKERS = ("max retries exceeded", "connection refused", "failed to establish",
                        "connectionerror", "read timed out", "connection aborted", "remotedisconnected")
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

    return _retry(lambda: MlflowClient(tracking_uri=tracking_uri))  # a SQLite store is opened (and may be locked)


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


def is_remote(tracking_uri: str) -> bool:
    return tracking_uri.startswith(("http://", "https://"))


def unreachable(error: BaseException) -> bool:
    """True when `error` says the tracking server did not answer (not a refused request)."""
    return any(m in str(error).lower() for m in _UNREACHABLE_MARKERS)


class TrackingUnreachable(RuntimeError):
    """The tracking server does not answer."""


def check_reachable(tracking_uri: str, timeout_s: float = REACH_TIMEOUT_S) -> None:
    """Raise TrackingUnreachable naming the URI unless its server answers within timeout_s
    (GET /health, MLflow server's liveness endpoint); nothing to check for a local store."""
    import urllib.error
    import urllib.request

    if not is_remote(tracking_uri):
        return
    deadline, error = time.monotonic() + timeout_s, None
    while True:
        try:
            with urllib.request.urlopen(tracking_uri.rstrip("/") + "/health", timeout=5):
                return
        except urllib.error.HTTPError:
            return  # it answered (an older server without /health, a proxy): reachable
        except (urllib.error.URLError, OSError) as e:
            error = getattr(e, "reason", e)
        if time.monotonic() + 2 > deadline:
            raise TrackingUnreachable(
                f"MLflow tracking server {tracking_uri} does not answer ({error}); start it, or "
                f"point mlflow.tracking_uri at a running one (e.g. sqlite:///mlflow.db)")
        time.sleep(2)


class Pending:
    """A job's MLflow writes that its server did not take, in order, one JSON object a line
    (`mlflow_pending.jsonl` in the job's results folder); `send` replays them. Metrics keep
    their timestamps, so a record sent twice (a replay cut short) stores nothing new."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def add(self, record: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def records(self) -> list[dict]:
        if not self.path.is_file():
            return []
        lines = self.path.read_text().splitlines()
        return [json.loads(line) for line in lines if line.strip()]

    def __len__(self) -> int:
        return len(self.records())

    def send(self) -> int:
        """Send every record in order; the ones not sent stay in the file (gone when all are).
        Returns how many were sent; raises the error that stopped it."""
        records = self.records()
        for i, rec in enumerate(records):
            try:
                _replay(rec)
            except Exception:
                write_lines(self.path, records[i:])
                raise
        self.path.unlink(missing_ok=True)
        return len(records)


def write_lines(path: Path, records: list[dict]) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
    os.replace(tmp, path)


def _replay(rec: dict) -> None:
    """One pending record to its run."""
    from mlflow.entities import Metric, Param

    c, run_id, kind = client(rec["tracking_uri"]), rec["run_id"], rec["kind"]
    if kind == "metrics":
        c.log_batch(run_id, metrics=[Metric(k, v, t, s) for k, v, t, s in rec["metrics"]])
    elif kind == "params":
        c.log_batch(run_id, params=[Param(k, v) for k, v in rec["params"]])
    elif kind == "tag":
        c.set_tag(run_id, rec["key"], rec["value"])
    elif kind == "artifact":
        if Path(rec["path"]).exists():
            c.log_artifact(run_id, rec["path"], rec["artifact_path"])
        else:
            print(f"tracking: artifact {rec['path']} of run {run_id} is gone; not sent", flush=True)
    elif kind == "call":  # e.g. deepimage.models:log_trained_model(run, checkpoint, shards)
        import importlib

        module, name = rec["target"].split(":")
        getattr(importlib.import_module(module), name)(StageRun(rec["tracking_uri"], run_id), *rec["args"])
    elif kind == "terminated":
        c.set_terminated(run_id, rec["status"], end_time=rec["end_time"])


def send_pending(root: str | Path = "results") -> int:
    """Send every job's pending file under `root` (onstart, after a job ended while its server
    was down); returns the records sent."""
    sent = 0
    for path in sorted(Path(root).rglob(PENDING_NAME)) if Path(root).is_dir() else []:
        n = Pending(path).send()
        print(f"tracking: sent {n} MLflow record(s) that {path} kept while the server was down", flush=True)
        sent += n
    return sent


class StageRun:
    """A live MLflow run: batched metrics, params and artifacts, every call retried. With a
    `pending` file, a write the server does not take goes there instead (see the module doc)."""

    RETRY_AFTER_S = 10.0  # while the server is down, how often a write tries it again

    def __init__(self, tracking_uri: str, run_id: str, pending: Pending | None = None):
        self.tracking_uri, self.run_id = tracking_uri, run_id
        self._client = client(tracking_uri)
        self.pending = pending if pending is not None and is_remote(tracking_uri) else None
        self._down_since: float | None = None  # monotonic time of the first failed write
        self._last_try = 0.0

    def _write(self, record: dict, send: Callable[[], Any]) -> None:
        """send() now, after what is pending; into the pending file while the server is down."""
        if self.pending is None:
            _retry(send)
            return
        record = {"tracking_uri": self.tracking_uri, "run_id": self.run_id, **record}
        if self._down_since is not None and time.monotonic() - self._last_try < self.RETRY_AFTER_S:
            self.pending.add(record)  # do not spend seconds on every write while it is down
            return
        try:
            self.flush()
            _retry(send)
        except Exception as e:
            if not unreachable(e):
                raise
            self.pending.add(record)
            self._mark_down(e)

    def _mark_down(self, error: BaseException) -> None:
        self._last_try = time.monotonic()
        if self._down_since is None:
            self._down_since = self._last_try
            print(f"tracking: MLflow server {self.tracking_uri} unreachable ({str(error)[:200]}); "
                  f"training goes on, its records are kept in {self.pending.path} and sent when "
                  f"the server answers again", flush=True)

    def flush(self) -> None:
        """Send what is pending (raises if the server still does not answer)."""
        if self.pending is None or not self.pending.path.is_file():
            return
        n = self.pending.send()
        if self._down_since is not None:
            print(f"tracking: MLflow server {self.tracking_uri} answers again after "
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

    def call(self, fn: Callable, *args) -> None:
        """fn(self, *args) (an importable function that logs to this run, e.g. a model upload);
        deferred like any write while the server is down. args must be JSON values."""
        if self.pending is None:
            fn(self, *args)  # no retry around it: a model upload is not idempotent
            return
        self._write({"kind": "call", "target": f"{fn.__module__}:{fn.__qualname__}", "args": list(args)},
                    lambda: fn(self, *args))

    def terminate(self, status: str) -> None:
        """Mark the run ended; if the server is still down, say so and leave the pending file
        (with this status last) for the next invocation."""
        end = int(time.time() * 1000)
        self._last_try = 0.0  # the end of the job: try once more whatever happened before
        self._write({"kind": "terminated", "status": status, "end_time": end},
                    lambda: self._client.set_terminated(self.run_id, status, end_time=end))
        if self.pending is not None and self.pending.path.is_file():
            print(f"tracking: MLflow server {self.tracking_uri} still unreachable at the end of the job: "
                  f"{len(self.pending)} record(s) of run {self.run_id} left in {self.pending.path}; "
                  f"the next snakemake invocation sends them", flush=True)


class NullRun(StageRun):
    """What non-zero ranks get: every call is a no-op (only rank 0 logs)."""

    def __init__(self):
        self.tracking_uri, self.run_id = "", ""

    def _noop(self, *a, **k):
        return None

    log_params = log_metrics = log_metric_series = log_artifact = set_tag = call = terminate = _noop


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


def pending_for(args: argparse.Namespace) -> Pending | None:
    """The job's pending file: beside its run record, in its results folder."""
    return Pending(Path(args.run_record).parent / PENDING_NAME) if getattr(args, "run_record", None) else None


def run_exists(tracking_uri: str, run_id: str) -> bool:
    """Whether the store at `tracking_uri` holds run `run_id` (a resumed job's checkpoint may
    name a run of another store, or one since deleted)."""
    try:
        client(tracking_uri).get_run(run_id)
        return True
    except Exception:  # MlflowException: RESOURCE_DOES_NOT_EXIST
        return False


@contextlib.contextmanager
def stage_run(args: argparse.Namespace, stage: str, params: dict, enabled: bool = True,
              tags: dict[str, str] | None = None, run_id: str | None = None) -> Iterator[StageRun]:
    """Open a child run of the workflow for one job; FAILED if the body raises. With `run_id`
    (a resumed job: the id its checkpoint holds) that run continues instead, RUNNING again,
    its params already logged."""
    if not enabled:
        yield NullRun()
        return
    uri = args.tracking_uri
    exp = experiment_id(uri, args.experiment)
    parent = read_parent(args.parent_file, uri)
    c = client(uri)
    if run_id is None:
        all_tags = {"deepimage.stage": stage, **lineage.lineage_tags(params), **(tags or {})}
        if parent:
            all_tags["mlflow.parentRunId"] = parent
        run_id = _retry(lambda: c.create_run(exp, run_name=args.run_name or stage, tags=all_tags)).info.run_id
        run = StageRun(uri, run_id, pending_for(args))
        run.log_params(params)
    else:
        _retry(lambda: c.update_run(run_id, status="RUNNING"))
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
                                         "experiment_id": exp, "tracking_uri": uri})


def write_json(path: str | Path, obj: Any) -> None:
    """Atomic JSON write: a reader never sees a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def start_workflow(config: dict, parent_file: str = DEFAULT_PARENT_FILE, results: str = "results") -> str:
    """Create the invocation's parent run, log the resolved config, record its id. First: stop
    (TrackingUnreachable, naming the URI) if the server does not answer; mark the previous
    invocation's parent KILLED if a killed Snakemake left it RUNNING; send what jobs kept in
    their pending files while the server was down."""
    uri, name = config["mlflow"]["tracking_uri"], config["mlflow"]["experiment"]
    check_reachable(uri)
    mark_killed_parent(parent_file, uri)
    send_pending(results)
    exp = experiment_id(uri, name)
    c = client(uri)
    info = _retry(lambda: c.create_run(exp, run_name=time.strftime("workflow-%Y%m%d-%H%M%S"),
                                       tags={"deepimage.stage": "workflow", **lineage.lineage_tags(config)}))
    StageRun(uri, info.info.run_id).log_params(config)
    write_json(parent_file, {"run_id": info.info.run_id, "experiment_id": exp, "tracking_uri": uri})
    return info.info.run_id


def mark_killed_parent(parent_file: str | Path, tracking_uri: str) -> str | None:
    """The previous invocation's parent run, if still RUNNING (its Snakemake was killed before
    onsuccess / onerror), and its RUNNING children, marked KILLED; returns the parent's id."""
    run_id = read_parent(parent_file, tracking_uri)
    if run_id is None:
        return None
    c = client(tracking_uri)
    try:
        run = _retry(lambda: c.get_run(run_id))
    except Exception as e:
        if "not found" in str(e).lower() or "does not exist" in str(e).lower():
            return None  # another store behind the same URI (a fresh database)
        raise
    if run.info.status != "RUNNING":
        return None
    children = _retry(lambda: c.search_runs([run.info.experiment_id], max_results=1000,
                                            filter_string=f"tags.mlflow.parentRunId = '{run_id}' "
                                                          f"and attributes.status = 'RUNNING'"))
    for r in [*children, run]:
        _retry(lambda r=r: c.set_terminated(r.info.run_id, "KILLED"))
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
