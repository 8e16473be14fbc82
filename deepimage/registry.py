"""Models in MLflow: each resolution's network (PyTorch flavour) and the ensemble (pyfunc).

    log_trained_model(run, "results/train/64/model.pt", "results/shards/64/train")  # train, rank 0
    log_ensemble(run, checkpoints, shard_dirs, top1_error)                         # ensemble job
    classifier = load_classifier("models:/deepimage-ensemble@champion")            # predict, serve

A resolution's model is registered as `deepimage-<res>px`; the ensemble as `deepimage-ensemble`,
whose new version takes the alias `champion` only when its validation top-1 error is below the
current champion's. Input preprocessing is the evaluation path's: decode_square to the stored
size of the shards the model was trained on, centre crop to what evaluation fed the model (its
resolution, or the whole stored image under evaluate.view: whole), ImageNet normalize.
"""
from __future__ import annotations

import io
import json
import re
import tempfile
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from mlflow.pyfunc import PythonModel

from deepimage import mlflow_client
from deepimage.data.augment import center_crop, normalize
from deepimage.data.decode import BadImage, decode_square
from deepimage.data.manifest import load_manifest
from deepimage.modelfile import load_checkpoint

ENSEMBLE_NAME = "deepimage-ensemble"
CHAMPION = "champion"
ERROR_TAG = "val_top1_error"
TOPK = 5
_IN_MEMORY = re.compile(r" <_io\.BytesIO object at 0x[0-9a-fA-F]+>")  # in PIL's error messages
# What the logged models need at load time; listed so MLflow does not infer them by loading
# the model in a subprocess (slow, once per job).
_REQUIREMENTS = ("torch", "numpy", "pillow", "pandas", "mlflow")


def registered_name(resolution: int) -> str:
    return f"deepimage-{resolution}px"


def pip_requirements() -> list[str]:
    return [f"{p}=={version(p)}" for p in _REQUIREMENTS]


def member_crop(resolution: int, stored_size: int, crop: int | None = None) -> int:
    """The side a member centre-crops its stored image to (None: its resolution); ValueError
    when it is not between the two."""
    crop = int(crop or resolution)
    if not resolution <= crop <= stored_size:
        raise ValueError(f"a {resolution} px model stored at {stored_size} px sees {resolution}..{stored_size} px, "
                         f"not {crop} px")
    return crop


@dataclass
class Member:
    """One resolution's network and its test-time preprocessing: decoded at stored_size (as its
    shards were), centre-cropped to `crop` (None: the resolution it was trained at)."""

    model: torch.nn.Module
    resolution: int
    stored_size: int
    crop: int | None = None

    def __post_init__(self):
        self.crop = member_crop(self.resolution, self.stored_size, self.crop)
        # Channels-last weights and inputs: on CPU, NCHW max-pooling alone took half of a batch's
        # forward (6-16x slower than channels-last); posteriors stay within 1.1e-6 of evaluation's.
        self.model = self.model.to(memory_format=torch.channels_last)

    @torch.inference_mode()
    def posteriors(self, pixels: np.ndarray) -> torch.Tensor:
        """uint8 (N, S, S, 3) decoded at stored_size -> softmax (N, K)."""
        x = torch.from_numpy(pixels).permute(0, 3, 1, 2)           # (N, 3, S, S), channels-last strides
        x = normalize(center_crop(x, self.crop))                   # (N, 3, crop, crop) float, same strides
        return torch.softmax(self.model(x.contiguous(memory_format=torch.channels_last)), dim=1)


