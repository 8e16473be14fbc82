"""Worker: split-FC training on N processes against one-process training of the same network.

    python -m deepimage.launch --launcher torchrun --np 3 --threads 3 -- \
        tests.workers.split_fc_equivalence --out /tmp/sfc [--save] [--resume ckpt.pt]

Every rank also trains the plain DeepImageNet on the whole global batch in-process (it is tiny)
and writes <out>/rank<r>.json with the relative differences (max |a - b| / max |b|) of logits,
loss and every parameter, and whether the top-1 counts agree. --save: rank 0 writes the gathered
plain checkpoint <out>/ckpt.pt (model + SGD momentum). --resume: continue from such a checkpoint
(written with any N), re-split for this N, beside the plain model continuing from it.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from deepimage.runtime import apply_thread_limit
from deepimage.model import ModelSpec, build_model
from deepimage.parallel.split_fc import is_model_parallel, split_head
from deepimage.parallel.state import (gather_optimizer_state, gather_state_dict,
                                      load_optimizer_state, shard_state_dict)
from deepimage.parallel.transport import init_transport

# Widths and classes not divisible by 2, 3 or 4 (13, 10, 7); F = 8 channels * 2 * 2 = 32.
SPEC = ModelSpec(num_classes=7, conv=[[4], [8]], fc_hidden=[13, 10], dropout=0.0, norm="group")
GLOBAL_BATCH = 10
RESOLUTION = 8
LR, MOMENTUM, WEIGHT_DECAY = 0.1, 0.9, 1e-3


def batches(first_step: int, steps: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The global batches of steps [first_step, first_step + steps): the same on every rank."""
    out = []
    for step in range(first_step, first_step + steps):
        g = torch.Generator().manual_seed(1000 + step)
        images = torch.randn(GLOBAL_BATCH, 3, RESOLUTION, RESOLUTION, generator=g)  # (B, 3, H, W)
        labels = torch.randint(0, SPEC.num_classes, (GLOBAL_BATCH,), generator=g)  # (B,)
        out.append((images, labels))
    return out


def local_rows(rank: int, size: int) -> slice:
    """This rank's rows of the global batch; with N > 1, rank 1's share is empty."""
    if size == 1:
        return slice(0, GLOBAL_BATCH)
    owners = [r for r in range(size) if r != 1]
    sizes = [GLOBAL_BATCH // len(owners) + (1 if i < GLOBAL_BATCH % len(owners) else 0)
             for i in range(len(owners))]
    counts = [0] * size
    for r, n in zip(owners, sizes):
        counts[r] = n
    start = sum(counts[:rank])
    return slice(start, start + counts[rank])


def sgd(model: torch.nn.Module) -> torch.optim.SGD:
    return torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def plain_step(model, opt, images, labels) -> tuple[torch.Tensor, float, int]:
    """One single-process SGD step on the global batch: (logits, loss, correct) before the step."""
    logits = model(images)  # (B, 3, H, W) -> (B, K)
    loss = F.cross_entropy(logits, labels)
    opt.zero_grad()
    loss.backward()
    opt.step()
    return logits.detach(), float(loss.detach()), int((logits.argmax(1) == labels).sum())


def split_step(model, opt, transport, images, labels) -> tuple[torch.Tensor, float, int]:
    """One hybrid step on this rank's rows: (global logits, loss, correct) before the step."""
    rows = local_rows(transport.rank, transport.size)
    features = model.trunk(images[rows])  # (b_r, 3, H, W) -> (b_r, F)
    with torch.no_grad():
        logits = model.head.full_logits(features)  # (B, K)
    loss, correct = model.head.loss(features, labels[rows])
    opt.zero_grad()
    loss.backward()
    for p in model.parameters():  # conv gradients: each rank holds its share of the global one
        if not is_model_parallel(p):
            p.grad = transport.allreduce(p.grad, op="sum")
    opt.step()
    return logits, float(loss.detach()), int(correct)


def compare_training(plain, plain_opt, split, split_opt, transport, steps) -> dict:
    """Train both for `steps` batches; worst relative differences over the steps and params."""
    worst = {"logits": 0.0, "loss": 0.0, "correct_equal": True}
    for images, labels in steps:
        lp, loss_p, cp = plain_step(plain, plain_opt, images, labels)
        ls, loss_s, cs = split_step(split, split_opt, transport, images, labels)
        worst["logits"] = max(worst["logits"], rel(ls, lp))
        worst["loss"] = max(worst["loss"], rel(loss_s, loss_p))
        worst["correct_equal"] &= cp == cs
    gathered = gather_state_dict(split, transport)
    reference = plain.state_dict()
    worst["keys_equal"] = sorted(gathered) == sorted(reference)
    worst["params"] = {k: rel(gathered[k], reference[k]) for k in reference}
    return worst


def fresh(transport, seed: int = 0):
    """(plain model + SGD, split model + SGD), starting from identical weights."""
    plain = build_model(SPEC, seed)
    split = build_model(SPEC, seed)
    split.head = split_head(split.head, transport)
    return plain, sgd(plain), split, sgd(split)


def resume(transport, ckpt: dict):
    """Both models continued from a plain checkpoint: as saved, and re-split for this N."""
    plain, plain_opt, split, split_opt = fresh(transport, seed=1)  # other weights: must be replaced
    plain.load_state_dict(ckpt["model"], strict=True)
    load_optimizer_state(plain, plain_opt, ckpt["optim"])
    split.load_state_dict(shard_state_dict(ckpt["model"], transport.rank, transport.size), strict=True)
    load_optimizer_state(split, split_opt, ckpt["optim"])
    return plain, plain_opt, split, split_opt


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--save", action="store_true")
    p.add_argument("--resume", type=Path)
    a = p.parse_args(argv)
    apply_thread_limit()
    transport = init_transport("auto")
    rows = local_rows(transport.rank, transport.size)
    report = {"rank": transport.rank, "size": transport.size, "transport": transport.name,
              "rows": rows.stop - rows.start}

    plain, plain_opt, split, split_opt = fresh(transport)
    report["train"] = compare_training(plain, plain_opt, split, split_opt, transport, batches(0, a.steps))
    ckpt = {"model": gather_state_dict(split, transport),
            "optim": gather_optimizer_state(split, split_opt, transport)}
    if a.save and transport.rank == 0:
        torch.save(ckpt, a.out / "ckpt.pt")
    if a.resume:
        models = resume(transport, torch.load(a.resume))
        report["resume"] = compare_training(*models, transport, batches(a.steps, a.steps))
    (a.out / f"rank{transport.rank}.json").write_text(json.dumps(report, indent=1))
    transport.barrier()
    transport.shutdown()


if __name__ == "__main__":
    main()
