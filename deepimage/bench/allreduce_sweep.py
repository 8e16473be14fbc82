"""Times of the butterfly all-reduce at several sizes, beside the launcher's own all-reduces: a
worker module the scaling stage launches under train.launcher (the stage process imports nothing
of deepimage.bench; the workers import this module and the transport only).

    python -m deepimage.launch --launcher torchrun --np 2 --threads 2 deepimage.bench.allreduce_sweep \
        --sizes 0.25 1 4 16 --repeats 7 --out sweep.json

Methods: "butterfly" (allreduce_flat_async_ on the transport, always), "torch"
(torch.distributed.all_reduce on the transport's gloo group, when one is initialised: under
torchrun and horovodrun) and "horovod" (hvd.allreduce_, under horovodrun only). Each size times
`repeats` interleaved rounds after 2 warm-up rounds, each call the slowest rank's seconds; rank 0
writes {"np", "launcher", "sizes_mib", "median_s": {method: [seconds per size]}} to --out.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from deepimage.runtime import apply_thread_limit


def methods(transport, buf: torch.Tensor) -> dict:
    """name -> zero-argument callable that all-reduces `buf` (sum) in place, to completion."""
    import torch.distributed as dist

    from deepimage.parallel.butterfly import allreduce_flat_async_

    found = {"butterfly": lambda: allreduce_flat_async_(buf, "sum", transport).wait()}
    if dist.is_available() and dist.is_initialized():
        found["torch"] = lambda: dist.all_reduce(buf)
    if transport.name == "horovod":
        import horovod.torch as hvd

        found["horovod"] = lambda: hvd.allreduce_(buf, op=hvd.Sum, name="sweep")
    return found


def time_size(transport, mib: float, repeats: int) -> dict[str, float]:
    """Median seconds per call of each method at `mib` MiB (slowest rank), rounds interleaved."""
    buf = torch.ones(max(transport.size, int(mib * 2**20) // 4))  # (numel,) float32
    calls = methods(transport, buf)
    names = list(calls)
    times: dict[str, list[float]] = {n: [] for n in names}
    for round_ in range(repeats + 2):
        for name in names[round_ % len(names):] + names[:round_ % len(names)]:
            buf.fill_(1.0)  # sums stay small and exact whatever ran before
            transport.barrier()
            start = time.perf_counter()
            calls[name]()
            elapsed = torch.tensor([time.perf_counter() - start], dtype=torch.float64)
            if round_ >= 2:
                times[name].append(float(transport.allreduce(elapsed, "max")))
    return {n: statistics.median(t) for n, t in times.items()}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=float, nargs="+", required=True, help="MiB")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    apply_thread_limit()
    from deepimage.parallel.transport import init_transport

    transport = init_transport("auto")
    try:
        per_size = [time_size(transport, mib, args.repeats) for mib in args.sizes]
        result = {"np": transport.size, "launcher": transport.name, "sizes_mib": args.sizes,
                  "median_s": {m: [s[m] for s in per_size] for m in per_size[0]}}
        if transport.rank == 0:
            Path(args.out).write_text(json.dumps(result))
        transport.barrier()
    finally:
        transport.shutdown()


if __name__ == "__main__":
    main()
