"""Split fully connected layers: arithmetic with a fake in-process transport, equivalence with
one-process training under real horovodrun / torchrun launches, and checkpoints.

    pytest tests/test_split_fc.py
"""
from __future__ import annotations

import json
from collections import Counter
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from fake_transport import run_ranks  # noqa: E402

from deepimage.launch import launch_command, worker_env  # noqa: E402
from deepimage.model import DeepImageNet, FCHead, ModelSpec, build_model  # noqa: E402
from deepimage.parallel.mappings import (ClassParallelCrossEntropy, class_parallel_cross_entropy,  # noqa: E402
                                         copy_to_region, gather_columns_from_region,
                                         gather_row_counts, gather_rows_from_region,
                                         reduce_from_region, scatter_rows_to_owners)
from deepimage.parallel.even_split import partition_range, partition_sizes  # noqa: E402
from deepimage.parallel.split_fc import is_model_parallel, split_head  # noqa: E402
from deepimage.parallel.state import (gather_optimizer_state, gather_state_dict,  # noqa: E402
                                      load_optimizer_state, shard_state_dict)
from workers import split_fc_equivalence as eq  # noqa: E402
from workers.transport_launch import run_launch  # noqa: E402

torch.set_num_threads(1)


def shard_rows(x: torch.Tensor, counts: list[int], rank: int) -> torch.Tensor:
    start = sum(counts[:rank])
    return x[start:start + counts[rank]]


# ---------------------------------------------------------------------------------------------
# Partition and slicing

def test_partition_gives_first_ranks_one_more():
    assert partition_sizes(13, 4) == [4, 3, 3, 3]
    assert partition_sizes(7, 3) == [3, 2, 2]
    assert partition_sizes(8, 4) == [2, 2, 2, 2]
    assert [partition_range(10, r, 3) for r in range(3)] == [(0, 4), (4, 7), (7, 10)]


def test_shard_state_dict_slices_and_reassembles_plain_weights():
    sd = build_model(eq.SPEC).state_dict()
    shards = [shard_state_dict(sd, r, 3) for r in range(3)]
    assert [s["head.fc1.weight"].shape[0] for s in shards] == [5, 4, 4]  # 13 outputs
    assert [s["head.fc2.weight"].shape[1] for s in shards] == [5, 4, 4]  # 13 inputs
    assert [s["head.classifier.weight"].shape[0] for s in shards] == [3, 2, 2]  # 7 classes
    for key, dim in [("head.fc1.weight", 0), ("head.fc1.bias", 0), ("head.fc2.weight", 1),
                     ("head.classifier.weight", 0), ("head.classifier.bias", 0)]:
        assert torch.equal(torch.cat([s[key] for s in shards], dim), sd[key])
    for s in shards:  # replicated: fc2's bias and the whole trunk
        assert torch.equal(s["head.fc2.bias"], sd["head.fc2.bias"])
        assert torch.equal(s["features.0.weight"], sd["features.0.weight"])


def test_shard_state_dict_rejects_a_dict_without_the_head():
    with pytest.raises(KeyError, match="head.fc1.weight"):
        shard_state_dict({"fc1.weight": torch.zeros(2, 2)}, 0, 2)


def test_split_head_rejects_layers_narrower_than_the_process_count():
    head = FCHead(8, [13, 3], 7, 0.0)
    with pytest.raises(ValueError, match=r"fc_hidden\[1\] >= 4, got 3"):
        run_ranks(4, lambda t: split_head(head, t))


def test_split_head_marks_every_shard_parameter_model_parallel():
    model = build_model(eq.SPEC)
    heads = run_ranks(2, lambda t: split_head(model.head, t))
    assert all(is_model_parallel(p) for h in heads for p in h.parameters())
    assert not any(is_model_parallel(p) for p in model.features.parameters())


# ---------------------------------------------------------------------------------------------
# Mapping Functions: forward and backward against their definitions (3 fake ranks)

