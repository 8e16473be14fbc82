"""Split fully connected layers: the paper's model parallelism, applied to a plain FCHead.

    from deepimage.parallel.split_fc import split_head
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

Checkpoints are plain: deepimage.parallel.state gathers a DeepImageNet state dict (same keys as
the plain model) and cuts one for any N. Widths and class counts need not divide N (nearly
equal parts, the first ranks one more) but must be >= N.

Dropout masks are a pure function of (seed, global step, layer, global row, global column):
every rank draws a layer's whole (B, H) mask and keeps its columns, so a run resumed at another
worker count (or on one, with the plain FCHead, which draws them alike) draws the masks the
uninterrupted run drew.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from deepimage.model import FCHead, dropout_keep
from deepimage.parallel.mappings import (class_parallel_cross_entropy, copy_to_region,
                                         gather_columns_from_region, gather_row_counts,
                                         gather_rows_from_region, reduce_from_region,
                                         scatter_rows_to_owners)
from deepimage.parallel.even_split import partition_range, partition_sizes
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

    def __init__(self, head: FCHead, transport: Transport, seed: int):
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
        self.dropout = head.dropout
        self.seed, self.step = seed, head.step
        self.fc1_start, self.fc1_stop = partition_range(head.fc1.out_features, rank, size)
        self.hidden = (head.fc1.out_features, head.fc2.out_features)
        # self.step counts training forwards: one per global step, so it is the global step
        # (state.py sets it from a checkpoint's when resuming).
        self.load_state_dict(_slice_head(head, rank, size))
        for p in self.parameters():
            setattr(p, PARALLEL_ATTR, True)

    # --- dropout: masks that do not depend on the worker count --------------------------------

    def _dropout(self, x: torch.Tensor, layer: int) -> torch.Tensor:
        """Dropout of fc1's (layer 0, x (B, H1_r): this rank's columns) or fc2's (layer 1, x
        (B, H2): whole on every rank) output, rows in global batch order.

        Every rank draws the layer's FULL (B, H) mask (deepimage.model.dropout_keep, the plain
        FCHead's) and keeps its own columns, so each element's mask is a pure function of (seed,
        step, layer, row, column): the same at any worker count, unsplit, and after a resume."""
        if not self.training or self.dropout == 0.0:
            return x
        keep = dropout_keep(self.seed, self.step, layer, (x.shape[0], self.hidden[layer]),
                            self.dropout, x.device)  # (B, H)
        if layer == 0:
            keep = keep[:, self.fc1_start:self.fc1_stop]  # (B, H1) -> (B, H1_r)
        return x * keep.to(x.dtype) / (1.0 - self.dropout)

    # --- forward paths -------------------------------------------------------------------------

    def _shard_logits(self, features_local: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """This rank's classes for the whole global batch: (b_r, F) -> (B, K_r)."""
        x = gather_rows_from_region(features_local, self.transport, counts)  # (b_r, F) -> (B, F)
        h = self._dropout(torch.relu(self.fc1(x)), 0)  # (B, F) -> (B, H1_r)
        h = self._dropout(torch.relu(self.fc2(h)), 1)  # (B, H1_r) -> (B, H2), on every rank
        h = copy_to_region(h, self.transport)
        if self.training:
            self.step += 1
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


def _slice_head(head: FCHead, rank: int, size: int) -> dict:
    """This rank's slices of a plain head's state dict (keys as in the head)."""
    out = dict(head.state_dict())
    for layer, cls in SplitFCHead.LAYERS.items():
        for name, dim in cls.SPLIT_DIMS.items():
            full = out[f"{layer}.{name}"]
            start, stop = partition_range(full.shape[dim], rank, size)
            out[f"{layer}.{name}"] = full.narrow(dim, start, stop - start).clone()
    return out


def split_head(head: FCHead, transport: Transport, seed: int | None = None) -> SplitFCHead:
    """This rank's SplitFCHead, its weights sliced from `head` (so it starts identical to it).

    `seed` (default: the head's) seeds the dropout masks, a pure function of (seed, step,
    layer, row, column): the plain head's masks at its step.
    """
    if not isinstance(head, FCHead):
        raise TypeError(f"split_head needs a deepimage.model.FCHead, got {type(head).__name__}")
    return SplitFCHead(head, transport, head.seed if seed is None else seed)
