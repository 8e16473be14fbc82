"""The Arrow loader: rank partition over real shards, resume, verification, workers, Horovod.

    pytest tests/test_loader.py
"""
from __future__ import annotations

import gc
import json
import math
import shutil
import subprocess

import numpy as np
import pytest
import torch

from data_fixtures import synthetic_source
from deepimage.data import buffers
from deepimage.data.augment import AugmentConfig
from deepimage.data.layout import DataError
from deepimage.data.loader import ArrowLoader
from deepimage.data.manifest import ShardChecksumError, load_manifest
from deepimage.launch import launch_command, worker_env
from deepimage.shard import ShardParams, build, plan_split

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]
N = 45                                          # 3 classes x 15: not a multiple of any batch


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Raw and JPEG shards of a small synthetic split, ~4 rows per shard (12 shards)."""
    tmp = tmp_path_factory.mktemp("loader")
    plan = plan_split(synthetic_source(tmp / "syn", classes=3, per_class=15, image_size=48), "train")
    raw = build(plan, tmp / "raw", ShardParams(resolution=24, shard_mib=0.009))[0]
    build(plan, tmp / "jpeg", ShardParams(resolution=24, format="jpeg", shard_mib=0.009))
    assert raw.num_samples == N and len(raw.shards) == 12
    return tmp


def epoch_ids(shard_dir, world, batch, epoch=0, **kw):
    """Per rank, the list of per-step sample-id arrays of one epoch."""
    out = []
    for r in range(world):
        loader = ArrowLoader(shard_dir, batch, rank=r, world_size=world, seed=5, **kw)
        loader.set_epoch(epoch)
        out.append([ids.numpy() for _, _, ids in loader])
    return out


def test_batches_have_the_contracted_types_and_shapes(shards):
    loader = ArrowLoader(shards / "raw", batch_size=8, rank=1, world_size=2, crop=24)
    assert (loader.num_samples, len(loader), loader.classes) == (N, 6, load_manifest(shards / "raw").classes)
    images, labels, ids = next(iter(loader))
    assert images.shape == (4, 3, 24, 24) and images.dtype == torch.float32
    assert labels.dtype == ids.dtype == torch.int64 and labels.shape == ids.shape == (4,)
    assert -2.2 < images.min() and images.max() < 2.7                  # ImageNet-normalized
    view = loader.store._images[0]                                      # (rows, S, S, 3) uint8
    assert view.shape[1:] == (27, 27, 3) and not view.flags.owndata and not view.flags.writeable


@pytest.mark.parametrize("world,batch", [(1, 8), (2, 8), (3, 8), (4, 5), (5, 16), (7, 4), (2, 45)])
def test_each_sample_once_per_epoch_over_ranks_and_shards(shards, world, batch):
    per_rank = epoch_ids(shards / "raw", world, batch, epoch=2, augment=AugmentConfig.none())
    steps = math.ceil(N / batch)
    assert all(len(r) == steps for r in per_rank)                       # same step count
    seen = np.concatenate([ids for rank in per_rank for ids in rank])
    assert np.array_equal(np.sort(seen), np.arange(N))                  # once each, all of them
    for s in range(steps):
        sizes = [len(rank[s]) for rank in per_rank]
        assert max(sizes) - min(sizes) <= 1 and sum(sizes) == min(batch, N - s * batch)


def test_evaluation_order_is_sample_id_order(shards):
    (steps,) = epoch_ids(shards / "raw", 1, 8, epoch=3, train=False)
    assert np.array_equal(np.concatenate(steps), np.arange(N))


def test_augmented_sample_does_not_depend_on_world_size(shards):
    def by_id(world):
        out = {}
        for r in range(world):
            loader = ArrowLoader(shards / "raw", 8, rank=r, world_size=world, seed=1)
            for images, _, ids in loader:
                out.update(zip(ids.tolist(), images))
        return out

    one, three = by_id(1), by_id(3)
    assert all(torch.allclose(one[i], three[i], atol=1e-5) for i in range(N))


@pytest.mark.parametrize("fmt", ["raw", "jpeg"])
def test_resume_mid_epoch_restores_the_exact_remaining_batches(shards, fmt):
    def batches(loader):
        return [(x.clone(), y, i) for x, y, i in loader]

    full = ArrowLoader(shards / fmt, 8, rank=1, world_size=2, seed=3)
    full.set_epoch(4)
    expected = batches(full)
    first = ArrowLoader(shards / fmt, 8, rank=1, world_size=2, seed=3)
    first.set_epoch(4)
    it = iter(first)
    head = [next(it) for _ in range(2)]
    state = first.state_dict()
    assert state == {"epoch": 4, "position": 2, "seed": 3}
    resumed = ArrowLoader(shards / fmt, 8, rank=1, world_size=2, seed=99)
    resumed.load_state_dict(json.loads(json.dumps(state)))             # survives a checkpoint
    resumed.set_epoch(4)                                                # the trainer's call
    got = [(x, y, i) for x, y, i in head] + batches(resumed)
    assert len(got) == len(expected) == 6
    for (x, y, i), (ex, ey, ei) in zip(got, expected):
        assert torch.equal(i, ei) and torch.equal(y, ey) and torch.allclose(x, ex, atol=1e-6)
    assert resumed.state_dict()["position"] == 6
    resumed.set_epoch(5)
    assert resumed.state_dict() == {"epoch": 5, "position": 0, "seed": 3}


@pytest.mark.parametrize("fmt", ["raw", "jpeg"])
def test_worker_processes_deliver_the_same_batches(shards, fmt):
    a = ArrowLoader(shards / fmt, 16, seed=2, num_workers=0)
    b = ArrowLoader(shards / fmt, 16, seed=2, num_workers=2)
    for (xa, ya, ia), (xb, yb, ib) in zip(a, b, strict=True):
        assert torch.equal(ia, ib) and torch.equal(ya, yb) and torch.allclose(xa, xb, atol=1e-6)
    assert b.state_dict()["position"] == len(b)


@pytest.mark.parametrize("fmt", ["raw", "jpeg"])
@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("train", [True, False])
def test_device_path_on_cpu_tensors_equals_the_cpu_path(shards, fmt, workers, train):
    """device set: the processes only decode and batch, the training process augments; on CPU
    tensors that is the path a GPU takes, and its batches are the CPU path's, bit for bit."""
    cpu = ArrowLoader(shards / fmt, 16, rank=1, world_size=2, seed=4, train=train, crop=20)
    dev = ArrowLoader(shards / fmt, 16, rank=1, world_size=2, seed=4, train=train, crop=20,
                      num_workers=workers, device="cpu")
    for epoch in (0, 3):
        cpu.set_epoch(epoch)
        dev.set_epoch(epoch)
        for (xa, ya, ia), (xb, yb, ib) in zip(cpu, dev, strict=True):
            assert torch.equal(ia, ib) and torch.equal(ya, yb) and torch.equal(xa, xb)
            assert xb.shape[1:] == (3, 20, 20) and xb.dtype == torch.float32


