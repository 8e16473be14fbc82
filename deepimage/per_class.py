"""Per-class top-1 / top-5 error table and confusion-matrix plot of one set of posteriors.

    write_per_class(probs, labels, classes, "results/evaluate/64")   # per_class.tsv, confusion.png

Used by deepimage.evaluate (each resolution) and deepimage.ensemble (the averaged posteriors).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from deepimage.tsv import tsv_bytes

TSV_HEADER = "class\tsamples\ttop1_error\ttop5_error\tmost_confused_with"


def confusion(probs: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Counts (K, K): row = true class, column = top-1 prediction. probs (N, K), labels (N,)."""
    pred = probs.argmax(axis=1)                                    # (N,)
    m = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(m, (labels, pred), 1)
    return m


def per_class_rows(probs: np.ndarray, labels: np.ndarray, classes: list[str]) -> list[dict]:
    """One dict per class: samples, top-1 and top-5 error, the class it is most often taken for."""
    k5 = min(5, probs.shape[1])
    top5 = np.argsort(-probs, axis=1)[:, :k5]                     # (N, 5), best first
    hit1 = top5[:, 0] == labels
    hit5 = (top5 == labels[:, None]).any(axis=1)
    cm = confusion(probs, labels, len(classes))
    rows = []
    for c, name in enumerate(classes):
        mask = labels == c
        n = int(mask.sum())
        off = cm[c].copy()
        off[c] = 0
        rows.append({"class": name, "samples": n,
                     "top1_error": float(1 - hit1[mask].mean()) if n else float("nan"),
                     "top5_error": float(1 - hit5[mask].mean()) if n else float("nan"),
                     "most_confused_with": classes[int(off.argmax())] if off.any() else ""})
    return rows


def write_tsv(rows: list[dict], path: Path) -> None:
    """per_class.tsv: any class name round-trips through deepimage.tsv.read_tsv."""
    path.write_bytes(tsv_bytes(TSV_HEADER.split("\t"), (
        [r["class"], r["samples"], f"{r['top1_error']:.6f}", f"{r['top5_error']:.6f}",
         r["most_confused_with"]] for r in rows)))


def plot_confusion(cm: np.ndarray, classes: list[str], title: str, path: Path) -> None:
    """Row-normalised confusion matrix as a heat map (counts written in the cells when few)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rates = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)     # (K, K), rows sum to 1
    side = max(4.0, 0.4 * len(classes) + 2)
    fig, ax = plt.subplots(figsize=(side, side))
    im = ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(classes)), classes, rotation=90, fontsize=7)
    ax.set_yticks(range(len(classes)), classes, fontsize=7)
    ax.set_xlabel("predicted (top-1)")
    ax.set_ylabel("true class")
    ax.set_title(title)
    if len(classes) <= 30:
        for i, j in zip(*np.nonzero(cm)):
            ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=6,
                    color="white" if rates[i, j] > 0.5 else "black")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_per_class(probs: np.ndarray, labels: np.ndarray, classes: list[str], out_dir: str | Path,
                    title: str) -> tuple[Path, Path]:
    """per_class.tsv and confusion.png in out_dir; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tsv, png = out / "per_class.tsv", out / "confusion.png"
    write_tsv(per_class_rows(probs, labels, list(classes)), tsv)
    plot_confusion(confusion(probs, labels, len(classes)), list(classes), title, png)
    return tsv, png
