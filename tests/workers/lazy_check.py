"""Worker: GradientSync training on N processes against one-process training on the global batch.

    python -m deepimage.launch --launcher torchrun --np 3 --threads 3 -- \
        tests.workers.lazy_check --out /tmp/lc

Every rank also trains the same DeepImageNet on the whole global batch in-process (it is tiny)
and writes <out>/rank<r>.json with, per variant (sync / lazy / average), the largest relative
parameter difference (max |a - b| / max |b|) to that reference, and further checks.
The global batches include one that leaves a rank with no samples (N = 3) and uneven splits.
"""
from __future__ import annotations

import argparse
import json
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from deepimage.runtime import apply_thread_limit
from deepimage.model import ModelSpec, build_model
from deepimage.parallel.lazy import GradientSync
from deepimage.parallel.split_fc import PARALLEL_ATTR
from deepimage.parallel.transport import init_transport

SPEC = ModelSpec(num_classes=5, conv=[[4], [6]], fc_hidden=[9, 7], dropout=0.0, norm="group")
GLOBAL_BATCHES = [12, 7, 2, 12, 5, 9]
EVEN_BATCHES = [12, 12, 12, 12]  # op="average" needs equal local batches
BUCKET_MIB = 0.0005  # ~500 bytes: several buckets in this small network


def factory(params):
    return torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=5e-4)


def lr_at(step: int) -> float:
    return 0.1 * 0.7**step


def batch(step: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + step)
    return torch.randn(size, 3, 8, 8, generator=gen), torch.randint(0, SPEC.num_classes, (size,), generator=gen)


def local_part(x: torch.Tensor, rank: int, size: int) -> torch.Tensor:
    """Rank r's contiguous share of the global batch (the first B % N ranks get one more)."""
    base, extra = divmod(x.shape[0], size)
    start = rank * base + min(rank, extra)
    return x[start:start + base + (rank < extra)]


def train_reference(batches: list[int], mean_loss: bool) -> nn.Module:
    model = build_model(SPEC, seed=0)
    opt = factory(list(model.parameters()))
    for step, size in enumerate(batches):
        x, y = batch(step, size)
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        opt.zero_grad()
        F.cross_entropy(model(x), y, reduction="mean" if mean_loss else "sum").div(1 if mean_loss else size).backward()
        opt.step()
    return model


def train_parallel(t, batches: list[int], lazy: bool, op: str, checks: dict,
                   overlap: bool | None = None) -> nn.Module:
    """Each rank trains on its share; loss = sum over local samples / global batch (op=sum) or
    the local mean (op=average)."""
    model = build_model(SPEC, seed=0)
    sync = GradientSync(model, t, factory, bucket_mib=BUCKET_MIB, lazy=lazy, op=op, overlap=overlap)
    checks.setdefault("several_buckets", len(sync.buckets) >= 3)
    for step, size in enumerate(batches):
        x, y = batch(step, size)
        x, y = local_part(x, t.rank, t.size), local_part(y, t.rank, t.size)
        # A collective while last step's butterflies may still be in flight (as the trainer does).
        count = int(t.allreduce(torch.tensor([float(len(y))]), "sum").item())
        checks["collective_beside_butterflies"] = checks.get("collective_beside_butterflies", True) and count == size
        sync.set_lr(lr_at(step))
        sync.zero_grad()
        if len(y):  # a rank with no samples skips forward and backward; step() sends zeros
            loss = F.cross_entropy(model(x), y, reduction="sum")
            (loss / len(y) if op == "average" else loss / size).backward()
        before = [p.detach().clone() for p in model.parameters()]
        sync.step()
        if lazy and step == 0:
            checks["lazy_step_defers_the_update"] = all(
                torch.equal(p, b) for p, b in zip(model.parameters(), before))
    sync.flush()
    if lazy:
        checks["flush_applies_the_update"] = not all(
            torch.equal(p, b) for p, b in zip(model.parameters(), before))
    check_state_roundtrip(model, sync, checks)
    return model


