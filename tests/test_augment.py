"""Each augmentation's defining property, on batched tensors.

    pytest tests/test_augment.py
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from deepimage.data.augment import (CAST_MAX, DISTORTION_MAX, VIGNETTE_MAX, AugmentConfig,
                                    SampleParams, augment_batch, center_crop, color_cast, crop_flip,
                                    hflip, normalize, sample_params, sampling_grid, vignette, warp)

OFF = AugmentConfig.none()


def only(**on) -> AugmentConfig:
    return AugmentConfig(**{**OFF.__dict__, **on})


def images(b=6, s=33, seed=0) -> torch.Tensor:
    """Random uint8 (b, 3, s, s) kept away from 0/255 so shifts do not clamp."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(30, 226, (b, 3, s, s), generator=g, dtype=torch.uint8)


IDS = np.arange(100, 106)


def test_color_cast_is_one_bounded_integer_per_channel():
    x = images()
    out = augment_batch(x, IDS, only(color_cast=True), seed=1, epoch=0, out_size=33)
    diff = out - x.float()                                               # (b, 3, s, s)
    per_channel = diff.flatten(2)
    assert torch.equal(per_channel.amax(-1), per_channel.amin(-1))      # constant per channel
    shifts = per_channel[..., 0]
    assert torch.equal(shifts, shifts.round()) and shifts.abs().max() <= CAST_MAX
    # Over many samples each channel is cast with probability 1/2.
    p = sample_params(only(color_cast=True), 1, 0, np.arange(4000), 33, 33)
    assert 0.45 < (p.cast != 0).mean() < 0.55 + 1 / 41
    assert p.cast.min() == -CAST_MAX and p.cast.max() == CAST_MAX


def test_color_cast_clamps_to_the_pixel_range():
    x = torch.full((1, 3, 2, 2), 250.0)
    assert color_cast(x, np.array([[20, -20, 0]])).amax() == 255


def test_flip_twice_is_identity_and_mirrors():
    x = images().float()
    assert torch.equal(hflip(hflip(x)), x)
    assert torch.equal(hflip(x)[..., 0], x[..., -1])
    flipped = augment_batch(images(), IDS, only(flip=True), 0, 0, 33)
    p = sample_params(only(flip=True), 0, 0, IDS, 33, 33)
    assert p.flip.any() and not p.flip.all()
    for i, f in enumerate(p.flip):
        assert torch.equal(flipped[i], hflip(x[i]) if f else x[i])


def test_vignetting_darkens_corners_more_than_centre():
    x = torch.full((4, 3, 33, 33), 200.0)
    out = vignette(x.clone(), np.array([0.1, 0.2, 0.3, 0.5]))        # in place on its input
    centre, corner = out[:, :, 16, 16], out[:, :, 0, 0]
    assert torch.all(corner < centre) and torch.all(centre > 199.5)
    assert torch.all(out[:, :, 0, 16] > corner) and torch.all(out[:, :, 0, 16] < centre)
    assert torch.equal(vignette(x.clone(), np.zeros(4)), x)


@pytest.mark.parametrize("k", [-0.15, 0.15])     # pincushion and barrel
def test_lens_distortion_keeps_the_centre_and_moves_the_edges(k):
    x = images(b=1, s=33).float()
    p = SampleParams(np.zeros((1, 3), np.int64), np.zeros(1), np.array([k]), np.zeros(1),
                     np.zeros(1, bool), np.zeros((1, 2), np.int64))
    grid = sampling_grid(p, stored=33, size=33)
    out = warp(x, grid)
    assert torch.allclose(out[..., 16, 16], x[..., 16, 16], atol=1e-3)  # centre pixel kept
    ident = sampling_grid(SampleParams(p.cast, p.vignette, np.zeros(1), p.angle, p.flip,
                                       p.offset), 33, 33)
    r_out = grid[0, 16, -1, 0].abs()                                     # right edge, centre row
    r_in = ident[0, 16, -1, 0].abs()
    assert (r_out > r_in) if k > 0 else (r_out < r_in)                  # barrel reaches outward


