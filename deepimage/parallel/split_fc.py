"""Split fully connected layers: the paper's model parallelism, applied to a plain FCHead.

    from deepimage.parallel.split_fc import split_head, gather_state_dict, shard_state_dict
    model.head = split_head(model.head, transport)         # this rank's shards of fc1/fc2/classifier
    loss, correct = model.head.loss(model.trunk(x_local), y_local)
    loss.backward()   # then SUM the conv (trunk) gradients over ranks; the FC shards step locally

Convolutions stay data-parallel (most FLOPs, few parameters). The FC layers (few FLOPs, most
parameters) are split across the N ranks as in Krizhevsky 2014 and Megatron-LM:

    features (b_r, F) --gather rows--> (B, F)            every shard sees the global batch
    fc1  column-parallel  (B, F)    -> (B, H1_r)         output features split, no communication
    fc2  row-parallel     (B, H1_r) -> (B, H2)           partial sums, all-reduce (bias added after)
    classifier over classes (B, H2) -> (B, K_r)          input copied to every rank's shard
    class-parallel softmax cross-entropy -> loss, the mean over the global batch, on every rank

Backward returns each rank the gradient of its own feature rows (a reduce-scatter). Each rank's
shard gradients are complete, so shards are stepped locally: their parameters carry
`deepimage_model_parallel = True` and gradient synchronisation skips them. That includes fc2's
bias, which is replicated but whose gradient is already the full one, identical on every rank.
The loss is the global mean on every rank, so each rank's conv gradient is its share of the
global gradient: SUM them over ranks (GradientSync(op="sum")), do not average.

Checkpoints are plain: gather_state_dict gives a DeepImageNet state dict (same keys as the plain
model), shard_state_dict cuts one for any N. Widths and class counts need not divide N (nearly
equal parts, the first ranks one more) but must be >= N.
"""
from __future__ import annotations

from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from deepimage.model import FCHead
from deepimage.parallel.mappings import (class_parallel_cross_entropy, copy_to_region,
                                         gather_columns_from_region, gather_row_counts,
                                         gather_rows_from_region, reduce_from_region,
                                         scatter_rows_to_owners)
from deepimage.parallel.partition import partition_range, partition_sizes
from deepimage.parallel.transport import Transport

# The mark of a split-FC parameter; GradientSync (lazy.py) reads it through is_model_parallel.
PARALLEL_ATTR = "deepimage_model_parallel"


def is_model_parallel(p: torch.Tensor) -> bool:
    """True for a split-FC parameter: stepped locally, never all-reduced."""
    return bool(getattr(p, PARALLEL_ATTR, False))


def _shard_param(rows: int, cols: int | None, like: torch.Tensor) -> nn.Parameter:
    shape = (rows,) if cols is None else (rows, cols)
    return nn.Parameter(torch.empty(shape, dtype=like.dtype, device=like.device))


class ColumnParallelLinear(nn.Module):
    """y_r = x W_r^T + b_r, output features split over ranks: (B, in) -> (B, out_r).

    The input must be the same on every rank; whoever replicated it reduces its gradient.
    """

    SPLIT_DIMS = {"weight": 0, "bias": 0}  # parameter -> dim cut across ranks

    def __init__(self, plain: nn.Linear, rank: int, size: int):
        super().__init__()
        start, stop = partition_range(plain.out_features, rank, size)
        self.weight = _shard_param(stop - start, plain.in_features, plain.weight)
        self.bias = _shard_param(stop - start, None, plain.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)  # (B, in) -> (B, out_r)


class RowParallelLinear(nn.Module):
    """y = sum_r x_r W_r^T + b, input features split over ranks: (B, in_r) -> (B, out).

    The bias is replicated and added once, after the all-reduce of the partial products.
    """

    SPLIT_DIMS = {"weight": 1}

    def __init__(self, plain: nn.Linear, rank: int, size: int, transport: Transport):
        super().__init__()
        start, stop = partition_range(plain.in_features, rank, size)
        self.weight = _shard_param(plain.out_features, stop - start, plain.weight)
        self.bias = _shard_param(plain.out_features, None, plain.weight)
        self.transport = transport

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        partial = F.linear(x, self.weight)  # (B, in_r) -> (B, out), this rank's share
        return reduce_from_region(partial, self.transport) + self.bias