@pytest.mark.parametrize("workers", [0, 2])
def test_read_epoch_hands_over_decoded_unaugmented_batches(shards, workers):
    loader = ArrowLoader(shards / "jpeg", 16, seed=2, num_workers=workers, device="cpu")
    loader.set_epoch(1)
    loader.position = 1
    steps = loader.steps(2)
    got = list(loader.read_epoch(2))
    assert len(got) == len(steps) == 3 and loader.state_dict()["position"] == 1   # untouched
    for (pixels, labels, ids), rows in zip(got, steps):
        assert pixels.dtype == torch.uint8 and pixels.shape == (len(rows), 27, 27, 3)
        assert np.array_equal(pixels.numpy(), loader.store.images(rows))
        assert np.array_equal(ids, loader.store.sample_ids[rows])
        assert np.array_equal(labels, loader.store.labels[rows])
        assert pixels.is_shared() == (workers > 0)      # handed over without a copy


def _epochs(loader, n: int, whole: bool):
    for epoch in range(n):
        if whole:
            loader.set_epoch(epoch)
            yield from loader
        else:
            yield from loader.read_epoch(epoch)


@pytest.mark.parametrize("whole", [True, False])
def test_held_batches_keep_their_pixels_while_loader_processes_reuse_buffers(shards, whole):
    """Every batch of 6 epochs held at once (30 batches, more than the processes' slots): none is
    written over; dropped, every slot is free again."""
    device = None if whole else "cpu"
    ref = ArrowLoader(shards / "jpeg", 9, seed=2, num_workers=0, device=device)
    pool = ArrowLoader(shards / "jpeg", 9, seed=2, num_workers=2, device=device)
    held = [batch[0] for batch in _epochs(pool, 6, whole)]
    expected = [batch[0] for batch in _epochs(ref, 6, whole)]
    assert len(held) == 30
    for a, b in zip(expected, held, strict=True):
        assert torch.equal(a, b)
    slots = pool._pools[whole][2]
    assert int(slots.flags.sum()) > 0
    del held, a, b
    gc.collect()
    assert int(slots.flags.sum()) == 0


