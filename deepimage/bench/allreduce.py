"""All-reduce benchmark: butterfly vs hvd.allreduce vs torch.distributed.all_reduce.

    python -m deepimage.bench.allreduce [--json] [--np 2] [--sizes 1 2 4 8 16 32 64] [--repeats 15]

The module starts its own workers under horovodrun (--np processes, one compute thread each),
so all three run in the same processes, on the same float32 buffers, in interleaved rounds
(the order rotates each round) and see the same machine noise:
- butterfly: deepimage's butterfly all-reduce, in place on a flat buffer (the path training's
  gradient buckets take), over the transport's default data path (`data_path` in the result:
  "cma", one kernel copy per message, when the ranks share a host; see parallel/transport.py);
- butterfly_copy: the public butterfly_allreduce(tensor), which returns a new tensor;
- butterfly_gloo: the same butterfly with its messages over gloo's TCP point-to-point instead
  (the algorithm on the same wire as the two baselines);
- horovod:   hvd.allreduce_ (in place, Horovod's gloo ring);
- torch:     torch.distributed.all_reduce (in place, gloo) on the group the transport set up.
Each figure is the median over --repeats rounds of the slowest rank's time; bus bandwidth is
size * 2(N-1)/N / time (the nccl-tests convention). With --json the last line is one JSON object
with every figure and speedup_vs_horovod_16MiB (Horovod time / butterfly time) and
ratio_vs_torch_16MiB (torch time / butterfly time).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from deepimage.bench import BenchError, run_workers
from deepimage.launch import apply_thread_limit

METHODS = ("butterfly", "butterfly_copy", "butterfly_gloo", "horovod", "torch")
DEFAULT_SIZES = [1, 2, 4, 8, 16, 32, 64]


def _methods(transport, buf: torch.Tensor) -> dict:
    """name -> zero-argument callable that all-reduces `buf` (sum) once, to completion."""
    import horovod.torch as hvd
    import torch.distributed as dist

    from deepimage.parallel.butterfly import allreduce_flat_async_, butterfly_allreduce

    default = transport.data_path

    def over_gloo():
        transport.use_data_path("gloo")
        try:
            allreduce_flat_async_(buf, "sum", transport).wait()
        finally:
            transport.use_data_path(default)

    return {"butterfly": lambda: allreduce_flat_async_(buf, "sum", transport).wait(),
            "butterfly_copy": lambda: butterfly_allreduce(buf, "sum", transport),
            "butterfly_gloo": over_gloo,
            "horovod": lambda: hvd.allreduce_(buf, op=hvd.Sum, name="bench"),
            "torch": lambda: dist.all_reduce(buf)}


def _time_size(transport, mib: float, repeats: int) -> dict[str, list[float]]:
    """Seconds per call of each method (slowest rank), `repeats` interleaved rounds after 2 warm."""
    buf = torch.ones(int(mib * 2**20) // 4)
    methods = _methods(transport, buf)
    names = list(methods)
    times: dict[str, list[float]] = {n: [] for n in names}
    for round_ in range(repeats + 2):
        order = names[round_ % len(names):] + names[:round_ % len(names)]
        for name in order:
            buf.fill_(1.0)  # sums stay small and exact whatever ran before
            transport.barrier()
            start = time.perf_counter()
            methods[name]()
            elapsed = torch.tensor([time.perf_counter() - start], dtype=torch.float64)
            if round_ >= 2:
                times[name].append(float(transport.allreduce(elapsed, "max")))
    return times


def worker(out: Path, sizes: list[float], repeats: int) -> None:
    apply_thread_limit()
    from deepimage.parallel.transport import init_transport

    transport = init_transport("horovod")
    result = {"np": transport.size, "sizes_mib": sizes, "repeats": repeats,
              "data_path": transport.data_path, "data_path_note": transport.data_path_note,
              "median_ms": {m: [] for m in METHODS}, "busbw_gbps": {m: [] for m in METHODS}}
    for mib in sizes:
        times = _time_size(transport, mib, repeats)
        for m in METHODS:
            median = statistics.median(times[m])
            result["median_ms"][m].append(round(median * 1e3, 3))
            bus_bytes = mib * 2**20 * 2 * (transport.size - 1) / transport.size
            result["busbw_gbps"][m].append(round(bus_bytes / median / 1e9, 3))
    if transport.rank == 0:
        out.write_text(json.dumps(result))
    transport.barrier()
    transport.shutdown()


def summarize(result: dict) -> dict:
    """Add the issue's headline ratios at 16 MiB and the worst ratio at 16 MiB and above."""
    sizes, ms = result["sizes_mib"], result["median_ms"]
    big = [i for i, s in enumerate(sizes) if s >= 16]
    if 16 in sizes:
        i = sizes.index(16)
        result["speedup_vs_horovod_16MiB"] = round(ms["horovod"][i] / ms["butterfly"][i], 3)
        result["ratio_vs_torch_16MiB"] = round(ms["torch"][i] / ms["butterfly"][i], 3)
    if big:
        result["min_speedup_vs_horovod_ge_16MiB"] = round(min(ms["horovod"][i] / ms["butterfly"][i] for i in big), 3)
        result["min_ratio_vs_torch_ge_16MiB"] = round(min(ms["torch"][i] / ms["butterfly"][i] for i in big), 3)
    return result


def print_table(result: dict) -> None:
    print(f"all-reduce of float32, {result['np']} processes x 1 thread, median of "
          f"{result['repeats']} rounds (ms; bus bandwidth GB/s); butterfly data path: "
          f"{result['data_path']} {result['data_path_note']}")
    print(f"{'MiB':>5} " + " ".join(f"{m:>22}" for m in METHODS))
    for i, mib in enumerate(result["sizes_mib"]):
        cells = [f"{result['median_ms'][m][i]:9.2f} ({result['busbw_gbps'][m][i]:5.2f} GB/s)" for m in METHODS]
        print(f"{mib:>5g} " + " ".join(f"{c:>22}" for c in cells))
    for key in ("speedup_vs_horovod_16MiB", "ratio_vs_torch_16MiB",
                "min_speedup_vs_horovod_ge_16MiB", "min_ratio_vs_torch_ge_16MiB"):
        if key in result:
            print(f"{key}: {result[key]}")


def run(np: int, sizes: list[float], repeats: int, timeout: float = 300) -> dict:
    """Launch the workers under horovodrun and return the summarized figures."""
    args = ["--repeats", str(repeats), "--sizes", *map(str, sizes)]
    return summarize(run_workers("deepimage.bench.allreduce", np, args, timeout=timeout))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    p.add_argument("--np", type=int, default=2)
    p.add_argument("--sizes", type=float, nargs="+", default=DEFAULT_SIZES, help="MiB")
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    try:
        if a.np < 2 or a.repeats < 1 or min(a.sizes) <= 0:
            raise BenchError(f"bench.allreduce: need --np >= 2, --repeats >= 1 and sizes > 0, got "
                             f"np={a.np} repeats={a.repeats} sizes={a.sizes}")
        if a.worker:
            worker(a.out, a.sizes, a.repeats)
            return
        result = run(a.np, a.sizes, a.repeats)
    except (BenchError, RuntimeError) as err:
        sys.exit(str(err))
    print_table(result)
    if a.json:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
