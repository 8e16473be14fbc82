"""Shard stage: messy input, conversions, skipped files, strict mode, atomic and identical reruns.

    pytest tests/test_shard.py
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from data_fixtures import (BAD_FILES, EXIF_ROTATED, EXPECTED_RGB, empty_class_folder,
                           messy_folder, source_json, synthetic_source, tracking_uri, tree_bytes)
from deepimage.data.layout import DataError
from deepimage.data.manifest import load_manifest
from deepimage.shard import ShardParams, build, plan_split

__all__ = ["tracking_uri"]   # the session fixture, re-exported so pytest finds it here
ROOT = Path(__file__).resolve().parents[1]


def read_rows(shard_dir: Path) -> pa.Table:
    m = load_manifest(shard_dir)
    return pa.concat_tables(pa.ipc.open_file(pa.memory_map(str(shard_dir / s.name))).read_all()
                            for s in m.shards)


def shard_cli(src: Path, out: Path, uri: str, *extra: str, resolution: int = 16,
              timeout: float = 120) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "deepimage.shard", "--source", str(src), "--split", "train",
           "--resolution", str(resolution), "--out", str(out), "--threads", "2",
           "--tracking-uri", uri, "--parent-file", str(out.parent / "none.json"), *extra]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)


@pytest.fixture(scope="module")
def messy(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("messy")
    root = messy_folder(tmp / "data")
    return root, source_json(root, tmp / "source.json")


def test_messy_folder_is_sharded_skipping_and_listing_bad_files(messy, tmp_path, tracking_uri):
    root, src = messy
    out = tmp_path / "shards"
    proc = shard_cli(src, out, tracking_uri)
    assert proc.returncode == 0, proc.stderr
    m = load_manifest(out)
    # 12 files in cat (8 awkward + EXIF-rotated + 3 bad) and 2 in dog; hidden and stray ignored.
    assert (m.num_candidates, m.num_samples, m.num_skipped) == (14, 11, 3)
    assert m.classes == ["cat", "dog"] and m.class_counts == [9, 2]
    lines = (out / "skipped.tsv").read_text().splitlines()
    assert lines[0] == "path\treason"
    skipped = dict(line.split("\t") for line in lines[1:])
    assert set(skipped) == BAD_FILES and all(skipped.values())
    assert "truncated" in skipped["cat/truncated.jpg"].lower()
    rows = read_rows(out)
    paths = rows.column("path").to_pylist()
    assert all("/." not in p and not p.startswith(".") and "/" in p for p in paths)
    assert paths == sorted(paths)
    ids = rows.column("sample_id").to_pylist()
    all_files = sorted(list(EXPECTED_RGB) + [EXIF_ROTATED, *BAD_FILES, "dog/dog0.png", "dog/dog1.png"])
    assert [all_files[i] for i in ids] == paths      # id = index in sorted relative-path order
    from mlflow import MlflowClient

    run, = MlflowClient(tracking_uri).search_runs(
        [MlflowClient(tracking_uri).get_experiment_by_name("deepimage").experiment_id],
        filter_string="params.resolution = '16' and attributes.status = 'FINISHED'", max_results=1)
    assert run.data.tags["deepimage.stage"] == "shard"
    assert run.data.metrics["skipped_files"] == 3 and run.data.metrics["samples"] == 11


def test_awkward_modes_decode_to_expected_rgb(messy, tmp_path):
    root, src = messy
    m, _, _ = build(plan_split(src, "train"), tmp_path, ShardParams(resolution=16))
    rows = read_rows(tmp_path)
    s = m.stored_size
    images = np.frombuffer(rows.column("image").combine_chunks().buffers()[1], np.uint8)
    images = images[:rows.num_rows * s * s * 3].reshape(-1, s, s, 3)     # (rows, S, S, 3)
    by_path = dict(zip(rows.column("path").to_pylist(), images))
    for path, rgb in EXPECTED_RGB.items():
        centre = by_path[path][s // 2, s // 2].astype(int)
        assert np.abs(centre - rgb).max() <= 6, (path, centre, rgb)
    rot = by_path[EXIF_ROTATED].mean(axis=(1, 2))                         # (S,) row brightness
    assert rot[:3].max() < 40 and rot[-3:].min() > 215    # EXIF applied: dark top, bright bottom


def test_strict_fails_naming_the_first_bad_file(messy, tmp_path, tracking_uri):
    root, src = messy
    proc = shard_cli(src, tmp_path / "shards", tracking_uri, "--config-json", '{"dataset": {"strict": true}}')
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("shard: error:") and "cat/empty.jpg" in last   # first bad, sorted
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "shards" / "manifest.json").exists()


def test_empty_class_folder_stops_naming_it(tmp_path):
    root = empty_class_folder(tmp_path / "data")
    src = tmp_path / "source.json"
    src.write_text(f'{{"root": "{root}", "classes": ["cat", "empty"]}}')
    with pytest.raises(DataError, match=r"train/empty: empty class folder"):
        plan_split(src, "train")
    proc = shard_cli(src, tmp_path / "shards", f"sqlite:///{tmp_path}/unused.db")  # before MLflow
    assert proc.returncode != 0 and "train/empty: empty class folder" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    return synthetic_source(tmp_path_factory.mktemp("syn"), classes=3, per_class=12, image_size=64)


def test_reruns_are_byte_identical_whatever_the_threads(small, tmp_path):
    params = ShardParams(resolution=24, shard_mib=0.02)
    plan = plan_split(small, "train")
    build(plan, tmp_path / "a", params, threads=1)
    build(plan, tmp_path / "b", params, threads=2)
    first = tree_bytes(tmp_path / "a")
    assert first == tree_bytes(tmp_path / "b")
    build(plan, tmp_path / "a", params, threads=2)                      # rerun in place
    assert tree_bytes(tmp_path / "a") == first
    assert not [n for n in first if n.startswith(".")]                   # no temporaries left


def test_shards_are_bounded_and_raw_rows_have_one_shape(small, tmp_path):
    params = ShardParams(resolution=24, shard_mib=0.02)                 # ~20 KiB: several shards
    m, _, _ = build(plan_split(small, "train"), tmp_path, params)
    row = m.stored_size ** 2 * 3
    assert m.stored_size == 27 and len(m.shards) > 3
    assert sum(s.rows for s in m.shards) == m.num_samples == 36
    for s in m.shards:
        t = pa.ipc.open_file(pa.memory_map(str(tmp_path / s.name))).read_all()
        assert t.schema.field("image").type == pa.binary(row)           # fixed shape (S, S, 3)
        assert t.num_rows * row <= 0.02 * 2 ** 20 and t.num_rows == s.rows
        assert s.bytes == (tmp_path / s.name).stat().st_size


def test_sample_ids_agree_across_resolutions_and_formats(small, tmp_path):
    plan = plan_split(small, "train")
    build(plan, tmp_path / "r16", ShardParams(resolution=16))
    build(plan, tmp_path / "r32", ShardParams(resolution=32, format="jpeg"))
    a, b = read_rows(tmp_path / "r16"), read_rows(tmp_path / "r32")
    for col in ("sample_id", "label", "path"):
        assert a.column(col).to_pylist() == b.column(col).to_pylist()
    from PIL import Image
    import io

    first = Image.open(io.BytesIO(b.column("image")[0].as_py()))
    assert first.format == "JPEG" and first.size == (36, 36)


def test_killed_run_leaves_no_shard_that_reads_as_complete(tmp_path, tracking_uri):
    """SIGKILL while shards are being written (proved: the job was alive, some shards were on disk
    and the manifest was not), then a rerun in the same folder equals a clean build."""
    src = synthetic_source(tmp_path / "syn", classes=3, per_class=60, image_size=64)
    out = tmp_path / "shards"
    params = ShardParams(resolution=64, shard_mib=0.02)       # one image per shard: 180 shards
    cmd = [sys.executable, "-m", "deepimage.shard", "--source", str(src), "--split", "train",
           "--resolution", "64", "--out", str(out), "--threads", "1",
           "--config-json", json.dumps({"shard": {"shard_mib": params.shard_mib}}),
           "--tracking-uri", tracking_uri, "--parent-file", str(tmp_path / "none.json")]
    log = tmp_path / "shard.log"
    with open(log, "wb") as f:      # a file, not a pipe: a full pipe would stall the job
        proc = subprocess.Popen(cmd, cwd=ROOT, start_new_session=True, stdout=f, stderr=f,
                                env=dict(os.environ, OMP_NUM_THREADS="1"))
    deadline = time.time() + 90
    while proc.poll() is None and time.time() < deadline and not (out / "shard-00002.arrow").exists():
        time.sleep(0.05)
    assert proc.poll() is None, f"the job ended before the kill:\n{log.read_text(errors='replace')[-3000:]}"
    os.killpg(proc.pid, signal.SIGKILL)                  # the job and its decode workers
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL           # killed while running, not finished
    written = sorted(out.glob("shard-*.arrow"))
    temporaries = [p for p in out.glob(".*") if ".tmp" in p.name]
    assert written, "no shard was on disk at kill time: the kill came too early to test anything"
    assert not (out / "manifest.json").exists()          # the folder reads as incomplete
    for shard in written:                                # every visible shard is whole
        assert pa.ipc.open_file(pa.memory_map(str(shard))).read_all().num_rows > 0
    m, _, _ = build(plan_split(src, "train"), out, params)
    assert len(m.shards) == m.num_samples == 180 > len(written), (len(written), temporaries)
    assert not [p for p in out.iterdir() if p.name.startswith(".")]   # the rerun cleared the temporaries
    build(plan_split(src, "train"), tmp_path / "clean", params)
    assert tree_bytes(out) == tree_bytes(tmp_path / "clean")
