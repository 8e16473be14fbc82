"""GPU training-step benchmark: our training step against a plain PyTorch loop, fp32 and bf16.

    python -m deepimage.bench.gpu_step [--json] [--resolution 224] [--batch 64] [--steps 10]

One DeepImageNet (a paper-sized VGG trunk: [[64], [128], [256, 256], [512, 512], [512, 512]],
FC 4096 x 4096, 1000 classes by default) on the local GPU, on a fixed random batch, four ways:
- ours: parallelized (deepimage.parallel.parallelize) and trained by the training stage's step
  (deepimage.train.step) over the one-process transport, with the config's train defaults (lr,
  momentum, weight decay, bucketing, lazy update), train.bf16 off and on;
- plain: the same model (same seed) trained by the loop a PyTorch user writes first: forward,
  cross-entropy, zero_grad, backward, torch.optim.SGD's step (its CUDA default, foreach), with
  torch.autocast(bfloat16) for bf16; no per-step host sync.
The four run in interleaved blocks; each block's time ends with torch.cuda.synchronize(), so
queued kernels are inside it. Figures are medians over the blocks. Needs a CUDA GPU; with --json
the last line is one JSON object: images_per_s per mode, bf16_speedup (ours, bf16 / fp32) and
vs_plain_fp32 / vs_plain_bf16 (our images/s / the plain loop's; the target is >= 0.9).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

from deepimage.bench import BenchError
from deepimage.model import ModelSpec, build_model

PRECISIONS = ("fp32", "bf16")
MODES = ("fp32", "bf16", "plain_fp32", "plain_bf16")
CONV = [[64], [128], [256, 256], [512, 512], [512, 512]]


def _trainer(bf16: bool, spec: ModelSpec):
    """(model, sync, autocast) of one mode: the schema's train defaults, bf16 on or off."""
    from deepimage.config import Config
    from deepimage.parallel.parallelize import parallelize
    from deepimage.parallel.transport import LocalTransport
    from deepimage.train import autocast, sgd

    cfg = Config.from_dict({"train": {"bf16": bf16}})
    model, sync = parallelize(build_model(spec, seed=0).cuda(), LocalTransport(), cfg, sgd(cfg.train))
    return model, sync, autocast(model, cfg.train)


def _plain(bf16: bool, spec: ModelSpec):
    """A plain PyTorch loop's step of the same model: the schema's lr, momentum, weight decay."""
    import torch.nn.functional as F

    from deepimage.config import Config

    train = Config.from_dict({}).train
    model = build_model(spec, seed=0).cuda().train()
    opt = torch.optim.SGD(model.parameters(), lr=train.lr, momentum=train.momentum,
                          weight_decay=train.weight_decay)

    def one_step(x, y):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
            loss = F.cross_entropy(model(x).float(), y)  # (B, K) logits -> mean loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return one_step


def _ours(bf16: bool, spec: ModelSpec):
    """Our training stage's step (deepimage.train.step) of the parallelized model."""
    from deepimage.train import step

    model, sync, amp = _trainer(bf16, spec)

    def one_step(x, y):
        step(model, sync, x, y, amp)
    one_step.flush = sync.flush
    return one_step


def _block(one_step, x, y, steps: int) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        one_step(x, y)
    getattr(one_step, "flush", lambda: None)()  # lazy update: the last step's updates too
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps


def run(resolution: int, batch: int, steps: int, rounds: int, classes: int) -> dict:
    if not torch.cuda.is_available():
        raise BenchError("bench.gpu_step: no CUDA GPU visible (torch.cuda.is_available() is False)")
    torch.backends.cudnn.benchmark = True
    spec = ModelSpec(num_classes=classes, conv=CONV, fc_hidden=[4096, 4096], dropout=0.0)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, resolution, resolution, generator=gen).cuda()  # (B, 3, H, W)
    y = torch.randint(0, classes, (batch,), generator=gen).cuda()
    trainers = {m: (_plain if m.startswith("plain") else _ours)(m.endswith("bf16"), spec) for m in MODES}
    for trainer in trainers.values():
        _block(trainer, x, y, 3)  # warm-up: cuDNN autotuning, allocations
    times = {m: [] for m in MODES}
    for round_ in range(rounds):
        for m in (MODES if round_ % 2 == 0 else MODES[::-1]):
            times[m].append(_block(trainers[m], x, y, steps))
    step_ms = {m: statistics.median(v) * 1e3 for m, v in times.items()}
    ips = {m: batch / (step_ms[m] / 1e3) for m in MODES}
    return {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
            "resolution": resolution, "batch": batch, "steps_per_block": steps, "rounds": rounds,
            "model": spec.to_dict(), "step_ms": {m: round(v, 2) for m, v in step_ms.items()},
            "images_per_s": {m: round(v, 1) for m, v in ips.items()},
            "bf16_speedup": round(ips["bf16"] / ips["fp32"], 3),
            **{f"vs_plain_{m}": round(ips[m] / ips[f"plain_{m}"], 3) for m in PRECISIONS},
            "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    p.add_argument("--resolution", type=int, default=224)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=10, help="steps per timed block")
    p.add_argument("--rounds", type=int, default=5, help="timed blocks per mode")
    p.add_argument("--classes", type=int, default=1000)
    a = p.parse_args(argv)
    try:
        if a.resolution < 32 or min(a.batch, a.steps, a.rounds) < 1 or a.classes < 2:
            raise BenchError(f"bench.gpu_step: need --resolution >= 32, --batch/--steps/--rounds >= 1 "
                             f"and --classes >= 2, got {a.resolution}/{a.batch}/{a.steps}/{a.rounds}/{a.classes}")
        result = run(a.resolution, a.batch, a.steps, a.rounds, a.classes)
    except BenchError as err:
        sys.exit(str(err))
    print(f"training step on {result['device']}, batch {a.batch} at {a.resolution} px, median of "
          f"{a.rounds} blocks of {a.steps} steps")
    for m in MODES:
        print(f"  {m:10s}: {result['step_ms'][m]:8.2f} ms/step  {result['images_per_s'][m]:9.1f} img/s")
    print(f"  bf16_speedup: {result['bf16_speedup']}  ours / plain loop: fp32 {result['vs_plain_fp32']}, "
          f"bf16 {result['vs_plain_bf16']}  peak memory {result['peak_memory_gib']} GiB")
    if a.json:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