@pytest.mark.parametrize("whole", [True, False])
def test_loader_processes_reuse_their_shared_buffers(shards, monkeypatch, whole):
    """Batches dropped as they come: 30 batches from 2 processes in at most their 2 x 4 slots'
    segments (forked processes count into one shared counter)."""
    made, fresh = torch.zeros(1, dtype=torch.int64).share_memory_(), buffers.shared_buffer

    def counted(*args, **kwargs):
        made.add_(1)
        return fresh(*args, **kwargs)

    monkeypatch.setattr(buffers, "shared_buffer", counted)
    loader = ArrowLoader(shards / "jpeg", 9, seed=2, num_workers=2, device=None if whole else "cpu")
    assert sum(len(batch[2]) for batch in _epochs(loader, 6, whole)) == 6 * N
    assert 2 <= int(made) <= 2 * buffers.SLOTS_PER_PROCESS


def test_workers_persist_across_epochs_and_follow_a_restored_seed(shards):
    def ids_and_images(loader, epoch):
        loader.set_epoch(epoch)
        return [(i.clone(), x.clone()) for x, _, i in loader]

    pooled = ArrowLoader(shards / "jpeg", 8, seed=1, num_workers=2)
    first = ids_and_images(pooled, 0)
    workers = pooled._pools[True][1]._iterator._workers
    pids = [w.pid for w in workers]
    assert all(w.is_alive() for w in workers)
    ids_and_images(pooled, 1)
    assert [w.pid for w in pooled._pools[True][1]._iterator._workers] == pids   # same processes
    pooled.load_state_dict({"epoch": 0, "position": 0, "seed": 6})
    fresh = ArrowLoader(shards / "jpeg", 8, seed=6)
    for (ia, xa), (ib, xb) in zip(ids_and_images(pooled, 0), ids_and_images(fresh, 0), strict=True):
        assert torch.equal(ia, ib) and torch.equal(xa, xb)
    assert not all(torch.equal(a, b) for (a, _), (b, _) in zip(first, ids_and_images(fresh, 0)))


def test_gpu_decode_needs_a_cuda_device_and_bad_values_are_named(shards):
    with pytest.raises(ValueError, match="train.jpeg_decode is 'gpu' but the batches go to the "
                                         "CPU: it needs train.device cuda"):
        ArrowLoader(shards / "jpeg", 8, decode="gpu")
    with pytest.raises(ValueError, match="train.jpeg_decode is 'gpu' but the batches go to cpu"):
        ArrowLoader(shards / "jpeg", 8, decode="gpu", device="cpu")
    with pytest.raises(ValueError, match=r"train.jpeg_decode must be one of \('cpu', 'gpu'\), "
                                         r"got 'nvjpeg'"):
        ArrowLoader(shards / "jpeg", 8, decode="nvjpeg")


@pytest.mark.parametrize("device", [None, "cpu"])
def test_empty_rank_parts_come_through_worker_processes(shards, device):
    """45 samples, batch 14 over 7 ranks: the last step leaves some ranks nothing."""
    sizes = []
    for rank in range(7):
        loader = ArrowLoader(shards / "jpeg", 14, rank=rank, world_size=7, seed=1, num_workers=2,
                             device=device)
        batches = list(loader)
        assert all(x.shape[1:] == (3, 24, 24) and y.dtype == i.dtype == torch.int64
                   for x, y, i in batches)
        sizes.append([len(i) for _, _, i in batches])
    assert sum(map(sum, sizes)) == N and min(s[-1] for s in sizes) == 0


