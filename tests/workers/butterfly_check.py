"""Worker: butterfly all-reduce against the launcher's own all-reduce and the exact sum.

    python -m deepimage.launch --launcher torchrun --np 3 --threads 3 -- \
        tests.workers.butterfly_check --out /tmp/bc

Every rank can regenerate every other rank's input (seeded by case and rank), so it knows the
exact float64 sum. The reference is hvd.allreduce under horovodrun (bfloat16, which Horovod's
CPU path lacks, goes through float32) and torch.distributed.all_reduce under torchrun.
Round 1 runs each case with butterfly_allreduce; round 2 starts every case first (even cases
with butterfly_allreduce_async, odd ones in place on lane 1 with allreduce_flat_async_) and
waits in reverse order, and must give the same bits.
Writes <out>/rank<r>.json: {"rank", "size", "reference", "cases": [...], "errors": {...}}.
"""
from __future__ import annotations

import argparse
import json
import traceback
from pathlib import Path

import torch

from deepimage.runtime import apply_thread_limit
from deepimage.parallel import butterfly, butterfly_allreduce, butterfly_allreduce_async
from deepimage.parallel.butterfly import allreduce_flat_async_
from deepimage.parallel.transport import init_transport

SHAPES = [(0,), (0, 3), (1,), (2,), (3,), (5,), (7, 3), (2, 3, 5), (1031,), (64, 65), (300_007,)]
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
OPS = ["sum", "average"]
SMALL_PIECES = [((600_001,), 0.1), ((10_007,), 0.001)]  # many pieces, none divisible by N
ABOVE_PAIR = ((1_100_003,), 1.0)  # float32/64 over PAIR_MIB: two ranks take the two phases too


def case_input(index: int, rank: int, shape, dtype) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1000 * index + rank)
    return (torch.randn(shape, generator=gen, dtype=torch.float64) * 3).to(dtype)


def exact(index: int, size: int, shape, dtype, op: str) -> torch.Tensor:
    total = sum(case_input(index, r, shape, dtype).double() for r in range(size))
    return total / size if op == "average" else total


def references(t, inputs: list[torch.Tensor], ops: list[str]) -> list[torch.Tensor]:
    """The launcher's own all-reduce of every case, all started before any is waited for."""
    if t.name == "horovod":
        import horovod.torch as hvd

        handles = [hvd.allreduce_async(x.float() if x.dtype == torch.bfloat16 else x,
                                       op=hvd.Sum if op == "sum" else hvd.Average, name=f"ref{i}")
                   for i, (x, op) in enumerate(zip(inputs, ops))]
        return [hvd.synchronize(h).to(x.dtype) for h, x in zip(handles, inputs)]
    import torch.distributed as dist

    outs = [x.clone() for x in inputs]
    works = [dist.all_reduce(out, async_op=True) for out in outs]
    for work in works:
        work.wait()
    return [out / t.size if op == "average" else out for out, op in zip(outs, ops)]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b| (0 for empty tensors)."""
    if b.numel() == 0:
        return 0.0
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30))


def cases():
    index = 0
    for shape in SHAPES:
        for dtype in DTYPES:
            for op in OPS:
                yield index, shape, dtype, op, None
                index += 1
    for shape, piece_mib in SMALL_PIECES:
        for dtype in (torch.float32, torch.bfloat16):
            yield index, shape, dtype, "sum", piece_mib
            index += 1
    for dtype in (torch.float32, torch.float64):
        yield index, ABOVE_PAIR[0], dtype, "sum", ABOVE_PAIR[1]
        index += 1


def identical_everywhere(t, results: list[torch.Tensor]) -> list[bool]:
    """Per case, whether every rank got the same bits (float64 holds every dtype exactly)."""
    flat = torch.cat([y.double().reshape(-1) for y in results])  # (total,)
    gathered = t.allgather(flat.reshape(1, -1))  # (N, total)
    same = (gathered == flat).all(0)  # (total,)
    out, start = [], 0
    for y in results:
        out.append(bool(same[start:start + y.numel()].all()))
        start += y.numel()
    return out


def run_case(t, index, shape, dtype, op, piece_mib) -> tuple[dict, torch.Tensor, torch.Tensor]:
    x = case_input(index, t.rank, shape, dtype)
    before = x.clone()
    kwargs = {} if piece_mib is None else {"piece_mib": piece_mib}
    y = butterfly_allreduce(x, op, **kwargs)  # transport=None: the process-wide default
    truth = exact(index, t.size, shape, dtype, op)
    report = {"name": f"{tuple(shape)} {str(dtype)[6:]} {op} pieces={piece_mib}",
              "dtype": str(dtype)[6:], "numel": x.numel(),
              "same_shape_dtype": y.shape == x.shape and y.dtype == x.dtype,
              "input_unchanged": torch.equal(x, before), "err_truth": rel(y, truth)}
    if t.size == 2:  # the one-exchange paths (shared memory, _PairPiece) against the two phases
        pair_mib, shared = butterfly.PAIR_MIB, butterfly.SHARED_PAIR
        butterfly.PAIR_MIB, butterfly.SHARED_PAIR = 0.0, False
        try:
            report["pair_same_bits"] = torch.equal(butterfly_allreduce(x, op, **kwargs), y)
        finally:
            butterfly.PAIR_MIB, butterfly.SHARED_PAIR = pair_mib, shared
    return report, y, truth


class _Viewed:
    """A flat in-place handle whose result is shown in the input's shape."""

    def __init__(self, handle, shape):
        self.handle, self.shape = handle, shape

    def wait(self) -> torch.Tensor:
        return self.handle.wait().view(self.shape)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args(argv)
    apply_thread_limit()
    t = init_transport("auto")
    reports, results, errors = [], [], {}
    try:
        inputs, ops, truths = [], [], []
        for index, shape, dtype, op, piece_mib in cases():
            report, y, truth = run_case(t, index, shape, dtype, op, piece_mib)
            reports.append(report)
            results.append(y)
            inputs.append(case_input(index, t.rank, shape, dtype))
            ops.append(op)
            truths.append(truth)
        for report, y, ref, truth, same in zip(reports, results, references(t, inputs, ops), truths,
                                               identical_everywhere(t, results)):
            report.update(err_reference=rel(y, ref), reference_err_truth=rel(ref, truth),
                          identical_on_all_ranks=same)
        # Round 2: everything in flight at once, waited for in reverse order; odd cases go
        # in place on lane 1 (GradientSync's path for the first layers' buckets).
        handles = []
        for i, s, d, op, pm in cases():
            x, kwargs = case_input(i, t.rank, s, d), ({} if pm is None else {"piece_mib": pm})
            if i % 2:
                flat = x.reshape(-1).clone()
                handles.append(_Viewed(allreduce_flat_async_(flat, op, t, lane=1, **kwargs), x.shape))
            else:
                handles.append(butterfly_allreduce_async(x, op, t, **kwargs))
        for report, y, handle in reversed(list(zip(reports, results, handles))):
            report["async_same_bits"] = torch.equal(handle.wait(), y)
    except Exception:
        errors["main"] = traceback.format_exc()
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / f"rank{t.rank}.json").write_text(json.dumps(
        {"rank": t.rank, "size": t.size, "reference": t.name, "cases": reports, "errors": errors}))
    t.barrier()
    t.shutdown()


if __name__ == "__main__":
    main()
