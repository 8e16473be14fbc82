"""Shard stage: one split of the source, resized for one resolution, into Arrow IPC files.

    python -m deepimage.shard --source results/dataset/source.json --split train \
        --resolution 32 --out results/shards/32/train --threads 2 \
        --config-json '{"shard": {"format": "raw", "shard_mib": 64}, "dataset": {"strict": false}}'

The config sections shard and dataset.strict come as one JSON argument (keys left out: the
schema's defaults). Writes <out>/shard-00000.arrow ... (each at most shard.shard_mib of image bytes, written to a
temporary file and renamed), then <out>/skipped.tsv and, last, <out>/manifest.json: a folder
without a manifest is incomplete. Samples are decoded on --threads processes but written in
sample-id order, so a rerun gives the same bytes whatever the thread count. Undecodable files
are skipped and listed (or, with dataset.strict, the first one stops the run), and so are
files that break decode.py's limits (format, pixels, file size) and symlinks that lead out of
the dataset root (links within it are followed). skipped.tsv is read with deepimage.tsv.read_tsv.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path

import pyarrow as pa

from deepimage import config, tracking
from deepimage.config import Config, defaults
from deepimage.data.decode import BadImage, decode_square, stored_size
from deepimage.data.layout import DataError, Sample, list_classes, list_samples
from deepimage.data.manifest import (MANIFEST, SKIPPED, Manifest, ShardInfo, sha256_file,
                                     shard_name, shard_schema, write_atomic, write_manifest)
from deepimage.progress import progress
from deepimage.tsv import tsv_bytes


def _default(key: str):
    """A field defaulting to the schema's shard.<key> (ShardParams(resolution=16) in tests)."""
    return field(default_factory=lambda: getattr(defaults().shard, key))


@dataclass(frozen=True)
class ShardParams:
    """What the shards are a function of (recorded in the manifest)."""

    resolution: int
    format: str = _default("format")
    jpeg_quality: int = _default("jpeg_quality")
    shard_mib: float = _default("shard_mib")
    crop_margin: float = _default("crop_margin")
    strict: bool = field(default_factory=lambda: defaults().dataset.strict)

    @classmethod
    def from_config(cls, cfg: Config, resolution: int) -> "ShardParams":
        """The shard section (and dataset.strict) for one resolution."""
        s = cfg.shard
        return cls(resolution=resolution, format=s.format, jpeg_quality=s.jpeg_quality,
                   shard_mib=s.shard_mib, crop_margin=s.crop_margin, strict=cfg.dataset.strict)

    def __post_init__(self):
        if self.format not in ("raw", "jpeg"):
            raise ValueError(f"shard.format must be raw or jpeg, got {self.format!r}")
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError(f"shard.jpeg_quality must be in [1, 100], got {self.jpeg_quality}")
        if self.shard_mib <= 0:
            raise ValueError(f"shard.shard_mib must be > 0, got {self.shard_mib}")
        if self.resolution < 1 or self.crop_margin < 0:
            raise ValueError(f"--resolution must be >= 1 and shard.crop_margin >= 0, got "
                             f"{self.resolution} and {self.crop_margin}")

    @property
    def stored_size(self) -> int:
        return stored_size(self.resolution, self.crop_margin)


def _encode(job: tuple[str, int, str, int, str]) -> tuple[bool, bytes | str]:
    """Worker: (ok, image bytes) or (False, reason) for one file."""
    path, size, fmt, quality, root = job
    try:
        pixels = decode_square(path, size, root)             # (size, size, 3) uint8
    except BadImage as e:
        return False, str(e)
    if fmt == "raw":
        return True, pixels.tobytes()
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buf, format="JPEG", quality=quality)
    return True, buf.getvalue()


class ShardWriter:
    """Collects rows and writes each shard atomically once the next row would pass the bound."""

    def __init__(self, out: Path, schema: pa.Schema, limit_bytes: int):
        self.out, self.schema, self.limit = out, schema, limit_bytes
        self.rows: list[tuple[int, int, str, bytes]] = []
        self.nbytes = 0
        self.shards: list[ShardInfo] = []

    def add(self, sample: Sample, image: bytes) -> None:
        if self.rows and self.nbytes + len(image) > self.limit:
            self.flush()
        self.rows.append((sample.sample_id, sample.label, _printable(sample.relpath), image))
        self.nbytes += len(image)

    def flush(self) -> None:
        if not self.rows:
            return
        ids, labels, paths, images = zip(*self.rows)
        batch = pa.record_batch([pa.array(ids, pa.int64()), pa.array(labels, pa.int64()),
                                 pa.array(paths, pa.string()),
                                 pa.array(images, self.schema.field("image").type)],
                                schema=self.schema)
        name = shard_name(len(self.shards))
        sink = pa.BufferOutputStream()
        with pa.ipc.new_file(sink, self.schema) as w:   # uncompressed: memory-maps zero-copy
            w.write_batch(batch)
        path = self.out / name
        write_atomic(path, sink.getvalue().to_pybytes())
        self.shards.append(ShardInfo(name, len(self.rows), path.stat().st_size, sha256_file(path)))
        self.rows, self.nbytes = [], 0


