"""The model file: a plain single-process model, its spec, classes and resolution, written by
train and read by evaluate, ensemble, robustness, the registry and the benchmarks.

    save_checkpoint("results/train/64/model.pt", spec, state_dict, classes, 64)
    model, ckpt = load_checkpoint("results/train/64/model.pt")   # eval mode; ckpt["classes"], ...
"""
from __future__ import annotations

import pickle
import re
from pathlib import Path

import torch

from deepimage.model import DeepImageNet, ModelSpec


def save_checkpoint(path: str | Path, spec: ModelSpec, state_dict: dict, classes: list[str],
                    resolution: int, extra: dict | None = None) -> None:
    """A plain single-process model: loads on any number of processes, whatever N trained it.
    Tensors, numbers, strings, lists and dicts only (extra too), so that load_checkpoint reads
    it without running code."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save({"spec": spec.to_dict(), "state_dict": state_dict, "classes": classes,
                "resolution": resolution, **(extra or {})}, tmp)
    tmp.replace(path)


def load_checkpoint(path: str | Path) -> tuple[DeepImageNet, dict]:
    """(model in eval mode, the checkpoint dict). Model files are shared between users: only
    plain data is unpickled (weights_only), a file that would build any other object or call
    anything is refused."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"Unsupported[^.\n]*", str(e))  # torch names the global it would call
        reason = found.group(0).strip() if found else "not a weights-only pickle"
        raise ValueError(f"{path}: not plain data, refused unread ({reason}); load only model files "
                         "written by deepimage.train") from None
    except (FileNotFoundError, IsADirectoryError, RuntimeError, EOFError) as e:
        raise ValueError(f"cannot read checkpoint {path}: {e}") from e
    if not isinstance(ckpt, dict) or not {"spec", "state_dict", "classes", "resolution"} <= set(ckpt):
        raise ValueError(f"{path}: not a deepimage model file (needs spec, state_dict, classes, resolution)")
    model = DeepImageNet(ModelSpec(**ckpt["spec"]))
    model.load_state_dict(ckpt["state_dict"])
    return model.eval(), ckpt
