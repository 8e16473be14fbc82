"""GradientSync (butterfly buckets + lazy update): N-process training equals one-process training
on the global batch under horovodrun and torchrun; lazy and synchronous give the same weights.

    pytest tests/test_lazy.py
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from deepimage.parallel.lazy import GradientSync, GradientSyncError, assign_lanes, make_buckets
from deepimage.parallel.transport import LocalTransport

from workers.transport_launch import launch_worker  # noqa: E402

TOLERANCE = 1e-5
EXPECTED_CHECKS = {"several_buckets", "lazy_step_defers_the_update", "flush_applies_the_update",
                   "state_dict_roundtrip", "lazy_equals_sync_exactly", "overlap_equals_sync_exactly",
                   "model_parallel_param_stepped_locally", "collective_beside_butterflies"}


@pytest.mark.parametrize("np", [2, 3])
@pytest.mark.parametrize("launcher", ["horovod", "torchrun"])
def test_training_matches_one_process(launcher, np, tmp_path):
    """6 SGD-momentum steps with uneven local batches (and, for N = 3, a rank with none), lr
    changing every step: sync, lazy and op=average all within 1e-5 of one-process training."""
    reports = launch_worker(launcher, np, "tests.workers.lazy_check", tmp_path)
    for report in reports:
        where = f"rank {report['rank']} ({launcher}, np={np})"
        assert not report["errors"], f"{where}: {report['errors']}"
        assert set(report["checks"]) == EXPECTED_CHECKS
        failed = [name for name, ok in report["checks"].items() if not ok]
        assert not failed, f"{where} failed {failed}"
        for variant in ("sync", "lazy", "average"):
            diffs = report["rel_diff"][variant]
            worst = max(diffs, key=diffs.get)
            assert diffs[worst] < TOLERANCE, f"{where} {variant}: {worst} differs by {diffs[worst]:.3g}"


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3))


def _sgd(params):
    return torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=1e-3)


def test_one_process_matches_plain_sgd_and_defers_to_the_next_forward():
    plain, model = _net(), _net()
    opt = _sgd(plain.parameters())
    sync = GradientSync(model, LocalTransport(), _sgd, bucket_mib=1e-5, lazy=True)
    assert len(sync.buckets) == 6  # 10-byte buckets: one parameter each
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    for _ in range(3):
        opt.zero_grad()
        F.cross_entropy(plain(x), y).backward()
        opt.step()
        sync.zero_grad()
        F.cross_entropy(model(x), y).backward()
        before = model[0].weight.detach().clone()
        sync.step()
        assert torch.equal(model[0].weight, before)  # deferred ...
    model(x)  # ... to the layer's next forward
    assert not torch.equal(model[0].weight, before)
    sync.flush()
    for p, q in zip(model.parameters(), plain.parameters()):
        assert torch.allclose(p, q, rtol=0, atol=1e-7)


def test_buckets_run_last_layer_first_and_split_by_size():
    params = list(_net().parameters())
    buckets = make_buckets(params[::-1], bucket_mib=100 / 2**20)  # 100 bytes
    assert [p for b in buckets for p in b.params] == params[::-1]
    assert all(sum(p.numel() * 4 for p in b.params) <= 100 or len(b.params) == 1 for b in buckets)
    with pytest.raises(GradientSyncError, match="bucket_mib"):
        make_buckets(params, 0)


def test_first_layers_buckets_take_the_priority_lane():
    """The last buckets (first layers), up to the byte fraction and at least one, go on lane 1."""
    params = [nn.Parameter(torch.zeros(n)) for n in (10, 20, 30, 40)]  # first layer first
    buckets = make_buckets(params[::-1], bucket_mib=1e-6)  # one parameter per bucket
    assert [b.params[0].numel() for b in buckets] == [40, 30, 20, 10]
    assign_lanes(buckets, 0.35)  # 35 of 100 elements: the first two layers (10 + 20)
    assert [b.lane for b in buckets] == [0, 0, 1, 1]
    lanes = make_buckets(params[::-1], 1e-6)
    assign_lanes(lanes, 0.01)
    assert [b.lane for b in lanes] == [0, 0, 0, 1]  # at least the first layer's bucket
    none = make_buckets(params[::-1], 1e-6)
    assign_lanes(none, 0.0)
    assert all(b.lane == 0 for b in none)
    single = make_buckets(params, 1.0)
    assign_lanes(single, 0.35)
    assert len(single) == 1 and single[0].lane == 0  # nothing to overtake
    with pytest.raises(GradientSyncError, match="priority_fraction"):
        assign_lanes(buckets, 1.5)


def test_a_second_backward_in_one_step_is_refused():
    """Once backward hooks have sent a bucket, more gradient for it would be lost: refuse."""
    model = _net()
    sync = GradientSync(model, LocalTransport(), _sgd, bucket_mib=64, lazy=False, overlap=True)
    x = torch.randn(2, 6)
    model(x).sum().backward()
    assert sync.buckets[0].handle is not None  # sent from the hooks, before step()
    with pytest.raises(RuntimeError, match="backward once per step"):
        model(x).sum().backward()


def test_synchronous_mode_sends_nothing_until_step():
    """lazy=False (the default overlap): every bucket starts after backward, in step()."""
    model = _net()
    sync = GradientSync(model, LocalTransport(), _sgd, bucket_mib=64, lazy=False)
    model(torch.randn(2, 6)).sum().backward()
    assert all(b.handle is None for b in sync.buckets)
    sync.step()
    assert all(b.handle is None and not b.pending for b in sync.buckets)  # waited and applied


def test_learning_rate_of_a_deferred_update_is_the_one_at_step():
    """set_lr between step() and the next forward must not change the deferred update."""
    a, b = _net(), _net()
    sync_a = GradientSync(a, LocalTransport(), _sgd, bucket_mib=4, lazy=True)
    sync_b = GradientSync(b, LocalTransport(), _sgd, bucket_mib=4, lazy=False)
    x = torch.randn(4, 6)
    for model, sync in ((a, sync_a), (b, sync_b)):
        sync.zero_grad()
        model(x).pow(2).sum().backward()
        sync.step()
        sync.set_lr(10.0)
        sync.flush()
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)
