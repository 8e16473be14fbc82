"""Images/s of deepimage.predict against a plain loop that classifies the same files one by one.

    python -m deepimage.bench.predict --json     # in a folder where the default workflow has run

Both sides use the same checkpoints (the model.pt files held by the registered ensemble, loaded
with torch.load for the loop) and the same preprocessing. The loop decodes each image, runs each
model on it alone and averages the softmax posteriors; deepimage.predict sends batches to
--workers processes that each decode a batch and run one forward per model on it. Model loading
is outside both timings; each process runs --threads torch threads. Besides images/s (wall
clock), the CPU time per image of each side (its processes' user + system time) is reported: on
a machine shared with other jobs it varies far less than the wall clock. The last line with
--json is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch

from deepimage import tracking
from deepimage.data.augment import center_crop, normalize
from deepimage.data.decode import BadImage, decode_square
from deepimage.modelfile import load_checkpoint
from deepimage.registry.load import load_classifier
from deepimage.predict import DEFAULT_MODEL, classify, list_images


@torch.no_grad()
def plain_loop(checkpoints: list[str], stored_sizes: list[int], crops: list[int],
               files: list[str]) -> tuple[list[int], float, float]:
    """(top-1 index per decodable file, seconds, CPU seconds): one image and one model at a time,
    each decoded at its stored size and centre-cropped to the side the ensemble's member sees."""
    loaded = [load_checkpoint(p) for p in checkpoints]
    start, cpu, top1 = time.perf_counter(), time.process_time(), []
    for path in files:
        try:
            probs = []
            for (model, _), size, crop in zip(loaded, stored_sizes, crops):
                x = torch.from_numpy(decode_square(path, size)).permute(2, 0, 1)[None]   # (1, 3, S, S)
                x = normalize(center_crop(x, crop))                                    # (1, 3, c, c)
                probs.append(torch.softmax(model(x), dim=1))
            top1.append(int(torch.stack(probs).mean(dim=0).argmax()))
        except BadImage:
            continue
    return top1, time.perf_counter() - start, time.process_time() - cpu


def cpu_seconds() -> float:
    """User + system CPU time of this process and of its finished children (the pool workers)."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


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
    p.add_argument("--workers", type=int, default=2, help="processes of deepimage.predict")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process, both sides")
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
    ours, loop, ours_cpu, loop_cpu, agree = [], [], [], [], 0.0
    for _ in range(args.repeats):
        t0, c0 = time.perf_counter(), cpu_seconds()
        preds, _ = classify(ensemble, files, args.batch_size, args.workers, args.threads, desc="bench predict")
        ours.append(len(preds) / (time.perf_counter() - t0))
        ours_cpu.append((cpu_seconds() - c0) / len(preds))
        top1, seconds, cpu = plain_loop(ensemble.checkpoints, ensemble.stored_sizes,
                                        [m.crop for m in ensemble.members], files)
        loop.append(len(top1) / seconds)
        loop_cpu.append(cpu / len(top1))
        agree = float(np.mean([ensemble.classes.index(pr.top[0][0]) == t for pr, t in zip(preds, top1)]))
    result = {"images": len(preds), "models": len(ensemble.members), "batch_size": args.batch_size,
              "workers": args.workers, "threads": args.threads, "repeats": args.repeats,
              "predict_images_per_s": float(np.median(ours)), "loop_images_per_s": float(np.median(loop)),
              "speedup": float(np.median(ours) / np.median(loop)), "top1_agreement": agree,
              "predict_cpu_ms_per_image": 1e3 * float(np.median(ours_cpu)),
              "loop_cpu_ms_per_image": 1e3 * float(np.median(loop_cpu)),
              "predict_images_per_s_all": ours, "loop_images_per_s_all": loop,
              "cpu_count": os.cpu_count()}
    print(f"deepimage.predict {result['predict_images_per_s']:.1f} img/s, plain loop "
          f"{result['loop_images_per_s']:.1f} img/s: {result['speedup']:.2f}x (target >= 3x); "
          f"CPU {result['predict_cpu_ms_per_image']:.2f} vs {result['loop_cpu_ms_per_image']:.2f} ms/image; "
          f"top-1 agreement {agree:.3f}")
    if args.json:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