def _printable(relpath: str) -> str:
    """The path as valid UTF-8 for the shard's string column: bytes of a name that is not UTF-8
    (surrogate-escaped by os.walk) are written as \\xNN."""
    try:
        relpath.encode("utf-8")
        return relpath
    except UnicodeEncodeError:
        return relpath.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _clear(out: Path) -> None:
    """Remove what an earlier run left (manifest first: the folder reads as incomplete)."""
    for name in (MANIFEST, SKIPPED):
        (out / name).unlink(missing_ok=True)
    for p in out.iterdir():
        if (p.name.startswith("shard-") and p.name.endswith(".arrow")) or (
                p.name.startswith(".") and ".tmp" in p.name):
            p.unlink()


def load_source(source_json: str | Path) -> dict:
    """The dataset stage's source.json, checked."""
    path = Path(source_json)
    if not path.is_file():
        raise DataError(f"{path}: source description missing: run the dataset stage first")
    try:
        src = json.loads(path.read_text())
        root, classes = Path(src["root"]), list(src["classes"])
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise DataError(f"{path}: not a dataset source description ({e})") from None
    return {"root": root, "classes": classes, "path": path}


@dataclass
class Plan:
    """The checked input of one split: where it is, its classes and its samples in id order."""

    split_dir: Path
    classes: list[str]
    samples: list[Sample]


def plan_split(source_json: str | Path, split: str) -> Plan:
    """Read source.json and list the split's samples; layout errors surface here, early."""
    src = load_source(source_json)
    split_dir = src["root"] / split
    found = list_classes(split_dir)
    if found != src["classes"]:
        raise DataError(f"{split_dir}: class folders {found} differ from {src['path']} "
                        f"({src['classes']}): rerun the dataset stage")
    return Plan(split_dir, src["classes"], list_samples(split_dir, src["classes"]))


def build(plan: Plan, out: str | Path, params: ShardParams,
          threads: int = 1) -> tuple[Manifest, list[tuple[str, str]], float]:
    """Write the shards, skipped.tsv and manifest of one split; returns them and images/s."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    _clear(out)
    size = params.stored_size
    writer = ShardWriter(out, shard_schema(params.format, size), int(params.shard_mib * 2 ** 20))
    skipped: list[tuple[str, str]] = []
    counts = [0] * len(plan.classes)
    root = os.path.realpath(plan.split_dir.parent)        # symlinks may not lead out of it
    jobs = [(str(plan.split_dir / s.relpath), size, params.format, params.jpeg_quality, root)
            for s in plan.samples]
    t0 = time.perf_counter()
    with get_context("spawn").Pool(max(1, threads), initializer=_one_thread) as pool:
        encoded = zip(plan.samples, pool.imap(_encode, jobs, chunksize=8))
        for sample, (ok, result) in progress(encoded, total=len(jobs), unit="img",
                                             desc=f"shard {plan.split_dir.name} {params.resolution} px"):
            if not ok:
                if params.strict:
                    raise DataError(f"{plan.split_dir / sample.relpath}: cannot decode ({result}); "
                                    "dataset.strict is true (set it false to skip such files)")
                skipped.append((sample.relpath, result))
                continue
            writer.add(sample, result)
            counts[sample.label] += 1
    writer.flush()
    rate = len(plan.samples) / max(time.perf_counter() - t0, 1e-9)
    write_atomic(out / SKIPPED, tsv_bytes(["path", "reason"], skipped))
    manifest = Manifest(split=plan.split_dir.name, resolution=params.resolution, stored_size=size,
                        format=params.format, classes=plan.classes, shards=writer.shards,
                        num_samples=sum(counts), class_counts=counts,
                        num_candidates=len(plan.samples), num_skipped=len(skipped),
                        params={"root": str(plan.split_dir.parent),
                                "jpeg_quality": params.jpeg_quality,
                                "shard_mib": params.shard_mib, "crop_margin": params.crop_margin,
                                "strict": params.strict})
    write_manifest(out, manifest)
    return manifest, skipped, rate


def _one_thread() -> None:
    os.environ["OMP_NUM_THREADS"] = "1"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--source", required=True, help="source.json written by the dataset stage")
    p.add_argument("--split", required=True, choices=["train", "val"])
    p.add_argument("--resolution", type=int, required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    config.add_argument(p, "shard and dataset (strict)")
    tracking.add_args(p)
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> Manifest:
    cfg = config.from_args(args)
    params = ShardParams.from_config(cfg, args.resolution)
    plan = plan_split(args.source, args.split)      # layout errors before any MLflow run
    mlparams = {"split": args.split, "resolution": args.resolution, "shard": cfg.shard,
                "dataset.strict": cfg.dataset.strict, "threads": args.threads}
    with tracking.stage_run(args, stage="shard", params=mlparams,
                            tags={"deepimage.resolution": str(args.resolution),
                                  "deepimage.split": args.split}) as mlrun:
        manifest, skipped, rate = build(plan, args.out, params, args.threads)
        mlrun.log_metrics({"images_per_s": rate, "samples": manifest.num_samples,
                           "skipped_files": len(skipped), "shards": len(manifest.shards),
                           "shard_bytes": sum(s.bytes for s in manifest.shards)})
        mlrun.log_artifact(Path(args.out) / MANIFEST)
        mlrun.log_artifact(Path(args.out) / SKIPPED)
    return manifest


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        m = run(args)
    except (DataError, ValueError, OSError) as e:
        raise SystemExit(f"shard: error: {e}")
    print(f"shard: {args.split} at {args.resolution} px ({m.format}, stored {m.stored_size} px): "
          f"{m.num_samples} samples in {len(m.shards)} shards, {m.num_skipped} skipped "
          f"-> {args.out}")


if __name__ == "__main__":
    main()
