"""The model file: a plain single-process model, its spec, classes and resolution, written by
train and read by evaluate, ensemble, robustness, the registry and the benchmarks.

    save_checkpoint("results/train/64/model.pt", spec, state_dict, classes, 64)
    model, ckpt = load_checkpoint("results/train/64/model.pt")   # eval mode; ckpt["classes"], ...
"""
from __future__ import annotations

from pathlib import Path

import torch

from deepimage.model import DeepImageNet, ModelSpec


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
