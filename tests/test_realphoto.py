"""deepimage.realphoto: a tiny real-photo folder in ImageNet layout, the same for the same seed."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from deepimage import realphoto


def _files(root):
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*.jpg"))


def test_builds_imagenet_layout_from_shipped_photographs(tmp_path):
    out = tmp_path / "photos"
    r = subprocess.run([sys.executable, "-m", "deepimage.realphoto", "--out", str(out), "--seed", "1",
                        "--classes", "4", "--train-per-class", "3", "--val-per-class", "2",
                        "--image-size", "24"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    meta = json.loads((out / "classes.json").read_text())
    names = [c["name"] for c in meta["classes"]]
    # two regions of each of the first two photographs: same photo, different regions, and two photos
    assert names == ["astronaut_r0c0", "astronaut_r1c1", "chelsea_r0c0", "chelsea_r1c1"]
    for split, n in (("train", 3), ("val", 2)):
        assert sorted(p.name for p in (out / split).iterdir()) == sorted(names)
        for name in names:
            files = sorted((out / split / name).glob("*.jpg"))
            assert len(files) == n
            with Image.open(files[0]) as im:
                assert im.size == (24, 24) and im.mode == "RGB"


def test_same_seed_same_bytes_other_seed_other_crops(tmp_path):
    args = dict(classes=2, train_per_class=2, val_per_class=1, image_size=16)
    realphoto.build(tmp_path / "a", seed=5, **args)
    realphoto.build(tmp_path / "b", seed=5, **args)
    realphoto.build(tmp_path / "c", seed=6, **args)
    files = _files(tmp_path / "a")
    assert files == _files(tmp_path / "b") == _files(tmp_path / "c")
    assert all((tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes() for f in files)
    assert any((tmp_path / "a" / f).read_bytes() != (tmp_path / "c" / f).read_bytes() for f in files)


def test_crops_stay_inside_their_region():
    rng = np.random.default_rng(0)
    for _ in range(200):
        x0, y0, x1, y1 = realphoto.crop_box(rng, (10, 20, 110, 70))        # 100 x 50 region
        assert 20 <= x0 and x1 <= 70 and 10 <= y0 and y1 <= 110 and x1 - x0 == y1 - y0 >= 30


def test_bad_arguments_name_the_option(tmp_path):
    with pytest.raises(ValueError, match="--classes 999"):
        realphoto.build(tmp_path / "x", seed=0, classes=999, train_per_class=1, val_per_class=1, image_size=16)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "old").write_text("")
    with pytest.raises(ValueError, match="not empty"):
        realphoto.build(tmp_path / "full", seed=0, classes=2, train_per_class=1, val_per_class=1, image_size=16)


def test_per_photo_takes_neighbouring_regions_and_min_scale_bounds_crops(tmp_path):
    cat = realphoto.catalog(8, grid=4, per_photo=4)
    assert [c.name for c in cat] == ["astronaut_r0c0", "astronaut_r0c2", "astronaut_r1c1", "astronaut_r1c3",
                                     "chelsea_r0c0", "chelsea_r0c2", "chelsea_r1c1", "chelsea_r1c3"]
    rng = np.random.default_rng(0)
    sides = [x1 - x0 for x0, _, x1, _ in (realphoto.crop_box(rng, (0, 0, 100, 100), 0.3) for _ in range(300))]
    assert 30 <= min(sides) < 40 and max(sides) <= 100
    with pytest.raises(ValueError, match="--per-photo 17"):
        realphoto.catalog(8, grid=4, per_photo=17)
    with pytest.raises(ValueError, match="--min-scale 0"):
        realphoto.build(tmp_path / "x", seed=0, classes=2, train_per_class=1, val_per_class=1, image_size=16,
                        min_scale=0)


def test_crops_tsv_records_every_image_box_and_scale(tmp_path):
    out = tmp_path / "photos"
    cat = realphoto.build(out, seed=2, classes=4, train_per_class=3, val_per_class=2, image_size=16,
                          grid=4, per_photo=4, min_scale=0.35)
    header, *rows = (out / "crops.tsv").read_text().splitlines()
    assert header.split("\t") == ["split", "class", "file", "left", "top", "right", "bottom", "scale"]
    assert sorted(r.split("\t")[2] for r in rows) == _files(out)
    boxes = {c.name: c.box for c in cat}
    for split, name, _, *box, scale in (r.split("\t") for r in rows):
        left, top, right, bottom = map(int, box)
        r_top, r_left, r_bottom, r_right = boxes[name]
        assert r_left <= left and right <= r_right and r_top <= top and bottom <= r_bottom
        assert 0.35 - 0.01 <= float(scale) <= 1.0 and split in ("train", "val")
