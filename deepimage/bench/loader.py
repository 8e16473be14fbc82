"""Loader benchmark: Arrow shards against the pipeline a PyTorch user would write, and against
the decode-only limit.

    python -m deepimage.bench.loader [--json] [--images 384] [--workers 2] [--repeats 3]

Generates its own source folder in a temporary directory (ImageNet-like JPEGs of 300-500 px,
quality 90), shards it at 64 px (raw), 256 px (raw and JPEG) and 512 px (JPEG), and measures
images/s delivered, every contender with --workers processes:
- arrow:        ArrowLoader over the shards, whole batches (decoded, augmented with the paper's
                full list, normalized) made in the worker processes: training on the CPU;
- arrow_decode: the same loader's CPU side when the device augments (train.device cuda): the
                processes only decode and batch into shared memory (ArrowLoader.read_epoch);
- decode_limit: the fastest decoder (deepimage.bench.decode) decoding the same JPEG bytes from
                memory in --workers processes, nothing else;
- torchvision:  torchvision.datasets.ImageFolder over the source folder + transforms.v2 (the
                nearest equivalents of the paper's augmentations) in a DataLoader
                (deepimage.bench.torchvision_pipeline);
- baseline:     (64 and 256 px) a DataLoader over the folder, PIL decode and resize to the stored
                square, then the same batched augmentation code as the Arrow loader.
Each figure is the median of --repeats timings (an epoch; for arrow_decode and decode_limit,
enough epochs for --decode-images) after one warm-up (page cache warm for
all; worker processes started in it and kept, as persistent_workers), the contenders taking
turns epoch by epoch, so load from other processes hits them alike.
Also per resolution: each decoder's rate per core and each augmentation's cost per image
(deepimage.bench.decode). With --json the last line is one JSON object with the command, date,
commit, machine and library versions, every figure, and vs_torchvision_<res> (arrow /
torchvision), decode_limit_fraction_<res> (arrow_decode / decode_limit) and speedup_<res>
(arrow / baseline).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from deepimage.bench import decode as bench_decode
from deepimage.bench.jpeg_source import CROP_MARGIN, PACKAGES, SEED, source_json
from deepimage.bench.provenance import run_info
from deepimage.bench.torchvision_pipeline import (folder_dataset, torchvision_epoch,
                                                  torchvision_loader)
from deepimage.data.augment import AugmentConfig, augment_batch, normalize
from deepimage.data.decode import center_square, stored_size
from deepimage.data.layout import list_classes, list_samples
from deepimage.data.loader import ArrowLoader, init_loader_process
from deepimage.data.partition import partition, rank_steps
from deepimage.shard import ShardParams, build, plan_split

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


def baseline_epoch(ds: FolderDataset, batch: int, workers: int, crop: int, epoch: int) -> int:
    """One epoch in the same sample order as the Arrow loader; returns the images delivered."""
    steps = rank_steps(partition(len(ds), SEED, epoch, 1, batch), 0)
    dl = DataLoader(ds, batch_sampler=[s.tolist() for s in steps], num_workers=workers,
                    collate_fn=AugmentCollate(AugmentConfig(), crop, epoch),
                    worker_init_fn=init_loader_process, prefetch_factor=2 if workers else None)
    return sum(len(ids) for _, _, ids in dl)


def arrow_epoch(loader: ArrowLoader, epoch: int) -> int:
    loader.set_epoch(epoch)
    return sum(len(ids) for _, _, ids in loader)


def arrow_decode_epoch(loader: ArrowLoader, epoch: int) -> int:
    """The CPU side alone (decode and batch, uint8), as when the device augments."""
    return sum(len(ids) for _, _, ids in loader.read_epoch(epoch))


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

# Shard formats per resolution: raw at 64 px (no decode at all, 0.4x the source bytes); at 256 px
# raw and JPEG (raw is 13x larger there); JPEG only at 512 px (raw: 1 MiB per image).
FORMATS = {64: ["raw"], 256: ["raw", "jpeg"], 512: ["jpeg"]}
BASELINE_PIL = (64, 256)


def bench_resolution(src_json: Path, work: Path, res: int, args) -> dict:
    """Shard at `res`, then time every contender in one interleaved loop; this resolution's figures."""
    plan = plan_split(src_json, "train")
    stored = stored_size(res, CROP_MARGIN)
    out: dict = {}
    runs = {}
    for fmt in FORMATS[res]:
        t0 = time.perf_counter()
        m, _, _ = build(plan, work / f"{res}-{fmt}", ShardParams(resolution=res, format=fmt,
                                                                 crop_margin=CROP_MARGIN),
                        threads=args.workers)
        out[f"shard_img_s_{res}_{fmt}"] = m.num_candidates / (time.perf_counter() - t0)
        out[f"shard_bytes_{res}_{fmt}"] = sum(s.bytes for s in m.shards)
        loader = ArrowLoader(work / f"{res}-{fmt}", args.batch, seed=SEED, train=True,
                             augment=AugmentConfig(), crop=res, num_workers=args.workers)
        runs[f"arrow_img_s_{res}_{fmt}"] = lambda e, loader=loader: arrow_epoch(loader, e)
    limit = None
    if "jpeg" in FORMATS[res]:
        rows, size = bench_decode.shard_rows(work / f"{res}-jpeg")
        figures = bench_decode.measure(rows, size, res, args.workers, args.repeats, limit=False)
        bench_decode.log_figures(figures, res)
        out.update(figures)
        loader = ArrowLoader(work / f"{res}-jpeg", args.batch, seed=SEED, train=True,
                             augment=AugmentConfig(), crop=res, num_workers=args.workers)
        # Decoding alone runs an epoch of these few images in ~0.1 s, where the hand-over at
        # its start and end would weigh as it never does in training: several epochs a timing.
        passes = max(1, -(-args.decode_images // len(rows)))
        runs[f"arrow_decode_img_s_{res}"] = lambda e: sum(
            arrow_decode_epoch(loader, e * passes + k) for k in range(passes))
        limit = bench_decode.DecodeLimit(rows, size, figures[f"decoder_{res}"], args.workers)
        runs[f"decode_limit_img_s_{res}"] = lambda e: sum(limit() for _ in range(passes))
    tv = torchvision_loader(folder_dataset(plan.split_dir, res, stored), args.batch, args.workers)
    runs[f"torchvision_img_s_{res}"] = lambda e: torchvision_epoch(tv, e)
    if res in BASELINE_PIL:
        ds = FolderDataset(plan.split_dir, stored)
        runs[f"baseline_img_s_{res}"] = lambda e: baseline_epoch(ds, args.batch, args.workers, res, e)
    try:
        out.update(rates(runs, args.repeats))             # the interleaved limit replaces
    finally:                                               # decode.measure's own
        if limit is not None:
            limit.__exit__()
    for name in runs:
        log(f"  {res:>3} px {name.replace('_img_s', '').replace(f'_{res}', ''):<18}"
            f"{out[name]:8.0f} img/s")
    return out


def log(msg: str) -> None:
    print(msg, flush=True)


def summary(r: dict, resolutions: list[int]) -> dict:
    """The ratios: vs_torchvision_<res>, decode_limit_fraction_<res>, speedup_<res>."""
    out = {}
    for res in resolutions:
        fmt = "raw" if res == 64 else "jpeg"
        arrow = r[f"arrow_img_s_{res}_{fmt}"]
        out[f"format_{res}"] = fmt
        out[f"vs_torchvision_{res}"] = arrow / r[f"torchvision_img_s_{res}"]
        if f"decode_limit_img_s_{res}" in r:
            out[f"decode_limit_fraction_{res}"] = (r[f"arrow_decode_img_s_{res}"]
                                                   / r[f"decode_limit_img_s_{res}"])
        if f"baseline_img_s_{res}" in r:
            out[f"speedup_{res}"] = arrow / r[f"baseline_img_s_{res}"]
            for f in FORMATS[res]:
                out[f"speedup_{res}_{f}"] = r[f"arrow_img_s_{res}_{f}"] / r[f"baseline_img_s_{res}"]
        for f in FORMATS[res]:
            out[f"shard_to_source_{res}_{f}"] = r[f"shard_bytes_{res}_{f}"] / r["source_bytes"]
    return out


def run(args) -> dict:
    torch.set_num_threads(1)
    result: dict = {}
    with tempfile.TemporaryDirectory(prefix="deepimage-bench-") as tmp:
        work = Path(tmp)
        t0 = time.perf_counter()
        src_json = source_json(work, args.images, args.workers)
        src_bytes = folder_bytes(work / "source")
        n = len(plan_split(src_json, "train").samples)
        log(f"source: {n} JPEGs (300-500 px, q90), {src_bytes / 2**20:.1f} MiB, "
            f"made in {time.perf_counter() - t0:.1f} s; {args.workers} workers, "
            f"batch {args.batch}, median of {args.repeats}")
        result.update(images=n, workers=args.workers, batch=args.batch, repeats=args.repeats,
                      source_bytes=src_bytes)
        for res in args.resolutions:
            result.update(bench_resolution(src_json, work, res, args))
    result.update(summary(result, args.resolutions))
    return result


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", action="store_true", help="last line: one JSON object")
    p.add_argument("--images", type=int, default=384,
                   help="source images (12 classes); 384 = 6 batches of 64, 3 per worker of 2")
    p.add_argument("--workers", type=int, default=2, help="worker processes of every contender")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3, help="timed epochs; the median is reported")
    p.add_argument("--decode-images", type=int, default=2048,
                   help="images per timing of the decode-only contenders (whole epochs)")
    p.add_argument("--resolutions", type=int, nargs="+", default=sorted(FORMATS),
                   choices=sorted(FORMATS), help="resolutions to measure")
    args = p.parse_args(argv)
    if min(args.workers, args.repeats, args.batch, args.decode_images) < 1 or args.images < 12:
        raise SystemExit("bench.loader: error: need --images >= 12 and --workers, --repeats, "
                         "--batch, --decode-images >= 1")
    info = run_info("deepimage.bench.loader", argv, PACKAGES)
    t0 = time.perf_counter()
    r = run(args)
    r.update(info, seconds=time.perf_counter() - t0)
    for res in args.resolutions:
        line = f"{res:>3} px: {r[f'vs_torchvision_{res}']:.2f}x torchvision"
        if f"decode_limit_fraction_{res}" in r:
            line += f", decode-and-batch {r[f'decode_limit_fraction_{res}']:.2f} of the decode limit"
        if f"speedup_{res}" in r:
            line += f", {r[f'speedup_{res}']:.2f}x the PIL-folder baseline"
        log(line)
    log(f"total {r['seconds']:.0f} s")
    if args.json:
        print(json.dumps(r, sort_keys=True))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
