"""Training-step benchmark: lazy update vs synchronous butterfly vs Horovod's DistributedOptimizer.

    python -m deepimage.bench.train_step [--json] [--np 2] [--batch 16] [--resolution 32] \
        [--fc-hidden 2048 1024]

The module starts its own workers under horovodrun (--np processes, one compute thread each).
Every method trains its own copy of the same DeepImageNet (replicated: plain data parallelism,
no split FC layers) with SGD momentum on the same fixed local batch:
- compute:  no communication at all (local steps): the floor, for the communication share;
- sync:     GradientSync(lazy=False): every butterfly starts after backward, step() waits (the
            issue's synchronous baseline: "synchronize everything after backward");
- overlap:  GradientSync(lazy=False, overlap=True): butterflies start from backward hooks,
            step() waits (DDP-style; lazy minus the deferred waits);
- lazy:     GradientSync(lazy=True): each bucket's wait and update move to its layer's next forward;
- horovod:  hvd.DistributedOptimizer (backward hooks, tensor fusion, Horovod's ring all-reduce).
Methods run in interleaved blocks of --block steps (the order rotates each round), each block
timed on the slowest rank and ended by a flush, so every update is inside the time. Figures are
medians of the per-step time over --rounds blocks. communication_share = 1 - compute / sync.
With --json the last line is one JSON object (step_ms per method, lazy_speedup_vs_sync,
lazy_speedup_vs_horovod, communication_share, model and gradient size).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from deepimage.bench import BenchError, run_workers
from deepimage.config import defaults
from deepimage.launch import apply_thread_limit
from deepimage.model import ModelSpec, build_model

METHODS = ("compute", "sync", "overlap", "lazy", "horovod")
# VGG trunk at 32 px with FC layers of 4096: 73 MiB of gradients against ~200 ms of compute per
# step on the 2-core machine, so communication is over 20 % of a synchronous step even over the
# same-host path (with 2048 x 1024, 13 MiB, it was 5 %).
CONV = [[32], [64], [128, 128]]
FC_HIDDEN = [4096, 4096]
TRAIN = defaults().train  # lr, momentum, weight decay, bucket_mib, compute_nice: the config's


def _sgd(params):
    return torch.optim.SGD(params, lr=TRAIN.lr, momentum=TRAIN.momentum, weight_decay=TRAIN.weight_decay)


class _Method:
    """One way to train: step(x, y) runs a full training step; flush() completes pending work."""

    def __init__(self, name: str, spec: ModelSpec, transport, global_batch: int, bucket_mib: float):
        import horovod.torch as hvd

        from deepimage.parallel.lazy import GradientSync

        self.name, self.global_batch = name, global_batch
        self.model = build_model(spec, seed=0)
        self.sync = None
        if name in ("sync", "overlap", "lazy"):
            self.sync = GradientSync(self.model, transport, _sgd, bucket_mib=bucket_mib,
                                     lazy=name == "lazy", op="sum", overlap=name != "sync")
        elif name == "horovod":
            self.opt = hvd.DistributedOptimizer(_sgd(self.model.parameters()),
                                                named_parameters=self.model.named_parameters(),
                                                op=hvd.Average)
        else:
            self.opt = _sgd(self.model.parameters())

    def step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        if self.sync is not None:
            self.sync.zero_grad()
            loss = F.cross_entropy(self.model(x), y, reduction="sum") / self.global_batch
            loss.backward()
            self.sync.step()
        else:
            self.opt.zero_grad()
            F.cross_entropy(self.model(x), y).backward()  # Horovod averages the local means
            self.opt.step()

    def flush(self) -> None:
        if self.sync is not None:
            self.sync.flush()


def _timed_block(method: _Method, transport, x, y, steps: int) -> float:
    """Seconds per step over `steps` consecutive steps, slowest rank, pending work included."""
    transport.barrier()
    start = time.perf_counter()
    for _ in range(steps):
        method.step(x, y)
    method.flush()
    elapsed = torch.tensor([(time.perf_counter() - start) / steps], dtype=torch.float64)
    return float(transport.allreduce(elapsed, "max"))


def _waits_per_step(methods: list[_Method], steps: int) -> dict[str, float]:
    """ms per step the trainer's thread sat blocked on communication (GradientSync methods)."""
    return {m.name: round(m.sync.wait_seconds / steps * 1e3, 2) for m in methods if m.sync is not None}