class Ensemble:
    """Members averaged as the paper does: mean of the softmax posteriors of every resolution."""

    def __init__(self, members: list[Member], classes: list[str], checkpoints: list[str] | None = None):
        self.members, self.classes = members, list(classes)
        self.checkpoints = checkpoints or []  # the model.pt files the members were loaded from

    @property
    def stored_sizes(self) -> list[int]:
        return [m.stored_size for m in self.members]

    def decode(self, source: str | bytes) -> list[np.ndarray]:
        """One image (path or encoded bytes) -> its (S_m, S_m, 3) view per member; BadImage."""
        return decode_views(source, self.stored_sizes)

    def posteriors(self, views: list[np.ndarray]) -> np.ndarray:
        """views[m]: uint8 (N, S_m, S_m, 3) -> averaged posteriors (N, K), one forward per member."""
        probs = [m.posteriors(v) for m, v in zip(self.members, views)]   # M x (N, K)
        return torch.stack(probs).mean(dim=0).numpy()                     # (M, N, K) -> (N, K)

    def top(self, probs: np.ndarray, k: int = TOPK) -> list[list[tuple[str, float]]]:
        """Per row, the k best (class name, probability), best first."""
        order = np.argsort(-probs, axis=1)[:, :min(k, probs.shape[1])]   # (N, k)
        return [[(self.classes[j], float(p[j])) for j in row] for p, row in zip(probs, order)]

    def frame(self, probs: np.ndarray):
        """The pyfunc answer: one row per image (top-1, top-5 names and probabilities, posteriors)."""
        tops = self.top(probs)
        return pd.DataFrame({"top1_class": [t[0][0] for t in tops],
                             "top1_prob": [t[0][1] for t in tops],
                             "top5_classes": [[c for c, _ in t] for t in tops],
                             "top5_probs": [[p for _, p in t] for t in tops],
                             "posteriors": [row.astype(float).tolist() for row in probs]})


def decode_views(source: str | bytes, stored_sizes: list[int]) -> list[np.ndarray]:
    """The image decoded once per distinct stored size, exactly as the shard stage did (each
    size has its own JPEG draft scale, so one decode cannot serve two sizes exactly). A file is
    read once; OSError when it cannot be read, BadImage when it does not decode."""
    data = source if isinstance(source, bytes) else Path(source).read_bytes()
    try:
        cache = {s: decode_square(data, s) for s in sorted(set(stored_sizes))}
    except BadImage as e:  # the reason a path would give: without the in-memory file's address
        raise BadImage(_IN_MEMORY.sub("", str(e))) from None
    return [cache[s] for s in stored_sizes]


def stack_views(decoded: list[list[np.ndarray]], members: int) -> list[np.ndarray]:
    """Per-image lists of member views -> per-member batches (N, S_m, S_m, 3)."""
    return [np.stack([d[m] for d in decoded]) for m in range(members)]


# ---------------------------------------------------------------- the pyfunc served by MLflow
class EnsemblePyfunc(PythonModel):
    """Input: a DataFrame with an `image` column of encoded image bytes (base64 in JSON requests).
    Output: Ensemble.frame, one row per image."""

    def load_context(self, context) -> None:
        spec = json.loads(Path(context.artifacts["ensemble"]).read_text())
        members, paths = [], [context.artifacts[m["artifact"]] for m in spec["members"]]
        for m, path in zip(spec["members"], paths):
            model, _ = load_checkpoint(path)
            members.append(Member(model, int(m["resolution"]), int(m["stored_size"]), m.get("crop")))
        self.ensemble = Ensemble(members, spec["classes"], paths)

    # DataFrame hints: MLflow 3 stops asking for type hints, and since it infers no schema from
    # them the signature logged with the model (a column of image bytes) stays the contract.
    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        if "image" not in getattr(model_input, "columns", []):
            raise ValueError("input needs an 'image' column of encoded image bytes")
        decoded = []
        for i, data in enumerate(model_input["image"]):
            try:
                decoded.append(self.ensemble.decode(bytes(data)))
            except BadImage as e:
                raise ValueError(f"row {i}: not a decodable image ({e})") from None
        views = stack_views(decoded, len(self.ensemble.members))
        return self.ensemble.frame(self.ensemble.posteriors(views))


# ---------------------------------------------------------------------------- logging helpers
def _mlflow(tracking_uri: str):
    import os

    import mlflow

    mlflow_client.bound_http_retries()
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # no tqdm in job logs
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)
    return mlflow


