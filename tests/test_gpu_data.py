"""The data plane on a CUDA GPU: JPEG rows decoded on the device (train.jpeg_decode: gpu) against
the CPU decoder, and the device-augmented batches' statistics against the CPU path's at 256 px,
fed by loader processes. Skipped without a GPU (the same code path on CPU tensors is tested in
tests/test_loader.py: test_device_path_on_cpu_tensors_equals_the_cpu_path).

    pytest tests/test_gpu_data.py        # on a machine with one CUDA GPU and torchvision's CUDA build
"""
from __future__ import annotations

import pytest
import torch

from data_fixtures import synthetic_source
from deepimage.data.loader import ArrowLoader
from deepimage.shard import ShardParams, build, plan_split

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def jpeg_shards(tmp_path_factory):
    """JPEG shards at 256 px (stored 288 px) of a small synthetic split: 3 classes x 8."""
    tmp = tmp_path_factory.mktemp("gpu_data")
    plan = plan_split(synthetic_source(tmp / "syn", classes=3, per_class=8, image_size=320), "train")
    build(plan, tmp / "jpeg", ShardParams(resolution=256, format="jpeg"))
    return tmp / "jpeg"


def test_gpu_decoded_rows_are_near_the_cpu_decoders(jpeg_shards):
    """nvJPEG's IDCT and chroma upsampling are not libjpeg-turbo's: pixels within a few levels."""
    cpu = ArrowLoader(jpeg_shards, 8, train=False, crop=288)
    gpu = ArrowLoader(jpeg_shards, 8, train=False, crop=288, device="cuda", decode="gpu")
    for (x, y, ids), (gx, gy, gids) in zip(cpu, gpu, strict=True):
        assert gx.device.type == "cuda" and gx.shape == x.shape == (8, 3, 288, 288)
        diff = (gx.cpu() - x).abs() * 0.226 * 255             # back to pixel levels (about)
        assert diff.mean() < 1.0 and diff.max() < 40
        assert torch.equal(gy, y) and torch.equal(gids, ids)


@pytest.mark.parametrize("decode", ["cpu", "gpu"])
def test_device_augmented_batches_match_the_cpu_paths_statistics(jpeg_shards, decode):
    kw = dict(batch_size=8, seed=3, train=True, crop=256)
    cpu = ArrowLoader(jpeg_shards, **kw)
    dev = ArrowLoader(jpeg_shards, num_workers=2, device="cuda", decode=decode, **kw)
    a = torch.cat([x for x, _, _ in cpu])
    b = torch.cat([x.cpu() for x, _, _ in dev])
    assert a.shape == b.shape == (24, 3, 256, 256)
    assert abs(a.mean() - b.mean()) < 0.02 and abs(a.std() / b.std() - 1) < 0.02
    if decode == "cpu":                                    # same pixels, grid_sample's rounding
        torch.testing.assert_close(b, a, rtol=0, atol=1e-3)
