"""Robustness to the trained transformations: top-1 / top-5 error of each model and the ensemble
on val under each transformation family at graded strengths (the paper's last claim).

    python -m deepimage.robustness --models results/train/32/model.pt results/train/64/model.pt \
        --ablation results/train/32-noaug/model.pt --shards results/shards \
        --config-json '{"seed": 0, "robustness": {"strengths": {"rotation": [0, 15, 30, 45]}}}' \
        --out results/robustness

Writes <out>/robustness.json and <out>/robustness.png. Each model sees the centre crop of its own
resolution's val shards with one family applied at one strength (deepimage.data.augment's
graded_batch: the training augmentations' own code). A sample's signs and crop position depend on
(seed, family, sample id) only, so every resolution sees the same transformation of the same
image and the ensemble averages posteriors of the same view. --ablation models (trained with
train.augment all off) are evaluated alike and kept out of the ensemble.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from deepimage import config, tracking
from deepimage.data.augment import GRADED, check_strength, graded_batch, normalize
from deepimage.data.loader import ArrowLoader
from deepimage.ensemble import align
from deepimage.io import write_json
from deepimage.metrics import topk_error
from deepimage.modelfile import load_checkpoint

ENSEMBLE = "ensemble"


@dataclass
class Member:
    """One checkpoint and the val shards of its resolution."""

    name: str              # its folder under results/train: "32", "32-noaug"
    model: torch.nn.Module
    resolution: int
    augmented: bool        # trained with any augmentation on (read from the checkpoint)
    loader: ArrowLoader


def load_member(path: str, shards_root: str, batch_size: int) -> Member:
    """A checkpoint (loaded as deepimage.evaluate loads it) with its val loader."""
    model, ckpt = load_checkpoint(path)
    res = int(ckpt["resolution"])
    val = Path(shards_root) / str(res) / "val"
    loader = ArrowLoader(val, batch_size=batch_size, rank=0, world_size=1, seed=0, train=False,
                         augment=None, crop=res, verify=True)
    if list(loader.classes) != list(ckpt["classes"]):
        raise ValueError(f"{val}: class names differ from those {path} was trained on")
    aug = (ckpt.get("train") or {}).get("augment", {})
    augmented = any(bool(v) for v in aug.values()) if aug else True  # absent: trained with defaults
    return Member(Path(path).parent.name, model, res, augmented, loader)


@torch.no_grad()
def posteriors(m: Member, family: str, strength: float, seed: int) -> dict:
    """Softmax over classes of every val sample under one family at one strength:
    {"probs": (N, K), "labels": (N,), "sample_ids": (N,), "classes": (K,)}."""
    probs, labels, ids = [], [], []
    for rows in m.loader.steps(0):                                        # val order, unshuffled
        pixels = torch.from_numpy(m.loader.store.images(rows)).permute(0, 3, 1, 2)  # (b, 3, S, S)
        sid = m.loader.store.sample_ids[rows]
        x = normalize(graded_batch(pixels, sid, family, strength, seed, m.resolution))  # (b, 3, r, r)
        probs.append(torch.softmax(m.model(x.contiguous()), dim=1).numpy())  # (b, K)
        labels.append(m.loader.store.labels[rows])
        ids.append(sid)
    return {"probs": np.concatenate(probs), "labels": np.concatenate(labels),
            "sample_ids": np.concatenate(ids), "classes": np.array(m.loader.classes)}


def errors(probs: np.ndarray, labels: np.ndarray) -> dict:
    return {"top1_error": topk_error(probs, labels, 1), "top5_error": topk_error(probs, labels, 5)}


def condition_errors(members: list[Member], family: str, strength: float, seed: int) -> dict:
    """{member name or "ensemble": {top1_error, top5_error}} for one family at one strength."""
    runs = {m.name: posteriors(m, family, strength, seed) for m in members}
    out = {name: errors(r["probs"], r["labels"]) for name, r in runs.items()}
    ens = {m.name: runs[m.name] for m in members if m.augmented}
    if ens:
        _, labels, probs = align(ens)
        out[ENSEMBLE] = errors(np.mean(np.stack(list(probs.values())), axis=0), labels)  # (N, K)
    return out


def check_strengths(strengths: dict) -> dict[str, list[float]]:
    """Sorted strengths per family; an unknown family or a bad strength names the key."""
    if not strengths:
        raise ValueError("robustness.strengths is empty: give at least one family, e.g. "
                         "{rotation: [0, 15, 30, 45]}")
    for family, values in strengths.items():
        if not isinstance(values, list) or not values:
            raise ValueError(f"robustness.strengths.{family}: need a non-empty list, got {values!r}")
        for s in values:
            check_strength(family, s)
    return {f: sorted(float(s) for s in strengths[f]) for f in GRADED if f in strengths}


def robustness(members: list[Member], strengths: dict, seed: int) -> dict:
    """Errors of every member and the ensemble per family per strength, plus a summary."""
    strengths = check_strengths(strengths)
    clean = condition_errors(members, next(iter(strengths)), 0.0, seed)  # strength 0: centre crop
    names = [m.name for m in members] + ([ENSEMBLE] if any(m.augmented for m in members) else [])
    table = {n: {} for n in names}
    for family, values in strengths.items():
        for s in values:
            per = clean if s == 0 else condition_errors(members, family, s, seed)
            for n in names:
                table[n].setdefault(family, []).append({"strength": s, **per[n]})
    return {"seed": seed, "samples": int(members[0].loader.num_samples),
            "strengths": strengths, "units": {f: GRADED[f][0] for f in strengths},
            "models": {m.name: {"resolution": m.resolution, "augmented": m.augmented} for m in members},
            "ensemble_of": [m.name for m in members if m.augmented],
            "clean": {n: clean[n] for n in names}, "errors": table,
            "summary": summarize(table, {n: clean[n] for n in names})}


def summarize(table: dict, clean: dict) -> dict:
    """Per member and family: mean and worst top-1 error over the non-zero strengths, and the
    mean's increase over the clean (centre-crop) error."""
    out = {}
    for name, fams in table.items():
        for family, rows in fams.items():
            hard = [r["top1_error"] for r in rows if r["strength"] > 0] or [clean[name]["top1_error"]]
            mean = float(np.mean(hard))
            out.setdefault(name, {})[family] = {"mean_top1_error": mean, "worst_top1_error": max(hard),
                                                "top1_increase": mean - clean[name]["top1_error"]}
    return out


