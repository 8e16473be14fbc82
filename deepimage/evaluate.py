"""Evaluate one resolution's model on val: softmax posteriors (saved) and top-1 / top-5 error.

    python -m deepimage.evaluate --model results/train/64/model.pt \
        --val-shards results/shards/64/val --out results/evaluate/64 \
        --config-json '{"evaluate": {"batch_size": 256, "view": "whole"}}'

evaluate.view is what the model sees: the whole stored image (whole) or the centre crop at its
training resolution (centre). posteriors.npz records the side it saw (`crop`), and the ensemble
registers each member with that preprocessing, so predict and serving see what was evaluated.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

from deepimage import config, tracking
from deepimage.data.loader import ArrowLoader
from deepimage.data.manifest import load_manifest
from deepimage.io import write_json
from deepimage.metrics import topk_error
from deepimage.modelfile import load_checkpoint
from deepimage.per_class import write_per_class
from deepimage.progress import progress


VIEWS = ("whole", "centre")  # evaluate.view


@torch.no_grad()
def posteriors(model: torch.nn.Module, loader: ArrowLoader) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Softmax over classes for every val sample: probs (N, K), labels (N,), sample_ids (N,)."""
    probs, labels, ids = [], [], []
    for images, y, sid in progress(loader, desc="evaluate", unit="batch"):
        probs.append(torch.softmax(model(images), dim=1).numpy())  # (b, K)
        labels.append(y.numpy())
        ids.append(sid.numpy())
    return np.concatenate(probs), np.concatenate(labels), np.concatenate(ids)


def view_crop(view: str, resolution: int, stored_size: int) -> int:
    """The side of the centred square a model sees at test time under evaluate.view."""
    if view not in VIEWS:
        raise ValueError(f"evaluate.view {view!r}: need one of {', '.join(VIEWS)}")
    return stored_size if view == "whole" else resolution


def evaluate(model_path: str, val_shards: str, batch_size: int, view: str) -> tuple[dict, dict]:
    """(arrays to save, metrics) for one checkpoint on one set of val shards, seen as `view`."""
    model, ckpt = load_checkpoint(model_path)
    crop = view_crop(view, int(ckpt["resolution"]), load_manifest(val_shards).stored_size)
    loader = ArrowLoader(val_shards, batch_size=batch_size, rank=0, world_size=1, seed=0,
                         train=False, augment=None, crop=crop, verify=True)
    if list(loader.classes) != list(ckpt["classes"]):
        raise ValueError(f"{val_shards}: class names differ from those {model_path} was trained on")
    start = time.perf_counter()
    probs, labels, ids = posteriors(model, loader)
    seconds = time.perf_counter() - start
    metrics = {"top1_error": topk_error(probs, labels, 1), "top5_error": topk_error(probs, labels, 5),
               "samples": int(len(labels)), "images_per_s": len(labels) / seconds,
               "resolution": int(ckpt["resolution"]), "view": view, "crop": crop}
    arrays = {"probs": probs.astype(np.float32), "labels": labels, "sample_ids": ids,
              "classes": np.array(ckpt["classes"]), "resolution": np.array(ckpt["resolution"]),
              "crop": np.array(crop)}
    return arrays, metrics


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--val-shards", required=True)
    config.add_argument(p, "evaluate")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", required=True, help="folder for posteriors.npz and metrics.json")
    tracking.add_args(p)
    args = p.parse_args(argv)
    torch.set_num_threads(max(1, args.threads))
    try:
        cfg = config.from_args(args).evaluate
        params = {"model": args.model, "val_shards": args.val_shards, "evaluate": cfg}
        with tracking.stage_run(args, "evaluate", params) as run:
            run.log_dataset(str(args.val_shards), "evaluation")
            arrays, metrics = evaluate(args.model, args.val_shards, cfg.batch_size, cfg.view)
            out = Path(args.out)
            out.mkdir(parents=True, exist_ok=True)
            np.savez(out / ".posteriors.tmp.npz", **arrays)
            (out / ".posteriors.tmp.npz").replace(out / "posteriors.npz")
            write_json(out / "metrics.json", metrics)
            for f in write_per_class(arrays["probs"], arrays["labels"], list(arrays["classes"]), out,
                                     f"{metrics['resolution']} px model, validation"):
                run.log_artifact(f, "per_class")  # per_class.tsv, confusion.png
            run.log_metrics({k: v for k, v in metrics.items() if k not in ("resolution", "view")})
            run.set_tag("deepimage.resolution", str(metrics["resolution"]))
    except ValueError as e:
        sys.exit(f"evaluate: {e}")
    print(f"evaluate: {metrics}")


if __name__ == "__main__":
    main()