def _upstream(shape, rank: int) -> torch.Tensor:
    """A different upstream gradient on every rank, so sums over ranks are visible."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(100 + rank))


def test_copy_to_region_is_identity_forward_and_sums_gradients_backward():
    x0 = torch.randn(4, 5)

    def fn(t):
        x = x0.clone().requires_grad_()
        y = copy_to_region(x, t)
        (y * _upstream(y.shape, t.rank)).sum().backward()
        return y.detach(), x.grad

    out = run_ranks(3, fn)
    expected_grad = sum(_upstream((4, 5), r) for r in range(3))
    for y, grad in out:
        assert torch.equal(y, x0)
        torch.testing.assert_close(grad, expected_grad)


def test_reduce_from_region_sums_forward_and_is_identity_backward():
    parts = [torch.randn(4, 5) for _ in range(3)]

    def fn(t):
        x = parts[t.rank].clone().requires_grad_()
        y = reduce_from_region(x, t)
        (y * _upstream(y.shape, t.rank)).sum().backward()
        return y.detach(), x.grad

    for rank, (y, grad) in enumerate(run_ranks(3, fn)):
        torch.testing.assert_close(y, parts[0] + parts[1] + parts[2])
        torch.testing.assert_close(grad, _upstream((4, 5), rank))


def test_gather_rows_concatenates_forward_and_reduce_scatters_backward():
    counts = [3, 0, 2]  # rank 1 has no rows
    full = torch.randn(5, 4)

    def fn(t):
        x = shard_rows(full, counts, t.rank).clone().requires_grad_()
        assert gather_row_counts(x.shape[0], t) == counts
        y = gather_rows_from_region(x, t, counts)  # (b_r, 4) -> (5, 4)
        (y * _upstream(y.shape, t.rank)).sum().backward()
        return y.detach(), x.grad

    total = sum(_upstream((5, 4), r) for r in range(3))
    for rank, (y, grad) in enumerate(run_ranks(3, fn)):
        assert torch.equal(y, full)
        torch.testing.assert_close(grad, shard_rows(total, counts, rank))


def test_gather_columns_concatenates_forward_and_slices_backward():
    sizes = [3, 2, 2]
    full = torch.randn(4, 7)

    def fn(t):
        start = sum(sizes[:t.rank])
        x = full[:, start:start + sizes[t.rank]].clone().requires_grad_()
        y = gather_columns_from_region(x, t, sizes)  # (4, K_r) -> (4, 7)
        g = _upstream(y.shape, 0)  # the same upstream on every rank, as a replicated loss gives
        (y * g).sum().backward()
        return y.detach(), x.grad, g[:, start:start + sizes[t.rank]]

    for y, grad, expected in run_ranks(3, fn):
        assert torch.equal(y, full)
        assert torch.equal(grad, expected)


def test_scatter_rows_to_owners_exchanges_blocks_and_inverts_backward():
    rows, cols = [2, 0, 3], [3, 2, 2]
    full = torch.randn(5, 7)

    def fn(t):
        start = sum(cols[:t.rank])
        x = full[:, start:start + cols[t.rank]].clone().requires_grad_()  # (B, K_r)
        y = scatter_rows_to_owners(x, t, rows, cols)  # (b_r, K)
        g = shard_rows(_upstream((5, 7), 0), rows, t.rank)
        (y * g).sum().backward()
        return y.detach(), x.grad

    g_full = _upstream((5, 7), 0)
    for rank, (y, grad) in enumerate(run_ranks(3, fn)):
        assert torch.equal(y, shard_rows(full, rows, rank))
        start = sum(cols[:rank])
        assert torch.equal(grad, g_full[:, start:start + cols[rank]])


# ---------------------------------------------------------------------------------------------
# Class-parallel cross-entropy

def _class_parallel(logits: torch.Tensor, target: torch.Tensor, size: int):
    """Loss, prediction and logits gradient from `size` fake ranks, each holding its classes."""
    sizes = partition_sizes(logits.shape[1], size)

    def fn(t):
        start = sum(sizes[:t.rank])
        x = logits[:, start:start + sizes[t.rank]].clone().requires_grad_()
        loss, predicted = class_parallel_cross_entropy(x, target, start, t)
        loss.mean().backward()
        return loss.detach(), predicted, x.grad

    out = run_ranks(size, fn)
    return out[0][0], out[0][1], torch.cat([o[2] for o in out], 1), out


@pytest.mark.parametrize("size", [1, 2, 3, 4])
def test_class_parallel_cross_entropy_matches_the_plain_one(size):
    logits = torch.randn(6, 11, dtype=torch.float64) * 3
    target = torch.tensor([0, 10, 4, 5, 7, 2])
    loss, predicted, grad, out = _class_parallel(logits, target, size)
    x = logits.clone().requires_grad_()
    F.cross_entropy(x, target).backward()
    torch.testing.assert_close(loss, F.cross_entropy(logits, target, reduction="none"))
    torch.testing.assert_close(grad, x.grad)
    assert torch.equal(predicted, logits.argmax(1))
    assert all(torch.equal(o[0], loss) for o in out)  # identical on every rank


def test_class_parallel_cross_entropy_is_stable_and_breaks_ties_as_argmax():
    logits = torch.tensor([[1e4, 0.0, 0.0, 1e4, -1e4], [5.0, 5.0, 5.0, 5.0, 5.0]])
    target = torch.tensor([3, 4])
    loss, predicted, _, _ = _class_parallel(logits, target, 3)  # classes split [2, 2, 1]
    assert torch.isfinite(loss).all()
    torch.testing.assert_close(loss, F.cross_entropy(logits, target, reduction="none"))
    assert predicted.tolist() == [0, 0]  # lowest class id among ties, across ranks


def test_cross_entropy_helpers_arithmetic():
    shifted = torch.tensor([[-1.0, 0.0], [-2.0, -3.0]])
    target_logit, local_target, in_range = ClassParallelCrossEntropy.target_logits(
        shifted, torch.tensor([3, 1]), class_start=2)
    assert target_logit.tolist() == [0.0, 0.0] and in_range.tolist() == [True, False]
    assert local_target.tolist() == [1, 0]
    grad = ClassParallelCrossEntropy.logits_grad(torch.full((2, 2), 0.25), local_target, in_range,
                                                 torch.tensor([1.0, 2.0]))
    assert grad.tolist() == [[0.25, -0.75], [0.5, 0.5]]


# ---------------------------------------------------------------------------------------------
# The split head on fake ranks against the plain head

def _split_vs_plain(size: int, dropout: float = 0.0, train: bool = True):
    spec = ModelSpec(num_classes=7, conv=[[4], [8]], fc_hidden=[13, 10], dropout=dropout)
    plain = build_model(spec)
    plain.train(train)
    features = torch.randn(10, 32, generator=torch.Generator().manual_seed(3))
    labels = torch.randint(0, 7, (10,), generator=torch.Generator().manual_seed(4))
    counts = partition_sizes(10, size - 1) + [0] if size > 1 else [10]  # last rank empty
    # Built here, not in the rank threads: build_model seeds the process-wide RNG.
    models = [build_model(spec) for _ in range(size)]

    def fn(t):
        head = split_head(models[t.rank].head, t)
        head.train(train)
        x = shard_rows(features, counts, t.rank).clone().requires_grad_()
        loss, correct = head.loss(x, shard_rows(labels, counts, t.rank))
        loss.backward()
        with torch.no_grad():
            full, local = head.full_logits(x), head(x)
        grads = {n: p.grad for n, p in head.named_parameters()}
        return loss.detach(), int(correct), full, local, x.grad, grads, gather_state_dict(head, t)

    return plain, features, labels, counts, run_ranks(size, fn)


@pytest.mark.parametrize("size", [2, 3, 4])
def test_split_head_matches_plain_head_on_fake_ranks(size):
    plain, features, labels, counts, out = _split_vs_plain(size)
    x = features.clone().requires_grad_()
    logits = plain.head(x)
    loss = F.cross_entropy(logits, labels)
    loss.backward()
    grads = {n: p.grad for n, p in plain.head.named_parameters()}
    for rank, (l, correct, full, local, xg, g, _) in enumerate(out):
        torch.testing.assert_close(l, loss.detach(), rtol=1e-6, atol=0)
        assert correct == int((logits.argmax(1) == labels).sum())
        torch.testing.assert_close(full, logits.detach(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(local, shard_rows(logits.detach(), counts, rank), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(xg, shard_rows(x.grad, counts, rank), rtol=1e-5, atol=1e-7)
        shard = shard_state_dict(grads, rank, size, prefix="")
        for name, grad in g.items():
            torch.testing.assert_close(grad, shard[name], rtol=1e-5, atol=1e-7)


def test_loss_rejects_labels_outside_the_classes_on_every_rank():
    models = [build_model(eq.SPEC) for _ in range(2)]

    def fn(t):
        head = split_head(models[t.rank].head, t)
        labels = torch.tensor([0, 7]) if t.rank == 0 else torch.tensor([3])  # 7 classes: 0..6
        return head.loss(torch.randn(len(labels), 32), labels)

    with pytest.raises(ValueError, match=r"labels must be in \[0, 7\), got \[0, 7\]"):
        run_ranks(2, fn)


def test_dropout_masks_replicated_activations_alike_on_every_rank():
    _, _, _, _, out = _split_vs_plain(3, dropout=0.5)
    fc2_bias_grads = [o[5]["fc2.bias"] for o in out]
    assert fc2_bias_grads[0].abs().sum() > 0
    assert all(torch.equal(g, fc2_bias_grads[0]) for g in fc2_bias_grads)  # stays replicated


def test_dropout_is_off_in_eval_mode():
    plain, features, _, _, out = _split_vs_plain(2, dropout=0.5, train=False)
    torch.testing.assert_close(out[0][2], plain.head(features).detach(), rtol=1e-5, atol=1e-6)


def test_dropout_masks_are_the_same_at_every_worker_count_and_follow_the_step():
    """Training-mode logits of the global batch (dropout 0.5) of the plain head and of the split
    one at 1, 2 and 3 ranks agree to float rounding, step by step; a head pointed back at step 0
    draws step 0's masks again."""
    spec = ModelSpec(num_classes=7, conv=[[4], [8]], fc_hidden=[13, 10], dropout=0.5)
    features = torch.randn(10, 32, generator=torch.Generator().manual_seed(3))  # (B, F)
    plain = build_model(spec, seed=5).head.train()
    with torch.no_grad():
        plain_logits = [plain(features) for _ in range(2)]  # (B, K) at steps 0 and 1
    logits = {}
    for size in (1, 2, 3):
        counts = partition_sizes(10, size)
        models = [build_model(spec, seed=5) for _ in range(size)]

        def fn(t):
            head = split_head(models[t.rank].head, t)
            head.train()
            x = shard_rows(features, counts, t.rank)
            with torch.no_grad():
                steps = [head.full_logits(x) for _ in range(2)]  # (B, K) at steps 0 and 1
                head.step = 0
                return steps, head.full_logits(x)

        logits[size] = run_ranks(size, fn)[0]
    (first, second), again = logits[1]
    assert not torch.allclose(first, second)  # a new mask each step
    assert torch.equal(again, first)  # a pure function of the step
    for got, want in zip(plain_logits, logits[1][0]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for size in (2, 3):
        for got, want in zip(logits[size][0], logits[1][0]):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_gathered_state_dict_loads_into_a_plain_model_and_optimizer_state_round_trips():
    spec = eq.SPEC
    plain_sd = build_model(spec).state_dict()
    models = [build_model(spec) for _ in range(3)]  # not in the threads: build_model seeds the RNG

    def fn(t):
        model = models[t.rank]
        model.head = split_head(model.head, t)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        for p in model.parameters():  # a momentum buffer that differs per parameter
            opt.state[p]["momentum_buffer"] = p.detach() * 2
        return gather_state_dict(model, t), gather_optimizer_state(model, opt, t)

    sd, optim = run_ranks(3, fn)[1]
    plain = DeepImageNet(spec)
    plain.load_state_dict(sd, strict=True)
    for key, value in plain_sd.items():
        assert torch.equal(sd[key], value)
    plain_opt = torch.optim.SGD(plain.parameters(), lr=0.1, momentum=0.9)
    load_optimizer_state(plain, plain_opt, optim)
    for name, p in plain.named_parameters():
        assert torch.equal(plain_opt.state[p]["momentum_buffer"], plain_sd[name] * 2)


# ---------------------------------------------------------------------------------------------
# Real launches: horovodrun and torchrun, 1 to 4 processes

LAUNCH_TIMEOUT = 180
TOLERANCE = 1e-5


def _launch(launcher: str, np: int, out: Path, *args: str) -> list[dict]:
    out.mkdir(parents=True, exist_ok=True)
    cmd = launch_command(launcher, np, "tests.workers.split_fc_equivalence", ["--out", str(out), *args])
    proc = run_launch(cmd, worker_env(threads=np, np=np), LAUNCH_TIMEOUT)  # stops workers on timeout
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(np)]