def _mlflow_for(run):
    """mlflow pointed at run's store and experiment: MLflow 3 files a logged model under the
    active experiment (else 'Default', whose artifacts land in ./mlruns), and runs:/<id>/<name>
    finds it only in the run's own experiment."""
    mlflow = _mlflow(run.tracking_uri)
    exp = mlflow_client.retry(lambda: mlflow_client.client(run.tracking_uri).get_run(run.run_id)).info.experiment_id
    mlflow.set_experiment(experiment_id=exp)
    return mlflow


def _stored_image(shard_dir: str | Path) -> np.ndarray:
    """The first stored image of a split, uint8 (S, S, 3): a real input example."""
    from deepimage.data.loader import ArrowLoader

    loader = ArrowLoader(shard_dir, batch_size=1, train=False, verify=False)
    return loader.store.images(np.array([0]))[0]


def _example_png(shard_dir: str | Path) -> bytes:
    """_stored_image PNG-encoded: the ensemble's input example (what a client sends)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(_stored_image(shard_dir)).save(buf, format="PNG")
    return buf.getvalue()


def _register(mlflow, model_uri: str, name: str, run_id: str):
    """A new version of `name` (retried while SQLite is locked by another job)."""
    return mlflow_client.retry(lambda: mlflow.register_model(model_uri, name, tags={"run_id": run_id}))


def log_trained_model(run, checkpoint: str | Path, shard_dir: str | Path, name: str | None = None) -> str:
    """Log one resolution's checkpoint with the PyTorch flavour and register it as `name`
    (default deepimage-<res>px); the version."""
    from mlflow.models import Model, infer_signature

    mlflow = _mlflow_for(run)
    model, ckpt = load_checkpoint(checkpoint)
    res, classes = int(ckpt["resolution"]), list(ckpt["classes"])
    stored = load_manifest(shard_dir).stored_size
    pixels = torch.from_numpy(_stored_image(shard_dir).copy())[None]     # (1, S, S, 3)
    x = normalize(center_crop(pixels.permute(0, 3, 1, 2), res)).numpy()  # (1, 3, res, res)
    with torch.no_grad():
        logits = model(torch.from_numpy(x)).numpy()                  # (1, K)
    meta = {"classes": classes, "resolution": res, "stored_size": stored,
            "preprocess": "decode_square(stored_size) -> centre crop(resolution) -> ImageNet normalize",
            "output": "logits (N, K); softmax gives the posteriors"}
    with tempfile.TemporaryDirectory() as tmp:
        classes_file = Path(tmp) / "classes.json"
        classes_file.write_text(json.dumps(classes))
        info = Model.log(artifact_path=None, name="model", flavor=mlflow.pytorch, run_id=run.run_id,
                         pytorch_model=model, signature=infer_signature(x, logits),
                         input_example=x, metadata=meta, extra_files=[str(classes_file)],
                         pip_requirements=pip_requirements())
    mv = _register(mlflow, info.model_uri, name or registered_name(res), run.run_id)
    run.set_tag("deepimage.registered_model", f"{mv.name}/{mv.version}")
    return mv.version


def ensemble_spec(checkpoints: list[str], shard_dirs: list[str], crops: list[int | None] | None = None) -> dict:
    """{classes, members: [{artifact, resolution, stored_size, crop}]} with the checks that keep it
    sane; crops: the side each model was evaluated on (None: its resolution)."""
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
                 crops: list[int | None] | None = None) -> dict:
    """Log the ensemble pyfunc (each member seeing `crops`, as evaluated), register it, and move
    `champion` to it when it is better."""
    from mlflow.models import Model, infer_signature

    mlflow = _mlflow_for(run)
    spec = ensemble_spec(checkpoints, shard_dirs, crops)
    example = pd.DataFrame({"image": [_example_png(shard_dirs[-1])]})
    with tempfile.TemporaryDirectory() as tmp:
        spec_file = Path(tmp) / "ensemble.json"
        spec_file.write_text(json.dumps(spec, indent=2))
        artifacts = {"ensemble": str(spec_file),
                     **{m["artifact"]: m["checkpoint"] for m in spec["members"]}}
        pyfunc = EnsemblePyfunc()
        pyfunc.load_context(type("Ctx", (), {"artifacts": artifacts})())
        signature = infer_signature(example, pyfunc.predict(None, example))
        info = Model.log(artifact_path=None, name="ensemble", flavor=mlflow.pyfunc, run_id=run.run_id,
                         python_model=EnsemblePyfunc(), artifacts=artifacts, signature=signature,
                         input_example=example, pip_requirements=pip_requirements(),
                         metadata={"classes": spec["classes"], ERROR_TAG: top1_error,
                                   "resolutions": [m["resolution"] for m in spec["members"]],
                                   "test_crops": [m["crop"] for m in spec["members"]]})
    mv = _register(mlflow, info.model_uri, ENSEMBLE_NAME, run.run_id)
    client = mlflow_client.client(run.tracking_uri)
    mlflow_client.retry(lambda: client.set_model_version_tag(ENSEMBLE_NAME, mv.version, ERROR_TAG,
                                                              repr(float(top1_error))))
    promoted, previous = promote_if_better(client, ENSEMBLE_NAME, mv.version, top1_error)
    run.set_tag("deepimage.registered_model", f"{ENSEMBLE_NAME}/{mv.version}")
    return {"name": ENSEMBLE_NAME, "version": mv.version, "model_uri": info.model_uri,
            "champion": promoted, "previous_champion_error": previous}


def champion_error(client, name: str) -> float | None:
    """Validation top-1 error of the current champion version, or None without a champion."""
    from mlflow.exceptions import MlflowException

    try:
        mv = mlflow_client.retry(lambda: client.get_model_version_by_alias(name, CHAMPION))
    except MlflowException as e:
        if "RESOURCE_DOES_NOT_EXIST" in str(e.error_code) or "not found" in str(e).lower():
            return None
        raise
    return float(mv.tags[ERROR_TAG]) if ERROR_TAG in mv.tags else None


def promote_if_better(client, name: str, version: str, top1_error: float) -> tuple[bool, float | None]:
    """Alias `champion` -> version when its error is strictly below the champion's (or none)."""
    previous = champion_error(client, name)
    if previous is not None and not top1_error < previous:
        return False, previous
    mlflow_client.retry(lambda: client.set_registered_model_alias(name, CHAMPION, version))
    return True, previous