def test_rotation_by_zero_and_no_distortion_is_identity():
    x = images(b=3, s=33)
    p = sample_params(OFF, 0, 0, IDS[:3], 33, 33)
    assert torch.allclose(warp(x.float(), sampling_grid(p, 33, 33)), x.float(), atol=1e-3)


def test_rotation_turns_the_image_about_its_centre():
    x = torch.zeros(1, 1, 33, 33)
    x[..., 16, 20:] = 1.0                                               # a ray pointing right
    p = SampleParams(np.zeros((1, 3), np.int64), np.zeros(1), np.zeros(1),
                     np.array([np.pi / 2]), np.zeros(1, bool), np.zeros((1, 2), np.int64))
    out = warp(x, sampling_grid(p, 33, 33))[0, 0]
    assert out[16, 16] == 0 and out[16, 20:].sum() < 0.5                # ray left its row...
    assert out[20:, 16].sum() > 10 or out[:13, 16].sum() > 10            # ...and is vertical now
    angles = sample_params(only(rotation_deg=10), 0, 0, np.arange(500), 33, 33).angle
    assert np.abs(angles).max() <= np.radians(10) and np.abs(angles).max() > np.radians(9)


def test_random_crop_is_a_window_of_the_source():
    x = images(b=6, s=40)
    out = augment_batch(x, IDS, only(random_crop=True), 0, 0, out_size=32)
    p = sample_params(only(random_crop=True), 0, 0, IDS, 40, 32)
    assert len({tuple(o) for o in p.offset}) > 1 and p.offset.max() <= 8
    for i, (t, l) in enumerate(p.offset):
        assert torch.equal(out[i], x[i, :, t:t + 32, l:l + 32].float())
    assert torch.equal(center_crop(x, 32), x[:, :, 4:36, 4:36].float())


def test_same_seed_same_output_and_independent_of_batch_composition():
    cfg = AugmentConfig(rotation_deg=15)
    x = images(b=6, s=40)
    a = augment_batch(x, IDS, cfg, seed=3, epoch=2, out_size=32)
    assert torch.equal(a, augment_batch(x, IDS, cfg, seed=3, epoch=2, out_size=32))
    part = augment_batch(x[2:4], IDS[2:4], cfg, seed=3, epoch=2, out_size=32)
    assert torch.allclose(part, a[2:4], atol=1e-4)                        # per-sample seeding
    assert not torch.allclose(a, augment_batch(x, IDS, cfg, seed=3, epoch=3, out_size=32))
    assert not torch.allclose(a, augment_batch(x, IDS, cfg, seed=4, epoch=2, out_size=32))


def test_switching_one_transform_off_keeps_the_others_draws():
    full = sample_params(AugmentConfig(), 0, 1, IDS, 40, 32)
    no_cast = sample_params(AugmentConfig(color_cast=False), 0, 1, IDS, 40, 32)
    assert np.array_equal(full.offset, no_cast.offset) and np.array_equal(full.angle, no_cast.angle)
    assert not no_cast.cast.any()


def test_empty_batch_and_bad_config():
    out = augment_batch(torch.zeros(0, 3, 40, 40, dtype=torch.uint8), np.zeros(0, np.int64),
                        AugmentConfig(), 0, 0, 32)
    assert out.shape == (0, 3, 32, 32)
    with pytest.raises(ValueError, match="unknown key.*'blur'"):
        AugmentConfig.from_config({"blur": True})
    with pytest.raises(ValueError, match="rotation_deg"):
        AugmentConfig.from_config({"rotation_deg": 400})
    with pytest.raises(ValueError, match="larger than the stored"):
        augment_batch(images(b=1, s=30), IDS[:1], AugmentConfig(), 0, 0, 32)