@pytest.fixture(scope="module")
def checkpoint_from_two_ranks(tmp_path_factory) -> Path:
    """A plain checkpoint gathered from a 2-process split run (torchrun)."""
    out = tmp_path_factory.mktemp("split2")
    _launch("torchrun", 2, out, "--save")
    return out / "ckpt.pt"


def _assert_equivalent(report: dict, what: str) -> None:
    r = report[what]
    assert r["keys_equal"], f"rank {report['rank']}: gathered keys differ from the plain model's"
    assert r["logits"] < TOLERANCE and r["loss"] < TOLERANCE, f"rank {report['rank']} {what}: {r}"
    assert r["correct_equal"], f"rank {report['rank']} {what}: top-1 counts differ"
    worst = max(r["params"], key=r["params"].get)
    assert r["params"][worst] < TOLERANCE, f"rank {report['rank']} {what}: {worst} {r['params'][worst]}"


@pytest.mark.parametrize("np", [1, 2, 3, 4])
@pytest.mark.parametrize("launcher", ["horovod", "torchrun"])
def test_split_training_matches_one_process_and_resumes_resplit(launcher, np, tmp_path,
                                                                checkpoint_from_two_ranks):
    """k SGD-momentum steps (one rank with an empty batch when N > 1) equal one-process training
    of the same network; then the 2-process checkpoint, re-split for N, continues identically."""
    reports = _launch(launcher, np, tmp_path, "--resume", str(checkpoint_from_two_ranks))
    assert [r["size"] for r in reports] == [np] * np
    assert np == 1 or 0 in [r["rows"] for r in reports], "no rank had an empty batch"
    for report in reports:
        _assert_equivalent(report, "train")
        _assert_equivalent(report, "resume")


