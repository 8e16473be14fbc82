"""The CUDA code paths: fp32 training equals the CPU, bf16 autocast trains in bf16 with fp32
weights, lazy update equals synchronous, the butterfly sums CUDA tensors over several in-process
ranks, GPU augmentation equals CPU augmentation, and the device choice. Skipped without a GPU.

    pytest tests/test_gpu.py        # on a machine with one CUDA GPU; seconds each
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

import fake_transport  # noqa: E402

from deepimage.data.augment import AugmentConfig  # noqa: E402
from deepimage.data.loader import ArrowLoader  # noqa: E402
from deepimage.model import ModelSpec, build_model  # noqa: E402
from deepimage.parallel.butterfly import allreduce_flat_async_, butterfly_allreduce  # noqa: E402
from deepimage.config import Config  # noqa: E402
from deepimage.parallel.parallelize import parallelize  # noqa: E402
from deepimage.parallel.transport import LocalTransport  # noqa: E402
# (tracking imports mlflow only when used)
from deepimage.train import autocast, gather_weights, pick_device, sgd, step  # noqa: E402

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

DEVICE = torch.device("cuda")
# 16 px inputs: (B, 3, 16, 16) -> two conv stages -> (B, 16, 4, 4) -> pooled (B, 64) -> (B, 4)
SPEC = ModelSpec(4, conv=[[8], [16]], fc_hidden=[32, 32], dropout=0.0)
TRAIN = {"lr": 0.05, "momentum": 0.9, "weight_decay": 1e-4, "bucket_mib": 4.0,
         "lazy_update": True, "split_fc": False, "bf16": False, "compute_nice": 0}
# max |error| / max |exact| of a butterfly sum, per dtype (one rounding of an N-term sum, N <= 3)
BUTTERFLY_TOLERANCE = {torch.float32: 1e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


@pytest.fixture
def exact_fp32():
    """No TF32 in matmuls or convolutions, deterministic cuDNN; restored afterwards."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
             torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    yield
    (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
     torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark) = saved


def _batch(n: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed CPU batch: images (n, 3, 16, 16) float32, labels (n,) int64."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 16, 16, generator=g), torch.randint(0, SPEC.num_classes, (n,), generator=g)


class _Trainer:
    """A parallelized model on `transport`, its GradientSync and autocast, stepped by
    deepimage.train's step (the same functions the training stage runs)."""

    def __init__(self, model, transport, train: dict):
        cfg = Config.from_dict({"train": train})
        self.model, self.sync = parallelize(model, transport, cfg, sgd(cfg.train))
        self.amp = autocast(self.model, cfg.train)

    def step(self, images, labels):
        return step(self.model, self.sync, images, labels, self.amp)

    def weights(self) -> dict:
        return {k: v.cpu() for k, v in gather_weights(self.model, self.sync).items()}


def _trainer(device: torch.device | str, **overrides) -> _Trainer:
    return _Trainer(build_model(SPEC, seed=0).to(device), LocalTransport(), {**TRAIN, **overrides})


def _train(device: torch.device | str, steps: int, **overrides) -> tuple[dict, list[float]]:
    """(plain state dict on the CPU, per-step losses) of `steps` steps on the fixed batch, the
    learning rate changing every step (a deferred update must use the one of its own step)."""
    trainer = _trainer(device, **overrides)
    images, labels = _batch()
    losses = []
    for i in range(steps):
        trainer.sync.set_lr(TRAIN["lr"] * (1 + 0.5 * i))
        losses.append(trainer.step(images, labels).loss)
    return trainer.weights(), losses


# ---------------------------------------------------------------------------------------------
# Training on the GPU


def test_fp32_training_on_cuda_equals_the_cpu(exact_fp32):
    """3 steps of the same model on the same batch, fp32 without TF32: every weight within
    rtol 1e-4 / atol 1e-5 of the CPU's, and the losses too."""
    assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
    cpu, cpu_losses = _train("cpu", 3)
    gpu, gpu_losses = _train(DEVICE, 3)
    assert cpu.keys() == gpu.keys()
    for name in cpu:
        torch.testing.assert_close(gpu[name], cpu[name], rtol=1e-4, atol=1e-5, msg=name)
    assert gpu_losses == pytest.approx(cpu_losses, rel=1e-4)
    assert not torch.equal(gpu["features.0.weight"], build_model(SPEC, seed=0).features[0].weight)


def test_bf16_autocast_runs_the_forward_in_bf16_and_keeps_fp32_weights(exact_fp32):
    """train.bf16: a conv's output is bfloat16, the weights, gradient buckets and momentum stay
    float32, the loss over 20 steps falls to under half, and the first loss (no update yet) is
    within bf16 rounding (3e-2 relative) of the fp32 run's."""
    trainer = _trainer(DEVICE, bf16=True)
    seen = []
    trainer.model.features[0].register_forward_hook(lambda m, i, out: seen.append(out.dtype))
    images, labels = _batch()
    losses = [trainer.step(images, labels).loss for _ in range(20)]
    trainer.sync.flush()
    assert seen and set(seen) == {torch.bfloat16}
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())
    assert all(b.flat.dtype == torch.float32 for b in trainer.sync.buckets)
    states = [s for opt in trainer.sync.optimizers() for s in opt.state.values()]
    assert states and all(s["momentum_buffer"].dtype == torch.float32 for s in states)
    assert losses[-1] < 0.5 * losses[0], losses
    fp32_first = _trainer(DEVICE).step(images, labels).loss
    assert losses[0] == pytest.approx(fp32_first, rel=3e-2)


