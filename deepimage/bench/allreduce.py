"""All-reduce benchmark: butterfly vs hvd.allreduce, torch.distributed.all_reduce and MPI_Allreduce.

    python -m deepimage.bench.allreduce [--json] [--np 2] [--sizes 1 2 4 8 16 32 64] [--repeats 15]

Needs `make setup` (envs/requirements-bench.txt: mpi4py and the MPICH wheel, whose mpiexec
launches the MPI baseline). The module starts two launches of its own workers (--np processes,
one compute thread each); in each, every method runs in the same processes, on the same float32
buffers, in interleaved rounds (the order rotates each round) and sees the same machine noise.
1. horovodrun:
- butterfly: deepimage's butterfly all-reduce, in place on a flat buffer (the path training's
  gradient buckets take), over the transport's default data path (`data_path` in the result:
  "cma", one kernel copy per message, when the ranks share a host; see parallel/transport.py;
  two ranks on one host exchange through a shared-memory segment instead, parallel/shm.py:
  `shared_pair` in the result);
- butterfly_copy: the public butterfly_allreduce(tensor), which returns a new tensor;
- butterfly_gloo: the same butterfly with its messages over gloo's TCP point-to-point instead
  (the algorithm on the same wire as the two baselines);
- horovod:   hvd.allreduce_ (in place, Horovod's gloo ring);
- torch:     torch.distributed.all_reduce (in place, gloo) on the group the transport set up;
- limit:     the memory-bandwidth limit: every rank at once, one thread copies the N bytes and
  adds N/2 of them (the least an all-reduce of N bytes over 2 ranks must move).
2. mpiexec (MPICH's own launcher, shared memory):
- mpi:       MPI_Allreduce (mpi4py, in place);
- butterfly_mpiexec: the butterfly again, over a torch.distributed transport set up from the
  MPI ranks, so the ratio to MPI is taken between neighbouring rounds of the same processes;
- limit_mpiexec: the limit again.
Each figure is the median over --repeats rounds of the slowest rank's time; bus bandwidth is
size * 2(N-1)/N / time (the nccl-tests convention); limit_fraction is limit time / method time
(1 = at the limit). With --json the last line is one JSON object with every figure and
speedup_vs_horovod_16MiB (Horovod time / butterfly time), ratio_vs_torch_16MiB (torch time /
butterfly time), ratio_vs_mpi_<s>MiB (MPI time / butterfly_mpiexec time) and
limit_fraction_<s>MiB (limit time / butterfly time).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from deepimage.bench import BenchError, run_workers
from deepimage.launch import worker_env
from deepimage.runtime import apply_thread_limit
from deepimage.parallel.transport.datapath import pair_of

METHODS = ("butterfly", "butterfly_copy", "butterfly_gloo", "horovod", "torch", "limit")
MPI_METHODS = ("mpi", "butterfly_mpiexec", "limit_mpiexec")
DEFAULT_SIZES = [1, 2, 4, 8, 16, 32, 64]
HEADLINE_SIZES = (1, 4, 16, 64)  # ratio_vs_mpi_<s>MiB; limit_fraction_<s>MiB from 16 up


def _limit(buf: torch.Tensor):
    """The bandwidth limit's work on `buf` (N bytes): copy N bytes, add N/2 (sum of two halves)."""
    copy = torch.empty_like(buf)
    copy.fill_(0.0)  # pages mapped before timing
    half = buf.numel() // 2

    def run():
        copy.copy_(buf)
        torch.add(buf[:half], buf[half:2 * half], out=copy[:half])

    return run


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
            "torch": lambda: dist.all_reduce(buf),
            "limit": _limit(buf)}


def _mpi_methods(comm, transport, buf: torch.Tensor) -> dict:
    """The mpiexec launch's methods (see the module doc), as in _methods."""
    from mpi4py import MPI

    from deepimage.parallel.butterfly import allreduce_flat_async_

    array = buf.numpy()  # shares buf's memory
    return {"mpi": lambda: comm.Allreduce(MPI.IN_PLACE, array, op=MPI.SUM),
            "butterfly_mpiexec": lambda: allreduce_flat_async_(buf, "sum", transport).wait(),
            "limit_mpiexec": _limit(buf)}


