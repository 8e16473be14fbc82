"""What the CPU side of the data plane can reach: the decode-only limit and each augmentation's
cost, per image, at the stored sizes of JPEG shards.

    python -m deepimage.bench.decode [--json] [--images 240] [--resolutions 256 512] [--workers 2]

Builds JPEG shards (the shard stage at shard.format jpeg, the schema's jpeg_quality and
crop_margin) of the ImageNet-like source JPEGs of deepimage.bench.loader, then per resolution:
- decoders: each candidate decodes the shards' stored bytes in one process on one thread
  (images/s per core): pil (Pillow's open + convert, the stored size leaving draft() nothing to
  reduce), simplejpeg (libjpeg-turbo into a reused buffer: what the loader calls) and
  torchvision (torchvision.io.decode_jpeg on the CPU, where its image extension loads);
- decode limit: the fastest of them in --workers processes at once, each decoding its share of
  the bytes held in memory (no Arrow, no batching, no hand-over): the rate the loader's
  decode-and-batch path is measured against (deepimage.bench.loader: decode_limit_fraction);
- augmentation: ms per image of each of the paper's augmentations (deepimage.data.augment) and
  of the whole chain, on one thread, on batches of 16 decoded rows.
With --json the last line is one JSON object.
"""
from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import tempfile
import time
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from deepimage.bench.jpeg_source import CROP_MARGIN, PACKAGES, source_json
from deepimage.data.augment import (AugmentConfig, augment_batch, color_cast, crop_flip,
                                    normalize, sample_params, sampling_grid, vignette, warp)
from deepimage.data.decode import decode_stored_jpeg
from deepimage.data.loader import init_loader_process
from deepimage.data.manifest import load_manifest

AUGMENT_BATCH = 16


def shard_rows(shard_dir: Path) -> tuple[list[bytes], int]:
    """Every stored JPEG row of a shard folder, and the stored size."""
    m = load_manifest(shard_dir)
    rows: list[bytes] = []
    for s in m.shards:
        with pa.memory_map(str(shard_dir / s.name), "r") as f:
            rows += pa.ipc.open_file(f).read_all().column("image").to_pylist()
    return rows, m.stored_size


# ---- decoders ----------------------------------------------------------------------------------

def _pil(size: int):
    from PIL import Image

    def decode(data: bytes) -> np.ndarray:
        with Image.open(io.BytesIO(data)) as im:
            return np.asarray(im.convert("RGB"), dtype=np.uint8)
    return decode


def _simplejpeg(size: int):
    out = np.empty((size, size, 3), np.uint8)
    return lambda data: decode_stored_jpeg(data, out)


def _torchvision(size: int):
    from deepimage.bench.torchvision_pipeline import import_torchvision

    import_torchvision()
    from torchvision.io import ImageReadMode, decode_jpeg

    def decode(data: bytes) -> torch.Tensor:
        return decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8),
                           mode=ImageReadMode.RGB)
    return decode


DECODERS = {"pil": _pil, "simplejpeg": _simplejpeg, "torchvision": _torchvision}


def decoders(size: int, probe: bytes) -> tuple[dict, dict[str, str]]:
    """({name: decode(bytes)} that work here, {name: why not} for the others)."""
    ok, unavailable = {}, {}
    for name, make in DECODERS.items():
        try:
            fn = make(size)
            fn(probe)
            ok[name] = fn
        except (ImportError, RuntimeError, OSError) as e:
            unavailable[name] = " ".join(f"{type(e).__name__}: {e}".split())[:160]
    return ok, unavailable


def decoder_rates(rows: list[bytes], size: int, repeats: int) -> tuple[dict[str, float], dict]:
    """Images/s on one thread of each available decoder (median of `repeats` passes, taking
    turns pass by pass), and the unavailable ones with their reason."""
    torch.set_num_threads(1)
    fns, unavailable = decoders(size, rows[0])
    speeds: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            for data in rows:
                fn(data)
            speeds[name].append(len(rows) / (time.perf_counter() - t0))
    return {name: statistics.median(v) for name, v in speeds.items()}, unavailable


# ---- the decode limit: the fastest decoder in N processes at once -----------------------------

_SHARE: dict = {}


def _hold(rows: list[bytes], size: int, decoder: str) -> None:
    init_loader_process()
    _SHARE.update(rows=rows, decode=DECODERS[decoder](size))


def _decode_share(part: tuple[int, int]) -> int:
    rank, parts = part
    rows = _SHARE["rows"][rank::parts]
    for data in rows:
        _SHARE["decode"](data)
    return len(rows)


class DecodeLimit:
    """`workers` processes holding the rows; calling it decodes all of them once (each process
    its share) and returns the count. Use as a context manager."""

    def __init__(self, rows: list[bytes], size: int, decoder: str, workers: int):
        self.workers = workers
        self.pool = get_context("spawn").Pool(workers, initializer=_hold,
                                              initargs=(rows, size, decoder))

    def __call__(self, _epoch: int = 0) -> int:
        return sum(self.pool.map(_decode_share, [(r, self.workers) for r in range(self.workers)]))

    def __enter__(self) -> "DecodeLimit":
        return self

    def __exit__(self, *exc) -> None:
        self.pool.terminate()
        self.pool.join()


# ---- augmentation costs ------------------------------------------------------------------------

