"""Builders of real input folders for the data-plane tests: a messy ImageNet-layout folder with
every kind of bad and awkward file, an empty-class folder, and a small synthetic dataset.

    from data_fixtures import messy_folder, EXPECTED_RGB, BAD_FILES
"""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

SIZE = 24                      # fixture images are tiny: decoding is not what is being timed

# Decodable awkward files of class "cat" and the RGB their centre should decode to.
EXPECTED_RGB = {
    "cat/plain.jpg": (40, 160, 90),
    "cat/UPPER.JPEG": (200, 30, 60),
    "cat/gray.png": (100, 100, 100),            # mode L
    "cat/palette.png": (10, 200, 30),           # mode P
    "cat/transparent.png": (255, 255, 255),     # RGBA, alpha 0: composited onto white
    "cat/cmyk.jpg": (255, 0, 0),                # CMYK (0, 255, 255, 0) is red
    "cat/deep16.png": (156, 156, 156),          # I;16 value 40000: high byte 156
    "cat/animated.gif": (255, 0, 0),            # first frame red, second blue
}
EXIF_ROTATED = "cat/exif_rotated.jpg"           # stored landscape left black/right white, tag 6
BAD_FILES = {"cat/truncated.jpg", "cat/empty.jpg", "cat/notes.jpg"}   # skipped with a reason
IGNORED = ["train/cat/.hidden.jpg", "train/.DS_Store", "train/stray.jpg",
           "train/dog/.thumbs/t.jpg"]


@pytest.fixture(scope="session")
def tracking_uri(tmp_path_factory) -> str:
    """One throw-away MLflow sqlite store for the session (creating its tables takes seconds)."""
    return f"sqlite:///{tmp_path_factory.getbasetemp() / 'mlflow.db'}"


def _solid(mode: str, colour, size=(SIZE, SIZE)) -> Image.Image:
    return Image.new(mode, size, colour)


def _save(img: Image.Image, path: Path, **kw) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, **kw)


def _jpeg_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def write_awkward(cat: Path) -> None:
    """Every decodable-but-awkward kind of file, in one class folder."""
    _save(_solid("RGB", EXPECTED_RGB["cat/plain.jpg"], (SIZE + 8, SIZE)), cat / "plain.jpg",
          quality=95)
    _save(_solid("RGB", EXPECTED_RGB["cat/UPPER.JPEG"]), cat / "UPPER.JPEG", format="JPEG",
          quality=95)
    _save(_solid("L", 100), cat / "gray.png")
    pal = _solid("RGB", EXPECTED_RGB["cat/palette.png"]).convert("P", palette=Image.ADAPTIVE)
    _save(pal, cat / "palette.png")
    _save(_solid("RGBA", (200, 0, 0, 0)), cat / "transparent.png")
    _save(_solid("CMYK", (0, 255, 255, 0)), cat / "cmyk.jpg", quality=95)
    deep = Image.fromarray(np.full((SIZE, SIZE), 40000, np.uint16))
    assert deep.mode == "I;16"
    _save(deep, cat / "deep16.png")
    frames = [_solid("RGB", (255, 0, 0)), _solid("RGB", (0, 0, 255))]
    _save(frames[0], cat / "animated.gif", save_all=True, append_images=frames[1:], duration=50)
    land = _solid("RGB", (0, 0, 0), (2 * SIZE, SIZE))
    land.paste((255, 255, 255), (SIZE, 0, 2 * SIZE, SIZE))
    exif = Image.Exif()
    exif[0x0112] = 6                              # display = stored rotated 90 degrees clockwise
    _save(land, cat / Path(EXIF_ROTATED).name, quality=95, exif=exif.tobytes())


def write_bad(cat: Path) -> None:
    """Files that cannot be decoded: truncated JPEG, empty file, text named .jpg."""
    data = _jpeg_bytes(Image.fromarray(np.random.default_rng(0).integers(
        0, 255, (SIZE * 4, SIZE * 4, 3), dtype=np.uint8)))
    (cat / "truncated.jpg").write_bytes(data[:len(data) // 2])
    (cat / "empty.jpg").write_bytes(b"")
    (cat / "notes.jpg").write_text("this is not an image\n")


def messy_folder(root: Path) -> Path:
    """ImageNet-layout folder: train/{cat,dog}, val/{cat,dog}, with every awkward case in train/cat."""
    cat = root / "train" / "cat"
    cat.mkdir(parents=True)
    write_awkward(cat)
    write_bad(cat)
    _save(_solid("RGB", (1, 2, 3)), cat / ".hidden.jpg", quality=95)
    (root / "train" / ".DS_Store").write_bytes(b"\x00\x01")
    _save(_solid("RGB", (9, 9, 9)), root / "train" / "stray.jpg", quality=95)
    for i, colour in enumerate([(0, 90, 200), (220, 220, 0)]):
        _save(_solid("RGB", colour), root / "train" / "dog" / f"dog{i}.png")
    _save(_solid("RGB", (5, 5, 5)), root / "train" / "dog" / ".thumbs" / "t.jpg", quality=95)
    for cls, colour in (("cat", (40, 160, 90)), ("dog", (0, 90, 200))):
        _save(_solid("RGB", colour), root / "val" / cls / "v0.jpg", quality=95)
    return root


def empty_class_folder(root: Path) -> Path:
    """Like an ImageNet folder, but train/empty holds only a hidden file."""
    for split in ("train", "val"):
        for cls in ("cat", "empty"):
            (root / split / cls).mkdir(parents=True)
        _save(_solid("RGB", (1, 1, 1)), root / split / "cat" / "a.jpg", quality=95)
    (root / "train" / "empty" / ".DS_Store").write_bytes(b"")
    _save(_solid("RGB", (1, 1, 1)), root / "val" / "empty" / "b.jpg", quality=95)
    return root


def source_json(root: Path, out: Path) -> Path:
    """The dataset stage's description of `root`, written without running the stage."""
    from deepimage.dataset import describe_folder

    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(describe_folder(str(root))))
    return out


def synthetic_source(tmp: Path, classes: int = 3, per_class: int = 20, image_size: int = 64,
                     seed: int = 0) -> Path:
    """A small built-in dataset in `tmp` and its source.json (generated in-process)."""
    from deepimage import synthetic
    from deepimage.dataset import build_synthetic

    spec = synthetic.SyntheticSpec(seed=seed, classes=classes, train_per_class=per_class,
                                   val_per_class=max(1, per_class // 4), image_size=image_size)
    desc = build_synthetic(tmp, spec, threads=1)
    path = tmp / "source.json"
    path.write_text(json.dumps(desc))
    return path


def tree_bytes(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` (hidden ones too) by relative path: for byte-identity checks."""
    return {p.relative_to(folder).as_posix(): p.read_bytes()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def tiny_train_shards(tmp: Path) -> Path:
    """Tiny 16 px train shards in tmp/shards: 3 classes x 24 images, 9 steps of 8 per epoch."""
    from deepimage.shard import ShardParams, build, plan_split

    plan = plan_split(synthetic_source(tmp / "syn", classes=3, per_class=24, image_size=32), "train")
    build(plan, tmp / "shards", ShardParams(resolution=16))
    return tmp / "shards"
