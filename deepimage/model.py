"""The network, written once and plainly: a VGG-style conv trunk and the paper's FC head.

Parallelism is applied from outside (deepimage.parallel); nothing here knows about ranks.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from deepimage.config import default, default_field

# After the trunk, features are pooled to this fixed grid so the FC head's input width does not
# depend on the input resolution (one head shape per config, any resolution).
POOL_GRID = 2


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to rebuild the network (saved beside each checkpoint); a field left out
    takes the schema's model.<field>."""

    num_classes: int
    conv: list[list[int]] = default_field("model.conv")
    fc_hidden: list[int] = default_field("model.fc_hidden")
    dropout: float = default_field("model.dropout")
    norm: str = default_field("model.norm")

    def __post_init__(self):
        if self.num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {self.num_classes}")
        if len(self.fc_hidden) != 2:
            raise ValueError(f"fc_hidden must list two widths, got {self.fc_hidden}")
        if self.norm not in ("group", "batch", "none"):
            raise ValueError(f"norm must be group, batch or none, got {self.norm!r}")

    @classmethod
    def from_config(cls, model_cfg: dict, resolution: int, num_classes: int) -> "ModelSpec":
        """Resolve `model:` of config.yaml for one resolution (per_resolution overrides win; a key
        left out: the schema's default)."""
        model_cfg = {**default("model"), **model_cfg}
        override = model_cfg["per_resolution"].get(str(resolution), {})
        return cls(
            num_classes=num_classes,
            conv=[list(s) for s in override.get("conv", model_cfg["conv"])],
            fc_hidden=list(override.get("fc_hidden", model_cfg["fc_hidden"])),
            dropout=float(model_cfg["dropout"]),
            norm=model_cfg["norm"],
        )

    def to_dict(self) -> dict:
        return {"num_classes": self.num_classes, "conv": self.conv, "fc_hidden": self.fc_hidden,
                "dropout": self.dropout, "norm": self.norm}


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "group":
        # Per-sample statistics: a data-parallel step equals the single-process step exactly.
        return nn.GroupNorm(min(8, channels) if channels % min(8, channels) == 0 else 1, channels)
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    return nn.Identity()


def dropout_keep(seed: int, step: int, layer: int, shape: tuple[int, int], p: float,
                 device: torch.device) -> torch.Tensor:
    """The keep mask (1 kept, 0 dropped) of FC layer `layer`'s (B, H) output at training step
    `step`: a pure function of (seed, step, layer, row, column), drawn from its own generator,
    so the masks do not depend on torch's global stream or on who draws them."""
    mixed = int(np.random.SeedSequence([seed, step, layer]).generate_state(1, np.uint64)[0])
    g = torch.Generator(device).manual_seed(mixed)
    return torch.empty(shape, device=device).bernoulli_(1.0 - p, generator=g)  # (B, H)


class FCHead(nn.Module):
    """fc1 -> ReLU -> dropout -> fc2 -> ReLU -> dropout -> classifier (the paper's FC layers).

    Dropout masks come from dropout_keep(seed, step, layer): `step` counts the training forwards
    (one per training step; set it to resume), `seed` is build_model's."""

    def __init__(self, in_features: int, hidden: list[int], num_classes: int, dropout: float):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden[0])
        self.fc2 = nn.Linear(hidden[0], hidden[1])
        self.classifier = nn.Linear(hidden[1], num_classes)
        self.act = nn.ReLU(inplace=True)
        self.dropout, self.seed, self.step = float(dropout), 0, 0

    def drop(self, x: torch.Tensor, layer: int) -> torch.Tensor:
        """Inverted dropout of layer `layer`'s output x (B, H) at this step."""
        if not self.training or self.dropout == 0.0:
            return x
        keep = dropout_keep(self.seed, self.step, layer, tuple(x.shape), self.dropout, x.device)
        return x * keep.to(x.dtype) / (1.0 - self.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.drop(self.act(self.fc1(x)), 0)  # (B, F) -> (B, H1)
        x = self.drop(self.act(self.fc2(x)), 1)  # (B, H1) -> (B, H2)
        if self.training:
            self.step += 1
        return self.classifier(x)  # (B, H2) -> (B, K)


class DeepImageNet(nn.Module):
    """VGG-style trunk (data-parallel in training) followed by FCHead (split in training)."""

    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.spec = spec
        layers: list[nn.Module] = []
        channels = 3
        for stage in spec.conv:
            for width in stage:
                layers += [nn.Conv2d(channels, width, 3, padding=1, bias=spec.norm == "none"),
                           _norm(spec.norm, width), nn.ReLU(inplace=True)]
                channels = width
            layers.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(POOL_GRID)
        self.head = FCHead(channels * POOL_GRID * POOL_GRID, spec.fc_hidden, spec.num_classes, spec.dropout)
        self._init_weights()

    def _init_weights(self):
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.Linear):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.head.classifier.weight, 0.0, 0.01)

    def trunk(self, x: torch.Tensor) -> torch.Tensor:
        """Conv features: (B, 3, H, W) -> (B, C * POOL_GRID**2)."""
        return self.pool(self.features(x)).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.trunk(x))  # (B, 3, H, W) -> (B, K)


def build_model(spec: ModelSpec, seed: int = 0) -> DeepImageNet:
    """The same weights on every rank for the same seed (no broadcast needed at start)."""
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        net = DeepImageNet(spec)
        net.head.seed = seed  # the dropout masks' seed too
        return net
    finally:
        torch.random.set_rng_state(gen_state)
