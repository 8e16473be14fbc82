"""How a length is cut into nearly equal parts over ranks: the split FC layers' shards of
features, classes and batch rows (split_fc.py), and the butterfly's slices of each piece
(butterfly.py). Pure functions.

    from deepimage.parallel.even_split import partition_range, partition_sizes
    partition_sizes(13, 4)      # [4, 3, 3, 3]
    partition_range(13, 1, 4)   # (4, 7)
"""
from __future__ import annotations


def partition_sizes(n: int, size: int) -> list[int]:
    """Nearly equal parts of `n` over `size` ranks; the first `n % size` ranks get one more.

    Returns a list of `size` ints (length of each rank's part) that sums to n."""
    if size < 1:
        raise ValueError(f"number of ranks must be >= 1, got {size}")
    base, extra = divmod(n, size)
    return [base + (1 if r < extra else 0) for r in range(size)]


def partition_range(n: int, rank: int, size: int) -> tuple[int, int]:
    """[start, stop) of rank's part of `n` under partition_sizes."""
    if not 0 <= rank < size:
        raise ValueError(f"rank must be in [0, {size}), got {rank}")
    sizes = partition_sizes(n, size)
    start = sum(sizes[:rank])
    return start, start + sizes[rank]