def metrics(result: dict) -> dict[str, float]:
    """The figures of robustness.json as flat MLflow metric keys, e.g. top1_error/32/rotation/45."""
    out = {}
    for name, fams in result["errors"].items():
        for family, rows in fams.items():
            for r in rows:
                for k in ("top1_error", "top5_error"):
                    out[f"{k}/{name}/{family}/{r['strength']:g}"] = r[k]
            out[f"top1_increase/{name}/{family}"] = result["summary"][name][family]["top1_increase"]
    return out


def plot(result: dict, path: Path) -> Path:
    """Top-1 error against strength, one panel per family, one line per model and the ensemble;
    augmented models solid, models trained without augmentation dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fams = families(result)
    cols = min(3, len(fams))
    rows = -(-len(fams) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.3 * rows), squeeze=False)
    for ax, family in zip(axes.flat, fams):
        for name in columns(result):
            per, aug = result["errors"][name], result["models"].get(name, {}).get("augmented", True)
            ax.plot([r["strength"] for r in per[family]], [100 * r["top1_error"] for r in per[family]],
                    "-" if aug else "--", marker="o", lw=2.5 if name == ENSEMBLE else 1.5,
                    color="black" if name == ENSEMBLE else None, label=label(result, name))
        ax.set(title=family, xlabel=GRADED[family][0], ylabel="top-1 error (%)", ylim=(0, 100))
        ax.xaxis.label.set_size(7)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(fams):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def families(result: dict) -> list[str]:
    """The result's families in GRADED order (robustness.json stores its keys sorted)."""
    return [f for f in GRADED if f in result["strengths"]]