def worker(out: Path, batch: int, resolution: int, block: int, rounds: int, bucket_mib: float,
           fc_hidden: list[int], compute_nice: int) -> None:
    apply_thread_limit()
    from deepimage.parallel.lazy import yield_to_communication
    from deepimage.parallel.transport import init_transport

    transport = init_transport("horovod")
    yield_to_communication(transport, compute_nice)  # the same for every method, Horovod's too
    spec = ModelSpec(num_classes=12, conv=CONV, fc_hidden=fc_hidden, dropout=0.0)
    gen = torch.Generator().manual_seed(transport.rank)
    x = torch.randn(batch, 3, resolution, resolution, generator=gen)  # (B, 3, H, W) local batch
    y = torch.randint(0, spec.num_classes, (batch,), generator=gen)
    methods = [_Method(m, spec, transport, batch * transport.size, bucket_mib) for m in METHODS]
    for method in methods:  # warm-up: allocations, Horovod's negotiation and caches
        _timed_block(method, transport, x, y, 2)
        if method.sync is not None:
            method.sync.wait_seconds = 0.0
    times = {m.name: [] for m in methods}
    for round_ in range(rounds):
        for method in methods[round_ % len(methods):] + methods[:round_ % len(methods)]:
            times[method.name].append(_timed_block(method, transport, x, y, block))
    grad_mib = sum(p.numel() * p.element_size() for p in methods[0].model.parameters()) / 2**20
    if transport.rank == 0:
        out.write_text(json.dumps({
            "np": transport.size, "batch_per_rank": batch, "resolution": resolution,
            "block": block, "rounds": rounds, "bucket_mib": bucket_mib, "compute_nice": compute_nice,
            "data_path": transport.data_path,
            "model": spec.to_dict(), "gradient_mib": round(grad_mib, 2),
            "step_ms": {m: round(statistics.median(v) * 1e3, 2) for m, v in times.items()},
            "blocked_on_communication_ms": _waits_per_step(methods, rounds * block),
            "step_ms_all": {m: [round(t * 1e3, 2) for t in v] for m, v in times.items()}}))
    transport.barrier()
    transport.shutdown()


def summarize(result: dict) -> dict:
    ms = result["step_ms"]
    result["communication_share"] = round(1 - ms["compute"] / ms["sync"], 3)
    result["lazy_speedup_vs_sync"] = round(ms["sync"] / ms["lazy"] - 1, 3)  # 0.10 = 10 % faster
    result["lazy_speedup_vs_horovod"] = round(ms["horovod"] / ms["lazy"] - 1, 3)
    result["lazy_speedup_vs_overlap"] = round(ms["overlap"] / ms["lazy"] - 1, 3)
    return result


def print_table(result: dict) -> None:
    print(f"training step, {result['np']} processes x 1 thread, batch {result['batch_per_rank']}/rank "
          f"at {result['resolution']} px, {result['gradient_mib']} MiB of gradients; median of "
          f"{result['rounds']} blocks of {result['block']} steps; compute thread at nice "
          f"{result['compute_nice']}, data path {result['data_path']}")
    for m in METHODS:
        blocked = result["blocked_on_communication_ms"].get(m)
        note = f"  (blocked on communication {blocked:.2f} ms/step)" if blocked is not None else ""
        print(f"  {m:>8}: {result['step_ms'][m]:8.2f} ms/step{note}")
    for key in ("communication_share", "lazy_speedup_vs_sync", "lazy_speedup_vs_overlap", "lazy_speedup_vs_horovod"):
        print(f"  {key}: {result[key]}")


def run(np: int, batch: int, resolution: int, block: int, rounds: int, bucket_mib: float,
        fc_hidden: list[int], compute_nice: int = TRAIN.compute_nice, timeout: float = 300) -> dict:
    """Launch the workers under horovodrun and return the summarized figures."""
    args = ["--batch", str(batch), "--resolution", str(resolution), "--block", str(block),
            "--rounds", str(rounds), "--bucket-mib", str(bucket_mib), "--fc-hidden", *map(str, fc_hidden),
            "--compute-nice", str(compute_nice)]
    return summarize(run_workers("deepimage.bench.train_step", np, args, timeout=timeout))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    p.add_argument("--np", type=int, default=2)
    p.add_argument("--batch", type=int, default=16, help="samples per rank")
    p.add_argument("--resolution", type=int, default=32)
    p.add_argument("--block", type=int, default=4, help="steps per timed block")
    p.add_argument("--rounds", type=int, default=7, help="timed blocks per method")
    p.add_argument("--bucket-mib", type=float, default=TRAIN.bucket_mib, help="train.bucket_mib")
    p.add_argument("--fc-hidden", type=int, nargs=2, default=FC_HIDDEN,
                   help="widths of the two hidden FC layers (more: a larger communication share)")
    p.add_argument("--compute-nice", type=int, default=TRAIN.compute_nice, choices=range(20), metavar="0..19",
                   help="nice level of each worker's compute thread (train.compute_nice)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    try:
        if a.np < 2 or a.batch < 1 or a.block < 1 or a.rounds < 1 or a.resolution < 8 or min(a.fc_hidden) < 1:
            raise BenchError(f"bench.train_step: need --np >= 2, --batch/--block/--rounds >= 1 and "
                             f"--resolution >= 8 and --fc-hidden >= 1, got np={a.np} batch={a.batch} "
                             f"block={a.block} rounds={a.rounds} resolution={a.resolution} "
                             f"fc_hidden={a.fc_hidden}")
        if a.worker:
            worker(a.out, a.batch, a.resolution, a.block, a.rounds, a.bucket_mib, a.fc_hidden,
                   a.compute_nice)
            return
        result = run(a.np, a.batch, a.resolution, a.block, a.rounds, a.bucket_mib, a.fc_hidden,
                     a.compute_nice)
    except (BenchError, RuntimeError) as err:
        sys.exit(str(err))
    print_table(result)
    if a.json:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
