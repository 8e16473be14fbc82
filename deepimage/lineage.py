"""What produced a run: the code's commit, the config's digest and the data's manifest.

    tags = lineage_tags(params)                 # on every run when it is created
    run.log_dataset("results/shards/64/train", "training")   # a stage that reads shards (StageRun)

Tags: `mlflow.source.git.commit` (MLflow's own; the run page shows it beside `mlflow.source.name`,
the checkout), `deepimage.git.dirty` ("true" when tracked files differ from that commit),
`deepimage.config_digest` (sha256 of the config the run was given, canonical JSON: equal digests,
equal inputs). A split of shards is the run's dataset input (the run page's Datasets): its name,
the manifest's sha256 as digest, the folder as source, and a profile with the image and class
counts.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import subprocess
from pathlib import Path
from typing import Any

from deepimage.mlflow_client import retry
from deepimage.redact import redact, reveal

CODE_DIR = Path(__file__).resolve().parents[1]  # the checkout whose commit a run records
COMMIT_TAG = "mlflow.source.git.commit"
# MLflow's run page shows the commit beside the run's source, and no source without a name.
SOURCE_TAGS = {"mlflow.source.name": str(CODE_DIR), "mlflow.source.type": "LOCAL"}
DIRTY_TAG = "deepimage.git.dirty"
CONFIG_DIGEST_TAG = "deepimage.config_digest"
MANIFEST_TAG = "deepimage.dataset.{context}.manifest_sha256"
DIGEST_CHARS = 32  # MLflow stores a dataset digest in 36 characters at most


def _plain(obj: Any) -> Any:
    """JSON for what json.dumps cannot write: config sections (dataclasses), paths, sets."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    return str(obj)


def config_digest(config: Any) -> str:
    """sha256 of the config as canonical JSON (sorted keys, no spaces)."""
    text = json.dumps(config, sort_keys=True, separators=(",", ":"), default=_plain)
    return hashlib.sha256(text.encode()).hexdigest()


@functools.lru_cache(maxsize=4)
def git_state(repo_dir: str | Path = CODE_DIR) -> tuple[str, bool] | None:
    """(commit, dirty) of the checkout at repo_dir; None outside a git checkout or without git.
    Dirty: a tracked file differs from the commit (untracked files do not count)."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(repo_dir), *args], capture_output=True, text=True,
                              check=True, timeout=30).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return None
    return commit, dirty


def lineage_tags(config: Any, repo_dir: str | Path = CODE_DIR) -> dict[str, str]:
    """The tags that name a run's code and config (no commit tags outside a git checkout)."""
    tags = {CONFIG_DIGEST_TAG: config_digest(config)}
    state = git_state(str(repo_dir))
    if state is not None:
        tags.update(SOURCE_TAGS)
        tags[COMMIT_TAG], tags[DIRTY_TAG] = state[0], str(state[1]).lower()
    return tags


def manifest_sha256(shard_dir: str | Path) -> str:
    """sha256 of <shard_dir>/manifest.json (which holds every shard's own sha256)."""
    from deepimage.data.manifest import MANIFEST

    return hashlib.sha256((Path(shard_dir) / MANIFEST).read_bytes()).hexdigest()


def shard_dataset(shard_dir: str | Path):
    """The split's MLflow dataset entity: name <source>-<res>px-<split>, the manifest's digest, the
    folder as a local source, and its counts as the profile."""
    from mlflow.entities import Dataset

    from deepimage.data.manifest import load_manifest

    m = load_manifest(shard_dir)
    folder = Path(shard_dir).resolve()
    sha = manifest_sha256(folder)
    source = Path(m.params.get("root", folder)).name
    profile = {"split": m.split, "images": m.num_samples, "classes": len(m.classes),
               "resolution": m.resolution, "stored_size": m.stored_size, "skipped": m.num_skipped,
               "manifest_sha256": sha, "source_root": str(m.params.get("root", ""))}
    return Dataset(name=f"{source}-{m.resolution}px-{m.split}", digest=sha[:DIGEST_CHARS], source_type="local",
                   source=json.dumps({"uri": folder.as_uri()}), profile=json.dumps(profile))


def log_dataset(run, shard_dir: str, context: str) -> None:
    """Record <shard_dir>'s split as an input of `run` (a StageRun), in `context` (training,
    validation, evaluation), and its manifest's sha256 as a tag; logging it again is harmless."""
    from mlflow import MlflowClient
    from mlflow.entities import DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    dataset = shard_dataset(shard_dir)
    client = MlflowClient(tracking_uri=run.tracking_uri, registry_uri=run.tracking_uri)
    inputs = [DatasetInput(dataset, [InputTag(MLFLOW_DATASET_CONTEXT, context)])]
    retry(lambda: client.log_inputs(run.run_id, datasets=inputs))  # SQLite may be locked
    sha = json.loads(dataset.profile)["manifest_sha256"]
    retry(lambda: client.set_tag(run.run_id, MANIFEST_TAG.format(context=context), sha))


def _images(dataset) -> str:
    return str(json.loads(dataset.profile or "{}").get("images", "?"))


def report_lines(records: list[dict]) -> list[str]:
    """Markdown: each run's commit, config digest and datasets as its store holds them (records:
    the jobs' mlflow_run.json); one line saying so when the store cannot be read."""
    from mlflow import MlflowClient

    rows = ["| run name | commit | config sha256 | datasets (manifest sha256, images) |", "| --- | --- | --- | --- |"]
    for rec in records:
        try:
            uri = reveal(rec["tracking_uri"])
            run = MlflowClient(tracking_uri=uri, registry_uri=uri).get_run(rec["run_id"])
        except Exception as e:  # a server that is down: the report is still written
            return [f"Lineage: the runs of {redact(rec['tracking_uri'])} could not be read ({redact(e)[:120]})."]
        tags = run.data.tags
        commit = tags.get(COMMIT_TAG, "")[:10] + (" (dirty)" if tags.get(DIRTY_TAG) == "true" else "")
        data = ", ".join(f"{d.dataset.name} ({d.dataset.digest[:12]}, {_images(d.dataset)})"
                         for d in run.inputs.dataset_inputs)
        rows.append(f"| {rec['run_name']} | `{commit}` | `{tags.get(CONFIG_DIGEST_TAG, '')[:12]}` | {data} |")
    return rows
