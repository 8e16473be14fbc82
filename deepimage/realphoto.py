"""A real-photo dataset in ImageNet layout, cut from photographs shipped inside installed packages.

    python -m deepimage.realphoto --out data/realphoto --seed 0 \
        --classes 12 --train-per-class 240 --val-per-class 60 --image-size 128

writes <out>/train/<class>/*.jpg, <out>/val/<class>/*.jpg, <out>/classes.json (where each
class comes from) and <out>/crops.tsv (each image's crop box in its photograph and its scale, the
crop's side over its region's shorter side: what error analysis needs to ask which crops fail).
No download: the photographs are scikit-image's (skimage/data), scikit-learn's sample images
and matplotlib's sample data, all pinned in envs/requirements.txt. A class is one region of one
photograph (a cell of a --grid x --grid grid), so some classes share a photograph
and differ only in layout and fine detail, others come from different photographs. Classes are
taken two regions per photograph, round-robin over the photographs, so 12 classes are 2 regions
of each of 6 photographs. A sample is a random square crop of its region (side 60-100 % of the
region's shorter side, anywhere inside it) resized to --image-size; every crop is drawn from its
own (seed, class, split, index) generator, so the folder is the same for the same arguments.
Val crops are new crops of the same regions: the set measures what happens to real-photo
statistics under transformations, not generalisation to new photographs.

The multi-scale study's set (deepimage.bench.multiscale's default, 40 train / 200 val per class) takes --grid 4
--per-photo 4 --min-scale 0.35 --classes 24: four regions of each photograph, so most classes share colours and texture
with three others, and crops down to 35 % of a region's side, so a crop shows little of the
region's layout and its fine detail (which 32 px loses) carries more of the class.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

# (package, path inside it, name): colour photographs, the order in which classes take them.
PHOTOS = [
    ("skimage", "data/astronaut.png", "astronaut"),
    ("skimage", "data/chelsea.png", "chelsea"),
    ("skimage", "data/coffee.png", "coffee"),
    ("skimage", "data/rocket.jpg", "rocket"),
    ("sklearn", "datasets/images/china.jpg", "china"),
    ("sklearn", "datasets/images/flower.jpg", "flower"),
    ("matplotlib", "mpl-data/sample_data/grace_hopper.jpg", "grace_hopper"),
    ("skimage", "data/motorcycle_left.png", "motorcycle"),
    ("skimage", "data/ihc.png", "ihc"),
    ("skimage", "data/hubble_deep_field.jpg", "hubble"),
    ("skimage", "data/retina.jpg", "retina"),
]
MIN_SCALE = 0.6  # a crop's side, as a fraction of its region's shorter side: 0.6 .. 1.0
SPLITS = {"train": 0, "val": 1}


@dataclass(frozen=True)
class PhotoClass:
    """One class: a grid cell of one photograph, as a pixel box (top, left, bottom, right)."""

    name: str
    package: str
    path: str
    box: tuple[int, int, int, int]


def photo_path(package: str, rel: str) -> Path:
    """Where an installed package keeps a file (found without importing the package)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"package {package!r} is not installed: run `pip install -r envs/requirements.txt`")
    path = Path(spec.submodule_search_locations[0]) / rel
    if not path.is_file():
        raise ValueError(f"{path}: not shipped by the installed {package!r}; the versions pinned in "
                         "envs/requirements.txt ship it")
    return path


def region_order(grid: int) -> list[tuple[int, int]]:
    """Grid cells, diagonal neighbours first, so the first two regions of a photo are far apart."""
    return sorted(((r, c) for r in range(grid) for c in range(grid)), key=lambda rc: ((rc[0] + rc[1]) % 2, rc))


