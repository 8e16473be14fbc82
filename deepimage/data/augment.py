"""The paper's augmentations on batched tensors (the same code on CPU and GPU).

    aug = AugmentConfig.from_config(config["train"]["augment"])
    x = augment_batch(images_uint8, sample_ids, aug, seed, epoch, out_size=64)  # float 0..255

Each sample's random parameters come from its own generator seeded by (seed, epoch, sample_id),
so an augmented sample is the same whatever the world size, batch or worker that produces it.
Every parameter is always drawn (also for switched-off transforms), so switching one transform
off leaves the others' draws unchanged.

Geometry (random crop, flip, rotation, lens distortion) is one sampling grid and one
`grid_sample` from the stored square to the output; without rotation and distortion it is an
exact integer window (and flip), no resampling. Photometry (colour cast, vignetting) follows on
the smaller output.

The robustness stage applies one family at a fixed strength through the same functions:

    x = graded_batch(images_uint8, sample_ids, "rotation", 30, seed, out_size=64)  # float 0..255
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields

import numpy as np
import torch
import torch.nn.functional as F

from deepimage.config import default_field

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CAST_MAX = 20              # paper: each channel, with probability 1/2, + one integer in [-20, 20]
VIGNETTE_MAX = 0.5         # corners darkened by up to this fraction
DISTORTION_MAX = 0.15      # k in r' = r (1 + k r^2): k > 0 barrel, k < 0 pincushion


@dataclass(frozen=True)
class AugmentConfig:
    """Which augmentations run (train.augment in config.yaml; a field left out: the schema's)."""

    color_cast: bool = default_field("train.augment.color_cast")
    vignetting: bool = default_field("train.augment.vignetting")
    lens_distortion: bool = default_field("train.augment.lens_distortion")
    rotation_deg: float = default_field("train.augment.rotation_deg")
    flip: bool = default_field("train.augment.flip")
    random_crop: bool = default_field("train.augment.random_crop")

    def __post_init__(self):
        if not 0 <= self.rotation_deg <= 180:
            raise ValueError(f"train.augment.rotation_deg must be in [0, 180], "
                             f"got {self.rotation_deg}")

    @classmethod
    def from_config(cls, cfg: dict | None) -> "AugmentConfig":
        """From the `train.augment` mapping; an unknown key raises naming it."""
        cfg = dict(cfg or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(cfg) - known)
        if unknown:
            raise ValueError(f"train.augment: unknown key(s) {unknown}; known: {sorted(known)}")
        return cls(**cfg)

    @classmethod
    def none(cls) -> "AugmentConfig":
        return cls(color_cast=False, vignetting=False, lens_distortion=False, rotation_deg=0.0,
                   flip=False, random_crop=False)


@dataclass
class SampleParams:
    """Per-sample random parameters of one batch, as numpy arrays with a leading batch axis."""

    cast: np.ndarray        # (b, 3) int: per-channel shift, 0 where the coin said no
    vignette: np.ndarray    # (b,) strength in [0, VIGNETTE_MAX]
    distortion: np.ndarray  # (b,) k in [-DISTORTION_MAX, DISTORTION_MAX]
    angle: np.ndarray       # (b,) radians
    flip: np.ndarray        # (b,) bool
    offset: np.ndarray      # (b, 2) int: (top, left) of the crop window in the stored image
    zoom: np.ndarray | None = None  # (b,) window side / output side (< 1 zooms in); None: all 1

    def take(self, rows: slice) -> "SampleParams":
        """The parameters of samples `rows`."""
        return SampleParams(*(None if v is None else v[rows] for v in
                              (self.cast, self.vignette, self.distortion, self.angle, self.flip,
                               self.offset, self.zoom)))


def sample_params(cfg: AugmentConfig, seed: int, epoch: int, sample_ids: np.ndarray,
                  stored: int, out_size: int) -> SampleParams:
    """Draw every sample's parameters from its own (seed, epoch, sample_id) generator."""
    b, slack = len(sample_ids), stored - out_size
    p = SampleParams(np.zeros((b, 3), np.int64), np.zeros(b), np.zeros(b), np.zeros(b),
                     np.zeros(b, bool), np.full((b, 2), slack // 2, np.int64))
    for i, sid in enumerate(np.asarray(sample_ids, dtype=np.int64)):
        rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, epoch, int(sid)])))
        cast = rng.integers(-CAST_MAX, CAST_MAX + 1, size=3) * (rng.random(3) < 0.5)
        vig, k, u, flip = rng.random(), rng.uniform(-1, 1), rng.uniform(-1, 1), rng.random() < 0.5
        offset = rng.integers(0, slack + 1, size=2)
        if cfg.color_cast:
            p.cast[i] = cast
        if cfg.vignetting:
            p.vignette[i] = vig * VIGNETTE_MAX
        if cfg.lens_distortion:
            p.distortion[i] = k * DISTORTION_MAX
        p.angle[i] = math.radians(u * cfg.rotation_deg)
        p.flip[i] = flip and cfg.flip
        if cfg.random_crop:
            p.offset[i] = offset
    return p


