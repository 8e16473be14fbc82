"""Logging and registering models: each resolution's network and the ensemble, both as MLflow
"models from code" pyfuncs whose artifacts are data (model.pt weights, a JSON description) and
whose code is this package, shipped with the model.

    log_trained_model(run, "results/train/64/model.pt", "results/shards/64/train")  # train, rank 0
    log_ensemble(run, checkpoints, shard_dirs, top1_error)                         # ensemble job
"""
from __future__ import annotations

import io
import json
import shutil
import tempfile
from importlib.metadata import version
from pathlib import Path

import numpy as np
import pandas as pd

import deepimage
from deepimage import mlflow_client
from deepimage.data.manifest import load_manifest
from deepimage.modelfile import load_checkpoint
from deepimage.registry import champion, names
from deepimage.registry.classifier import Ensemble, member_crop
from deepimage.registry.pyfunc import SPEC_ARTIFACT

FORMAT = "deepimage-classifier/1"   # metadata["deepimage"] of every model logged here
SERVED = Path(__file__).with_name("served.py")
# What the logged models need at load time; listed so MLflow does not infer them by loading
# the model in a subprocess (slow, once per job).
_REQUIREMENTS = ("torch", "numpy", "pillow", "pandas", "pyarrow", "pyyaml", "mlflow")


def pip_requirements() -> list[str]:
    return [f"{p}=={version(p)}" for p in _REQUIREMENTS]


def mlflow_on(tracking_uri: str):
    """mlflow with its tracking and registry URIs on tracking_uri, bounded HTTP retries, no progress bars."""
    import os

    import mlflow

    mlflow_client.bound_http_retries()
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # no tqdm in job logs
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)
    return mlflow


def _mlflow_for(run):
    """(mlflow pointed at run's store and experiment, the experiment): MLflow 3 files a logged
    model under the active experiment (else 'Default', whose artifacts land in ./mlruns), and
    runs:/<id>/<name> finds it only in the run's own experiment."""
    mlflow = mlflow_on(run.tracking_uri)
    client = mlflow_client.client(run.tracking_uri)
    exp_id = mlflow_client.retry(lambda: client.get_run(run.run_id)).info.experiment_id
    mlflow.set_experiment(experiment_id=exp_id)
    return mlflow, mlflow_client.retry(lambda: client.get_experiment(exp_id))


def _stored_image(shard_dir: str | Path) -> np.ndarray:
    """The first stored image of a split, uint8 (S, S, 3): a real input example."""
    from deepimage.data.loader import ArrowLoader

    loader = ArrowLoader(shard_dir, batch_size=1, train=False, verify=False)
    return loader.store.images(np.array([0]))[0]


