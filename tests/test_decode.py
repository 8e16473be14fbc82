"""The loader's JPEG decoder: the same pixels as Pillow's decoder of the shards' bytes, and a
clear error for rows that are not what the shard stage wrote.

    pytest tests/test_decode.py
"""
from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_fixtures import synthetic_source
from deepimage import realphoto
from deepimage.data.decode import BadImage, _decode_pillow, decode_stored_jpeg
from deepimage.data.layout import DataError
from deepimage.data.loader import ArrowLoader
from deepimage.shard import ShardParams, build, plan_split


def pillow(data: bytes) -> np.ndarray:
    """The reference: Pillow's decoder (what the loader decoded JPEG rows with before)."""
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"), dtype=np.uint8)


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """source.json of real photographs (skimage / matplotlib crops) and of the synthetic set."""
    tmp = tmp_path_factory.mktemp("decode")
    cat = realphoto.build(tmp / "photos", seed=0, classes=4, train_per_class=6, val_per_class=1,
                          image_size=150)
    photos = tmp / "photos.json"
    photos.write_text(json.dumps({"root": str(tmp / "photos"), "classes": [c.name for c in cat]}))
    return {"photos": photos,
            "synthetic": synthetic_source(tmp / "syn", classes=3, per_class=8, image_size=96)}


@pytest.mark.parametrize("source", ["photos", "synthetic"])
@pytest.mark.parametrize("resolution,quality", [(64, 90), (100, 90), (57, 75), (128, 95)])
def test_shard_rows_decode_to_pillows_pixels(sources, tmp_path, source, resolution, quality):
    m, _, _ = build(plan_split(sources[source], "train"), tmp_path / "shards",
                    ShardParams(resolution=resolution, format="jpeg", jpeg_quality=quality))
    loader = ArrowLoader(tmp_path / "shards", batch_size=8, train=False)
    rows = np.arange(m.num_samples)
    ours = loader.store.images(rows)                                 # (n, S, S, 3) uint8
    reference = np.stack([pillow(b) for b in loader.store.encoded(rows)])
    assert ours.shape == (m.num_samples, m.stored_size, m.stored_size, 3)
    assert np.array_equal(ours, reference)
    fallback = np.empty_like(ours)                       # without simplejpeg installed
    for i, b in enumerate(loader.store.encoded(rows)):
        _decode_pillow(b, fallback[i])
    assert np.array_equal(fallback, reference)


def test_decodes_into_the_given_buffer():
    pixels = np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
    out = np.zeros((2, 40, 40, 3), np.uint8)
    got = decode_stored_jpeg(buf.getvalue(), out[1])
    assert np.shares_memory(got, out) and np.array_equal(out[1], pillow(buf.getvalue()))
    assert not out[0].any()


@pytest.mark.parametrize("decode", [decode_stored_jpeg, _decode_pillow])
def test_wrong_size_or_not_a_jpeg_is_a_bad_image(decode):
    buf = io.BytesIO()
    Image.new("RGB", (30, 20)).save(buf, format="JPEG")
    with pytest.raises(BadImage, match="JPEG row is 20x30, the shards store 24x24"):
        decode(buf.getvalue(), np.empty((24, 24, 3), np.uint8))
    with pytest.raises(BadImage, match="Error"):
        decode(b"not a jpeg at all", np.empty((24, 24, 3), np.uint8))


def test_a_corrupt_row_names_the_shard_and_row(sources, tmp_path):
    import pyarrow as pa

    m, _, _ = build(plan_split(sources["synthetic"], "train"), tmp_path / "shards",
                    ShardParams(resolution=32, format="jpeg"))
    path = tmp_path / "shards" / m.shards[0].name
    table = pa.ipc.open_file(pa.memory_map(str(path), "r")).read_all()
    images = table.column("image").to_pylist()
    images[1] = b"garbage"
    table = table.set_column(table.schema.get_field_index("image"), table.schema.field("image"),
                             pa.array(images, table.schema.field("image").type))
    with pa.OSFile(str(path), "wb") as f, pa.ipc.new_file(f, table.schema) as w:
        w.write_table(table)
    loader = ArrowLoader(tmp_path / "shards", batch_size=4, train=False, verify=False)
    with pytest.raises(DataError, match=rf"{m.shards[0].name}: row 1: .*rerun the shard stage"):
        loader.store.images(np.array([0, 1]))


def test_decode_benchmark_runs_and_ends_with_one_json_line():
    proc = subprocess.run([sys.executable, "-m", "deepimage.bench.decode", "--json", "--images",
                           "12", "--resolutions", "64", "--repeats", "1"],
                          cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    assert r["stored_size_64"] == 72 and r["decoder_64"] in ("pil", "simplejpeg", "torchvision")
    for key in ("decode_img_s_per_core_pil_64", "decode_img_s_per_core_simplejpeg_64",
                "decode_limit_img_s_64", "augment_ms_all_64", "augment_ms_grid_sample_64"):
        assert r[key] > 0, key
    assert r["command"].startswith("python -m deepimage.bench.decode --json")
