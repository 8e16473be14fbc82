"""A resolution's training recipe: train.per_resolution.<res> applied to the config, and the
warm start from a lower resolution's trained model (train.per_resolution.<res>.init_from)."""
from __future__ import annotations

import dataclasses

from deepimage.config import Config
from deepimage.model import DeepImageNet
from deepimage.modelfile import load_checkpoint


def recipe(cfg: Config, resolution: int) -> Config:
    """cfg as this resolution trains: train.per_resolution.<res>'s epochs / lr in place of
    train.epochs / lr, and train.per_resolution narrowed to this resolution's entry (what its
    checkpoints record and compare on resume, and what MLflow logs)."""
    entry = dict(cfg.train.per_resolution or {}).get(str(resolution), {})
    train = dataclasses.replace(cfg.train, epochs=entry.get("epochs") or cfg.train.epochs,
                                lr=float(entry.get("lr") or cfg.train.lr),
                                per_resolution={str(resolution): entry} if entry else {})
    return dataclasses.replace(cfg, train=train)


def warm_start(net: DeepImageNet, path: str, classes: list[str]) -> None:
    """Every weight of `net` from the lower-resolution model at `path` (the trunk is pooled to a
    fixed grid, so the same network takes either size); refuses another network or class list."""
    lower, ckpt = load_checkpoint(path)
    if ckpt["classes"] != classes:
        raise ValueError(f"--init-from {path}: its classes differ from the training shards': shard every "
                         "resolution from the same dataset")
    if lower.spec.conv != net.spec.conv or lower.spec.fc_hidden != net.spec.fc_hidden:
        raise ValueError(f"--init-from {path}: conv {lower.spec.conv} / fc_hidden {lower.spec.fc_hidden}, this "
                         f"resolution builds {net.spec.conv} / {net.spec.fc_hidden}: give both the same network")
    net.load_state_dict(lower.state_dict())