def catalog(classes: int, grid: int = 2, per_photo: int = 2) -> list[PhotoClass]:
    """The first `classes` classes: `per_photo` regions per photograph, round-robin over PHOTOS."""
    from PIL import Image

    cells = region_order(grid)
    most = len(PHOTOS) * len(cells)
    if not 1 <= per_photo <= len(cells):
        raise ValueError(f"--per-photo {per_photo}: need 1..{len(cells)} (--grid {grid} has {len(cells)} regions)")
    if not 2 <= classes <= most:
        raise ValueError(f"--classes {classes}: need 2..{most} ({len(PHOTOS)} photographs x "
                         f"{len(cells)} regions at --grid {grid}; a larger --grid gives more)")
    out = []
    for block in range(0, len(cells), per_photo):
        for package, rel, name in PHOTOS:
            with Image.open(photo_path(package, rel)) as im:
                w, h = im.size
            for r, c in cells[block:block + per_photo]:
                box = (r * h // grid, c * w // grid, (r + 1) * h // grid, (c + 1) * w // grid)
                out.append(PhotoClass(f"{name}_r{r}c{c}", package, rel, box))
    return out[:classes]


def crop_box(rng: np.random.Generator, box: tuple[int, int, int, int],
             min_scale: float = MIN_SCALE) -> tuple[int, int, int, int]:
    """A random square inside `box`: side min_scale..1 of its shorter side, anywhere in it.
    Returned as PIL's (left, upper, right, lower)."""
    top, left, bottom, right = box
    side = int(round(min(bottom - top, right - left) * rng.uniform(min_scale, 1.0)))
    y = top + int(rng.integers(0, bottom - top - side + 1))
    x = left + int(rng.integers(0, right - left - side + 1))
    return x, y, x + side, y + side


CROPS_HEADER = "split\tclass\tfile\tleft\ttop\tright\tbottom\tscale"


def write_class(out: Path, index: int, cls: PhotoClass, counts: dict[str, int], seed: int, size: int,
                min_scale: float = MIN_SCALE) -> list[str]:
    """Every split's JPEG crops of one class; one crops.tsv row per image written."""
    from PIL import Image

    with Image.open(photo_path(cls.package, cls.path)) as im:
        photo = im.convert("RGB")
    region_side = min(cls.box[2] - cls.box[0], cls.box[3] - cls.box[1])
    rows = []
    for split, n in counts.items():
        folder = out / split / cls.name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            rng = np.random.default_rng(np.random.SeedSequence([seed, index, SPLITS[split], i]))
            box = crop_box(rng, cls.box, min_scale)
            crop = photo.crop(box).resize((size, size), Image.Resampling.BICUBIC)
            name = f"{cls.name}_{i:05d}.jpg"
            crop.save(folder / name, quality=92)
            rows.append("\t".join([split, cls.name, f"{split}/{cls.name}/{name}", *map(str, box),
                                   f"{(box[2] - box[0]) / region_side:.4f}"]))
    return rows


def build(out: str | Path, seed: int, classes: int, train_per_class: int, val_per_class: int,
          image_size: int, grid: int = 2, per_photo: int = 2, min_scale: float = MIN_SCALE) -> list[PhotoClass]:
    """Write the whole folder; refuses a non-empty `out` so stale classes never mix in."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"--out {out}: not empty; remove it or give a new folder")
    if not 0 < min_scale <= 1:
        raise ValueError(f"--min-scale {min_scale}: need 0 < min_scale <= 1 (a fraction of the region's side)")
    if min(train_per_class, val_per_class) < 1 or image_size < 8:
        raise ValueError("need --train-per-class and --val-per-class >= 1 and --image-size >= 8")
    cat = catalog(classes, grid, per_photo)
    rows = [CROPS_HEADER]
    for index, cls in enumerate(cat):
        rows += write_class(out, index, cls, {"train": train_per_class, "val": val_per_class}, seed, image_size,
                            min_scale)
    (out / "crops.tsv").write_text("\n".join(rows) + "\n")
    (out / "classes.json").write_text(json.dumps(
        {"seed": seed, "image_size": image_size, "grid": grid, "per_photo": per_photo, "min_scale": min_scale,
         "classes": [asdict(c) for c in cat]}, indent=2) + "\n")
    return cat


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="new folder for <out>/{train,val}/<class>/*.jpg")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--classes", type=int, default=12)
    p.add_argument("--train-per-class", type=int, default=240)
    p.add_argument("--val-per-class", type=int, default=60)
    p.add_argument("--image-size", type=int, default=128, help="side of each square JPEG (px)")
    p.add_argument("--grid", type=int, default=2, help="regions per side of each photograph")
    p.add_argument("--per-photo", type=int, default=2,
                   help="classes taken from each photograph before the next (4 at --grid 4: neighbours "
                        "that share layout and colour and differ in fine detail)")
    p.add_argument("--min-scale", type=float, default=MIN_SCALE,
                   help="smallest crop side as a fraction of its region's (smaller: less of the layout "
                        "in each crop, more weight on texture)")
    args = p.parse_args(argv)
    try:
        cat = build(args.out, args.seed, args.classes, args.train_per_class, args.val_per_class,
                    args.image_size, args.grid, args.per_photo, args.min_scale)
    except (ValueError, OSError) as e:
        sys.exit(f"realphoto: {e}")
    print(f"realphoto: {len(cat)} classes from {len({c.path for c in cat})} photographs in {args.out}")


if __name__ == "__main__":
    main()