def _time_size(mib: float, repeats: int, make_methods, barrier, slowest) -> dict[str, list[float]]:
    """Seconds per call of each method (slowest rank), `repeats` interleaved rounds after 2 warm."""
    buf = torch.ones(int(mib * 2**20) // 4)
    methods = make_methods(buf)
    names = list(methods)
    times: dict[str, list[float]] = {n: [] for n in names}
    for round_ in range(repeats + 2):
        order = names[round_ % len(names):] + names[:round_ % len(names)]
        for name in order:
            buf.fill_(1.0)  # sums stay small and exact whatever ran before
            barrier()
            start = time.perf_counter()
            methods[name]()
            elapsed = time.perf_counter() - start
            if round_ >= 2:
                times[name].append(slowest(elapsed))
    return times


def _figures(result: dict, methods: tuple, sizes: list[float], np_: int, timed: list[dict]) -> None:
    """Medians (ms) and bus bandwidth (GB/s) of each method at each size into `result`."""
    for m in methods:
        result["median_ms"][m], result["busbw_gbps"][m] = [], []
    for mib, times in zip(sizes, timed):
        for m in methods:
            median = statistics.median(times[m])
            result["median_ms"][m].append(round(median * 1e3, 3))
            bus_bytes = mib * 2**20 * 2 * (np_ - 1) / np_
            result["busbw_gbps"][m].append(round(bus_bytes / median / 1e9, 3))


def worker(out: Path, sizes: list[float], repeats: int) -> None:
    apply_thread_limit()
    from deepimage.parallel.transport import init_transport

    transport = init_transport("horovod")
    result = {"np": transport.size, "sizes_mib": sizes, "repeats": repeats,
              "data_path": transport.data_path, "data_path_note": transport.data_path_note,
              "shared_pair": pair_of(transport, 0) is not None, "median_ms": {}, "busbw_gbps": {}}

    def slowest(seconds: float) -> float:
        return float(transport.allreduce(torch.tensor([seconds], dtype=torch.float64), "max"))

    timed = [_time_size(mib, repeats, lambda buf: _methods(transport, buf), transport.barrier, slowest)
             for mib in sizes]
    _figures(result, METHODS, sizes, transport.size, timed)
    if transport.rank == 0:
        out.write_text(json.dumps(result))
    transport.barrier()
    transport.shutdown()


def _transport_from_mpi(comm):
    """A torch.distributed (gloo + same-host path) transport over the MPI ranks: rank 0 opens a
    TCPStore and the MPI broadcast tells the others its port."""
    import torch.distributed as dist

    from deepimage.parallel.transport import init_transport

    store = None
    if comm.rank == 0:
        store = dist.TCPStore("127.0.0.1", 0, comm.size, is_master=True, wait_for_workers=False)
    port = comm.bcast(store.port if store else None, root=0)
    if store is None:
        store = dist.TCPStore("127.0.0.1", port, comm.size, is_master=False)
    dist.init_process_group("gloo", store=store, rank=comm.rank, world_size=comm.size)
    return init_transport("torchrun")


def mpi_worker(out: Path, sizes: list[float], repeats: int) -> None:
    """One rank of the mpiexec launch: MPI_Allreduce, the butterfly and the limit, interleaved."""
    apply_thread_limit()
    from mpi4py import MPI
    import torch.distributed as dist

    comm = MPI.COMM_WORLD
    transport = _transport_from_mpi(comm)
    result = {"mpi_library": MPI.Get_library_version().splitlines()[0].strip(),
              "mpiexec_data_path": transport.data_path,
              "mpiexec_shared_pair": pair_of(transport, 0) is not None, "median_ms": {}, "busbw_gbps": {}}

    def slowest(seconds: float) -> float:
        return comm.allreduce(seconds, op=MPI.MAX)

    timed = [_time_size(mib, repeats, lambda buf: _mpi_methods(comm, transport, buf), comm.Barrier,
                        slowest) for mib in sizes]
    _figures(result, MPI_METHODS, sizes, comm.size, timed)
    if comm.rank == 0:
        out.write_text(json.dumps(result))
    comm.Barrier()
    transport.shutdown()
    dist.destroy_process_group()  # the transport did not create the group


def summarize(result: dict) -> dict:
    """Add the headline ratios: vs Horovod and torch at 16 MiB (and the worst at 16 MiB and
    above), vs MPI at 1, 4, 16, 64 MiB, and the fraction of the bandwidth limit."""
    sizes, ms = result["sizes_mib"], result["median_ms"]
    big = [i for i, s in enumerate(sizes) if s >= 16]
    result["limit_fraction"] = {m: [round(ms["limit"][i] / t, 3) for i, t in enumerate(ms[m])]
                                for m in METHODS if m != "limit"}
    with_mpi = "mpi" in ms
    if with_mpi:
        result["limit_fraction"].update({m: [round(ms["limit_mpiexec"][i] / t, 3) for i, t in enumerate(ms[m])]
                                         for m in ("mpi", "butterfly_mpiexec")})
    for s in HEADLINE_SIZES:
        if s in sizes:
            i = sizes.index(s)
            if with_mpi:
                result[f"ratio_vs_mpi_{s}MiB"] = round(ms["mpi"][i] / ms["butterfly_mpiexec"][i], 3)
            if s >= 16:
                result[f"limit_fraction_{s}MiB"] = result["limit_fraction"]["butterfly"][i]
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
    print(f"MPI launch ({result['mpi_library']}; butterfly data path {result['mpiexec_data_path']}); "
          f"limit = copy N bytes + add N/2 on every rank at once; fraction = limit / time")
    print(f"{'MiB':>5} " + " ".join(f"{m:>22}" for m in MPI_METHODS) + f" {'butterfly/limit':>16}")
    for i, mib in enumerate(result["sizes_mib"]):
        cells = [f"{result['median_ms'][m][i]:9.2f} ms" for m in MPI_METHODS]
        print(f"{mib:>5g} " + " ".join(f"{c:>22}" for c in cells)
              + f" {result['limit_fraction']['butterfly'][i]:>16.3f}")
    for key in ("speedup_vs_horovod_16MiB", "ratio_vs_torch_16MiB", "min_speedup_vs_horovod_ge_16MiB",
                "min_ratio_vs_torch_ge_16MiB", *(f"ratio_vs_mpi_{s}MiB" for s in HEADLINE_SIZES),
                *(f"limit_fraction_{s}MiB" for s in HEADLINE_SIZES)):
        if key in result:
            print(f"{key}: {result[key]}")


def mpiexec() -> str:
    """The mpiexec of this interpreter's environment (the MPICH wheel's), else the one on PATH."""
    beside = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    if os.path.exists(beside):
        return beside
    import shutil

    found = shutil.which("mpiexec")
    if found is None:
        raise BenchError("bench.allreduce: mpiexec not found: run `make setup` (it installs "
                         "envs/requirements-bench.txt: mpi4py and the mpich wheel)")
    return found


def run_mpi(np: int, args: list[str], timeout: float) -> dict:
    """Start the MPI baseline's workers with mpiexec; return rank 0's JSON."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "mpi.json"
        # -launcher fork: local processes only, also inside a SLURM allocation (where hydra
        # would otherwise start them through srun and wait on a job step).
        cmd = [mpiexec(), "-launcher", "fork", "-n", str(np), sys.executable, "-m", "deepimage.bench.allreduce",
               "--mpi-worker", "--out", str(out), *args]
        try:
            proc = subprocess.run(cmd, env=worker_env(threads=np, np=np), capture_output=True,
                                  text=True, timeout=timeout)
        except subprocess.TimeoutExpired as e:
            raise BenchError(f"bench.allreduce: mpiexec with {np} workers ran past {timeout} s") from e
        if proc.returncode != 0 or not out.exists():
            tail = (proc.stdout + proc.stderr).strip().splitlines()[-15:]
            raise BenchError(f"bench.allreduce: mpiexec with {np} workers failed (exit "
                             f"{proc.returncode}):\n" + "\n".join(tail))
        return json.loads(out.read_text())


def run(np: int, sizes: list[float], repeats: int, timeout: float = 300, mpi: bool = True) -> dict:
    """Launch the horovodrun workers, then (mpi) the mpiexec ones; return the summarized figures."""
    args = ["--repeats", str(repeats), "--sizes", *map(str, sizes)]
    result = run_workers("deepimage.bench.allreduce", np, args, timeout=timeout)
    if mpi:
        mpi_result = run_mpi(np, args, timeout)
        for key in ("median_ms", "busbw_gbps"):
            result[key].update(mpi_result.pop(key))
        result.update(mpi_result)
    return summarize(result)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    p.add_argument("--np", type=int, default=2)
    p.add_argument("--sizes", type=float, nargs="+", default=DEFAULT_SIZES, help="MiB")
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--mpi-worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    try:
        if a.np < 2 or a.repeats < 1 or min(a.sizes) <= 0:
            raise BenchError(f"bench.allreduce: need --np >= 2, --repeats >= 1 and sizes > 0, got "
                             f"np={a.np} repeats={a.repeats} sizes={a.sizes}")
        if a.worker:
            worker(a.out, a.sizes, a.repeats)
            return
        if a.mpi_worker:
            mpi_worker(a.out, a.sizes, a.repeats)
            return
        result = run(a.np, a.sizes, a.repeats)
    except (BenchError, RuntimeError) as err:
        sys.exit(str(err))
    print_table(result)
    if a.json:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
