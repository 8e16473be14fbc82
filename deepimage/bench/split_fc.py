"""Split FC layers against the same network fully data-parallel (butterfly all-reduce): FC
parameters and optimizer state per rank, bytes sent per step, step time.

    python -m deepimage.bench.split_fc [--json] [--launcher horovod|torchrun] [--np 2]

The module launches its own workers (horovodrun or torchrun, one compute thread each) and prints
a table; with --json the last line is one JSON object (np, fc_param_fraction_per_rank,
bytes_ratio, step_time_ratio and the figures behind them). Both modes train the same FC-heavy
DeepImageNet (two 4096-wide hidden layers, 1000 classes, a small conv trunk on 16 px images)
with SGD + momentum through GradientSync (butterfly all-reduce, lazy update, op="sum"):

- replicated: every rank holds the whole head; all gradients, FC included, are all-reduced;
- split: the head is split (deepimage.parallel.split_fc); only the conv gradients are
  all-reduced, and activations (features, fc2 partial sums, softmax statistics) move instead.

Bytes are counted by wrapping the transport: each call adds what this rank sends in it
(alltoall: the rows for other ranks; allgather: its tensor to N-1 ranks; allreduce: 2(N-1)/N
of the tensor, gloo's ring; plus 8 bytes per peer where the transport must first exchange row
counts). The butterfly goes through the same wrapper, so its traffic is counted call by call.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import torch
import torch.nn.functional as F

from deepimage.bench import BenchError, run_workers
from deepimage.config import defaults
from deepimage.launch import LAUNCHERS
from deepimage.runtime import apply_thread_limit
from deepimage.model import ModelSpec, build_model
from deepimage.parallel.even_split import partition_range
from deepimage.parallel.transport import Handle, Transport

MODES = ("split", "replicated")
CONV = [[32], [64], [128]]  # 16 px -> 2 x 2 x 128 = 512 features: a cheap trunk, FC-heavy net


class CountingTransport(Transport):
    """Delegates every collective to `inner` and adds up the bytes this rank sends in it."""

    def __init__(self, inner: Transport):
        super().__init__()
        self.inner, self.name, self.rank, self.size = inner, inner.name, inner.rank, inner.size
        self._lock = threading.Lock()  # the butterfly's progress thread calls in too
        self.sent: Counter = Counter()

    def _add(self, op: str, nbytes: int) -> None:
        with self._lock:
            self.sent[op] += int(nbytes)

    def reset(self) -> None:
        with self._lock:
            self.sent = Counter()

    def _count_exchange(self, known: object) -> int:
        return 0 if known is not None else 8 * (self.size - 1)  # int64 row counts to each peer

    def alltoall_async(self, tensor, splits, **options) -> Handle:
        row_bytes = tensor[0:1].numel() * tensor.element_size()
        others = sum(int(s) for j, s in enumerate(splits) if j != self.rank)
        self._add("alltoall", others * row_bytes + self._count_exchange(options.get("recv_splits")))
        return self.inner.alltoall_async(tensor, splits, **options)

    def allgather_async(self, tensor, **options) -> Handle:
        nbytes = tensor.numel() * tensor.element_size()
        self._add("allgather", nbytes * (self.size - 1) + self._count_exchange(options.get("sizes")))
        return self.inner.allgather_async(tensor, **options)

    def allreduce(self, tensor, op="sum"):
        self._add("allreduce", 2 * (self.size - 1) * tensor.numel() * tensor.element_size() // self.size)
        return self.inner.allreduce(tensor, op)

    def broadcast(self, tensor, root=0):
        if self.rank == root:
            self._add("broadcast", (self.size - 1) * tensor.numel() * tensor.element_size())
        return self.inner.broadcast(tensor, root)

    def barrier(self):
        self.inner.barrier()

    def reserve_tags(self, n: int) -> int:
        return self.inner.reserve_tags(n)  # one tag sequence, whichever object a caller holds

    def on_shutdown(self, closer) -> None:
        self.inner.on_shutdown(closer)

    def shutdown(self) -> None:
        self.inner.shutdown()


# ---------------------------------------------------------------------------------------------
# Worker side

def bench_spec(a: argparse.Namespace) -> ModelSpec:
    return ModelSpec(num_classes=a.classes, conv=CONV, fc_hidden=[a.hidden, a.hidden], dropout=0.0)


def _local_batch(a: argparse.Namespace, rank: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    images = torch.randn(a.batch_size, 3, a.resolution, a.resolution, generator=g)  # (B, 3, H, W)
    labels = torch.randint(0, a.classes, (a.batch_size,), generator=g)  # (B,)
    start, stop = partition_range(a.batch_size, rank, size)
    return images[start:stop].contiguous(), labels[start:stop].contiguous()  # (b_r, ...)


def run_mode(mode: str, a: argparse.Namespace, counter: CountingTransport) -> dict:
    """Train `mode` for warmup + steps; per-rank FC memory, bytes sent per step, step times."""
    from deepimage.parallel.lazy import GradientSync
    from deepimage.parallel.split_fc import split_head

    model = build_model(bench_spec(a), seed=0)
    if mode == "split":
        model.head = split_head(model.head, counter)
    optimizers: list[torch.optim.Optimizer] = []

    def sgd(params):
        optimizers.append(torch.optim.SGD(params, lr=1e-3, momentum=0.9))
        return optimizers[-1]

    sync = GradientSync(model, counter, sgd, bucket_mib=a.bucket_mib, lazy=a.lazy, op="sum")
    images, labels = _local_batch(a, counter.rank, counter.size)

    def step() -> None:
        features = model.trunk(images)  # (b_r, 3, H, W) -> (b_r, F)
        if mode == "split":
            loss, _ = model.head.loss(features, labels)  # mean over the global batch
        else:
            loss = F.cross_entropy(model.head(features), labels, reduction="sum") / a.batch_size
        sync.zero_grad()
        loss.backward()
        sync.step()

    for _ in range(a.warmup):
        step()
    sync.flush()  # warm-up traffic (a lazy update's phase 2 included) ends before counting
    counter.reset()
    times = []
    for _ in range(a.steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    sync.flush()
    head = set(model.head.parameters())
    state = [v for opt in optimizers for p, st in opt.state.items() if p in head
             for v in st.values() if torch.is_tensor(v)]
    return {"fc_params_per_rank": sum(p.numel() for p in head),
            "fc_optimizer_state_bytes_per_rank": sum(v.numel() * v.element_size() for v in state),
            "bytes_per_step": sum(counter.sent.values()) / a.steps,
            "bytes_per_step_by_op_rank0": {op: n / a.steps for op, n in sorted(counter.sent.items())},
            "step_time_s": statistics.median(times)}


def _across_ranks(result: dict, transport: Transport) -> dict:
    """Worst rank's memory and step time, mean bytes over ranks (the same on every rank)."""
    out = dict(result)
    for key in ("fc_params_per_rank", "fc_optimizer_state_bytes_per_rank", "step_time_s"):
        out[key] = float(transport.allreduce(torch.tensor([float(result[key])], dtype=torch.float64), "max"))
    out["bytes_per_step"] = float(transport.allreduce(
        torch.tensor([result["bytes_per_step"]], dtype=torch.float64), "average"))
    for key in ("fc_params_per_rank", "fc_optimizer_state_bytes_per_rank"):
        out[key] = int(out[key])
    return out


