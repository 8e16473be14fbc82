"""Whether a workflow's MLflow store suits where its jobs run.

    check_tracking_store(config)   # raises StoreError before any job

MLflow's SQLite store is one file that every job opens and locks. Jobs on several nodes reach it
over a shared file system, whose locks SQLite cannot rely on (MLflow's documentation warns
against it): writes block for minutes or the database is corrupted. Such a workflow logs to a
tracking server instead (envs/tracking_server.sh: MLflow on PostgreSQL).
"""
from __future__ import annotations

from deepimage.config import ConfigError
from deepimage.redact import redact


class StoreError(ConfigError):
    """The tracking store cannot serve this workflow's layout."""


def check_tracking_store(config: dict) -> None:
    """Raise StoreError, in one line naming the keys and the fix, when mlflow.tracking_uri is a
    SQLite file and training spans more than one node (train.nodes > 1)."""
    uri = str(config["mlflow"]["tracking_uri"])
    nodes = int(config["train"].get("nodes", 1))
    if uri.startswith("sqlite:") and nodes > 1:
        raise StoreError(
            f"mlflow.tracking_uri {redact(uri)} is a SQLite file, but train.nodes is {nodes}: jobs on several nodes "
            f"writing one SQLite file over a shared file system lock it for minutes or corrupt it; start a "
            f"tracking server (make tracking-server) and set mlflow.tracking_uri to its http:// URI")
