"""The tracking store as the workflow uses it: where it is by default, the experiment every run
goes to, whether a tracking server answers, and params flattened for MLflow."""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

from deepimage.config import defaults as _defaults
from deepimage.mlflow_client import client, retry
from deepimage.redact import redact, reveal, without_userinfo

# The schema's mlflow defaults (a stage run by hand, outside Snakemake, logs where a workflow would).
DEFAULT_URI = _defaults().mlflow.tracking_uri
DEFAULT_EXPERIMENT = _defaults().mlflow.experiment
DEFAULT_PARENT_FILE = "results/mlflow/parent_run.json"
REACH_TIMEOUT_S = 10.0  # start_workflow's wait for a tracking server to answer
# What requests / urllib3 say, inside MlflowException, when no server answers.
_UNREACHABLE_MARKERS = ("max retries exceeded", "connection refused", "failed to establish",
                        "connectionerror", "read timed out", "connection aborted", "remotedisconnected")


def artifact_root(tracking_uri: str) -> str | None:
    """For a sqlite store, artifacts live in `mlartifacts/` beside the database file."""
    if tracking_uri.startswith("sqlite:///"):
        db = Path(tracking_uri.removeprefix("sqlite:///")).resolve()
        return (db.parent / "mlartifacts").as_uri()
    return None


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

    return retry(get_or_create)


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
            with urllib.request.urlopen(without_userinfo(reveal(tracking_uri)).rstrip("/") + "/health", timeout=5):
                return
        except urllib.error.HTTPError:
            return  # it answered (an older server without /health, a proxy): reachable
        except (urllib.error.URLError, OSError) as e:
            error = getattr(e, "reason", e)
        if time.monotonic() + 2 > deadline:
            raise TrackingUnreachable(
                f"MLflow tracking server {redact(tracking_uri)} does not answer ({redact(error)}); start it, or "
                f"point mlflow.tracking_uri at a running one (e.g. sqlite:///mlflow.db)")
        time.sleep(2)

