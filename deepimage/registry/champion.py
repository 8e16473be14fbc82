"""The champion alias: it moves only on an error the version's own run backs, measured on the
same validation set.

    promote_if_better(client, name, version, 0.21, val_digest(shard_dirs), experiment_id)

The registry is shared: anyone who can write the store can register a version and tag it. So a
champion's error is not read from its version tag alone: the run that registered it must be in
the same experiment, have logged the same top-1 error, and the version must carry the digest of
the same validation shards. A champion that fails any of these does not hold the alias back.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from deepimage import mlflow_client
from deepimage.data.manifest import load_manifest
from deepimage.registry.names import CHAMPION

ERROR_TAG = "val_top1_error"       # version tag: the validation top-1 error
DIGEST_TAG = "val_digest"          # version tag: val_digest() of the shards it was measured on
ERROR_METRIC = "top1_error"        # the ensemble run's metric the tag must equal


def val_digest(shard_dirs: list[str | Path]) -> str:
    """sha256 of the validation shards' manifests (each lists its shards' sha256), in order."""
    manifests = [load_manifest(d).to_dict() for d in shard_dirs]
    return hashlib.sha256(json.dumps(manifests, sort_keys=True).encode()).hexdigest()


def believed_error(client, mv, digest: str, experiment_id: str) -> tuple[float | None, str]:
    """(the error a version's own run backs, "") or (None, why it is not believed)."""
    from mlflow.exceptions import MlflowException

    if mv.tags.get(DIGEST_TAG) != digest:
        return None, "measured on other validation shards (val_digest differs)"
    try:
        run = mlflow_client.retry(lambda: client.get_run(mv.run_id)) if mv.run_id else None
    except MlflowException:
        run = None
    if run is None:
        return None, f"its run {mv.run_id or '(none)'} is not in this store"
    if run.info.experiment_id != experiment_id:
        return None, f"its run {mv.run_id} is in another experiment"
    logged = run.data.metrics.get(ERROR_METRIC)
    try:
        tagged = float(mv.tags[ERROR_TAG])
    except (KeyError, ValueError):
        return None, f"its {ERROR_TAG} tag is missing or not a number"
    if logged is None or logged != tagged:
        return None, f"its {ERROR_TAG} tag {tagged} is not what its run logged ({logged})"
    return logged, ""


def current_champion(client, name: str):
    """The version holding the alias, or None."""
    from mlflow.exceptions import MlflowException

    try:
        return mlflow_client.retry(lambda: client.get_model_version_by_alias(name, CHAMPION))
    except MlflowException as e:
        if "RESOURCE_DOES_NOT_EXIST" in str(e.error_code) or "not found" in str(e).lower():
            return None
        raise


def promote_if_better(client, name: str, version: str, top1_error: float, digest: str,
                      experiment_id: str) -> dict:
    """Alias `champion` -> version when its error is strictly below the champion's, or the
    champion's error is not believed (believed_error). {champion, previous_champion_error,
    previous_champion_ignored: why, or ""}."""
    held = current_champion(client, name)
    previous, why = (None, "") if held is None else believed_error(client, held, digest, experiment_id)
    if held is not None and previous is not None and not top1_error < previous:
        return {"champion": False, "previous_champion_error": previous, "previous_champion_ignored": ""}
    mlflow_client.retry(lambda: client.set_registered_model_alias(name, CHAMPION, version))
    if why:
        why = f"version {held.version}: {why}"
    return {"champion": True, "previous_champion_error": previous, "previous_champion_ignored": why}
