"""Hostile input is bounded: bombs, refused formats, huge files, odd names and symlink escapes
are skipped with a reason, in the shard stage and in predict, with bounded memory.

    PYTHONPATH=$PWD .venv/bin/python -m pytest -q tests/test_trust_inputs.py
"""
from __future__ import annotations

import csv
import json
import os
import struct
import subprocess
import sys
import tracemalloc
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_fixtures import source_json
from deepimage import per_class, predict
from deepimage.data.decode import MAX_PIXELS, BadImage, decode_square, to_rgb
from deepimage.tsv import read_tsv

ROOT = Path(__file__).resolve().parents[1]
GIB = 1024 ** 3
# Peak resident memory of a process that meets every hostile file: a bomb just over the pixel
# limit adds about 510 MiB when decoded, the 2 GiB file 2 GiB when read whole. predict's process
# holds torch and the model (about 360 MiB), a shard worker only Pillow and pyarrow (about 70).
PREDICT_RSS_BOUND = 700 * 2 ** 20
WORKER_RSS_BOUND = 256 * 2 ** 20
ODD_NAMES = ["tab\there.jpg", "new\nline.jpg", 'quo"te.jpg', os.fsdecode(b"latin\xe9.jpg")]


def bomb_png(path: Path, width: int, height: int) -> Path:
    """A valid all-black grayscale PNG of width x height: a few hundred kB that decode to
    width * height bytes and more (written a row at a time: the test itself stays small)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    z, row, idat = zlib.compressobj(9), b"\x00" * (width + 1), []
    for _ in range(height):
        idat.append(z.compress(row))
    idat.append(z.flush())
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
                     + chunk(b"IDAT", b"".join(idat)) + chunk(b"IEND", b""))
    return path


def eps_file(path: Path) -> Path:
    path.write_text("%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 16 16\n%%EndComments\n"
                    "newpath 0 0 moveto 16 16 lineto stroke\nshowpage\n%%EOF\n")
    return path


def fake_ghostscript(tmp: Path) -> tuple[dict, Path]:
    """An environment whose PATH finds a `gs` that only leaves a mark: running it is the attack."""
    bin_dir, mark = tmp / "fakebin", tmp / "ghostscript-ran"
    bin_dir.mkdir()
    gs = bin_dir / "gs"
    gs.write_text(f"#!/bin/sh\necho \"$@\" >> {mark}\nexit 1\n")
    gs.chmod(0o755)
    return {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "PYTHONPATH": str(ROOT),
            "OMP_NUM_THREADS": "1"}, mark


def sparse(path: Path, size: int = 2 * GIB) -> Path:
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def jpeg(path: Path, colour=(40, 160, 90)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (24, 24), colour).save(path, format="JPEG", quality=95)
    return path


def run_python(code: str, env: dict, timeout: float = 300) -> dict:
    """Run `code` in a fresh interpreter; it prints one JSON line last."""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          timeout=timeout, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------ decode_square on its own
def test_a_bomb_under_pillows_own_limit_is_refused_from_its_header(tmp_path):
    side = int(MAX_PIXELS ** 0.5) + 2                     # just over the limit, under Pillow's 2x
    bomb = bomb_png(tmp_path / "bomb.png", side, side)
    assert bomb.stat().st_size < 2 ** 20
    with pytest.raises(BadImage, match=rf"{side}x{side} .*over the limit of {MAX_PIXELS}"):
        decode_square(str(bomb), 16)
    with pytest.raises(BadImage, match="over the limit"):
        decode_square(bomb.read_bytes(), 16)               # the served model's path: bytes


def test_16_bit_images_narrow_to_8_bit_without_a_wide_copy():
    values = np.random.default_rng(0).integers(0, 65536, (1000, 1000), dtype=np.uint16)
    im = Image.fromarray(values)
    assert im.mode == "I;16"
    tracemalloc.start()
    try:
        rgb = to_rgb(im)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert np.array_equal(np.asarray(rgb)[..., 0], (values >> 8).astype(np.uint8))
    assert peak < 6 * values.size, f"{peak / values.size:.1f} bytes per pixel while narrowing"


@pytest.mark.parametrize("name", ["drawing.eps", "drawing.jpg"])
def test_eps_is_refused_and_ghostscript_never_runs(tmp_path, name):
    env, mark = fake_ghostscript(tmp_path)
    eps = eps_file(tmp_path / name)
    out = run_python(
        "import json\nfrom deepimage.data.decode import BadImage, decode_square\n"
        f"try:\n    decode_square({str(eps)!r}, 16); why = ''\n"
        "except BadImage as e:\n    why = str(e)\nprint(json.dumps(why))", env)
    assert not mark.exists(), f"Ghostscript ran on {name}: {mark.read_text()}"
    assert "accepted formats" in out and "JPEG" in out and "PNG" in out


def test_a_fifo_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    with pytest.raises(BadImage, match="not a regular file"):
        decode_square(str(fifo), 16)


# ------------------------------------------------------------------ the shard stage
@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    """An ImageNet-layout folder with good images beside a bomb, an EPS, a 2 GiB non-image
    file, symlinks out of the root and in it, and names with tab, newline, quote, non-UTF-8."""
    tmp = tmp_path_factory.mktemp("hostile")
    root, outside = tmp / "data", tmp / "outside"
    cat, dog = root / "train" / "cat", root / "train" / "dog"
    jpeg(cat / "good.jpg")
    jpeg(dog / "good.jpg", (0, 90, 200))
    side = int(MAX_PIXELS ** 0.5) + 2
    bomb_png(cat / "bomb.png", side, side)
    eps_file(cat / "drawing.eps")
    sparse(cat / "huge.jpg")
    secret = jpeg(outside / "secret.jpg", (255, 0, 0))
    (cat / "passwd.jpg").symlink_to("/etc/passwd")
    (cat / "escape.jpg").symlink_to(secret)
    (dog / "relative.jpg").symlink_to(Path("..") / ".." / ".." / "outside" / "secret.jpg")
    (dog / "inside.jpg").symlink_to(Path("..") / "cat" / "good.jpg")   # inside the root: followed
    for name in ODD_NAMES:
        jpeg(dog / name, (200, 30, 60))
        (cat / name).write_bytes(b"not an image")
    for split in ("val",):
        jpeg(root / split / "cat" / "v.jpg")
        jpeg(root / split / "dog" / "v.jpg")
    return root, source_json(root, tmp / "source.json")


SKIPPED = {"cat/bomb.png": "over the limit", "cat/drawing.eps": "accepted formats",
           "cat/huge.jpg": "over the limit", "cat/passwd.jpg": "outside the dataset",
           "cat/escape.jpg": "outside the dataset", "dog/relative.jpg": "outside the dataset",
           **{f"cat/{n}": "accepted formats" for n in ODD_NAMES}}


def test_shard_skips_hostile_files_with_reasons_and_bounded_memory(hostile, tmp_path):
    root, src = hostile
    env, mark = fake_ghostscript(tmp_path)
    out = tmp_path / "shards"
    result = run_python(
        "import json, resource\n"
        "from deepimage.shard import ShardParams, build, plan_split\n"
        f"m, skipped, _ = build(plan_split({str(src)!r}, 'train'), {str(out)!r}, ShardParams(resolution=16))\n"
        "peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss   # the decoding worker\n"
        "print(json.dumps({'samples': m.num_samples, 'skipped': m.num_skipped, 'peak_kib': peak}))", env)
    assert not mark.exists(), "Ghostscript ran while sharding"
    assert result["peak_kib"] * 1024 < WORKER_RSS_BOUND, f"peak RSS {result['peak_kib'] // 1024} MiB"
    rows = read_tsv(out / "skipped.tsv")
    assert rows[0] == ["path", "reason"]
    reasons = dict(rows[1:])
    assert len(rows) - 1 == len(reasons) == result["skipped"]
    assert set(reasons) == set(SKIPPED)
    for path, expected in SKIPPED.items():
        assert expected in reasons[path], (path, reasons[path])
    assert "/etc/passwd" not in "".join(reasons.values())
    # good.jpg x2, inside.jpg and the odd names' images in dog: sharded, names kept readable
    assert result["samples"] == 3 + len(ODD_NAMES)
    import pyarrow as pa
    from deepimage.data.manifest import load_manifest

    table = pa.concat_tables(pa.ipc.open_file(pa.memory_map(str(out / s.name))).read_all()
                             for s in load_manifest(out).shards)
    paths = table.column("path").to_pylist()
    assert "dog/inside.jpg" in paths and "dog/tab\there.jpg" in paths and "dog/new\nline.jpg" in paths
    assert "dog/latin\\xe9.jpg" in paths                   # non-UTF-8 byte, escaped


# ------------------------------------------------------------------ predict
def test_predict_gives_each_hostile_file_a_reason_with_bounded_memory(tmp_path):
    env, mark = fake_ghostscript(tmp_path)
    folder = tmp_path / "photos"
    good = jpeg(folder / "good.jpg")
    side = int(MAX_PIXELS ** 0.5) + 2
    files = {str(good): None,
             str(bomb_png(folder / "bomb.png", side, side)): "over the limit",
             str(eps_file(folder / "drawing.eps")): "accepted formats",
             str(sparse(folder / "huge.bin")): "over the limit"}
    os.mkfifo(folder / "pipe.jpg")
    files[str(folder / "pipe.jpg")] = "not a regular file"
    result = run_python(
        "import json, resource, sys\n"
        "from deepimage import predict\n"
        "from deepimage.model import ModelSpec, build_model\n"
        "from deepimage.registry.classifier import Ensemble, Member\n"
        "net = build_model(ModelSpec(num_classes=3, conv=[[8]], fc_hidden=[8, 8])).eval()\n"
        "ens = Ensemble([Member(net, 16, 18)], ['a', 'b', 'c'])\n"
        f"preds, skipped = predict.classify(ens, predict.list_images([{str(folder)!r}]), workers=0)\n"
        # VmHWM: this process's own peak (ru_maxrss would carry the forking pytest's over exec)
        "peak = int(next(l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM:')))\n"
        "print(json.dumps({'done': [p.path for p in preds], 'skipped': skipped, 'peak_kib': peak}))",
        env)
    assert not mark.exists(), "Ghostscript ran in predict"
    assert result["peak_kib"] * 1024 < PREDICT_RSS_BOUND, f"peak RSS {result['peak_kib'] // 1024} MiB"
    assert result["done"] == [str(good)]
    reasons = dict(result["skipped"])
    assert set(reasons) == {p for p, why in files.items() if why}
    for path, why in files.items():
        if why:
            assert why in reasons[path] and "\n" not in reasons[path], (path, reasons[path])


# ------------------------------------------------------------------ tables round-trip any name
def test_predictions_csv_round_trips_any_file_name(tmp_path):
    names = [str(tmp_path / n) for n in ODD_NAMES]
    preds = [predict.Prediction(n, [("a,b", 0.75), ("c\td", 0.25)], np.array([0.75, 0.25]))
             for n in names]
    out = tmp_path / "p.csv"
    predict.write_csv(preds, out)
    with open(out, newline="", encoding="utf-8", errors="surrogateescape") as f:
        rows = list(csv.reader(f))
    assert rows[0] == predict.CSV_HEADER
    assert [r[0] for r in rows[1:]] == names and all(r[1] == "a,b" for r in rows[1:])


def test_per_class_tsv_round_trips_any_class_name(tmp_path):
    classes = ["plain", *ODD_NAMES]
    labels = np.arange(len(classes))
    probs = np.roll(np.eye(len(classes)), 1, axis=1)       # class c always taken for c + 1
    rows = per_class.per_class_rows(probs, labels, classes)
    per_class.write_tsv(rows, tmp_path / "per_class.tsv")
    back = read_tsv(tmp_path / "per_class.tsv")
    assert back[0] == per_class.TSV_HEADER.split("\t")
    assert [r[0] for r in back[1:]] == classes
    assert [r[4] for r in back[1:]] == classes[1:] + classes[:1]
    assert [float(r[2]) for r in back[1:]] == [1.0] * len(classes)
