"""Loader benchmark: Arrow shards vs reading the ImageNet-layout folder with PIL.

    python -m deepimage.bench.loader [--json] [--images 800] [--workers 2] [--repeats 3]

Generates its own source folder in a temporary directory (ImageNet-like JPEGs of 300-500 px,
quality 90), shards it at 64 and 256 px, and measures images/s delivered (decoded, augmented
with the paper's full list, normalized, batched) by:
- arrow:    ArrowLoader over the shards, whole batches made in `--workers` processes;
- baseline: a torch DataLoader over the folder with the same worker count, each sample opened
            with PIL, converted to RGB and resized to the same stored square, the batch then
            augmented by the same code (deepimage.data.augment) in the worker.
Each figure is the median of --repeats timed epochs after one warm-up epoch (page cache warm
for all), the contenders taking turns epoch by epoch. With --json the last line is one JSON
object (speedup_64, speedup_256, ...).

Shard formats: raw at 64 px (no decode at all, 0.4x the source bytes); JPEG at 256 px, where
the loader is bound by augmentation, so raw is no faster but 13x larger (6.5x the source).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from deepimage import synthetic
from deepimage.data.augment import AugmentConfig, augment_batch, normalize
from deepimage.data.decode import center_square, stored_size
from deepimage.data.layout import list_classes, list_samples
from deepimage.data.loader import ArrowLoader
from deepimage.data.partition import partition, rank_steps
from deepimage.config import defaults
from deepimage.shard import ShardParams, build, plan_split

CROP_MARGIN = defaults().shard.crop_margin
SEED = 0


# ---- source folder ---------------------------------------------------------------------------

def _source_image(job: tuple[str, int, int]) -> None:
    """One ImageNet-like JPEG: a synthetic image scaled to a random 300-500 px frame, plus grain."""
    root, split_index, total = job
    spec = synthetic.SyntheticSpec(seed=SEED, classes=12, train_per_class=max(1, total // 12),
                                   val_per_class=1)
    pixels, label = synthetic.render(spec, "train", split_index)
    rng = np.random.default_rng(split_index)
    w, h = (int(v) for v in rng.integers(300, 501, size=2))
    img = np.asarray(Image.fromarray(pixels).resize((w, h), Image.Resampling.BICUBIC), np.float32)
    img += rng.normal(0, 4, img.shape)                                   # sensor grain at full size
    out = Path(root) / "train" / synthetic.class_names(12)[label] / f"{split_index:06d}.jpg"
    out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(out, quality=90)


def make_source(root: Path, images: int, workers: int) -> None:
    """`images` JPEGs in <root>/train/<class>/ (only a train split: that is what is timed)."""
    per_class = max(1, images // 12)
    jobs = [(str(root), i, per_class * 12) for i in range(per_class * 12)]
    from multiprocessing import get_context

    with get_context("spawn").Pool(workers) as pool:
        pool.map(_source_image, jobs, chunksize=16)


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


# ---- baseline: PIL from the folder -----------------------------------------------------------

class FolderDataset(Dataset):
    """torchvision-style: one file per item, PIL decode, resize to the stored square."""

    def __init__(self, split_dir: Path, stored: int):
        classes = list_classes(split_dir)
        self.samples = list_samples(split_dir, classes)
        self.dir, self.stored = split_dir, stored

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        s = self.samples[i]
        with Image.open(self.dir / s.relpath) as im:
            pixels = center_square(im.convert("RGB"), self.stored)       # (S, S, 3) uint8
        return pixels, s.label, s.sample_id


class AugmentCollate:
    """Stack the samples and run the same batched augmentation as the Arrow loader."""

    def __init__(self, cfg: AugmentConfig, crop: int, epoch: int):
        self.cfg, self.crop, self.epoch = cfg, crop, epoch

    def __call__(self, items):
        pixels = torch.from_numpy(np.stack([p for p, _, _ in items])).permute(0, 3, 1, 2)
        ids = np.array([i for _, _, i in items], np.int64)
        x = augment_batch(pixels, ids, self.cfg, SEED, self.epoch, self.crop)
        labels = torch.tensor([label for _, label, _ in items])
        return normalize(x).contiguous(), labels, torch.from_numpy(ids)


def _one_thread(_worker_id: int) -> None:
    torch.set_num_threads(1)


def baseline_epoch(ds: FolderDataset, batch: int, workers: int, crop: int, epoch: int) -> int:
    """One epoch in the same sample order as the Arrow loader; returns the images delivered."""
    steps = rank_steps(partition(len(ds), SEED, epoch, 1, batch), 0)
    dl = DataLoader(ds, batch_sampler=[s.tolist() for s in steps], num_workers=workers,
                    collate_fn=AugmentCollate(AugmentConfig(), crop, epoch),
                    worker_init_fn=_one_thread, prefetch_factor=2 if workers else None)
    return sum(len(ids) for _, _, ids in dl)


def arrow_epoch(loader: ArrowLoader, epoch: int) -> int:
    loader.set_epoch(epoch)
    return sum(len(ids) for _, _, ids in loader)


def rates(runs: dict, repeats: int) -> dict[str, float]:
    """Median images/s of each contender over `repeats` timed epochs, after one warm-up epoch.

    The contenders take turns epoch by epoch, so load from other processes on a shared machine
    hits them alike.
    """
    speeds: dict[str, list[float]] = {name: [] for name in runs}
    for epoch in range(repeats + 1):
        for name, run_epoch in runs.items():
            t0 = time.perf_counter()
            n = run_epoch(epoch)
            if epoch > 0:
                speeds[name].append(n / (time.perf_counter() - t0))
    return {name: statistics.median(v) for name, v in speeds.items()}


# ---- the benchmark ---------------------------------------------------------------------------

def bench_resolution(src_json: Path, work: Path, res: int, fmts: list[str], args) -> dict:
    """Shard at `res` in each format, then time Arrow vs baseline; figures for this resolution."""
    plan = plan_split(src_json, "train")
    out: dict = {}
    runs = {}
    for fmt in fmts:
        t0 = time.perf_counter()
        m, _, _ = build(plan, work / f"{res}-{fmt}", ShardParams(resolution=res, format=fmt,
                                                                 crop_margin=CROP_MARGIN),
                        threads=args.workers)
        out[f"shard_img_s_{fmt}"] = m.num_candidates / (time.perf_counter() - t0)
        out[f"shard_bytes_{fmt}"] = sum(s.bytes for s in m.shards)
        loader = ArrowLoader(work / f"{res}-{fmt}", args.batch, seed=SEED, train=True,
                             augment=AugmentConfig(), crop=res, num_workers=args.workers)
        runs[f"arrow_img_s_{fmt}"] = lambda e, loader=loader: arrow_epoch(loader, e)
    ds = FolderDataset(plan.split_dir, stored_size(res, CROP_MARGIN))
    runs["baseline_img_s"] = lambda e: baseline_epoch(ds, args.batch, args.workers, res, e)
    out.update(rates(runs, args.repeats))
    for fmt in fmts:
        log(f"  {res:>3} px arrow ({fmt}): {out[f'arrow_img_s_{fmt}']:8.0f} img/s   sharding "
            f"{out[f'shard_img_s_{fmt}']:6.0f} img/s, {out[f'shard_bytes_{fmt}'] / 2**20:7.1f} MiB")
    log(f"  {res:>3} px baseline (PIL folder): {out['baseline_img_s']:8.0f} img/s")
    return out


def log(msg: str) -> None:
    print(msg, flush=True)


def run(args) -> dict:
    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"
    with tempfile.TemporaryDirectory(prefix="deepimage-bench-") as tmp:
        work = Path(tmp)
        t0 = time.perf_counter()
        make_source(work / "source", args.images, args.workers)
        src_bytes = folder_bytes(work / "source")
        src_json = work / "source.json"
        src_json.write_text(json.dumps({"root": str(work / "source"),
                                        "classes": synthetic.class_names(12)}))
        n = len(plan_split(src_json, "train").samples)
        log(f"source: {n} JPEGs (300-500 px, q90), {src_bytes / 2**20:.1f} MiB, "
            f"made in {time.perf_counter() - t0:.1f} s; {args.workers} workers, "
            f"batch {args.batch}, median of {args.repeats}")
        r64 = bench_resolution(src_json, work, 64, ["raw"], args)
        r256 = bench_resolution(src_json, work, 256, ["raw", "jpeg"], args)
    best256 = max(("raw", "jpeg"), key=lambda f: r256[f"arrow_img_s_{f}"])
    result = {
        "images": n, "workers": args.workers, "batch": args.batch, "repeats": args.repeats,
        "source_bytes": src_bytes,
        "speedup_64": r64["arrow_img_s_raw"] / r64["baseline_img_s"],
        "speedup_256": r256[f"arrow_img_s_{args.format_256}"] / r256["baseline_img_s"],
        "format_64": "raw", "format_256": args.format_256, "fastest_format_256": best256,
        "speedup_256_raw": r256["arrow_img_s_raw"] / r256["baseline_img_s"],
        "speedup_256_jpeg": r256["arrow_img_s_jpeg"] / r256["baseline_img_s"],
        "arrow_img_s_64": r64["arrow_img_s_raw"], "baseline_img_s_64": r64["baseline_img_s"],
        "arrow_img_s_256_raw": r256["arrow_img_s_raw"],
        "arrow_img_s_256_jpeg": r256["arrow_img_s_jpeg"],
        "baseline_img_s_256": r256["baseline_img_s"],
        "shard_img_s_64": r64["shard_img_s_raw"], "shard_img_s_256_raw": r256["shard_img_s_raw"],
        "shard_img_s_256_jpeg": r256["shard_img_s_jpeg"],
        "shard_bytes_64": r64["shard_bytes_raw"], "shard_bytes_256_raw": r256["shard_bytes_raw"],
        "shard_bytes_256_jpeg": r256["shard_bytes_jpeg"],
        "shard_to_source_64": r64["shard_bytes_raw"] / src_bytes,
        "shard_to_source_256_raw": r256["shard_bytes_raw"] / src_bytes,
        "shard_to_source_256_jpeg": r256["shard_bytes_jpeg"] / src_bytes,
    }
    return result


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", action="store_true", help="last line: one JSON object")
    p.add_argument("--images", type=int, default=800, help="source images (12 classes)")
    p.add_argument("--workers", type=int, default=2, help="worker processes for both loaders")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3, help="timed epochs; the median is reported")
    p.add_argument("--format-256", choices=["raw", "jpeg"], default="jpeg",
                   help="shard format whose speed-up is reported as speedup_256 (jpeg: as fast "
                        "as raw there, augmentation-bound, and 13x smaller)")
    args = p.parse_args(argv)
    if args.images < 12 or args.workers < 1 or args.repeats < 1 or args.batch < 1:
        raise SystemExit("bench.loader: error: need --images >= 12 and --workers, --repeats, "
                         "--batch >= 1")
    t0 = time.perf_counter()
    r = run(args)
    log(f"speed-up: {r['speedup_64']:.2f}x at 64 px (raw), {r['speedup_256']:.2f}x at 256 px "
        f"({r['format_256']}; raw {r['speedup_256_raw']:.2f}x, jpeg {r['speedup_256_jpeg']:.2f}x); "
        f"shards/source bytes: 64 px {r['shard_to_source_64']:.2f}, 256 px raw "
        f"{r['shard_to_source_256_raw']:.2f}, jpeg {r['shard_to_source_256_jpeg']:.2f}; "
        f"total {time.perf_counter() - t0:.0f} s")
    if args.json:
        print(json.dumps(r, sort_keys=True))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
