"""Worker: every Transport method against values each rank can compute for itself.

    python -m deepimage.launch --launcher horovod --np 3 --threads 3 -- \
        tests.workers.transport_check --out /tmp/tc --expect horovod [--data-path horovod]

Writes <out>/rank<r>.json: {"rank", "size", "name", "checks": {check: true/false}, "errors": {...}}.
"""
from __future__ import annotations

import argparse
import json
import os
import threading
import traceback
from pathlib import Path

import torch

from deepimage.runtime import apply_thread_limit
from deepimage.parallel.transport import TransportError, init_transport


def rows_for(src: int, dst: int, count: int, dtype=torch.float32) -> torch.Tensor:
    """The (count, 3) block rank src sends rank dst: values identify sender, receiver, row."""
    base = torch.arange(count, dtype=torch.float64)[:, None] * 3 + torch.arange(3)  # (count, 3)
    return (base + src * 1000 + dst * 100).to(dtype)


def alltoall_splits(src: int, size: int) -> list[int]:
    return [(src + dst) % 3 for dst in range(size)]  # some zero, all different


def check_alltoall(t, checks, dtype):
    r, n = t.rank, t.size
    send = torch.cat([rows_for(r, j, c, dtype) for j, c in enumerate(alltoall_splits(r, n))])
    want = torch.cat([rows_for(s, r, alltoall_splits(s, n)[r], dtype) for s in range(n)])
    tag = str(dtype).split(".")[-1]
    checks[f"alltoall_{tag}"] = torch.equal(t.alltoall(send, alltoall_splits(r, n)), want)
    recv_splits = [alltoall_splits(s, n)[r] for s in range(n)]
    got = t.alltoall_async(send, alltoall_splits(r, n), recv_splits=recv_splits).wait()
    checks[f"alltoall_recv_splits_{tag}"] = torch.equal(got, want)
    others = torch.cat([rows_for(s, r, alltoall_splits(s, n)[r], dtype) for s in range(n) if s != r])
    out = torch.full_like(others, -1)
    got = t.alltoall_async(send, alltoall_splits(r, n), include_self=False, out=out).wait()
    checks[f"alltoall_exclude_self_into_out_{tag}"] = got is out and torch.equal(out, others)


def check_alltoall_overlap(t, checks):
    """Two alltoalls in flight at once, waited for in reverse order."""
    r, n = t.rank, t.size
    a = torch.full((n, 2), float(r))
    b = torch.full((2 * n, 1), float(10 + r))
    ha = t.alltoall_async(a, [1] * n)
    hb = t.alltoall_async(b, [2] * n)
    got_b, got_a = hb.wait(), ha.wait()
    want_a = torch.arange(n, dtype=torch.float32).repeat_interleave(2).view(n, 2)
    want_b = (10 + torch.arange(n, dtype=torch.float32)).repeat_interleave(2).view(2 * n, 1)
    checks["alltoall_two_in_flight"] = torch.equal(got_a, want_a) and torch.equal(got_b, want_b)
    # The same on lane 1 (a second connection), in flight beside a lane 0 operation.
    h0 = t.alltoall_async(a, [1] * n)
    h1 = t.alltoall_async(b, [2] * n, lane=1)
    g1 = t.allgather_async(torch.full((1, 2), float(r)), lane=1)
    checks["lane1_beside_lane0"] = (torch.equal(h1.wait(), want_b) and torch.equal(h0.wait(), want_a)
                                    and torch.equal(g1.wait(), want_a))


def gather_rows(rank: int) -> int:
    return 0 if rank == 1 else rank + 1  # rank 1 contributes nothing


def check_allgather(t, checks):
    r, n = t.rank, t.size
    mine = rows_for(r, 0, gather_rows(r))
    want = torch.cat([rows_for(s, 0, gather_rows(s)) for s in range(n)])
    checks["allgather_uneven_rows"] = torch.equal(t.allgather(mine), want)
    out = torch.empty_like(want)
    got = t.allgather_async(mine, sizes=[gather_rows(s) for s in range(n)], out=out).wait()
    checks["allgather_sizes_into_out"] = got is out and torch.equal(out, want)
    ints = torch.tensor([r, -r], dtype=torch.int64)
    checks["allgather_int64"] = torch.equal(
        t.allgather(ints), torch.tensor([v for s in range(n) for v in (s, -s)], dtype=torch.int64))