def test_checkpoint_of_a_split_run_loads_strictly_into_a_plain_model(checkpoint_from_two_ranks):
    """The gathered checkpoint is a plain DeepImageNet that one process trained the same way."""
    ckpt = torch.load(checkpoint_from_two_ranks)
    model = DeepImageNet(eq.SPEC)
    model.load_state_dict(ckpt["model"], strict=True)
    reference = build_model(eq.SPEC)
    opt = eq.sgd(reference)
    for images, labels in eq.batches(0, 3):
        eq.plain_step(reference, opt, images, labels)
    for key, value in reference.state_dict().items():
        assert eq.rel(ckpt["model"][key], value) < TOLERANCE, key
    images, _ = eq.batches(3, 1)[0]
    with torch.no_grad():
        assert eq.rel(model(images), reference(images)) < TOLERANCE


# ---------------------------------------------------------------------------------------------
# Traffic: what one split step sends, counted as the benchmark counts it

def test_split_step_sends_only_activations_counted_call_by_call():
    """N=2, global batch 10 (5 + 5), F=32, H2=10, K=7: the exact bytes each rank sends in one
    loss + backward, by the benchmark's CountingTransport; FC weights never travel."""
    from deepimage.bench.split_fc import CountingTransport

    models = [build_model(eq.SPEC) for _ in range(2)]
    features = torch.randn(10, 32)
    labels = torch.randint(0, 7, (10,))

    def fn(t):
        counter = CountingTransport(t)
        head = split_head(models[t.rank].head, counter)
        x = features[5 * t.rank:5 * t.rank + 5].clone().requires_grad_()
        loss, _ = head.loss(x, labels[5 * t.rank:5 * t.rank + 5])
        loss.backward()
        return dict(counter.sent), dict(Counter(op for op, _ in t.sent)), sum(n for _, n in t.sent)

    f32, i64 = 4, 8
    expected = {
        "allgather": i64 * 1 + i64 * 5 + f32 * 5 * 32,  # row counts, labels, feature rows: to 1 peer
        "allreduce": f32 * 10 * 10 * 2                   # fc2 partial sums, classifier input grads
                     + f32 * 10 + f32 * 10 * (2 + 2),    # softmax max; sum-exp, target, argmax
        "alltoall": f32 * 5 * 32,                         # feature grads: the other rank's rows
    }
    for sent, calls, fake_total in run_ranks(2, fn):
        assert sent == expected
        assert calls == {"allgather": 3, "allreduce": 4, "alltoall": 1}
        assert fake_total == sum(expected.values())  # the fake transport counts the same