def _check_widths(head: FCHead, size: int) -> None:
    widths = {"model.fc_hidden[0]": head.fc1.out_features, "model.fc_hidden[1]": head.fc2.out_features,
              "num_classes": head.classifier.out_features}
    for key, width in widths.items():
        if width < size:
            raise ValueError(f"split FC over {size} processes needs {key} >= {size}, got {width}: "
                             f"use fewer processes, a wider layer, or train.split_fc: false")


class SplitFCHead(nn.Module):
    """This rank's shards of an FCHead, with the collectives that join them (same state keys)."""

    LAYERS = {"fc1": ColumnParallelLinear, "fc2": RowParallelLinear, "classifier": ColumnParallelLinear}

    def __init__(self, head: FCHead, transport: Transport, seed: int = 0):
        super().__init__()
        rank, size = transport.rank, transport.size
        _check_widths(head, size)
        self.transport, self.rank, self.size = transport, rank, size
        self.fc1 = ColumnParallelLinear(head.fc1, rank, size)
        self.fc2 = RowParallelLinear(head.fc2, rank, size, transport)
        self.classifier = ColumnParallelLinear(head.classifier, rank, size)
        self.num_classes = head.classifier.out_features
        self.class_sizes = partition_sizes(self.num_classes, size)
        self.class_start = sum(self.class_sizes[:rank])
        self.dropout = float(head.drop.p)
        self.seed = seed
        self._generators: dict[tuple[str, str], torch.Generator] = {}
        self.load_state_dict(shard_state_dict(head.state_dict(), rank, size, prefix=""))
        for p in self.parameters():
            setattr(p, PARALLEL_ATTR, True)

    # --- dropout: replicated activations need the same mask on every rank ----------------------

    def _dropout(self, x: torch.Tensor, region: str) -> torch.Tensor:
        """Dropout with a mask from the `shared` generator (same seed on every rank: for
        activations every rank holds whole) or the `local` one (seeded per rank: for shards)."""
        if not self.training or self.dropout == 0.0:
            return x
        key = (region, str(x.device))
        if key not in self._generators:
            offset = 0 if region == "shared" else 1 + self.rank
            self._generators[key] = torch.Generator(x.device).manual_seed(self.seed * 1009 + offset)
        keep = torch.empty_like(x).bernoulli_(1.0 - self.dropout, generator=self._generators[key])
        return x * keep / (1.0 - self.dropout)

    # --- forward paths -------------------------------------------------------------------------

    def _shard_logits(self, features_local: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """This rank's classes for the whole global batch: (b_r, F) -> (B, K_r)."""
        x = gather_rows_from_region(features_local, self.transport, counts)  # (b_r, F) -> (B, F)
        h = self._dropout(torch.relu(self.fc1(x)), "local")  # (B, F) -> (B, H1_r)
        h = self._dropout(torch.relu(self.fc2(h)), "shared")  # (B, H1_r) -> (B, H2), on every rank
        h = copy_to_region(h, self.transport)
        return self.classifier(h)  # (B, H2) -> (B, K_r)

    def _row_counts(self, features_local: torch.Tensor) -> list[int]:
        if features_local.dim() != 2:
            raise ValueError(f"split FC head expects features (b, F), got shape {tuple(features_local.shape)}")
        return gather_row_counts(features_local.shape[0], self.transport, features_local.device)

    def forward(self, features_local: torch.Tensor) -> torch.Tensor:
        """Logits of this rank's own samples, as the plain head gives: (b_r, F) -> (b_r, K)."""
        counts = self._row_counts(features_local)
        logits = self._shard_logits(features_local, counts)  # (B, K_r)
        return scatter_rows_to_owners(logits, self.transport, counts, self.class_sizes)

    def full_logits(self, features_local: torch.Tensor) -> torch.Tensor:
        """Logits of the global batch on every rank, rows in rank order: (b_r, F) -> (B, K)."""
        logits = self._shard_logits(features_local, self._row_counts(features_local))  # (B, K_r)
        return gather_columns_from_region(logits, self.transport, self.class_sizes)

    def loss(self, features_local: torch.Tensor, labels_local: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean cross-entropy over the global batch, top-1 correct count over it), both scalars
        and identical on every rank; features_local (b_r, F), labels_local (b_r,) int64."""
        if labels_local.shape != features_local.shape[:1]:
            raise ValueError(f"labels shape {tuple(labels_local.shape)} does not match features "
                             f"shape {tuple(features_local.shape)}")
        counts = self._row_counts(features_local)
        if sum(counts) == 0:
            raise ValueError("split FC loss: the global batch is empty on every rank")
        labels = self.transport.allgather_async(labels_local.to(torch.int64).contiguous(),
                                                sizes=counts).wait()  # (b_r,) -> (B,)
        if int(labels.min()) < 0 or int(labels.max()) >= self.num_classes:
            raise ValueError(f"labels must be in [0, {self.num_classes}), got "
                             f"[{int(labels.min())}, {int(labels.max())}]")
        logits = self._shard_logits(features_local, counts)  # (B, K_r)
        per_sample, predicted = class_parallel_cross_entropy(
            logits, labels, self.class_start, self.transport)  # (B,), (B,)
        return per_sample.mean(), (predicted == labels).sum()


def split_head(head: FCHead, transport: Transport, seed: int = 0) -> SplitFCHead:
    """This rank's SplitFCHead, its weights sliced from `head` (so it starts identical to it).

    `seed` seeds the dropout masks (the same on every rank for replicated activations).
    """
    if not isinstance(head, FCHead):
        raise TypeError(f"split_head needs a deepimage.model.FCHead, got {type(head).__name__}")
    return SplitFCHead(head, transport, seed)


# ---------------------------------------------------------------------------------------------
# Checkpoints: plain state dicts in, plain state dicts out

def split_layout(prefix: str = "head.") -> dict[str, int]:
    """State-dict key -> the dim cut across ranks, for a SplitFCHead whose keys start `prefix`."""
    return {f"{prefix}{layer}.{name}": dim for layer, cls in SplitFCHead.LAYERS.items()
            for name, dim in cls.SPLIT_DIMS.items()}


def _model_layout(model: nn.Module) -> tuple[dict[str, int], int, int]:
    """(split_layout of every SplitFCHead inside `model`, rank, size); ({}, 0, 1) if none."""
    layout, rank, size = {}, 0, 1
    for name, module in model.named_modules():
        if isinstance(module, SplitFCHead):
            layout.update(split_layout(f"{name}." if name else ""))
            rank, size = module.rank, module.size
    return layout, rank, size


def _shard(full: torch.Tensor, dim: int, rank: int, size: int) -> torch.Tensor:
    start, stop = partition_range(full.shape[dim], rank, size)
    return full.narrow(dim, start, stop - start).clone()  # clone: the shard owns its memory


def _gather_dim(shard: torch.Tensor, dim: int, transport: Transport) -> torch.Tensor:
    """Concatenate every rank's shard along `dim` (0 or 1), in rank order."""
    if dim == 0:
        return transport.allgather(shard.contiguous())
    # all-gather concatenates dim 0: gather the transpose, (out, in_r) -> (in, out) -> (out, in).
    return transport.allgather(shard.transpose(0, 1).contiguous()).transpose(0, 1).contiguous()


def shard_state_dict(plain_sd: dict, rank: int, size: int, prefix: str = "head.") -> dict:
    """Rank's state dict of the split model, cut from a plain DeepImageNet (or FCHead, with
    prefix="") state dict; keys are unchanged, other entries are passed through."""
    layout = split_layout(prefix)
    missing = [k for k in layout if k not in plain_sd]
    if missing:
        raise KeyError(f"state dict has no {missing[0]!r}: not a DeepImageNet state dict "
                       f"(keys start {sorted(plain_sd)[:3]}), or pass prefix= for where the head is")
    out = dict(plain_sd)
    for key, dim in layout.items():
        if plain_sd[key].shape[dim] < size:
            raise ValueError(f"{key} has {plain_sd[key].shape[dim]} rows/columns to split, fewer "
                             f"than {size} processes")
        out[key] = _shard(plain_sd[key], dim, rank, size)
    return out


def gather_tensors(model: nn.Module, named: dict, transport: Transport) -> dict:
    """Reassemble plain tensors from a dict keyed like model.state_dict() (shards gathered,
    everything else passed through). Every rank must call it with the same keys in order."""
    layout, _, _ = _model_layout(model)
    return {key: _gather_dim(value, layout[key], transport) if key in layout else value
            for key, value in named.items()}


def gather_state_dict(model: nn.Module, transport: Transport) -> dict:
    """A plain DeepImageNet state dict (same keys, full shapes) from a model with a split head,
    the same on every rank; a snapshot (copies), so later training steps do not change it."""
    gathered = gather_tensors(model, model.state_dict(), transport)
    return {k: v.detach().clone() if torch.is_tensor(v) else v for k, v in gathered.items()}


# ---------------------------------------------------------------------------------------------
# Optimizer state (e.g. SGD momentum), so a re-split run continues exactly

def _optimizers(optimizers) -> list[torch.optim.Optimizer]:
    return [optimizers] if isinstance(optimizers, torch.optim.Optimizer) else list(optimizers)


def gather_optimizer_state(model: nn.Module, optimizers: torch.optim.Optimizer | Iterable,
                           transport: Transport) -> dict[str, dict]:
    """Per-parameter optimizer state keyed by the plain model's parameter names, with the state
    tensors of shards (those shaped like their parameter) gathered to full shape.

    Every rank must hold state for the same parameters (true after one step of SGD or Adam).
    """
    layout, _, _ = _model_layout(model)
    state_of = {p: st for opt in _optimizers(optimizers) for p, st in opt.state.items()}
    out: dict[str, dict] = {}
    for name, p in model.named_parameters():
        if not state_of.get(p):
            continue
        out[name] = {k: _gather_dim(v, layout[name], transport)
                     if name in layout and torch.is_tensor(v) and v.shape == p.shape else v
                     for k, v in state_of[p].items()}
    return out


def shard_optimizer_state(model: nn.Module, plain_state: dict[str, dict]) -> dict[str, dict]:
    """gather_optimizer_state's output (or GradientSync.state_dict()["state"] of a plain run)
    cut for this rank of a split model: shard state tensors sliced like their parameter."""
    layout, rank, size = _model_layout(model)
    params = dict(model.named_parameters())
    out: dict[str, dict] = {}
    for name, state in plain_state.items():
        if name not in params:
            raise KeyError(f"optimizer state for {name!r}: the model has no such parameter")
        p = params[name]
        out[name] = {}
        for k, v in state.items():
            if name in layout and torch.is_tensor(v) and v.dim() == p.dim():
                v = _shard(v, layout[name], rank, size)
            if torch.is_tensor(v) and v.dim() == p.dim() and v.shape != p.shape:
                raise ValueError(f"optimizer state {name}.{k} has shape {tuple(v.shape)}, "
                                 f"parameter has {tuple(p.shape)}")
            out[name][k] = v
    return out


def load_optimizer_state(model: nn.Module, optimizers: torch.optim.Optimizer | Iterable,
                         plain_state: dict[str, dict]) -> None:
    """Load gather_optimizer_state's output into the optimizers of a (split or plain) model,
    each shard's state cut for this rank (e.g. optimizers=GradientSync.optimizers())."""
    params = dict(model.named_parameters())
    owner = {p: opt for opt in _optimizers(optimizers) for g in opt.param_groups for p in g["params"]}
    for name, state in shard_optimizer_state(model, plain_state).items():
        p = params[name]
        if p not in owner:
            raise KeyError(f"optimizer state for {name!r}: no optimizer holds that parameter")
        owner[p].state[p] = {k: v.clone().to(p.device) if torch.is_tensor(v) and v.dim() > 0 else v
                             for k, v in state.items()}
