"""Top-k error and the checkpoint format shared by train, evaluate and ensemble."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from deepimage.model import DeepImageNet, ModelSpec


def topk_error(probs: np.ndarray, labels: np.ndarray, k: int) -> float:
    """Fraction of rows whose label is not among the k highest scores. probs (N, K), labels (N,)."""
    if len(labels) == 0:
        raise ValueError("topk_error: no samples")
    k = min(k, probs.shape[1])
    topk = np.argpartition(-probs, k - 1, axis=1)[:, :k]  # (N, k), unordered
    return float(1.0 - (topk == labels[:, None]).any(axis=1).mean())


def save_checkpoint(path: str | Path, spec: ModelSpec, state_dict: dict, classes: list[str],
                    resolution: int, extra: dict | None = None) -> None:
    """A plain single-process model: loads on any number of processes, whatever N trained it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save({"spec": spec.to_dict(), "state_dict": state_dict, "classes": classes,
                "resolution": resolution, **(extra or {})}, tmp)
    tmp.replace(path)


def load_checkpoint(path: str | Path) -> tuple[DeepImageNet, dict]:
    """(model in eval mode, the checkpoint dict)."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except (FileNotFoundError, RuntimeError, EOFError) as e:
        raise ValueError(f"cannot read checkpoint {path}: {e}") from e
    model = DeepImageNet(ModelSpec(**ckpt["spec"]))
    model.load_state_dict(ckpt["state_dict"])
    return model.eval(), ckpt