def columns(result: dict) -> list[str]:
    """Augmented models by resolution, the ensemble, then the models trained without augmentation."""
    models = result["models"]
    key = lambda n: (not models[n]["augmented"], models[n]["resolution"], n)
    names = sorted(models, key=key)
    aug = [n for n in names if models[n]["augmented"]]
    return aug + ([ENSEMBLE] if ENSEMBLE in result["errors"] else []) + names[len(aug):]


def label(result: dict, name: str) -> str:
    if name == ENSEMBLE:
        return "ensemble"
    m = result["models"][name]
    return f"{m['resolution']} px" + ("" if m["augmented"] else ", no augmentation")


def pct(x: float) -> str:
    return f"{100 * x:.1f} %"


def report_section(result: dict, plot_rel: str) -> str:
    """The report's robustness section in Markdown: a summary table, the full table, the plot."""
    names = columns(result)
    head = "| " + " | ".join(label(result, n) for n in names) + " |"
    sep = "| --- " * (len(names) + 1) + "|"
    lines = ["## Robustness to the trained transformations", "",
             f"Top-1 error on the {result['samples']} validation images under each transformation "
             f"at graded strengths (seed {result['seed']}); strength 0 is the plain centre crop. "
             "Models marked 'no augmentation' were trained with train.augment all off.", "",
             "Mean top-1 error over the non-zero strengths, and its increase over the clean error:", "",
             "| family " + head, sep,
             "| clean | " + " | ".join(pct(result["clean"][n]["top1_error"]) for n in names) + " |"]
    for family in families(result):
        cells = [f"{pct(s['mean_top1_error'])} ({100 * s['top1_increase']:+.1f})"
                 for s in (result["summary"][n][family] for n in names)]
        lines.append(f"| {family} | " + " | ".join(cells) + " |")
    lines += ["", "Every strength (top-1 / top-5 error):", "", "| family | strength " + head,
              "| --- " * (len(names) + 2) + "|"]
    for family in families(result):
        for i, s in enumerate(result["strengths"][family]):
            cells = [f"{pct(r['top1_error'])} / {pct(r['top5_error'])}"
                     for r in (result["errors"][n][family][i] for n in names)]
            lines.append(f"| {family} | {s:g} | " + " | ".join(cells) + " |")
    units = "; ".join(f"{f}: {result['units'][f]}" for f in families(result))
    return "\n".join(lines + ["", f"Strengths: {units}.", "", f"![robustness]({plot_rel})", ""])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", required=True, help="model.pt of each augmented model")
    p.add_argument("--ablation", nargs="*", default=[], help="model.pt trained without augmentation")
    p.add_argument("--shards", required=True, help="root of <res>/val shards (results/shards)")
    config.add_argument(p, "seed, evaluate (batch_size) and robustness (strengths)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", required=True, help="folder for robustness.json and robustness.png")
    tracking.add_args(p)
    args = p.parse_args(argv)
    torch.set_num_threads(max(1, args.threads))
    try:
        cfg = config.from_args(args)
        strengths = cfg.robustness.strengths.to_dict()
        params = {"models": args.models, "ablation": args.ablation, "seed": cfg.seed,
                  "robustness": cfg.robustness, "evaluate": cfg.evaluate}
        with tracking.stage_run(args, "robustness", params) as run:
            members = [load_member(m, args.shards, cfg.evaluate.batch_size)
                       for m in args.models + args.ablation]
            result = robustness(members, strengths, cfg.seed)
            out = Path(args.out)
            write_json(out / "robustness.json", result)
            plot(result, out / "robustness.png")
            run.log_metrics(metrics(result))
            for f in ("robustness.json", "robustness.png"):
                run.log_artifact(out / f)
    except (ValueError, OSError) as e:  # ConfigError is a ValueError
        sys.exit(f"robustness: {e}")
    print(f"robustness: wrote {args.out}/robustness.json")


if __name__ == "__main__":
    main()