def worker(a: argparse.Namespace) -> None:
    from deepimage.parallel.transport import init_transport

    apply_thread_limit()
    transport = init_transport("auto")
    counter = CountingTransport(transport)
    results = {}
    for mode in MODES:
        results[mode] = _across_ranks(run_mode(mode, a, counter), transport)
    if transport.rank == 0:
        a.out.write_text(json.dumps(summarise(results, a, transport.size, transport.name)))
    transport.barrier()
    transport.shutdown()


def summarise(results: dict, a: argparse.Namespace, np: int, transport: str) -> dict:
    split, rep = results["split"], results["replicated"]
    return {"np": np, "transport": transport, "batch_size": a.batch_size, "hidden": a.hidden,
            "classes": a.classes, "resolution": a.resolution, "steps": a.steps, "lazy": a.lazy,
            "split": split, "replicated": rep,
            "fc_param_fraction_per_rank": split["fc_params_per_rank"] / rep["fc_params_per_rank"],
            "bytes_ratio": rep["bytes_per_step"] / split["bytes_per_step"],
            "step_time_ratio": split["step_time_s"] / rep["step_time_s"]}


# ---------------------------------------------------------------------------------------------
# Command line (the parent process launches the workers)

def _worker_args(a: argparse.Namespace) -> list[str]:
    # No --np here: torchrun reads it as an abbreviation of its own --nproc-per-node.
    return ["--batch-size", str(a.batch_size), "--hidden", str(a.hidden), "--classes", str(a.classes),
            "--resolution", str(a.resolution), "--steps", str(a.steps), "--warmup", str(a.warmup),
            "--bucket-mib", str(a.bucket_mib), "--lazy" if a.lazy else "--no-lazy"]