def crop_flip(x: torch.Tensor, offset: np.ndarray, flip: np.ndarray, size: int) -> torch.Tensor:
    """Exact integer crop windows, then horizontal flips: (b, C, S, S) -> (b, C, size, size)."""
    if not len(x):
        return x[:, :, :size, :size].clone()
    out = torch.stack([x[i, :, t:t + size, l:l + size] for i, (t, l) in enumerate(offset)])
    if flip.any():
        idx = torch.as_tensor(np.flatnonzero(flip), device=x.device)
        out[idx] = out[idx].flip(-1)
    return out


def hflip(x: torch.Tensor) -> torch.Tensor:
    """Mirror left-right: (b, C, H, W) -> (b, C, H, W)."""
    return x.flip(-1)


def sampling_grid(p: SampleParams, stored: int, size: int, device=None) -> torch.Tensor:
    """Where each output pixel samples the stored image, for grid_sample: (b, size, size, 2).

    Output pixel centres q, relative to the crop window's centre and scaled to [-1, 1], are
    distorted radially (q -> q s, s = 1 + k |q|^2: the centre stays put), then mapped by one
    affine map per sample that mirrors (flip), rotates, moves into the window and normalizes
    to the stored image (align_corners=False): grid = s A q + t. A q is an outer sum of a row
    and a column term, so each coordinate costs a few passes over (b, size, size).
    """
    b = len(p.flip)
    f32 = dict(dtype=torch.float32, device=device)
    q = (torch.arange(size, **f32) + 0.5) / size * 2 - 1                  # (size,) x or y
    c = size / stored * (np.ones(b) if p.zoom is None else p.zoom)       # (b,) window -> [-1, 1]
    mirror = np.where(p.flip, -1.0, 1.0)
    cos, sin = np.cos(p.angle) * c, np.sin(p.angle) * c
    centre = (p.offset + size / 2) / stored * 2 - 1                       # (b, 2) as (y, x)
    coef = torch.as_tensor(np.stack([cos * mirror, -sin, centre[:, 1],
                                     sin * mirror, cos, centre[:, 0]], 1), **f32)  # (b, 6)
    k = torch.as_tensor(p.distortion, **f32).view(b, 1, 1)
    s = (q.view(size, 1) ** 2 + q.view(1, size) ** 2) * k + 1             # (b, size, size)
    grid = torch.empty(b, size, size, 2, **f32)
    for axis, (ax, ay, at) in enumerate(((0, 1, 2), (3, 4, 5))):
        row = (coef[:, ax, None] * q).view(b, 1, size)                     # x term, (b, 1, size)
        col = (coef[:, ay, None] * q).view(b, size, 1)                     # y term, (b, size, 1)
        torch.addcmul(coef[:, at].view(b, 1, 1), row + col, s, out=grid[..., axis])  # t + s A q
    return grid


