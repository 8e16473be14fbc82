"""Autograd Functions that move activations between ranks for the split FC layers, and the
arithmetic of the class-parallel softmax cross-entropy (Megatron-LM's tensor_parallel/mappings.py
and vocab-parallel cross-entropy, written over deepimage's `Transport`).

Each Function is named for what it does to the data in the forward pass; its docstring says what
the backward pass does. Wrappers at the bottom (`copy_to_region(x, transport)`, ...) are what the
layers call. Nothing here holds parameters; deepimage.parallel.split_fc builds the layers.

Vocabulary: a "region" is the model-parallel group (all ranks of the transport). "Rows" are
samples (dim 0), "columns" are features or classes (the last dim).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch.autograd import Function

from deepimage.parallel.transport import Transport


# ---------------------------------------------------------------------------------------------
# Collective building blocks (no autograd): each is one or two transport calls.

def gather_row_counts(rows: int, transport: Transport, device: torch.device | str = "cpu") -> list[int]:
    """Every rank's dim-0 length, in rank order (a tiny all-gather on `device`)."""
    mine = torch.tensor([rows], dtype=torch.int64, device=device)
    counts = transport.allgather_async(mine, sizes=[1] * transport.size).wait()  # (N,)
    return [int(c) for c in counts]


def _reduce_scatter_rows(x: torch.Tensor, counts: Sequence[int], transport: Transport) -> torch.Tensor:
    """Sum `x` (B, ...) over ranks and keep this rank's rows: (B, ...) -> (counts[rank], ...).

    One all-to-all (rank j receives rows counts[j] of every rank's `x`) and a local sum, so each
    rank sends (N-1)/N of `x` instead of the 2(N-1)/N an all-reduce would send.
    """
    mine = counts[transport.rank]
    received = transport.alltoall_async(x.contiguous(), list(counts),
                                        recv_splits=[mine] * transport.size).wait()  # (N * b_r, ...)
    parts = received.view(transport.size, mine, *x.shape[1:])  # (N, b_r, ...)
    if x.dtype in (torch.float16, torch.bfloat16):  # accumulate 16-bit partials in fp32
        return parts.sum(0, dtype=torch.float32).to(x.dtype)
    return parts.sum(0)


def _exchange_blocks(blocks: Sequence[torch.Tensor], recv_shapes: Sequence[tuple[int, ...]],
                     transport: Transport) -> list[torch.Tensor]:
    """Send blocks[j] to rank j and return the block every rank j sent here, shaped recv_shapes[j].

    Blocks may have different shapes, so they travel flattened in one 1-D all-to-all.
    """
    flat = torch.cat([b.reshape(-1) for b in blocks])  # (sum of numels,)
    sizes = [int(torch.Size(s).numel()) for s in recv_shapes]
    received = transport.alltoall_async(flat, [b.numel() for b in blocks], recv_splits=sizes).wait()
    return [part.view(shape) for part, shape in zip(received.split(sizes), recv_shapes)]


# ---------------------------------------------------------------------------------------------
# Autograd Functions

class _CopyToRegion(Function):
    """Forward: identity (the input is already the same on every rank).
    Backward: all-reduce sum, since every rank's shard contributed a partial gradient."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, transport: Transport) -> torch.Tensor:
        ctx.transport = transport
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return ctx.transport.allreduce(grad.contiguous(), op="sum"), None


class _ReduceFromRegion(Function):
    """Forward: all-reduce sum of every rank's partial result (row-parallel output).
    Backward: identity (the summed output's gradient is the same on every rank)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, transport: Transport) -> torch.Tensor:
        return transport.allreduce(x.contiguous(), op="sum")

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


class _GatherRowsFromRegion(Function):
    """Forward: all-gather rows, (b_r, F) -> (B, F) with B = sum of b_r (b_r may be 0;
    `counts` lists every rank's b_r, from gather_row_counts).
    Backward: each rank holds a partial gradient of all B rows; sum them over ranks and return
    each rank its own rows (a reduce-scatter by rows)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, transport: Transport, counts: Sequence[int]) -> torch.Tensor:
        ctx.transport = transport
        ctx.counts = list(counts)
        return transport.allgather_async(x.contiguous(), sizes=ctx.counts).wait()  # (b_r, F) -> (B, F)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _reduce_scatter_rows(grad, ctx.counts, ctx.transport), None, None  # (B, F) -> (b_r, F)


class _GatherColumnsFromRegion(Function):
    """Forward: all-gather the last dim, (B, K_r) -> (B, K), column blocks in rank order.
    Backward: keep this rank's columns (the gradient of the gathered tensor is the same on
    every rank when every rank computes the same function of it)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, transport: Transport, sizes: Sequence[int]) -> torch.Tensor:
        ctx.start = sum(sizes[:transport.rank])
        ctx.stop = ctx.start + sizes[transport.rank]
        # all-gather concatenates dim 0, so gather the transpose: (K_r, B) -> (K, B).
        gathered = transport.allgather_async(x.t().contiguous(), sizes=list(sizes)).wait()  # (K, B)
        return gathered.t().contiguous()  # (B, K)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad[:, ctx.start:ctx.stop].contiguous(), None, None  # (B, K) -> (B, K_r)