# ------------------------------------------------------------------------------------ loading
def load_classifier(model_uri: str, tracking_uri: str | None = None) -> Ensemble:
    """Any logged deepimage model (ensemble pyfunc or one resolution's PyTorch model) as an
    Ensemble: `models:/name@alias`, `models:/name/version`, `runs:/<id>/<name>`, or a folder."""
    import mlflow
    from mlflow.models import Model

    if tracking_uri:
        _mlflow(tracking_uri)
    local = mlflow.artifacts.download_artifacts(artifact_uri=model_uri) \
        if "://" in model_uri or model_uri.startswith(("models:", "runs:")) else model_uri
    if not (Path(local) / "MLmodel").is_file():
        raise ValueError(f"{model_uri}: no MLmodel file there; give a model folder, runs:/<id>/<name> "
                         "or models:/<name>@<alias>")
    flavors = Model.load(local).flavors
    if "pytorch" in flavors:  # one resolution: an ensemble of one member
        meta = Model.load(local).metadata or {}
        model = mlflow.pytorch.load_model(local).eval()
        return Ensemble([Member(model, int(meta["resolution"]), int(meta["stored_size"]))],
                        meta["classes"])
    wrapped = mlflow.pyfunc.load_model(local).unwrap_python_model()
    if not isinstance(wrapped, EnsemblePyfunc):
        raise ValueError(f"{model_uri}: not a deepimage model (python model {type(wrapped).__name__})")
    return wrapped.ensemble