def test_normalize_uses_imagenet_statistics():
    x = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1) * 255
    assert torch.allclose(normalize(x), torch.zeros(1, 3, 1, 1), atol=1e-5)


def test_config_section_of_the_schema_loads():
    import yaml

    from deepimage.config import SCHEMA_PATH

    schema = yaml.safe_load(open(SCHEMA_PATH))
    keys = schema["properties"]["train"]["properties"]["augment"]["properties"]
    defaults = {k: v["default"] for k, v in keys.items()}
    assert AugmentConfig.from_config(defaults) == AugmentConfig()


def test_every_parameter_stays_in_its_range_at_the_papers_sizes():
    """The draws the device path and the CPU path share (one sample_params for both), at the
    stored sizes of 256 and 512 px: each in its range, each range reached."""
    for res in (256, 512):
        stored = int(res * 1.125 + 0.5)
        p = sample_params(AugmentConfig(), 0, 0, np.arange(3000), stored, res)
        assert p.cast.min() == -CAST_MAX and p.cast.max() == CAST_MAX
        assert 0 <= p.vignette.min() < 0.01 and 0.49 < p.vignette.max() <= VIGNETTE_MAX
        assert -DISTORTION_MAX <= p.distortion.min() < -0.14 and 0.14 < p.distortion.max() <= DISTORTION_MAX
        assert np.abs(p.angle).max() <= np.radians(10) and np.abs(p.angle).max() > np.radians(9.9)
        assert p.offset.min() == 0 and p.offset.max() == stored - res
        assert 0.45 < p.flip.mean() < 0.55


def test_augmented_batch_keeps_the_pixel_statistics_at_256_px():
    """Output mean and spread of the full chain stay near the input's (geometry moves pixels,
    the photometric steps shift them by bounded amounts), on CPU tensors of real size."""
    g = torch.Generator().manual_seed(0)
    base = torch.randint(60, 196, (8, 3, 36, 36), generator=g).float()
    x = F.interpolate(base, size=288, mode="bilinear", align_corners=False).round().to(torch.uint8)
    out = augment_batch(x, np.arange(8), AugmentConfig(), 0, 0, 256)
    assert out.shape == (8, 3, 256, 256) and 0 <= out.min() and out.max() <= 255
    assert abs(out.mean() - x.float().mean()) < 15                  # cast +-20, vignette darkens
    assert 0.6 < out.std() / x.float().std() < 1.4


@pytest.mark.parametrize("res,b", [(64, 40), (256, 7), (512, 2)])
def test_augmenting_in_pieces_gives_the_one_piece_values(res, b):
    """The CPU path works through a batch a few samples at a time; each value equals the chain
    of steps applied to the whole batch at once, bit for bit (so the training errors stay)."""
    stored = int(res * 1.125 + 0.5)
    x = torch.randint(0, 256, (b, 3, stored, stored), generator=torch.Generator().manual_seed(1),
                      dtype=torch.uint8)
    ids = np.arange(50, 50 + b)
    for cfg in (AugmentConfig(), only(random_crop=True, flip=True, color_cast=True)):
        p = sample_params(cfg, 2, 1, ids, stored, res)
        if cfg.rotation_deg:
            whole = warp(x.float(), sampling_grid(p, stored, res))
        else:
            whole = crop_flip(x, p.offset, p.flip, res).float()
        if p.cast.any():
            whole = color_cast(whole, p.cast)
        if p.vignette.any():
            whole = vignette(whole, p.vignette)
        got = augment_batch(x, ids, cfg, 2, 1, res, normalized=True)
        assert torch.equal(got, normalize(whole))
        into = torch.full((b, 3, res, res), float("nan"))
        assert augment_batch(x, ids, cfg, 2, 1, res, normalized=True, out=into) is into
        assert torch.equal(into, got)
        assert torch.equal(normalize(augment_batch(x, ids, cfg, 2, 1, res)), got)
