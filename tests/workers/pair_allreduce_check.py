"""Worker: Transport.allreduce through the two-rank shared-memory segment (cpu.allreduce's
pair path) against gloo's all_reduce of the same tensors, bit for bit, and beside a butterfly
in flight on lane 0; also times both paths on small tensors.

    python -m deepimage.launch --launcher torchrun --np 2 --threads 2 -- \
        tests.workers.pair_allreduce_check --out /tmp/pa

Writes <out>/rank<r>.json: {"rank", "pair", "checks": {check: true/false}, "errors": {...},
"median_ms": {"pair": ..., "gloo": ...}}.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
import traceback
from pathlib import Path

import torch

from deepimage.runtime import apply_thread_limit
from deepimage.parallel.butterfly import allreduce_flat_async_
from deepimage.parallel.transport import cpu, init_transport
from deepimage.parallel.transport.datapath import blocking_pair

SHAPES = {"one": (1,), "stats": (64, 10), "chunks": (600_001,)}  # the last: 2.3-4.6 MiB, 3+ chunks
DTYPES = (torch.float32, torch.float64, torch.int64)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal dtype, shape and bytes (NaN and -0.0 included)."""
    return (a.dtype == b.dtype and a.shape == b.shape
            and torch.equal(a.contiguous().view(-1).view(torch.uint8),
                            b.contiguous().view(-1).view(torch.uint8)))


def rank_tensor(rank: int, shape, dtype, seed: int) -> torch.Tensor:
    """Each rank's own values, with ties, negatives and (floats) values whose sum rounds."""
    g = torch.Generator().manual_seed(seed * 10 + rank)
    x = torch.randn(shape, generator=g, dtype=torch.float64) * 1e3
    if dtype.is_floating_point:
        return (x * (1 + 1e-9 * rank)).to(dtype)
    return x.round().to(dtype)


def check_bits(t, checks) -> None:
    for seed, (name, shape) in enumerate(SHAPES.items()):
        for dtype in DTYPES:
            ops = ("sum", "max", "average") if dtype.is_floating_point else ("sum", "max")
            for op in ops:
                x = rank_tensor(t.rank, shape, dtype, seed)
                via_pair = t.allreduce(x, op)
                via_gloo = cpu.allreduce(x, op, t.size)  # pair=None: torch.distributed gloo
                tag = f"{name}_{str(dtype).split('.')[-1]}_{op}"
                checks[f"bits_{tag}"] = same_bits(via_pair, via_gloo)
                checks[f"input_kept_{tag}"] = same_bits(x, rank_tensor(t.rank, shape, dtype, seed))


def check_beside_butterfly(t, checks) -> None:
    """A blocking all-reduce while a 16 MiB butterfly is queued on lane 0: its own segment, so
    it neither waits for nor disturbs the butterfly's exchange."""
    big = torch.full((4 * 2**20,), float(t.rank + 1))  # (4 Mi,) float32
    handle = allreduce_flat_async_(big, "sum", t)
    small = t.allreduce(torch.tensor([float(t.rank), 2.0]), "sum")
    checks["beside_butterfly_small"] = torch.equal(small, torch.tensor([1.0, 4.0]))
    checks["beside_butterfly_big"] = bool((handle.wait() == 3.0).all())


def time_paths(t, repeats: int = 200) -> dict[str, float]:
    """Median ms of one blocking (64, 12) float32 all-reduce over each path."""
    x = torch.randn(64, 12)
    out = {}
    for name, call in (("pair", lambda: t.allreduce(x, "sum")),
                       ("gloo", lambda: cpu.allreduce(x, "sum", t.size))):
        laps = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            call()
            laps.append(time.perf_counter() - t0)
        out[name] = statistics.median(laps) * 1e3
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args(argv)
    apply_thread_limit()
    t = init_transport("auto")
    checks: dict[str, bool] = {}
    errors: dict[str, str] = {}
    timing: dict[str, float] = {}
    pair = blocking_pair(t) is not None
    try:
        if pair:
            check_bits(t, checks)
            check_beside_butterfly(t, checks)
            timing = time_paths(t)
    except Exception:  # recorded; the other rank would hang on a collective, so stop here
        errors["checks"] = traceback.format_exc()
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / f"rank{t.rank}.json").write_text(json.dumps(
        {"rank": t.rank, "pair": pair, "checks": checks, "errors": errors, "median_ms": timing}))
    t.barrier()
    t.shutdown()


if __name__ == "__main__":
    main()