def test_jpeg_and_raw_shards_hold_the_same_samples(shards):
    (raw,) = epoch_ids(shards / "raw", 1, 16, train=False)
    (jpg,) = epoch_ids(shards / "jpeg", 1, 16, train=False)
    assert all(np.array_equal(a, b) for a, b in zip(raw, jpg))


def test_corrupted_shard_is_named_with_both_checksums(shards, tmp_path):
    bad = tmp_path / "raw"
    shutil.copytree(shards / "raw", bad)
    m = load_manifest(bad)
    target = m.shards[5]
    data = bytearray((bad / target.name).read_bytes())
    data[len(data) // 2] ^= 0xFF                                         # one flipped bit pattern
    (bad / target.name).write_bytes(bytes(data))
    with pytest.raises(ShardChecksumError) as e:
        ArrowLoader(bad, 8)
    msg = str(e.value)
    assert target.name in msg and target.sha256 in msg and "found sha256" in msg
    found = msg.split("found sha256 ")[1].split()[0]
    assert len(found) == 64 and found != target.sha256
    with pytest.raises(ShardChecksumError, match=target.name):          # 5 % 2: rank 1 checks it
        ArrowLoader(bad, 8, rank=1, world_size=2)
    ArrowLoader(bad, 8, rank=0, world_size=2)                           # rank 0 checks the others


def test_truncated_or_missing_shard_and_missing_manifest(shards, tmp_path):
    bad = tmp_path / "raw"
    shutil.copytree(shards / "raw", bad)
    name = load_manifest(bad).shards[0].name
    (bad / name).write_bytes((bad / name).read_bytes()[:100])
    with pytest.raises(ShardChecksumError, match=rf"{name}: corrupted shard: expected sha256 \w+ "):
        ArrowLoader(bad, 8)
    (bad / name).unlink()
    with pytest.raises(ShardChecksumError, match=f"{name}: shard listed in the manifest is missing"):
        ArrowLoader(bad, 8)
    (bad / "manifest.json").unlink()
    with pytest.raises(DataError, match="no manifest.*run the shard stage"):
        ArrowLoader(bad, 8)


def test_horovod_ranks_read_disjoint_parts_with_equal_steps(shards, tmp_path):
    cmd = launch_command("horovod", 2, "tests.workers.loader_worker",
                         ["--shards", str(shards / "raw"), "--batch", "8", "--out", str(tmp_path)])
    proc = subprocess.run(cmd, env=worker_env(threads=2, np=2), cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert all(r["len"] == r["max_steps"] == len(r["sizes"]) == 6 for r in ranks)
    assert not set(ranks[0]["ids"]) & set(ranks[1]["ids"])
    assert sorted(ranks[0]["ids"] + ranks[1]["ids"]) == list(range(N))
    local = epoch_ids(shards / "raw", 2, 8, epoch=1)                    # seed 5 here, 7 there
    assert [len(s) for s in local[0]] == ranks[0]["sizes"]


def test_benchmark_runs_and_ends_with_one_json_line():
    proc = subprocess.run([__import__("sys").executable, "-m", "deepimage.bench.loader", "--json",
                           "--images", "24", "--repeats", "1", "--batch", "8"], cwd=ROOT,
                          env=worker_env(threads=2, np=1), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["images"] == 24 and result["format_256"] == result["format_512"] == "jpeg"
    for key in ("vs_torchvision_64", "vs_torchvision_256", "vs_torchvision_512",
                "decode_limit_fraction_256", "decode_limit_fraction_512", "speedup_64",
                "speedup_256", "torchvision_img_s_512", "arrow_decode_img_s_512",
                "decode_limit_img_s_256", "decode_img_s_per_core_simplejpeg_256",
                "augment_ms_grid_sample_512", "augment_ms_all_256", "shard_to_source_64_raw"):
        assert result[key] > 0, key
    assert result["decoder_256"] in ("pil", "simplejpeg", "torchvision")
    assert result["command"] == ("python -m deepimage.bench.loader --json --images 24 "
                                 "--repeats 1 --batch 8")
    assert result["machine"]["cores"] >= 1 and len(result["commit"]) in (40, 7)
    assert result["versions"]["simplejpeg"] and result["versions"]["torchvision"]
    assert result["date"].endswith("+00:00")
