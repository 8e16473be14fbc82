"""The MLflow client every module uses, and the retry every call to it goes through.

    c = mlflow_client.client("sqlite:///mlflow.db")
    run = mlflow_client.retry(lambda: c.get_run(run_id))

Several jobs may write to one SQLite store at once: `retry` backs off while SQLite reports the
database locked. Against a tracking server (http URIs) a call gives up within seconds (the
HTTP bounds `client` sets), so a job keeps what the server did not take (deepimage.tracking).
"""
from __future__ import annotations

import os
import random
import time
from typing import Any, Callable

from deepimage.redact import reveal

_LOCK_MARKERS = ("database is locked", "database table is locked", "unable to open database")
# The MLflow client's own retries: by default 7 with exponential backoff and a 120 s timeout,
# minutes per call against a server that is down. Here a call gives up within seconds and the
# job keeps its metrics in its pending file instead (set these variables to override).
HTTP_BOUNDS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
               "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",  # an int: waits 1, 2 s
               "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
               # MLflow's telemetry thread, when it cannot reach its config URL (no network),
               # removes an environment variable while a request of another thread reads
               # os.environ: a KeyError fails that MLflow call. Off unless set.
               "MLFLOW_DISABLE_TELEMETRY": "true"}


def bound_http_retries() -> None:
    """HTTP_BOUNDS (and telemetry off) for this process's MLflow calls and the jobs it starts,
    unless set."""
    for key, value in HTTP_BOUNDS.items():
        os.environ.setdefault(key, value)


def client(tracking_uri: str):
    """An MlflowClient of `tracking_uri` (as shown or full: redact.reveal), whose model registry
    is the same store (never one that MLFLOW_REGISTRY_URI or an earlier mlflow.set_registry_uri
    in the process names), its HTTP calls bounded (bound_http_retries)."""
    from mlflow import MlflowClient

    bound_http_retries()
    tracking_uri = reveal(tracking_uri)
    # opening a SQLite store may meet a lock
    return retry(lambda: MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri))


def retry(fn: Callable[[], Any], attempts: int = 30) -> Any:
    """Call fn, backing off (with jitter, up to ~2 min in all) while SQLite is locked."""
    for i in range(attempts):
        try:
            return fn()
        except Exception as e:  # MlflowException wraps sqlalchemy's OperationalError
            if i == attempts - 1 or not any(m in str(e).lower() for m in _LOCK_MARKERS):
                raise
            time.sleep(min(8.0, 0.05 * 2 ** i) * (0.5 + random.random()))
