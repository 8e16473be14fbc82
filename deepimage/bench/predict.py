"""Images/s of deepimage.predict against a plain loop that classifies the same files one by one.

    python -m deepimage.bench.predict --json     # in a folder where the default workflow has run

Both sides use the same checkpoints (the model.pt files held by the registered ensemble, loaded
with torch.load for the loop) and the same preprocessing. The loop decodes each image, runs each
model on it alone and averages the softmax posteriors; deepimage.predict decodes in a process
pool and runs one forward per batch per model. Model loading is outside both timings; the same
torch thread count is used by both. The last line with --json is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from deepimage import tracking
from deepimage.data.augment import center_crop, normalize
from deepimage.data.decode import BadImage, decode_square
from deepimage.metrics import load_checkpoint
from deepimage.models import load_classifier
from deepimage.predict import DEFAULT_MODEL, classify, list_images


@torch.no_grad()
def plain_loop(checkpoints: list[str], stored_sizes: list[int], files: list[str]) -> tuple[list[int], float]:
    """(top-1 index per decodable file, seconds): one image and one model at a time."""
    loaded = [load_checkpoint(p) for p in checkpoints]
    start, top1 = time.perf_counter(), []
    for path in files:
        try:
            probs = []
            for (model, ckpt), size in zip(loaded, stored_sizes):
                x = torch.from_numpy(decode_square(path, size)).permute(2, 0, 1)[None]   # (1, 3, S, S)
                x = normalize(center_crop(x, ckpt["resolution"]))                      # (1, 3, r, r)
                probs.append(torch.softmax(model(x), dim=1))
            top1.append(int(torch.stack(probs).mean(dim=0).argmax()))
        except BadImage:
            continue
    return top1, time.perf_counter() - start


def default_images() -> str:
    """The default run's validation folder (results/dataset/source.json)."""
    source = Path("results/dataset/source.json")
    if not source.is_file():
        raise ValueError(f"{source} not found: run the workflow here first, or pass --images")
    return str(Path(json.loads(source.read_text())["root"]) / "val")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI", tracking.DEFAULT_URI))
    p.add_argument("--images", nargs="+", default=None, help="files or folders (default: the run's val set)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=2, help="decoding processes of deepimage.predict")
    p.add_argument("--threads", type=int, default=1, help="torch threads, both sides")
    p.add_argument("--repeats", type=int, default=3, help="median of this many passes per side")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    try:
        files = list_images(args.images or [default_images()])
        ensemble = load_classifier(args.model, args.tracking_uri)
    except ValueError as e:
        sys.exit(f"bench.predict: {e}")
    if not ensemble.checkpoints:
        sys.exit(f"bench.predict: {args.model} is not an ensemble pyfunc (no checkpoints to loop over)")
    ours, loop, agree = [], [], 0.0
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        preds, _ = classify(ensemble, files, args.batch_size, args.workers, desc="bench predict")
        ours.append(len(preds) / (time.perf_counter() - t0))
        top1, seconds = plain_loop(ensemble.checkpoints, ensemble.stored_sizes, files)
        loop.append(len(top1) / seconds)
        agree = float(np.mean([ensemble.classes.index(pr.top[0][0]) == t for pr, t in zip(preds, top1)]))
    result = {"images": len(preds), "models": len(ensemble.members), "batch_size": args.batch_size,
              "workers": args.workers, "threads": args.threads, "repeats": args.repeats,
              "predict_images_per_s": float(np.median(ours)), "loop_images_per_s": float(np.median(loop)),
              "speedup": float(np.median(ours) / np.median(loop)), "top1_agreement": agree,
              "cpu_count": os.cpu_count()}
    print(f"deepimage.predict {result['predict_images_per_s']:.1f} img/s, plain loop "
          f"{result['loop_images_per_s']:.1f} img/s: {result['speedup']:.2f}x (target >= 3x); "
          f"top-1 agreement {agree:.3f}")
    if args.json:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
