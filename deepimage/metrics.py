"""Top-k error, the metric train, evaluate, ensemble and robustness report."""
from __future__ import annotations

import numpy as np


def topk_error(probs: np.ndarray, labels: np.ndarray, k: int) -> float:
    """Fraction of rows whose label is not among the k highest scores. probs (N, K), labels (N,)."""
    if len(labels) == 0:
        raise ValueError("topk_error: no samples")
    k = min(k, probs.shape[1])
    topk = np.argpartition(-probs, k - 1, axis=1)[:, :k]  # (N, k), unordered
    return float(1.0 - (topk == labels[:, None]).any(axis=1).mean())