class _ScatterRowsToOwners(Function):
    """Forward: (B, K_r) column shards of all B rows -> (b_r, K), this rank's rows with every
    column (one all-to-all). Backward: the inverse exchange, (b_r, K) -> (B, K_r)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, transport: Transport, row_counts: Sequence[int],
                col_sizes: Sequence[int]) -> torch.Tensor:
        ctx.transport, ctx.row_counts, ctx.col_sizes = transport, list(row_counts), list(col_sizes)
        r = transport.rank
        blocks = x.split(ctx.row_counts, dim=0)  # to rank j: (b_j, K_r)
        shapes = [(ctx.row_counts[r], k) for k in ctx.col_sizes]  # from rank j: (b_r, K_j)
        return torch.cat(_exchange_blocks(blocks, shapes, transport), dim=1)  # (b_r, K)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        r = ctx.transport.rank
        blocks = [g.contiguous() for g in grad.split(ctx.col_sizes, dim=1)]  # to rank j: (b_r, K_j)
        shapes = [(b, ctx.col_sizes[r]) for b in ctx.row_counts]  # from rank j: (b_j, K_r)
        return torch.cat(_exchange_blocks(blocks, shapes, ctx.transport), dim=0), None, None, None


class ClassParallelCrossEntropy(Function):
    """Softmax cross-entropy per sample with the classes split across ranks.

    Forward: logits (B, K_r) of this rank's classes [class_start, class_start + K_r) for all B
    samples, targets (B,) global class ids -> (loss (B,), predicted class (B,)), identical on
    every rank. Two all-reduces: the max over classes, then [sum of exps, target logit, argmax
    candidates] in one. Backward: softmax minus one-hot on this rank's classes, no communication.
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, target: torch.Tensor, class_start: int,
                transport: Transport):
        ctx.dtype = logits.dtype
        if logits.dtype in (torch.float16, torch.bfloat16):
            logits = logits.float()  # softmax statistics in fp32 under autocast
        local_max, local_arg = ClassParallelCrossEntropy.local_max(logits, class_start)
        global_max = transport.allreduce(local_max, op="max")  # (B,)
        shifted = logits - global_max[:, None]  # (B, K_r), <= 0: exp cannot overflow
        target_logit, local_target, in_range = ClassParallelCrossEntropy.target_logits(
            shifted, target, class_start)
        exp = shifted.exp()
        candidates = ClassParallelCrossEntropy.argmax_candidates(
            local_max, local_arg, global_max, transport.rank, transport.size)  # (B, N)
        stats = torch.cat([exp.sum(1, keepdim=True), target_logit[:, None], candidates], 1)
        stats = transport.allreduce(stats, op="sum")  # (B, 2 + N)
        sum_exp, target_logit = stats[:, 0], stats[:, 1]
        loss = ClassParallelCrossEntropy.loss_from(sum_exp, target_logit)
        predicted = ClassParallelCrossEntropy.first_candidate(stats[:, 2:])
        ctx.save_for_backward(exp / sum_exp[:, None], local_target, in_range)
        ctx.mark_non_differentiable(predicted)
        return loss, predicted

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor, _grad_predicted):
        softmax, local_target, in_range = ctx.saved_tensors
        grad = ClassParallelCrossEntropy.logits_grad(softmax, local_target, in_range, grad_loss)
        return grad.to(ctx.dtype), None, None, None

    # --- the arithmetic, as plain functions of local tensors -------------------------------

    @staticmethod
    def local_max(logits: torch.Tensor, class_start: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Max over this rank's classes and its global class id: (B, K_r) -> (B,), (B,)."""
        values, idx = logits.max(dim=1)
        return values, idx + class_start

    @staticmethod
    def target_logits(shifted: torch.Tensor, target: torch.Tensor, class_start: int):
        """The target's shifted logit where this rank holds the target class, else 0.

        Returns (target_logit (B,), local_target (B,) index into K_r, clamped to 0 where not
        held, in_range (B,) bool). Summed over ranks, target_logit is the target's logit.
        """
        local_target = target - class_start
        in_range = (local_target >= 0) & (local_target < shifted.shape[1])
        local_target = torch.where(in_range, local_target, torch.zeros_like(local_target))
        picked = shifted.gather(1, local_target[:, None]).squeeze(1)  # (B,)
        return torch.where(in_range, picked, torch.zeros_like(picked)), local_target, in_range

    @staticmethod
    def argmax_candidates(local_max: torch.Tensor, local_arg: torch.Tensor,
                          global_max: torch.Tensor, rank: int, size: int) -> torch.Tensor:
        """(B,) -> (B, N): column `rank` holds 1 + this rank's argmax where it reaches the
        global max, else 0; summed over ranks, the first non-zero column is the global argmax
        (the lowest class id among ties, as torch.argmax)."""
        out = torch.zeros(local_max.shape[0], size, dtype=local_max.dtype, device=local_max.device)
        out[:, rank] = torch.where(local_max == global_max, local_arg.to(out.dtype) + 1, 0.0)
        return out

    @staticmethod
    def first_candidate(candidates: torch.Tensor) -> torch.Tensor:
        """(B, N) summed candidates -> (B,) predicted class id (int64)."""
        has = candidates > 0
        first = has.to(torch.int64).argmax(dim=1)  # first rank that reached the max
        return candidates.gather(1, first[:, None]).squeeze(1).to(torch.int64) - 1

    @staticmethod
    def loss_from(sum_exp: torch.Tensor, target_logit: torch.Tensor) -> torch.Tensor:
        """-log softmax[target] = log(sum exp(shifted)) - shifted target logit, (B,)."""
        return sum_exp.log() - target_logit

    @staticmethod
    def logits_grad(softmax: torch.Tensor, local_target: torch.Tensor, in_range: torch.Tensor,
                    grad_loss: torch.Tensor) -> torch.Tensor:
        """d loss / d logits on this rank's classes: (softmax - one_hot) * grad_loss, (B, K_r)."""
        grad = softmax.clone()
        rows = torch.arange(grad.shape[0], device=grad.device)
        grad[rows, local_target] -= in_range.to(grad.dtype)
        return grad * grad_loss[:, None]


# ---------------------------------------------------------------------------------------------
# What the layers call

def copy_to_region(x: torch.Tensor, transport: Transport) -> torch.Tensor:
    return _CopyToRegion.apply(x, transport)


def reduce_from_region(x: torch.Tensor, transport: Transport) -> torch.Tensor:
    return _ReduceFromRegion.apply(x, transport)


def gather_rows_from_region(x: torch.Tensor, transport: Transport,
                            counts: Sequence[int]) -> torch.Tensor:
    return _GatherRowsFromRegion.apply(x, transport, list(counts))


def gather_columns_from_region(x: torch.Tensor, transport: Transport,
                               sizes: Sequence[int]) -> torch.Tensor:
    return _GatherColumnsFromRegion.apply(x, transport, list(sizes))


def scatter_rows_to_owners(x: torch.Tensor, transport: Transport, row_counts: Sequence[int],
                           col_sizes: Sequence[int]) -> torch.Tensor:
    return _ScatterRowsToOwners.apply(x, transport, list(row_counts), list(col_sizes))


def class_parallel_cross_entropy(logits: torch.Tensor, target: torch.Tensor, class_start: int,
                                 transport: Transport) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample loss (B,) and predicted class (B,) from class-sharded logits (B, K_r)."""
    return ClassParallelCrossEntropy.apply(logits, target, class_start, transport)
