"""Plots a stage draws of its own output (matplotlib, Agg backend, imported when drawing)."""
from __future__ import annotations

from pathlib import Path


def scaling_plot(sc: dict, path: Path) -> Path:
    """Training throughput against the worker count with the linear ideal (left), and scaling
    efficiency per worker count (right), from the scaling stage's scaling.json."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    nps = [r["np"] for r in sc["rows"]]
    fig, ax = plt.subplots(1, 2, figsize=(9, 3.5))
    ax[0].plot(nps, [r["images_per_s"] for r in sc["rows"]], marker="o", label="measured")
    ax[0].plot(nps, [sc["rows"][0]["images_per_s"] * n / nps[0] for n in nps], "--", label="linear")
    ax[0].set(xlabel="workers", ylabel="images/s", title="Training throughput", xticks=nps)
    ax[1].bar([str(n) for n in nps], [100 * r["efficiency"] for r in sc["rows"]])
    ax[1].set(xlabel="workers", ylabel="scaling efficiency (%)", ylim=(0, 110), title="Scaling efficiency")
    ax[0].legend(), ax[0].grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