def check_state_roundtrip(model: nn.Module, sync: GradientSync, checks: dict) -> None:
    """state_dict() from small buckets loads into a one-bucket GradientSync of the same model."""
    other = GradientSync(model, sync.transport, factory, bucket_mib=64.0, lazy=False)
    other.load_state_dict(sync.state_dict())
    mine = {id(p): s for opt in sync.optimizers() for p, s in opt.state.items()}
    theirs = {id(p): s for opt in other.optimizers() for p, s in opt.state.items()}
    checks["state_dict_roundtrip"] = (len(other.buckets) == 1 and mine.keys() == theirs.keys() and all(
        torch.equal(mine[k]["momentum_buffer"], theirs[k]["momentum_buffer"]) for k in mine))
    other.remove_hooks()


def check_model_parallel_param(t, checks: dict) -> None:
    """A parameter marked deepimage_model_parallel is stepped with its local gradient only."""
    torch.manual_seed(0)
    lin = nn.Linear(4, 3)
    model = nn.Module()
    model.lin = lin
    model.gain = nn.Parameter(torch.ones(3))
    setattr(model.gain, PARALLEL_ATTR, True)
    x = torch.randn(5, 4) * (t.rank + 1)  # different on every rank
    start = model.gain.detach().clone()
    local_grad = torch.autograd.grad((lin(x) * model.gain).sum(), model.gain)[0]
    sync = GradientSync(model, t, lambda ps: torch.optim.SGD(ps, lr=0.1), bucket_mib=4, lazy=True)
    sync.zero_grad()
    (model.lin(x) * model.gain).sum().backward()
    sync.step()
    checks["model_parallel_param_stepped_locally"] = (
        torch.allclose(model.gain.detach(), start - 0.1 * local_grad)
        and all(model.gain is not p for b in sync.buckets for p in b.params))
    sync.flush()


def rel_diff(model: nn.Module, ref: nn.Module) -> dict[str, float]:
    return {n: float((p - q).abs().max() / q.abs().max()) for (n, p), (_, q) in
            zip(model.named_parameters(), ref.named_parameters())}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args(argv)
    apply_thread_limit()
    t = init_transport("auto")
    report = {"rank": t.rank, "size": t.size, "checks": {}, "rel_diff": {}, "errors": {}}
    try:
        ref = train_reference(GLOBAL_BATCHES, mean_loss=False)
        sync = train_parallel(t, GLOBAL_BATCHES, lazy=False, op="sum", checks=report["checks"])
        lazy = train_parallel(t, GLOBAL_BATCHES, lazy=True, op="sum", checks=report["checks"])
        report["rel_diff"]["sync"] = rel_diff(sync, ref)
        report["rel_diff"]["lazy"] = rel_diff(lazy, ref)
        report["checks"]["lazy_equals_sync_exactly"] = all(
            torch.equal(p, q) for p, q in zip(lazy.parameters(), sync.parameters()))
        overlap = train_parallel(t, GLOBAL_BATCHES, lazy=False, op="sum", checks=report["checks"], overlap=True)
        report["checks"]["overlap_equals_sync_exactly"] = all(
            torch.equal(p, q) for p, q in zip(overlap.parameters(), sync.parameters()))
        ref_mean = train_reference(EVEN_BATCHES, mean_loss=True)
        avg = train_parallel(t, EVEN_BATCHES, lazy=True, op="average", checks=report["checks"])
        report["rel_diff"]["average"] = rel_diff(avg, ref_mean)
        check_model_parallel_param(t, report["checks"])
    except Exception:
        report["errors"]["main"] = traceback.format_exc()
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / f"rank{t.rank}.json").write_text(json.dumps(report))
    t.barrier()
    t.shutdown()


if __name__ == "__main__":
    main()
