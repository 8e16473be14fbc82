"""Classify image files with a logged deepimage model: one CSV row per image.

    python -m deepimage.predict --model models:/deepimage-ensemble@champion photos/ cat.jpg \
        --out predictions.csv

--model takes `models:/<name>@<alias>` or `models:/<name>/<version>` (looked up in the registry
at --tracking-uri), `runs:/<run_id>/<name>`, or a local model folder. Folders are read
recursively (hidden files skipped); any file the shard stage decodes is accepted, the others
(a format not accepted, over the pixel or file-size limit, not a regular file) are skipped and
listed with the reason; no file is read before its size is checked. Files go in batches to a
pool of processes (one per core), each of which decodes a whole batch and runs one forward per
member model on it. The CSV keeps any file name: csv quoting, and a name that is not UTF-8
keeps its bytes (read it with encoding="utf-8", errors="surrogateescape").
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
from deepimage.cli import prog
from deepimage.data.decode import BadImage, open_file
from deepimage.redact import redact
from deepimage.registry import CHAMPION, ensemble_name
from deepimage.registry.classifier import Ensemble, decode_views
from deepimage.registry.load import load_classifier
from deepimage.progress import progress

DEFAULT_MODEL = f"models:/{ensemble_name(tracking.DEFAULT_EXPERIMENT)}@{CHAMPION}"   # the default experiment's
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


# One worker's ensemble: inherited from the parent when the pool forks (not pickled).
_ENSEMBLE: Ensemble | None = None


def _init_worker(ensemble: Ensemble, threads: int) -> None:
    global _ENSEMBLE
    _ENSEMBLE = ensemble
    torch.set_num_threads(threads)


def _worker_batch(files: list[str]):
    return classify_batch(_ENSEMBLE, files)


def _decode(path: str, sizes: list[int]) -> tuple[list[np.ndarray] | None, str]:
    """(one view per member, or None and the reason the file is skipped)."""
    try:
        with open_file(path) as f:             # a regular file within the size limit, or BadImage
            data = f.read()
        return decode_views(data, sizes), ""
    except BadImage as e:
        return None, str(e)
    except OSError as e:  # unreadable file (permissions, vanished)
        return None, f"{type(e).__name__}: {e.strerror or e}"


def classify_batch(ensemble: Ensemble, files: list[str]) -> tuple[list[str], np.ndarray, list[tuple[str, str]]]:
    """(decoded paths, their averaged posteriors (n, K), skipped (path, reason)): decode every
    file of one batch, then one forward per member for all of them."""
    sizes = ensemble.stored_sizes
    views = [np.empty((len(files), s, s, 3), np.uint8) for s in sizes]   # M x (B, S_m, S_m, 3)
    done, skipped = [], []
    for path in files:
        decoded, why = _decode(path, sizes)
        if decoded is None:
            skipped.append((path, why))
            continue
        for batch, view in zip(views, decoded):
            batch[len(done)] = view
        done.append(path)
    if not done:
        return [], np.empty((0, len(ensemble.classes)), np.float32), skipped
    return done, ensemble.posteriors([v[:len(done)] for v in views]), skipped   # (n, K)


def classified_batches(ensemble: Ensemble, files: list[str], batch_size: int, workers: int,
                      threads: int) -> Iterator[tuple[list[str], np.ndarray, list[tuple[str, str]]]]:
    """classify_batch over consecutive batches of files, in input order: in `workers` processes
    that each decode and classify whole batches (0 or 1, or a single batch: in this process)."""
    batches = [files[i:i + batch_size] for i in range(0, len(files), batch_size)]
    workers = min(workers, len(batches))
    if workers <= 1:
        yield from (classify_batch(ensemble, batch) for batch in batches)
        return
    # Decode and forward both in the workers, one thread each: on CPU every core then runs the
    # whole pipeline, and only paths and posteriors cross between processes (not pixels).
    ctx = mp.get_context("fork" if sys.platform == "linux" else "spawn")
    pool = ctx.Pool(workers, initializer=_init_worker, initargs=(ensemble, threads))
    try:
        yield from pool.imap(_worker_batch, batches)   # every batch queued at once: no worker waits
    finally:
        pool.terminate()  # idle by now, or the caller stopped early
        pool.join()


def classify(ensemble: Ensemble, files: list[str], batch_size: int = 32, workers: int = 2,
             threads: int = 1, desc: str = "predict") -> tuple[list[Prediction], list[tuple[str, str]]]:
    """(predictions in input order, skipped (path, reason)) for every file."""
    preds, skipped = [], []
    with progress(total=len(files), desc=desc, unit="img") as bar:
        for paths, probs, bad in classified_batches(ensemble, files, batch_size, workers, threads):
            preds += [Prediction(p, top, row) for p, top, row in zip(paths, ensemble.top(probs), probs)]
            skipped += bad
            bar.update(len(paths) + len(bad))
    return preds, skipped


def write_csv(preds: list[Prediction], out: str | Path) -> None:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    with open(tmp, "w", newline="", encoding="utf-8", errors="surrogateescape") as f:
        w = csv.writer(f)
        w.writerow(CSV_HEADER)
        w.writerows(p.row() for p in preds)
    tmp.replace(out)


def parse(argv):
    p = argparse.ArgumentParser(prog=prog("deepimage.predict"), description=__doc__.splitlines()[0])
    p.add_argument("paths", nargs="+", help="image files or folders")
    p.add_argument("--model", default=None, help="model URI or folder (default: models:/<experiment>-"
                   f"ensemble@champion, {DEFAULT_MODEL} for config.yaml's experiment)")
    p.add_argument("--experiment", default=os.environ.get("MLFLOW_EXPERIMENT_NAME", tracking.DEFAULT_EXPERIMENT),
                   help="the experiment whose champion is the default model (default: $MLFLOW_EXPERIMENT_NAME "
                        "or config.yaml's mlflow.experiment)")
    p.add_argument("--out", required=True, help="CSV: path, top1_class, top1_prob, top5")
    p.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI", tracking.DEFAULT_URI),
                   help="where models:/ and runs:/ URIs are looked up (default: $MLFLOW_TRACKING_URI "
                        "or config.yaml's mlflow.tracking_uri)")
    p.add_argument("--batch-size", type=int, default=32,
                   help="images per forward (on CPU, 8 to 128 cost about the same per image; "
                        "smaller batches spread a few images over more processes)")
    p.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)),
                   help="processes that decode and classify batches (default: one per available core; "
                        "0: in this process)")
    p.add_argument("--threads", type=int, default=1, help="torch threads of each process")
    args = p.parse_args(argv)
    if args.batch_size < 1:
        p.error(f"--batch-size must be >= 1, got {args.batch_size}")
    args.model = args.model or f"models:/{ensemble_name(args.experiment)}@{CHAMPION}"
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    torch.set_num_threads(max(1, args.threads))
    try:
        files = list_images(args.paths)
        ensemble = load_classifier(args.model, args.tracking_uri)
        preds, skipped = classify(ensemble, files, args.batch_size, args.workers, args.threads)
    except ValueError as e:
        sys.exit(f"predict: {e}")
    except Exception as e:  # MlflowException: unknown model name, alias, run or store
        if type(e).__name__ != "MlflowException":
            raise
        sys.exit(f"predict: cannot load {args.model} from {redact(args.tracking_uri)}: {redact(e.message)}")
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