def augment_costs(images: torch.Tensor, resolution: int, repeats: int = 3) -> dict[str, float]:
    """ms per image of each augmentation step on one thread: uint8 (b, 3, S, S) rows in."""
    torch.set_num_threads(1)
    init_loader_process()                     # the loader processes' allocator policy
    cfg, b, stored = AugmentConfig(), len(images), images.shape[-1]
    ids = np.arange(b)
    p = sample_params(cfg, 0, 0, ids, stored, resolution)
    grid = sampling_grid(p, stored, resolution)
    x = images.float()
    out = warp(x, grid)
    steps = {
        "params": lambda: sample_params(cfg, 0, 0, ids, stored, resolution),
        "crop_flip": lambda: crop_flip(images, p.offset, p.flip, resolution).float(),
        "to_float": lambda: images.float(),
        "sampling_grid": lambda: sampling_grid(p, stored, resolution),
        "grid_sample": lambda: warp(x, grid),
        "color_cast": lambda: color_cast(out.clone(), p.cast),
        "vignette": lambda: vignette(out.clone(), p.vignette),
        "normalize": lambda: normalize(out.clone()),
        "clone": lambda: out.clone(),                       # what the three above also pay
        "all": lambda: normalize(augment_batch(images, ids, cfg, 0, 0, resolution)),
    }
    result = {}
    for name, fn in steps.items():
        fn()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        result[name] = statistics.median(times) / b * 1e3
    return result


def decoded_batch(rows: list[bytes], size: int, n: int = AUGMENT_BATCH) -> torch.Tensor:
    """The first `n` rows decoded: uint8 (n, 3, S, S)."""
    out = np.empty((n, size, size, 3), np.uint8)
    for i in range(n):
        decode_stored_jpeg(rows[i % len(rows)], out[i])
    return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()


# ---- the benchmark -----------------------------------------------------------------------------

def measure(rows: list[bytes], size: int, resolution: int, workers: int, repeats: int,
            limit: bool = True) -> dict:
    """Decoder rates, the decode limit (unless limit=False: the caller times it) and the
    augmentation costs at one resolution."""
    rates, unavailable = decoder_rates(rows, size, repeats)
    r, best = resolution, max(rates, key=rates.get)
    out = {f"decode_img_s_per_core_{name}_{r}": v for name, v in rates.items()}
    out.update({f"decoder_unavailable_{name}": why for name, why in unavailable.items()})
    out.update({f"decoder_{r}": best, f"stored_size_{r}": size,
                f"stored_bytes_per_image_{r}": float(np.mean([len(x) for x in rows]))})
    if limit:
        with DecodeLimit(rows, size, best, workers) as run:
            run()                                                        # warm-up
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                n = run()
                times.append(n / (time.perf_counter() - t0))
        out[f"decode_limit_img_s_{r}"] = statistics.median(times)
    costs = augment_costs(decoded_batch(rows, size), resolution)
    out.update({f"augment_ms_{step}_{r}": v for step, v in costs.items()})
    return out


def log_figures(r: dict, resolution: int, workers: int = 0) -> None:
    dec = "  ".join(f"{k.split('_')[-2]} {v:.0f}" for k, v in r.items()
                    if k.startswith("decode_img_s_per_core_") and k.endswith(f"_{resolution}"))
    print(f"  {resolution:>3} px (stored {r[f'stored_size_{resolution}']} px, "
          f"{r[f'stored_bytes_per_image_{resolution}'] / 1024:.0f} KiB/image): decode img/s per "
          f"core: {dec}; fastest: {r[f'decoder_{resolution}']}", flush=True)
    if f"decode_limit_img_s_{resolution}" in r:
        print(f"  {resolution:>3} px decode limit: {r[f'decode_limit_img_s_{resolution}']:.0f} "
              f"img/s in {workers} processes", flush=True)
    aug = "  ".join(f"{k[len('augment_ms_'):-len(str(resolution)) - 1]} {v:.2f}"
                    for k, v in r.items() if k.startswith("augment_ms_")
                    and k.endswith(f"_{resolution}"))
    print(f"  {resolution:>3} px augmentation, ms/image: {aug}", flush=True)


def main(argv: list[str] | None = None) -> None:
    from deepimage.bench.provenance import run_info
    from deepimage.shard import ShardParams, build, plan_split

    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", action="store_true", help="last line: one JSON object")
    p.add_argument("--images", type=int, default=240, help="source images (12 classes)")
    p.add_argument("--resolutions", type=int, nargs="+", default=[256, 512])
    p.add_argument("--workers", type=int, default=2, help="processes of the decode limit")
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args(argv)
    if a.images < 12 or a.workers < 1 or a.repeats < 1:
        raise SystemExit("bench.decode: error: need --images >= 12 and --workers, --repeats >= 1")
    result = run_info("deepimage.bench.decode", argv, PACKAGES)
    result["workers"] = a.workers
    with tempfile.TemporaryDirectory(prefix="deepimage-decode-") as tmp:
        src_json = source_json(Path(tmp), a.images, a.workers)
        plan = plan_split(src_json, "train")
        for res in a.resolutions:
            build(plan, Path(tmp) / f"{res}", ShardParams(resolution=res, format="jpeg",
                                                          crop_margin=CROP_MARGIN),
                  threads=a.workers)
            rows, size = shard_rows(Path(tmp) / f"{res}")
            r = measure(rows, size, res, a.workers, a.repeats)
            log_figures(r, res, a.workers)
            result.update(r)
    if a.json:
        print(json.dumps(result, sort_keys=True))


if __name__ == "__main__":
    main()
