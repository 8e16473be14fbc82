"""Classify image files with a logged deepimage model: one CSV row per image.

    python -m deepimage.predict --model models:/deepimage-ensemble@champion photos/ cat.jpg \
        --out predictions.csv

--model takes `models:/<name>@<alias>` or `models:/<name>/<version>` (looked up in the registry
at --tracking-uri), `runs:/<run_id>/<name>`, or a local model folder. Folders are read
recursively (hidden files skipped); any file the shard stage decodes is accepted, the others are
skipped and listed with the reason. Images are decoded in a process pool and classified in
batches: one forward per batch per member model.
"""
from __future__ import annotations

import argparse
import csv
import multiprocessing as mp
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from deepimage import tracking
from deepimage.data.decode import BadImage
from deepimage.models import ENSEMBLE_NAME, CHAMPION, Ensemble, decode_views, load_classifier, stack_views
from deepimage.progress import progress

DEFAULT_MODEL = f"models:/{ENSEMBLE_NAME}@{CHAMPION}"
CSV_HEADER = ["path", "top1_class", "top1_prob", "top5"]


@dataclass
class Prediction:
    path: str
    top: list[tuple[str, float]]  # (class, probability), best first
    posteriors: np.ndarray        # (K,)

    def row(self) -> list[str]:
        return [self.path, self.top[0][0], f"{self.top[0][1]:.6f}",
                ";".join(f"{c}:{p:.6f}" for c, p in self.top)]


def list_images(paths: list[str]) -> list[str]:
    """Files as given, folders expanded recursively (sorted, hidden entries skipped)."""
    out = []
    for p in paths:
        path = Path(p)
        if path.is_file():
            out.append(str(path))
        elif path.is_dir():
            for dirpath, dirnames, filenames in os.walk(path):
                dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
                out += [str(Path(dirpath) / f) for f in sorted(filenames) if not f.startswith(".")]
        else:
            raise ValueError(f"{p}: no such file or folder")
    return out


_SIZES: list[int] = []


def _init_worker(sizes: list[int]) -> None:
    global _SIZES
    _SIZES = sizes
    torch.set_num_threads(1)


def _decode(path: str) -> tuple[str, list[np.ndarray] | None, str]:
    """(path, one view per member or None, reason it was skipped)."""
    try:
        return path, decode_views(path, _SIZES), ""
    except BadImage as e:
        return path, None, str(e)
    except OSError as e:  # unreadable file (permissions, vanished)
        return path, None, f"{type(e).__name__}: {e.strerror or e}"


def decoded(files: list[str], sizes: list[int], workers: int) -> Iterator[tuple[str, list | None, str]]:
    """_decode over files in input order, in a pool of `workers` processes (0: in this one)."""
    if workers <= 0:
        _init_worker(sizes)
        yield from map(_decode, files)
        return
    ctx = mp.get_context("fork" if sys.platform == "linux" else "spawn")
    with ctx.Pool(workers, initializer=_init_worker, initargs=(sizes,)) as pool:
        yield from pool.imap(_decode, files, chunksize=8)


def classify(ensemble: Ensemble, files: list[str], batch_size: int = 32, workers: int = 2,
             desc: str = "predict") -> tuple[list[Prediction], list[tuple[str, str]]]:
    """(predictions in input order, skipped (path, reason)) for every file."""
    preds, skipped, batch = [], [], []

    def flush():
        views = stack_views([v for _, v in batch], len(ensemble.members))   # M x (b, S_m, S_m, 3)
        probs = ensemble.posteriors(views)                                   # (b, K)
        preds.extend(Prediction(p, top, row) for (p, _), top, row in zip(batch, ensemble.top(probs), probs))
        batch.clear()

    for path, views, why in progress(decoded(files, ensemble.stored_sizes, workers), total=len(files),
                                     desc=desc, unit="img"):
        if views is None:
            skipped.append((path, why))
            continue
        batch.append((path, views))
        if len(batch) == batch_size:
            flush()
    if batch:
        flush()
    return preds, skipped


def write_csv(preds: list[Prediction], out: str | Path) -> None:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(CSV_HEADER)
        w.writerows(p.row() for p in preds)
    tmp.replace(out)


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("paths", nargs="+", help="image files or folders")
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"model URI or folder (default {DEFAULT_MODEL})")
    p.add_argument("--out", required=True, help="CSV: path, top1_class, top1_prob, top5")
    p.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI", tracking.DEFAULT_URI),
                   help="where models:/ and runs:/ URIs are looked up (default: $MLFLOW_TRACKING_URI "
                        "or config.yaml's mlflow.tracking_uri)")
    p.add_argument("--batch-size", type=int, default=32,
                   help="images per forward (32: measured best on CPU; larger batches leave the cache)")
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1),
                   help="decoding processes (0: decode in this process)")
    p.add_argument("--threads", type=int, default=1, help="torch threads for the forward passes")
    args = p.parse_args(argv)
    if args.batch_size < 1:
        p.error(f"--batch-size must be >= 1, got {args.batch_size}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    torch.set_num_threads(max(1, args.threads))
    try:
        files = list_images(args.paths)
        ensemble = load_classifier(args.model, args.tracking_uri)
        preds, skipped = classify(ensemble, files, args.batch_size, args.workers)
    except ValueError as e:
        sys.exit(f"predict: {e}")
    except Exception as e:  # MlflowException: unknown model name, alias, run or store
        if type(e).__name__ != "MlflowException":
            raise
        sys.exit(f"predict: cannot load {args.model} from {args.tracking_uri}: {e.message}")
    print(f"predict: {len(preds)} images classified, {len(skipped)} skipped (not decodable)"
          + (f" -> {args.out}" if preds else ""), file=sys.stderr)
    for path, why in skipped:
        print(f"  skipped {path}: {why}", file=sys.stderr)
    if not preds:
        sys.exit(f"predict: no image classified among {len(files)} file(s) under {' '.join(args.paths)}; "
                 "give image files (JPEG, PNG, TIFF, WebP, ...) or folders that hold them")
    write_csv(preds, args.out)


if __name__ == "__main__":
    main()
