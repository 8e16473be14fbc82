"""The built-in dataset: deterministic images whose class evidence lives at two scales.

    python -m deepimage.dataset --source synthetic --out results/dataset --seed 0 --classes 12

Class c is (shape c // 3, texture c % 3). The SHAPE (disk, square, triangle, cross, ...) spans
half the image and survives downscaling to 32 px. The TEXTURE inside it (horizontal stripes,
vertical stripes, or a checker of both) has a period of 4-5.6 px at 128 px: 2.3-3.2 px at the
72 px stored for 64 px training (resolved), but 1.1-1.6 px at the 36 px stored for 32 px, past
the Nyquist limit of 2 px, so the anti-aliased resize all but removes it. So 32 px sees the
shape only, 64 px sees both. Nuisances (colours, position, size, rotation, texture contrast,
background gradient, clutter, pixel noise, JPEG) keep either resolution from being perfect.
Measured (config.yaml's VGGs, 10 epochs, lr 0.05 warm-up + cosine, 1 CPU thread): val top-1
error 69 % at 32 px (shape 0.4 % wrong, texture at chance), 21 % at 64 px (texture right, shape
20 % wrong), 1.4 % for the average of both posteriors: the resolutions are complementary.
Every image comes from its own numpy Generator seeded by (seed, split, index), so the files
are byte-identical for a seed whatever the process count.
"""
from __future__ import annotations

import io
import math
import os
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

import numpy as np

SHAPES = ("disk", "square", "triangle", "cross", "ring", "diamond", "hbar", "vbar")
TEXTURES = ("hstripes", "vstripes", "checker")
MAX_CLASSES = len(SHAPES) * len(TEXTURES)
SPLITS = {"train": 0, "val": 1}
JPEG_QUALITY = 95
PERIOD_PX = (4.0, 5.6)          # texture period at a 128 px image (scaled with image_size)


@dataclass(frozen=True)
class SyntheticSpec:
    """What to generate; the same spec and seed always give the same bytes."""

    seed: int = 0
    classes: int = 12
    train_per_class: int = 240
    val_per_class: int = 60
    image_size: int = 128

    def __post_init__(self):
        if not 2 <= self.classes <= MAX_CLASSES:
            raise ValueError(f"synthetic classes must be in [2, {MAX_CLASSES}] ({len(SHAPES)} "
                             f"shapes x {len(TEXTURES)} textures), got {self.classes}")
        if self.image_size < 32:
            raise ValueError(f"synthetic image_size must be >= 32, got {self.image_size}")
        if min(self.train_per_class, self.val_per_class) < 1:
            raise ValueError("synthetic train_per_class and val_per_class must be >= 1")

    def per_class(self, split: str) -> int:
        return self.train_per_class if split == "train" else self.val_per_class


def class_names(classes: int) -> list[str]:
    """Names that sort in class-index order: '00_disk_hstripes', '01_disk_vstripes', ..."""
    return [f"{c:02d}_{SHAPES[c // len(TEXTURES)]}_{TEXTURES[c % len(TEXTURES)]}"
            for c in range(classes)]


def image_path(root: Path, spec: SyntheticSpec, split: str, index: int) -> Path:
    """<root>/<split>/<class>/<index>.jpg; index i of a split belongs to class i // per_class."""
    label = index // spec.per_class(split)
    return root / split / class_names(spec.classes)[label] / f"{index:06d}.jpg"


def _rng(seed: int, split: str, index: int) -> np.random.Generator:
    seq = np.random.SeedSequence([seed, SPLITS[split], index])
    return np.random.Generator(np.random.PCG64(seq))


def _upsample(small: np.ndarray, size: int) -> np.ndarray:
    """Bilinear upsampling of a (k, k, C) grid to (size, size, C): a smooth random field."""
    k = small.shape[0]
    pos = np.linspace(0, k - 1, size)
    lo = np.minimum(pos.astype(int), k - 2)
    w = pos - lo
    a = np.zeros((size, k))                                   # interpolation matrix (size, k)
    a[np.arange(size), lo] = 1 - w
    a[np.arange(size), lo + 1] = w
    return (a @ small.transpose(2, 0, 1) @ a.T).transpose(1, 2, 0)  # (k, k, C) -> (size, size, C)