# ---------------------------------------------------------------------------------------------
# The benchmark's command line (a tiny configuration; the real figures come from the defaults)

def test_benchmark_reports_memory_bytes_and_time_as_one_json_line():
    cmd = [sys.executable, "-m", "deepimage.bench.split_fc", "--json", "--launcher", "torchrun",
           "--hidden", "64", "--classes", "10", "--batch-size", "8", "--steps", "1", "--warmup", "1"]
    proc = run_launch(cmd, None, LAUNCH_TIMEOUT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    summary = json.loads(lines[-1])
    assert summary["np"] == 2
    assert summary["fc_param_fraction_per_rank"] == pytest.approx(0.5, abs=0.01)
    assert summary["bytes_ratio"] > 1 and summary["step_time_ratio"] > 0
    split, rep = summary["split"], summary["replicated"]
    assert split["fc_optimizer_state_bytes_per_rank"] < rep["fc_optimizer_state_bytes_per_rank"]
    assert any(line.startswith("bytes sent / step / rank") for line in lines)


def test_benchmark_rejects_a_layer_narrower_than_the_process_count():
    proc = run_launch([sys.executable, "-m", "deepimage.bench.split_fc", "--np", "4", "--classes", "3"],
                      None, 60)
    assert proc.returncode != 0
    assert proc.stderr.strip() == "bench.split_fc: --hidden (4096) and --classes (3) must be >= --np (4)"
