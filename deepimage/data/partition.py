"""Which samples each rank reads at each step: one pure function of the sample count, seed,
epoch, world size and global batch.

    from deepimage.data.partition import partition
    parts = partition(num_samples=1000, seed=0, epoch=3, world_size=4, global_batch=64)
    parts[step, rank]          # this rank's global row indices for that step, -1 = padding

The epoch permutation depends only on (seed, epoch, num_samples), never on the world size, so
global step s always covers perm[s*B:(s+1)*B]; the world size only decides how each step's
slice is cut (np.array_split: parts differ by at most one sample and may be empty on the last
step). Every rank therefore has ceil(N / B) steps, and over an epoch every sample is read
exactly once across ranks, whatever the number of shards or ranks.
"""
from __future__ import annotations

import math

import numpy as np

PAD = -1


def epoch_order(num_samples: int, seed: int, epoch: int, shuffle: bool = True) -> np.ndarray:
    """The global sample order of one epoch: a permutation of range(num_samples)."""
    if num_samples < 0:
        raise ValueError(f"num_samples must be >= 0, got {num_samples}")
    if not shuffle:
        return np.arange(num_samples, dtype=np.int64)
    # SeedSequence mixes (seed, epoch) so consecutive epochs give unrelated permutations.
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, epoch])))
    return rng.permutation(num_samples).astype(np.int64)


def num_steps(num_samples: int, global_batch: int) -> int:
    """Steps per epoch, the same on every rank: ceil(N / B)."""
    return math.ceil(num_samples / global_batch)


def partition(num_samples: int, seed: int, epoch: int, world_size: int, global_batch: int,
              shuffle: bool = True) -> np.ndarray:
    """Global row indices per (step, rank), -1-padded: shape (steps, world_size, ceil(B / W))."""
    if global_batch < 1:
        raise ValueError(f"global_batch must be >= 1, got {global_batch}")
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    order = epoch_order(num_samples, seed, epoch, shuffle)               # (N,)
    steps = num_steps(num_samples, global_batch)
    width = math.ceil(global_batch / world_size)
    out = np.full((steps, world_size, width), PAD, dtype=np.int64)       # (steps, W, ceil(B/W))
    for s in range(steps):
        chunk = order[s * global_batch:(s + 1) * global_batch]          # (<=B,)
        for r, part in enumerate(np.array_split(chunk, world_size)):    # sizes differ by <= 1
            out[s, r, :len(part)] = part
    return out


def rank_steps(parts: np.ndarray, rank: int) -> list[np.ndarray]:
    """One rank's row indices per step, padding removed: a list of `steps` arrays."""
    if not 0 <= rank < parts.shape[1]:
        raise ValueError(f"rank {rank} out of range for world size {parts.shape[1]}")
    return [row[row != PAD] for row in parts[:, rank]]