def test_lazy_update_equals_synchronous_on_cuda(exact_fp32):
    """GradientSync lazy=True vs lazy=False, small buckets (several per model), 4 steps with a
    changing learning rate: bitwise identical weights; and a lazy step leaves the weights alone
    until the layer's next forward."""
    lazy, _ = _train(DEVICE, 4, bucket_mib=0.004, lazy_update=True)
    sync, _ = _train(DEVICE, 4, bucket_mib=0.004, lazy_update=False)
    for name in sync:
        assert torch.equal(lazy[name], sync[name]), \
            f"{name} differs by {(lazy[name] - sync[name]).abs().max().item():.3g}"
    trainer = _trainer(DEVICE, bucket_mib=0.004)
    assert len(trainer.sync.buckets) > 1
    conv = trainer.model.features[0]
    before = conv.weight.detach().clone()
    images, labels = _batch()
    trainer.step(images, labels)
    assert torch.equal(conv.weight, before)  # deferred ...
    trainer.model.trunk(images.to(DEVICE))
    assert not torch.equal(conv.weight, before)  # ... to the layer's next forward


# ---------------------------------------------------------------------------------------------
# Several in-process ranks on one GPU (tests/fake_transport.py)


class _LaneFakeTransport(fake_transport.FakeTransport):
    """The fake, accepting the `lane=` the butterfly passes (it has one connection: ignored)."""

    def alltoall_async(self, tensor, splits, *, lane=0, **kw):
        return super().alltoall_async(tensor, splits, **kw)

    def allgather_async(self, tensor, *, lane=0, **kw):
        return super().allgather_async(tensor, **kw)


@pytest.fixture
def run_ranks(monkeypatch):
    """fake_transport.run_ranks over transports that take lane=."""
    monkeypatch.setattr(fake_transport, "FakeTransport", _LaneFakeTransport)
    return fake_transport.run_ranks


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("size", [2, 3])
def test_butterfly_sums_cuda_tensors_over_fake_ranks(run_ranks, size, dtype):
    """(7, 149) tensors (1043 elements: not divisible by 2 or 3), cut into several pieces: the sum
    (out of place) and the in-place average equal the exact ones within one rounding, are
    bitwise identical on every rank, stay on the GPU in their dtype, the input unchanged."""
    g = torch.Generator().manual_seed(size)
    inputs = [(torch.randn(7, 149, generator=g) * 10).to(dtype) for _ in range(size)]  # per rank
    exact = torch.stack([x.double() for x in inputs]).sum(0)  # (7, 149) float64
    piece_mib = 1200 / 2**20  # 300 float32 / 600 16-bit elements: 4 or 2 pieces

    def fn(t):
        mine = inputs[t.rank].to(DEVICE)
        total = butterfly_allreduce(mine, op="sum", transport=t, piece_mib=piece_mib)
        unchanged = torch.equal(mine.cpu(), inputs[t.rank])
        flat = mine.clone().view(-1)
        mean = allreduce_flat_async_(flat, "average", t, piece_mib).wait()
        torch.cuda.synchronize()
        return total, mean, unchanged, mean.data_ptr() == flat.data_ptr()

    results = run_ranks(size, fn)
    scale = exact.abs().max().item()
    for rank, (total, mean, unchanged, in_place) in enumerate(results):
        where = f"rank {rank}"
        assert total.device.type == DEVICE.type and total.dtype == dtype and total.shape == (7, 149), where
        assert unchanged and in_place, where
        assert (total.double().cpu() - exact).abs().max().item() <= BUTTERFLY_TOLERANCE[dtype] * scale, where
        err = (mean.double().cpu().view(7, 149) - exact / size).abs().max().item()
        assert err <= BUTTERFLY_TOLERANCE[dtype] * scale / size, where
        assert torch.equal(total, results[0][0]) and torch.equal(mean, results[0][1]), f"{where} differs"


