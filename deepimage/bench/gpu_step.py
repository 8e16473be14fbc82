"""GPU training-step benchmark: bf16 autocast vs fp32, one process, images per second.

    python -m deepimage.bench.gpu_step [--json] [--resolution 224] [--batch 64] [--steps 20]

One DeepImageNet (a paper-sized VGG trunk: [[64], [128], [256, 256], [512, 512], [512, 512]],
FC 4096 x 4096, 1000 classes by default) is parallelized (deepimage.parallel.parallelize) and
trained by the training stage's step (deepimage.train.step) on the local GPU over the
one-process transport, with the config's train defaults (lr, momentum, lazy update), on a fixed random batch, with train.bf16 off (the baseline) and on,
in interleaved blocks. Each block's time ends with torch.cuda.synchronize(), so queued kernels
are inside it. Figures are medians over the blocks. Needs a CUDA GPU; with --json the last line
is one JSON object (images_per_s per mode, bf16_speedup = bf16 img/s / fp32 img/s).
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

MODES = ("fp32", "bf16")
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


def _block(trainer, x, y, steps: int) -> float:
    from deepimage.train import step

    model, sync, amp = trainer
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step(model, sync, x, y, amp)
    sync.flush()
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
    trainers = {m: _trainer(m == "bf16", spec) for m in MODES}
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
        print(f"  {m}: {result['step_ms'][m]:8.2f} ms/step  {result['images_per_s'][m]:9.1f} img/s")
    print(f"  bf16_speedup: {result['bf16_speedup']}  peak memory {result['peak_memory_gib']} GiB")
    if a.json:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