def _example(shard_dir: str | Path) -> pd.DataFrame:
    """_stored_image PNG-encoded, as a request: what a client sends."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(_stored_image(shard_dir)).save(buf, format="PNG")
    return pd.DataFrame({"image": [buf.getvalue()]})


def _log(mlflow, run, name: str, spec: dict, weights: dict[str, str], example: pd.DataFrame, metadata: dict):
    """Log spec + weights as a models-from-code pyfunc under `name` in run; its ModelInfo."""
    from mlflow.models import Model, infer_signature

    answer = Ensemble.from_files(spec, weights).answer(example)
    with tempfile.TemporaryDirectory() as tmp:
        spec_file = Path(tmp) / "classifier.json"
        spec_file.write_text(json.dumps(spec, indent=2))
        # each member's weights under its own file name (every model file is called model.pt)
        weights = {name: shutil.copyfile(path, Path(tmp) / f"{name}.pt") for name, path in weights.items()}
        # the package without byte code: what the model runs wherever it is loaded
        code = shutil.copytree(Path(deepimage.__file__).parent, Path(tmp) / "code" / "deepimage",
                               ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        return Model.log(artifact_path=None, name=name, flavor=mlflow.pyfunc, run_id=run.run_id,
                         python_model=str(SERVED),
                         artifacts={SPEC_ARTIFACT: str(spec_file), **{k: str(v) for k, v in weights.items()}},
                         code_paths=[str(code)], signature=infer_signature(example, answer),
                         input_example=example, pip_requirements=pip_requirements(),
                         metadata={"deepimage": FORMAT, **metadata})


def _register(mlflow, model_uri: str, name: str, run_id: str):
    """A new version of `name` (retried while SQLite is locked by another job)."""
    return mlflow_client.retry(lambda: mlflow.register_model(model_uri, name, tags={"run_id": run_id}))


def log_trained_model(run, checkpoint: str | Path, shard_dir: str | Path, name: str | None = None) -> str:
    """Log one resolution's checkpoint (an ensemble of one member) and register it as `name`
    (default <experiment>-<res>px); the version."""
    mlflow, experiment = _mlflow_for(run)
    _, ckpt = load_checkpoint(checkpoint)
    res, classes = int(ckpt["resolution"]), list(ckpt["classes"])
    stored = load_manifest(shard_dir).stored_size
    artifact = f"model_{res}px"
    spec = {"classes": classes, "members": [{"artifact": artifact, "resolution": res, "stored_size": stored,
                                              "crop": res}]}
    info = _log(mlflow, run, "model", spec, {artifact: str(checkpoint)}, _example(shard_dir),
                {"classes": classes, "resolution": res, "stored_size": stored,
                 "preprocess": "decode_square(stored_size) -> centre crop(resolution) -> ImageNet normalize"})
    name = name or names.registered_name(names.check_prefix(experiment.name, "mlflow.experiment"), res)
    mv = _register(mlflow, info.model_uri, name, run.run_id)
    run.set_tag("deepimage.registered_model", f"{mv.name}/{mv.version}")
    return mv.version


def ensemble_spec(checkpoints: list[str], shard_dirs: list[str], crops: list[int | None] | None = None) -> dict:
    """{classes, members: [{artifact, checkpoint, resolution, stored_size, crop}]} with the checks
    that keep it sane; crops: the side each model was evaluated on (None: its resolution)."""
    crops = crops or [None] * len(checkpoints)
    if not len(checkpoints) == len(shard_dirs) == len(crops):
        raise ValueError(f"{len(checkpoints)} checkpoints but {len(shard_dirs)} shard folders and {len(crops)} "
                         "test crops: give one shard folder per model, in the same order")
    members, classes = [], None
    for path, shards, crop in zip(checkpoints, shard_dirs, crops):
        _, ckpt = load_checkpoint(path)
        manifest = load_manifest(shards)
        if manifest.resolution != ckpt["resolution"]:
            raise ValueError(f"{shards} holds {manifest.resolution} px images but {path} is a "
                             f"{ckpt['resolution']} px model: pass the shards of that resolution")
        if classes is not None and list(ckpt["classes"]) != classes:
            raise ValueError(f"{path}: class names differ from {checkpoints[0]}'s")
        classes = list(ckpt["classes"])
        try:
            crop = member_crop(int(ckpt["resolution"]), manifest.stored_size, crop)
        except ValueError as e:
            raise ValueError(f"{path} ({shards}): evaluated on {crop} px crops, but {e}") from None
        members.append({"artifact": f"model_{ckpt['resolution']}px", "checkpoint": str(path),
                        "resolution": int(ckpt["resolution"]), "stored_size": manifest.stored_size,
                        "crop": crop})
    return {"classes": classes, "members": members}


def log_ensemble(run, checkpoints: list[str], shard_dirs: list[str], top1_error: float,
                 crops: list[int | None] | None = None, name: str | None = None) -> dict:
    """Log the ensemble (each member seeing `crops`, as evaluated), register it as `name` (default
    <experiment>-ensemble) tagged with its error and val_digest, and move `champion` to it
    when it is better (champion.promote_if_better). The run must have logged `top1_error`."""
    mlflow, experiment = _mlflow_for(run)
    spec = ensemble_spec(checkpoints, shard_dirs, crops)
    weights = {m["artifact"]: m["checkpoint"] for m in spec["members"]}
    info = _log(mlflow, run, "ensemble", spec, weights, _example(shard_dirs[-1]),
                {"classes": spec["classes"], champion.ERROR_TAG: top1_error,
                 "resolutions": [m["resolution"] for m in spec["members"]],
                 "test_crops": [m["crop"] for m in spec["members"]]})
    name = name or names.ensemble_name(names.check_prefix(experiment.name, "mlflow.experiment"))
    digest = champion.val_digest(shard_dirs)
    mv = _register(mlflow, info.model_uri, name, run.run_id)
    client = mlflow_client.client(run.tracking_uri)
    for key, value in ((champion.ERROR_TAG, repr(float(top1_error))), (champion.DIGEST_TAG, digest)):
        mlflow_client.retry(lambda key=key, value=value: client.set_model_version_tag(name, mv.version, key, value))
    promoted = champion.promote_if_better(client, name, mv.version, float(top1_error), digest,
                                          experiment.experiment_id)
    if promoted["previous_champion_ignored"]:
        print(f"registry: {name} champion {promoted['previous_champion_ignored']}; not compared", flush=True)
    run.set_tag("deepimage.registered_model", f"{name}/{mv.version}")
    return {"name": name, "version": mv.version, "model_uri": info.model_uri, **promoted}