def warp(x: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """Bilinear resampling, edges reflected: (b, C, S, S) -> (b, C, size, size)."""
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def color_cast(x: torch.Tensor, cast: np.ndarray) -> torch.Tensor:
    """Add one integer per sample and channel, clamped to 0..255, in place: (b, 3, H, W)."""
    shift = torch.as_tensor(cast, dtype=x.dtype, device=x.device).view(-1, 3, 1, 1)
    return x.add_(shift).clamp_(0, 255)


def vignette(x: torch.Tensor, strength: np.ndarray) -> torch.Tensor:
    """Darken towards the corners, in place: factor 1 - s r^2 / 2, r = 0 at the centre and
    sqrt(2) at the corners: (b, C, H, W)."""
    b, _, h, w = x.shape
    ys = (torch.arange(h, dtype=x.dtype, device=x.device) + 0.5) / h * 2 - 1
    xs = (torch.arange(w, dtype=x.dtype, device=x.device) + 0.5) / w * 2 - 1
    r2 = ys.view(h, 1) ** 2 + xs.view(1, w) ** 2                        # (h, w)
    s = torch.as_tensor(strength, dtype=x.dtype, device=x.device).view(b, 1, 1, 1)
    return x.mul_(1 - s * r2 / 2)                                       # (b, 1, h, w) factor


def normalize(x: torch.Tensor) -> torch.Tensor:
    """0..255 -> ImageNet mean/std normalized, in place."""
    mean = torch.tensor(IMAGENET_MEAN, dtype=x.dtype, device=x.device).view(1, 3, 1, 1) * 255
    std = torch.tensor(IMAGENET_STD, dtype=x.dtype, device=x.device).view(1, 3, 1, 1) * 255
    inv_std = 1 / std
    return x.sub_(mean).mul_(inv_std)


def augment_batch(images: torch.Tensor, sample_ids: np.ndarray, cfg: AugmentConfig, seed: int,
                  epoch: int, out_size: int, normalized: bool = False,
                  out: torch.Tensor | None = None) -> torch.Tensor:
    """uint8 (b, 3, S, S) -> augmented float32 (b, 3, out_size, out_size) on the 0..255 scale,
    or normalized (`normalize`'s values) with normalized=True; written into `out` when given."""
    stored = images.shape[-1]
    if out_size > stored:
        raise ValueError(f"crop {out_size} px is larger than the stored {stored} px")
    p = sample_params(cfg, seed, epoch, sample_ids, stored, out_size)
    return apply_params(images, p, out_size, resample=cfg.lens_distortion or cfg.rotation_deg > 0,
                        normalized=normalized, out=out)


# On the CPU a batch is augmented a few samples at a time, so that each sample's float copy,
# grid and output stay in cache through every step instead of each step streaming the whole
# batch through memory (at 512 px, 10 MB a sample). Every step is element-wise or per sample,
# so the values are the same as in one piece.
_CHUNK_BYTES = 8 << 20


def _chunk(images: torch.Tensor, out_size: int) -> int:
    """Samples per piece: the whole batch on a GPU or when it fits the chunk."""
    if images.device.type != "cpu":
        return max(1, len(images))
    per_sample = 4 * images.shape[1] * (images.shape[-1] ** 2 + 2 * out_size ** 2)  # float bytes
    return max(1, _CHUNK_BYTES // per_sample)


def apply_params(images: torch.Tensor, p: SampleParams, out_size: int, resample: bool,
                 normalized: bool = False, out: torch.Tensor | None = None) -> torch.Tensor:
    """Geometry, then photometry, with given parameters: uint8 (b, 3, S, S) -> float (b, 3, out, out).

    resample=False takes the exact integer windows (p.offset, p.flip) and ignores angle,
    distortion and zoom. A cast or vignette that is zero for every sample is skipped (a no-op).
    normalized=True ends with `normalize`. `out`: float32 (b, 3, out, out) to write into.
    """
    b, step = len(images), _chunk(images, out_size)
    steps = (p.cast.any(), p.vignette.any(), normalized)           # decided for the whole batch
    if step >= b and out is None:
        return _apply(images, p, out_size, resample, *steps)
    if out is None:
        out = torch.empty((b, images.shape[1], out_size, out_size), dtype=torch.float32,
                          device=images.device)
    for i in range(0, b, step):
        part = slice(i, i + step)
        out[part] = _apply(images[part], p.take(part), out_size, resample, *steps)
    return out


def _apply(images: torch.Tensor, p: SampleParams, out_size: int, resample: bool, cast: bool,
           vignetting: bool, normalized: bool) -> torch.Tensor:
    stored = images.shape[-1]
    if resample:
        x = warp(images.float(), sampling_grid(p, stored, out_size, images.device))
    else:
        x = crop_flip(images, p.offset, p.flip, out_size).float()      # exact: no resampling
    if cast:
        x = color_cast(x, p.cast)
    if vignetting:
        x = vignette(x, p.vignette)
    return normalize(x) if normalized else x


def center_crop(images: torch.Tensor, out_size: int) -> torch.Tensor:
    """Evaluation view: the centre window, as float: uint8 (b, 3, S, S) -> (b, 3, size, size)."""
    stored = images.shape[-1]
    if out_size > stored:
        raise ValueError(f"crop {out_size} px is larger than the stored {stored} px")
    t = (stored - out_size) // 2
    return images[:, :, t:t + out_size, t:t + out_size].float()


# One transformation family at a fixed strength (the robustness stage): the name, the unit of its
# strength, and the largest strength the maths allows. Strength 0 is the evaluation view.
GRADED = {
    "color_cast": ("added to each channel, sign drawn per channel (pixel levels)", 255),
    "rotation": ("rotation, sign drawn per image (degrees)", 180),
    "vignetting": ("corner darkening (fraction; 1 = black corners)", 1),
    "lens_distortion": ("barrel distortion k in r' = r (1 + k r^2)", 1),
    "flip": ("horizontal flip (1 = mirrored)", 1),
    "crop": ("area cut away, the rest scaled up to the input (fraction)", 0.75),
}
_GRADED_TAG = 0x0B05  # in the seed sequence, so graded draws never repeat training's (seed, epoch, id)


def check_strength(family: str, strength: float) -> None:
    """A clear error for an unknown family or a strength outside [0, its maximum]."""
    if family not in GRADED:
        raise ValueError(f"unknown transformation family {family!r}; known: {sorted(GRADED)}")
    top = GRADED[family][1]
    if not 0 <= strength <= top or (family == "flip" and strength not in (0, 1)):
        raise ValueError(f"robustness.strengths.{family}: {strength} is outside "
                         f"{'{0, 1}' if family == 'flip' else f'[0, {top}]'}")


def graded_params(family: str, strength: float, seed: int, sample_ids: np.ndarray,
                  stored: int, out_size: int) -> SampleParams:
    """The evaluation view with one family at a fixed strength; signs and crop positions are
    drawn from each sample's own (seed, family, sample_id) generator."""
    check_strength(family, strength)
    b, slack = len(sample_ids), stored - out_size
    p = SampleParams(np.zeros((b, 3), np.int64), np.zeros(b), np.zeros(b), np.zeros(b),
                     np.zeros(b, bool), np.full((b, 2), slack // 2, np.int64), np.ones(b))
    if family == "crop" and strength > 0:
        p.offset = p.offset.astype(np.float64)      # sub-pixel windows: resampled, never sliced
    fam = list(GRADED).index(family)
    for i, sid in enumerate(np.asarray(sample_ids, dtype=np.int64)):
        rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence(
            [seed, _GRADED_TAG, fam, int(sid)])))
        sign, u = rng.choice([-1, 1], size=3), rng.random(2)
        if family == "color_cast":
            p.cast[i] = sign * round(strength)
        elif family == "rotation":
            p.angle[i] = sign[0] * math.radians(strength)
        elif family == "vignetting":
            p.vignette[i] = strength
        elif family == "lens_distortion":
            p.distortion[i] = strength
        elif family == "flip":
            p.flip[i] = bool(strength)
        else:  # crop: a window of (1 - strength) of the area, anywhere inside the evaluation view
            p.zoom[i] = math.sqrt(1 - strength)
            p.offset[i] = slack / 2 + (u - 0.5) * out_size * (1 - p.zoom[i])
    return p


def graded_batch(images: torch.Tensor, sample_ids: np.ndarray, family: str, strength: float,
                 seed: int, out_size: int) -> torch.Tensor:
    """uint8 (b, 3, S, S) -> float32 (b, 3, out_size, out_size), 0..255: the centre crop with one
    family at one strength; strength 0 equals center_crop exactly."""
    stored = images.shape[-1]
    if out_size > stored:
        raise ValueError(f"crop {out_size} px is larger than the stored {stored} px")
    p = graded_params(family, strength, seed, sample_ids, stored, out_size)
    resample = strength > 0 and family in ("rotation", "lens_distortion", "crop")
    return apply_params(images, p, out_size, resample)