def test_two_fake_ranks_on_cuda_train_like_one_process(run_ranks, exact_fp32):
    """Synchronous GradientSync (the butterfly of every bucket from step(), on the rank's own
    thread) over 2 ranks with 6 + 10 of the 16 samples: weights identical on both ranks and
    within rtol 1e-4 / atol 1e-5 of one process trained on all 16.

    Lazy update and split FC are not run this way: their collectives run inside backward, on
    autograd's one CUDA thread, where one fake rank's barrier would wait for the other's
    backward queued behind it (real ranks are separate processes; tests/test_lazy.py)."""
    images, labels = _batch()
    cuts = [0, 6, 16]
    # Several buckets on both lanes: on CUDA each butterfly runs inline on its rank's thread (on
    # the CPU, one progress thread per lane would share the fake's single set of slots).
    cfg = {**TRAIN, "lazy_update": False, "split_fc": False, "bucket_mib": 0.004}
    models = [build_model(SPEC, seed=0).to(DEVICE) for _ in range(2)]  # global RNG: not in threads

    def fn(t):
        trainer = _Trainer(models[t.rank], t, cfg)
        lo, hi = cuts[t.rank], cuts[t.rank + 1]
        for _ in range(3):
            trainer.step(images[lo:hi], labels[lo:hi])
        return trainer.weights()

    ranks = run_ranks(2, fn)
    plain = _Trainer(build_model(SPEC, seed=0).to(DEVICE), LocalTransport(), cfg)
    for _ in range(3):
        plain.step(images, labels)
    one = plain.weights()
    for name in one:
        assert torch.equal(ranks[0][name], ranks[1][name]), f"{name} differs between ranks"
        torch.testing.assert_close(ranks[0][name], one[name], rtol=1e-4, atol=1e-5, msg=name)


# ---------------------------------------------------------------------------------------------
# Data and device


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """Raw shards of a small synthetic split: 3 classes x 8, stored at 24 px (+ crop margin)."""
    pytest.importorskip("PIL")
    from data_fixtures import synthetic_source
    from deepimage.shard import ShardParams, build, plan_split

    tmp = tmp_path_factory.mktemp("gpu_loader")
    plan = plan_split(synthetic_source(tmp / "syn", classes=3, per_class=8, image_size=48), "train")
    build(plan, tmp / "raw", ShardParams(resolution=24, shard_mib=0.009))
    return tmp / "raw"


@pytest.mark.parametrize("augment", ["all", "crop_flip", "eval"])
def test_loader_augments_on_the_gpu_as_on_the_cpu(shards, augment):
    """ArrowLoader(device="cuda") yields the CPU path's batches: images on the GPU within 1e-3
    (normalized scale; grid_sample rounds differently), labels and sample ids equal."""
    cfg = AugmentConfig.none() if augment == "crop_flip" else AugmentConfig()
    kw = dict(batch_size=8, seed=3, train=augment != "eval", augment=cfg, crop=20)
    cpu, gpu = ArrowLoader(shards, **kw), ArrowLoader(shards, device=DEVICE, **kw)
    pairs = list(zip(cpu, gpu))
    assert len(pairs) == len(cpu) == 3
    for (x, y, ids), (gx, gy, gids) in pairs:
        assert gx.device.type == DEVICE.type and gx.dtype == torch.float32 and gx.shape == x.shape
        torch.testing.assert_close(gx.cpu(), x, rtol=0, atol=1e-3)
        assert torch.equal(gy.cpu(), y) and torch.equal(gids.cpu(), ids)


def test_pick_device_gives_this_workers_gpu(monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.delenv("HOROVOD_LOCAL_RANK", raising=False)
    assert pick_device("auto") == torch.device("cuda", 0)
    assert pick_device("cuda") == torch.device("cuda", 0)
    assert pick_device("cpu") == torch.device("cpu")
    monkeypatch.setenv("LOCAL_RANK", str(torch.cuda.device_count()))  # one worker too many
    with pytest.raises(ValueError, match="local rank .* GPU\\(s\\) are visible"):
        pick_device("auto")


def test_profile_times_a_cuda_worker_with_events():
    """perfmodel.profile on the GPU: CUDA-event times per layer, inside the step's own times."""
    from deepimage.perfmodel.profile import _leaves, profile

    prof = profile(Config.from_dict({"train": {"bf16": True}}), SPEC, 16, 16, steps=3, device="cuda")
    assert prof.forward_s > 0 and prof.backward_s > 0 and len(prof.layers) == len(_leaves(build_model(SPEC)))
    assert sum(layer["forward_s"] for layer in prof.layers) <= prof.forward_s
    assert all(0 < b["ready_s"] <= prof.backward_s for b in prof.buckets)
