"""The rank partition: every sample exactly once per epoch, for any samples/batch/ranks.

    pytest tests/test_partition.py
"""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from deepimage.data.partition import PAD, epoch_order, num_steps, partition, rank_steps

SIZES = [0, 1, 2, 7, 31, 100, 257]
BATCHES = [1, 3, 8, 32, 100]
WORLDS = [1, 2, 3, 5, 8]


@pytest.mark.parametrize("n,b,w", list(itertools.product(SIZES, BATCHES, WORLDS)))
def test_every_sample_exactly_once_and_equal_steps(n, b, w):
    parts = partition(n, seed=3, epoch=1, world_size=w, global_batch=b)
    assert parts.shape == (math.ceil(n / b), w, math.ceil(b / w))
    seen = np.concatenate([np.concatenate(rank_steps(parts, r) or [np.empty(0, np.int64)])
                           for r in range(w)])
    assert np.array_equal(np.sort(seen), np.arange(n))       # exactly once, nothing else
    for s in range(parts.shape[0]):
        sizes = (parts[s] != PAD).sum(axis=1)
        assert sizes.max() - sizes.min() <= 1                # balanced within one sample
        assert sizes.sum() == min(b, n - s * b)              # the step is one global batch


@pytest.mark.parametrize("w", [1, 2, 3, 7])
def test_global_order_is_independent_of_world_size(w):
    n, b = 103, 16
    order = epoch_order(n, seed=5, epoch=2)
    parts = partition(n, seed=5, epoch=2, world_size=w, global_batch=b)
    for s in range(parts.shape[0]):
        step = np.concatenate([rank_steps(parts, r)[s] for r in range(w)])  # ranks in order
        assert np.array_equal(step, order[s * b:(s + 1) * b])


def test_pure_function_of_seed_and_epoch():
    a = partition(500, seed=1, epoch=4, world_size=3, global_batch=32)
    assert np.array_equal(a, partition(500, seed=1, epoch=4, world_size=3, global_batch=32))
    assert not np.array_equal(a, partition(500, seed=1, epoch=5, world_size=3, global_batch=32))
    assert not np.array_equal(a, partition(500, seed=2, epoch=4, world_size=3, global_batch=32))


def test_no_shuffle_keeps_sample_order():
    parts = partition(10, seed=9, epoch=9, world_size=1, global_batch=4, shuffle=False)
    assert np.array_equal(np.concatenate(rank_steps(parts, 0)), np.arange(10))


def test_last_step_may_leave_a_rank_empty():
    parts = partition(9, seed=0, epoch=0, world_size=4, global_batch=8)  # last step: 1 sample
    assert num_steps(9, 8) == 2
    assert [len(rank_steps(parts, r)[1]) for r in range(4)] == [1, 0, 0, 0]


@pytest.mark.parametrize("kwargs,message", [
    (dict(global_batch=0, world_size=1), "global_batch"),
    (dict(global_batch=4, world_size=0), "world_size"),
])
def test_bad_arguments_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        partition(10, seed=0, epoch=0, **kwargs)
