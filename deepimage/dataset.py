"""Dataset stage: generate the built-in dataset, or check a user's ImageNet-layout folder.

    python -m deepimage.dataset --out results/dataset --threads 2 \
        --config-json '{"seed": 0, "dataset": {"source": "synthetic", "synthetic": {"classes": 12}}}'
    python -m deepimage.dataset --out results/dataset --config-json '{"dataset": {"source": "/data/imagenet"}}'

The config sections seed and dataset (what the rule passes; keys left out: the schema's defaults).

Writes <out>/source.json: {"source", "root", "classes", "counts": {"train", "val"}, "params"}.
A user's folder is not copied, only checked: train/ and val/ exist with the same class folders,
none of them empty. Synthetic images go to <out>/synthetic/{train,val}/<class>/<id>.jpg.
"""
from __future__ import annotations

import argparse
import os
import shutil
import time
from pathlib import Path

from deepimage import config, synthetic, tracking
from deepimage.config import Config
from deepimage.data.layout import DataError, check_layout
from deepimage.io import write_json

SOURCE_JSON = "source.json"


def build_synthetic(out: Path, spec: synthetic.SyntheticSpec, threads: int) -> dict:
    """Generate the synthetic images under out/synthetic and describe them."""
    root = out / "synthetic"
    if root.exists():
        shutil.rmtree(root)          # ours alone: a rerun must not keep images of an older spec
    synthetic.generate(spec, root, threads=threads)
    classes, counts = check_layout(root)
    if classes != synthetic.class_names(spec.classes):
        raise DataError(f"{root}: generated classes {classes} differ from the spec")
    params = {"seed": spec.seed, "classes": spec.classes, "train_per_class": spec.train_per_class,
              "val_per_class": spec.val_per_class, "image_size": spec.image_size,
              "jpeg_quality": synthetic.JPEG_QUALITY}
    return {"source": "synthetic", "root": str(root.resolve()), "classes": classes,
            "counts": counts, "params": params}


def describe_folder(path: str) -> dict:
    """Check a user's ImageNet-layout folder and describe it (nothing is copied)."""
    classes, counts = check_layout(path)
    return {"source": path, "root": str(Path(path).resolve()), "classes": classes,
            "counts": counts, "params": {}}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="output folder (source.json goes here)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    config.add_argument(p, "seed and dataset")
    tracking.add_args(p)
    return p.parse_args(argv)


def run(args: argparse.Namespace, cfg: Config) -> dict:
    """Build or check the source, log it to MLflow, write source.json; returns its content."""
    out, source = Path(args.out), cfg.dataset.source
    out.mkdir(parents=True, exist_ok=True)
    params = {"dataset": cfg.dataset, "threads": args.threads}
    if source == "synthetic":
        syn = cfg.dataset.synthetic
        spec = synthetic.SyntheticSpec(seed=cfg.seed, classes=syn.classes,
                                       train_per_class=syn.train_per_class,
                                       val_per_class=syn.val_per_class, image_size=syn.image_size)
        params["seed"] = cfg.seed
    else:
        describe_folder(source)    # fail on a bad layout before opening an MLflow run
    with tracking.stage_run(args, stage="dataset", params=params) as mlrun:
        t0 = time.perf_counter()
        if source == "synthetic":
            desc = build_synthetic(out, spec, args.threads)
        else:
            desc = describe_folder(source)
        seconds = time.perf_counter() - t0
        write_json(out / SOURCE_JSON, desc)
        n = sum(desc["counts"].values())
        metrics = {"train_images": desc["counts"]["train"], "val_images": desc["counts"]["val"],
                   "classes": len(desc["classes"]), "seconds": seconds}
        if source == "synthetic":
            metrics["images_per_s"] = n / max(seconds, 1e-9)
        mlrun.log_metrics(metrics)
        mlrun.log_artifact(out / SOURCE_JSON)
    return desc


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        desc = run(args, config.from_args(args))
    except (DataError, ValueError, OSError) as e:
        raise SystemExit(f"dataset: error: {e}")
    print(f"dataset: {desc['source']}: {len(desc['classes'])} classes, "
          f"{desc['counts']['train']} train / {desc['counts']['val']} val images -> "
          f"{Path(args.out) / SOURCE_JSON}")


if __name__ == "__main__":
    main()
