"""The data plane: source layout checks, Arrow shards and their manifest, the sample partition
across ranks, the paper's augmentations, and the loader that ties them together.

    from deepimage.data.loader import ArrowLoader
    from deepimage.data.augment import AugmentConfig
"""
from deepimage.data.layout import DataError

__all__ = ["DataError"]