def launch(a: argparse.Namespace) -> dict:
    """Run the workers under a.launcher; return rank 0's summary."""
    return run_workers("deepimage.bench.split_fc", a.np, _worker_args(a), launcher=a.launcher,
                       threads=a.threads or a.np, timeout=a.timeout)


def table(s: dict) -> str:
    split, rep = s["split"], s["replicated"]
    mib = 2.0 ** 20
    rows = [("FC parameters / rank", f"{split['fc_params_per_rank']:,}", f"{rep['fc_params_per_rank']:,}"),
            ("FC optimizer state / rank (MiB)", f"{split['fc_optimizer_state_bytes_per_rank'] / mib:.1f}",
             f"{rep['fc_optimizer_state_bytes_per_rank'] / mib:.1f}"),
            ("bytes sent / step / rank (MiB)", f"{split['bytes_per_step'] / mib:.2f}",
             f"{rep['bytes_per_step'] / mib:.2f}"),
            ("step time (ms, median)", f"{split['step_time_s'] * 1e3:.1f}", f"{rep['step_time_s'] * 1e3:.1f}")]
    head = (f"split FC vs replicated FC: np={s['np']} ({s['transport']}), global batch {s['batch_size']}, "
            f"fc {s['hidden']}x{s['hidden']}, {s['classes']} classes, {s['resolution']} px, "
            f"{s['steps']} steps, lazy={s['lazy']}")
    lines = [head, f"{'':34}{'split':>14}{'replicated':>14}"]
    lines += [f"{name:34}{x:>14}{y:>14}" for name, x, y in rows]
    lines.append(f"FC params per rank {s['fc_param_fraction_per_rank']:.3f} of replicated; "
                 f"{s['bytes_ratio']:.1f}x fewer bytes; step time ratio {s['step_time_ratio']:.2f}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", action="store_true", help="end with one JSON line")
    p.add_argument("--launcher", choices=LAUNCHERS, default="horovod")
    p.add_argument("--np", type=int, default=2)
    p.add_argument("--threads", type=int, default=0, help="cores for all workers (default: np)")
    p.add_argument("--batch-size", type=int, default=64, help="global batch")
    p.add_argument("--hidden", type=int, default=4096, help="width of both hidden FC layers")
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--resolution", type=int, default=16)
    p.add_argument("--steps", type=int, default=6, help="timed steps per mode")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--bucket-mib", type=float, default=defaults().train.bucket_mib, help="train.bucket_mib")
    p.add_argument("--lazy", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--timeout", type=float, default=300.0, help="seconds before the launch is killed")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    for name in ("np", "batch_size", "hidden", "classes", "resolution", "steps"):
        if getattr(a, name) < 1:
            raise BenchError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(a, name)}")
    if min(a.hidden, a.classes) < a.np:
        raise BenchError(f"--hidden ({a.hidden}) and --classes ({a.classes}) must be >= --np ({a.np})")
    if a.resolution % 8:
        raise BenchError(f"--resolution must be a multiple of 8 (three 2x2 pools), got {a.resolution}")
    return a


def main(argv: list[str] | None = None) -> None:
    try:
        a = parse_args(argv)
        if a.worker:
            worker(a)
            return
        summary = launch(a)
    except BenchError as err:
        sys.exit(f"bench.split_fc: {err}")
    print(table(summary))
    if a.json:
        print(json.dumps(summary))


if __name__ == "__main__":
    main()