def _shape_mask(name: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Boolean mask of a unit-size shape in object coordinates (u right, v down)."""
    if name == "disk":
        return u * u + v * v <= 1
    if name == "square":
        return np.maximum(abs(u), abs(v)) <= 0.82
    if name == "triangle":  # equilateral, circumradius 1, apex up
        return (v <= 0.5) & (math.sqrt(3) * abs(u) <= v + 1)
    if name == "cross":
        return ((abs(u) <= 0.36) & (abs(v) <= 1)) | ((abs(v) <= 0.36) & (abs(u) <= 1))
    if name == "ring":
        r2 = u * u + v * v
        return (r2 <= 1) & (r2 >= 0.5 ** 2)
    if name == "diamond":
        return abs(u) + abs(v) <= 1.1
    if name == "hbar":
        return (abs(u) <= 1.05) & (abs(v) <= 0.42)
    if name == "vbar":
        return (abs(v) <= 1.05) & (abs(u) <= 0.42)
    raise ValueError(f"unknown shape {name!r}")


def _texture(name: str, x: np.ndarray, y: np.ndarray, period: float, phase: float,
             angle: float) -> np.ndarray:
    """Zero-mean pattern in [-1, 1]: sine waves, so a resize filters them cleanly."""
    c, s = math.cos(angle), math.sin(angle)
    xr, yr = c * x + s * y, -s * x + c * y                   # stripes slightly tilted
    wx = np.sin(2 * np.pi * xr / period + phase)
    wy = np.sin(2 * np.pi * yr / period + phase)
    if name == "hstripes":
        return wy
    if name == "vstripes":
        return wx
    if name == "checker":
        return wx * wy * 1.6                                  # same contrast as the stripes
    raise ValueError(f"unknown texture {name!r}")


def _colour(rng: np.random.Generator, lo: float, hi: float) -> np.ndarray:
    return rng.uniform(lo, hi, size=3)


def _clutter(img: np.ndarray, rng: np.random.Generator, x: np.ndarray, y: np.ndarray) -> None:
    """A few small blobs and thin lines: coarse distractors, in place."""
    size = img.shape[0]
    for _ in range(rng.integers(1, 4)):
        cx, cy = rng.uniform(0, size, 2)
        r = rng.uniform(0.02, 0.045) * size
        img[(x - cx) ** 2 + (y - cy) ** 2 <= r * r] = _colour(rng, 0, 255)
    for _ in range(rng.integers(0, 2)):
        (x0, y0), ang = rng.uniform(0, size, 2), rng.uniform(0, np.pi)
        dist = abs((x - x0) * math.sin(ang) - (y - y0) * math.cos(ang))
        along = abs((x - x0) * math.cos(ang) + (y - y0) * math.sin(ang))
        img[(dist <= rng.uniform(0.6, 1.6)) & (along <= rng.uniform(0.1, 0.3) * size)] = \
            _colour(rng, 0, 255)


def render(spec: SyntheticSpec, split: str, index: int) -> tuple[np.ndarray, int]:
    """Image `index` of `split` as (size, size, 3) uint8, and its label."""
    label = index // spec.per_class(split)
    rng = _rng(spec.seed, split, index)
    size = spec.image_size
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5       # pixel centres, (size, size)

    # Background: a smooth random colour field plus clutter.
    base = _colour(rng, 40, 215)
    field = _upsample(rng.normal(0, 25, size=(4, 4, 3)), size)      # (size, size, 3)
    img = (base + field).astype(np.float32)
    _clutter(img, rng, x, y)

    # Object: the class's shape, filled with the class's texture.
    shape, texture = SHAPES[label // len(TEXTURES)], TEXTURES[label % len(TEXTURES)]
    cx, cy = size / 2 + rng.uniform(-0.08, 0.08, 2) * size
    radius = rng.uniform(0.27, 0.35) * size
    rot = math.radians(rng.uniform(-10, 10))
    c, s = math.cos(rot), math.sin(rot)
    u, v = ((x - cx) * c + (y - cy) * s) / radius, (-(x - cx) * s + (y - cy) * c) / radius
    mask = _shape_mask(shape, u, v)
    colour = _colour(rng, 70, 185)
    for _ in range(50):                                             # keep the object visible
        if np.abs(colour - base).sum() >= 150:
            break
        colour = _colour(rng, 70, 185)
    period = rng.uniform(*PERIOD_PX) * size / 128
    pattern = _texture(texture, x, y, period, rng.uniform(0, 2 * np.pi),
                       math.radians(rng.uniform(-8, 8)))
    amplitude = rng.uniform(22, 50)
    img[mask] = colour + amplitude * pattern[mask, None]

    img += rng.normal(0, rng.uniform(3, 10), size=img.shape)       # sensor noise
    return np.clip(np.rint(img), 0, 255).astype(np.uint8), label


def encode_jpeg(pixels: np.ndarray) -> bytes:
    """JPEG bytes (quality 95, 4:2:0), deterministic for the same pixels and libjpeg."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buf, format="JPEG", quality=JPEG_QUALITY, subsampling=2)
    return buf.getvalue()


def write_atomic(path: Path, data: bytes) -> None:
    """Write via a temporary file in the same folder, then rename: never a partial file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _write_chunk(job: tuple[SyntheticSpec, str, str, int, int]) -> int:
    spec, root, split, start, stop = job
    for i in range(start, stop):
        pixels, _ = render(spec, split, i)
        write_atomic(image_path(Path(root), spec, split, i), encode_jpeg(pixels))
    return stop - start


def _init_worker() -> None:
    os.environ["OMP_NUM_THREADS"] = "1"


def generate(spec: SyntheticSpec, root: str | Path, threads: int = 1,
             chunk: int = 64) -> dict[str, int]:
    """Write every image of both splits under root/{train,val}/<class>/; returns the counts."""
    root = Path(root)
    counts = {split: spec.classes * spec.per_class(split) for split in SPLITS}
    jobs = [(spec, str(root), split, a, min(a + chunk, n))
            for split, n in counts.items() for a in range(0, n, chunk)]
    for split in SPLITS:
        for name in class_names(spec.classes):
            (root / split / name).mkdir(parents=True, exist_ok=True)
    if threads <= 1:
        for job in jobs:
            _write_chunk(job)
    else:
        with get_context("spawn").Pool(threads, initializer=_init_worker) as pool:
            for _ in pool.imap_unordered(_write_chunk, jobs):
                pass
    return counts