def check_reduce_broadcast(t, checks):
    r, n = t.rank, t.size
    x = torch.tensor([1.0, r, -r, 0.5 * r], dtype=torch.float64)
    ranks = torch.arange(n, dtype=torch.float64)
    checks["allreduce_sum"] = torch.allclose(t.allreduce(x, "sum"),
                                             torch.stack([torch.full((), float(n)), ranks.sum(),
                                                          -ranks.sum(), 0.5 * ranks.sum()]))
    checks["allreduce_average"] = torch.allclose(t.allreduce(x, "average"),
                                                 torch.stack([torch.ones(()), ranks.mean(),
                                                              -ranks.mean(), 0.5 * ranks.mean()]))
    checks["allreduce_max"] = torch.equal(t.allreduce(x, "max"),
                                          torch.tensor([1.0, n - 1, 0.0, 0.5 * (n - 1)], dtype=torch.float64))
    checks["allreduce_max_int64"] = torch.equal(t.allreduce(torch.tensor([r, -r]), "max"),
                                                torch.tensor([n - 1, 0]))
    checks["allreduce_leaves_input"] = torch.equal(x, torch.tensor([1.0, r, -r, 0.5 * r], dtype=torch.float64))
    root = n - 1
    got = t.broadcast(torch.full((2, 3), float(r)), root=root)
    checks["broadcast_from_last_rank"] = torch.equal(got, torch.full((2, 3), float(root)))
    t.barrier()
    checks["barrier_returns"] = True


def check_tags_across_threads(t, checks):
    """Tags reserved in call order let another thread post the messages in any order."""
    r, n = t.rank, t.size
    tags = [t.reserve_tags(1) for _ in range(3)]
    sends = [torch.full((n, 4), float(r * 10 + i)) for i in range(3)]
    results = [None] * 3

    def post():  # reverse order, from another thread
        handles = {i: t.alltoall_async(sends[i], [1] * n, recv_splits=[1] * n, tag=tags[i])
                   for i in (2, 1, 0)}
        for i, h in handles.items():
            results[i] = h.wait()

    worker = threading.Thread(target=post)
    worker.start()
    worker.join()
    checks["tags_out_of_order_from_thread"] = all(
        torch.equal(results[i], (torch.arange(n, dtype=torch.float32) * 10 + i)[:, None].expand(n, 4))
        for i in range(3))


def check_errors(t, checks):
    def raises(fn) -> bool:
        try:
            fn()
        except TransportError:
            return True
        return False

    n = t.size
    checks["error_bad_splits"] = raises(lambda: t.alltoall_async(torch.zeros(3, 1), [1] * (n + 1)))
    checks["error_splits_sum"] = raises(lambda: t.alltoall_async(torch.zeros(3, 1), [4] + [0] * (n - 1)))
    checks["error_bad_op"] = raises(lambda: t.allreduce(torch.zeros(2), "min"))
    checks["error_allgather_sizes"] = raises(
        lambda: t.allgather_async(torch.zeros(2, 1), sizes=[5] * n))
    checks["error_0d"] = raises(lambda: t.allgather(torch.tensor(1.0)))
    checks["error_bad_lane"] = raises(lambda: t.allgather_async(torch.zeros(2, 1), lane=2).wait())


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--expect", required=True, help="the transport name init_transport('auto') must pick")
    p.add_argument("--data-path", choices=["auto", "cma", "gloo", "horovod"],
                   help="the transport's data_path (horovod: every byte with hvd ops)")
    a = p.parse_args(argv)
    apply_thread_limit()
    t = init_transport("auto", **({"data_path": a.data_path} if a.data_path else {}))
    checks: dict[str, bool] = {"picked_expected_transport": t.name == a.expect}
    errors: dict[str, str] = {}
    dtypes = [torch.float32, torch.int64]
    if a.data_path != "horovod":  # Horovod's CPU operations have no bfloat16
        dtypes.append(torch.bfloat16)
    steps = [*(lambda d=d: check_alltoall(t, checks, d) for d in dtypes),
             lambda: check_alltoall_overlap(t, checks), lambda: check_allgather(t, checks),
             lambda: check_reduce_broadcast(t, checks), lambda: check_tags_across_threads(t, checks),
             lambda: check_errors(t, checks)]
    for i, step in enumerate(steps):
        try:
            step()
        except Exception:  # recorded; a failed collective would hang the others, so stop
            errors[f"step{i}"] = traceback.format_exc()
            break
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / f"rank{t.rank}.json").write_text(json.dumps(
        {"rank": t.rank, "size": t.size, "name": t.name, "data_path": t.data_path,
         "horovod_cycle_ms": os.environ.get("HOROVOD_CYCLE_TIME"),
         "checks": checks, "errors": errors}))
    t.barrier()
    t.shutdown()


if __name__ == "__main__":
    main()
