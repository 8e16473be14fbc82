"""Training-step benchmark: lazy update (with and without split FC layers) vs synchronous
butterfly vs Horovod's DistributedOptimizer vs PyTorch DistributedDataParallel, on two models.

    python -m deepimage.bench.train_step [--json] [--np 2] [--batch 16] [--resolution 32] \
        [--fc-hidden 4096 4096]

The module starts its own workers under horovodrun (--np processes, one compute thread each).
Each method trains its own copy of the same DeepImageNet with SGD momentum on the same fixed
local batch (the same tensors for every method). The four GradientSync methods run the training
stage's step (deepimage.train.step, its batch count and loss all-reduces included) on the model
deepimage.parallel.parallelize makes, with their own train.lazy_update / train.split_fc:
- compute:    no communication at all (local steps): the floor, for the communication share;
- sync:       lazy update off: every butterfly starts after backward, step() waits (the
              issue's synchronous baseline: "synchronize everything after backward");
- overlap:    lazy update off, parallelize(overlap=True): butterflies start from backward hooks,
              step() waits (DDP-style; lazy minus the deferred waits);
- lazy:       lazy update on, replicated FC layers;
- lazy_split: lazy update WITH split FC layers, as training applies them;
- horovod:    hvd.DistributedOptimizer (backward hooks, tensor fusion, Horovod's ring all-reduce);
- ddp:        torch DistributedDataParallel over its own gloo group, its defaults (bucket_cap_mb
              25, all-reduce overlapped with backward): what a PyTorch user would pick.
Two models, one after the other in the same workers:
- default:  config.yaml's model (conv, per_resolution conv, fc_hidden, dropout, norm) at
            --resolution (the lowest of `resolutions`, the scale training starts at);
- fc_heavy: the FC-heavy benchmark model, VGG trunk CONV at --resolution with FC --fc-hidden
            (4096 x 4096: 73 MiB of gradients, communication over 20 % of a synchronous step).
Within a model, methods run in interleaved blocks of --block steps (the order rotates each
round), each block timed on the slowest rank and ended by a flush, so every update is inside
the time. Figures are medians of the per-step time over --rounds blocks.
communication_share = 1 - compute / sync. lazy_vs_ddp = ddp / lazy_split step time (> 1: lazy
update with split FC is faster than DDP).
With --json the last line is one JSON object: `models` holds each model's step_ms per method
(and the blocked-on-communication times); the top-level keys of earlier versions (step_ms,
lazy_speedup_vs_sync, lazy_speedup_vs_horovod, communication_share, model, gradient_mib) are the
fc_heavy model's; lazy_vs_ddp (default model) and lazy_vs_ddp_fc_heavy are the headline ratios.
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
from deepimage.config import Config, defaults
from deepimage.runtime import apply_thread_limit
from deepimage.model import ModelSpec, build_model
from deepimage.parallel.parallelize import parallelize
from deepimage.perfmodel.spec import FC_HEAVY
from deepimage.train import autocast, sgd, step

METHODS = ("compute", "sync", "overlap", "lazy", "lazy_split", "horovod", "ddp")
SYNCED = ("sync", "overlap", "lazy", "lazy_split")  # GradientSync: the training step
MODELS = ("default", "fc_heavy")
# The FC-heavy benchmark model (defined once, in the performance model): VGG trunk at 32 px with
# FC layers of 4096: 73 MiB of gradients against ~150 ms of compute per step on the 2-core
# machine, so communication is over 20 % of a synchronous step even over the same-host path.
CONV = [list(stage) for stage in FC_HEAVY["conv"]]
FC_HIDDEN = list(FC_HEAVY["fc_hidden"])
TRAIN = defaults().train  # lr, momentum, weight decay, bucket_mib, compute_nice: the config's
RESOLUTION = min(defaults().resolutions)  # the scale training starts at
_sgd = sgd(TRAIN)


def model_specs(resolution: int, fc_hidden: list[int]) -> dict[str, ModelSpec]:
    """The two benchmarked models: config.yaml's at `resolution`, and the FC-heavy one."""
    cfg = defaults()
    classes = cfg.dataset.synthetic.classes
    return {"default": ModelSpec.from_config(cfg.model.to_dict(), resolution, classes),
            "fc_heavy": ModelSpec(num_classes=classes, conv=CONV, fc_hidden=list(fc_hidden), dropout=0.0)}


class _Method:
    """One way to train: step(x, y) runs a full training step; flush() completes pending work.
    The GradientSync methods run the training stage's step (deepimage.train.step) on the model
    deepimage.parallel.parallelize makes."""

    def __init__(self, name: str, model_name: str, spec: ModelSpec, transport, bucket_mib: float, ddp_group):
        self.name = name
        self.model = build_model(spec, seed=0)
        self.sync, self.net = None, self.model
        if name in SYNCED:
            # compute_nice 0: the worker already set the nice level, the same for every method.
            cfg = Config.from_dict({"train": {"split_fc": name == "lazy_split",
                                              "lazy_update": name in ("lazy", "lazy_split"),
                                              "bucket_mib": bucket_mib, "compute_nice": 0}})
            self.model, self.sync = parallelize(self.model, transport, cfg, sgd(cfg.train), overlap=name != "sync")
            self.amp = autocast(self.model, cfg.train)
        elif name == "horovod":
            import horovod.torch as hvd

            # Horovod matches tensors across ranks by name: one prefix per model.
            named = [(f"{model_name}.{n}", p) for n, p in self.model.named_parameters()]
            self.opt = hvd.DistributedOptimizer(_sgd(self.model.parameters()), named_parameters=named,
                                                op=hvd.Average)
        elif name == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            self.net = DistributedDataParallel(self.model, process_group=ddp_group)  # its defaults
            self.opt = _sgd(self.model.parameters())
        else:
            self.opt = _sgd(self.model.parameters())

    def step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        if self.sync is not None:
            step(self.model, self.sync, x, y, self.amp)
        else:
            self.opt.zero_grad()
            F.cross_entropy(self.net(x), y).backward()  # Horovod and DDP average the local means
            self.opt.step()

    def flush(self) -> None:
        if self.sync is not None:
            self.sync.flush()

    def close(self) -> None:
        """Detach the hooks, so that a later model's steps do not run this one's."""
        if self.sync is not None:
            self.sync.flush()
            self.sync.remove_hooks()


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


def _gradient_mib(model: torch.nn.Module) -> float:
    return round(sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20, 2)


def bench_model(model_name: str, spec: ModelSpec, transport, x, y, block: int, rounds: int,
                bucket_mib: float, ddp_group) -> dict:
    """Every method on one model, in interleaved blocks; {model, gradient_mib, step_ms, ...}."""
    methods = [_Method(m, model_name, spec, transport, bucket_mib, ddp_group) for m in METHODS]
    for method in methods:  # warm-up: allocations, Horovod's negotiation, DDP's bucket rebuild
        _timed_block(method, transport, x, y, 2)
        if method.sync is not None:
            method.sync.wait_seconds = 0.0
    times = {m.name: [] for m in methods}
    for round_ in range(rounds):
        for method in methods[round_ % len(methods):] + methods[:round_ % len(methods)]:
            times[method.name].append(_timed_block(method, transport, x, y, block))
    result = {"model": spec.to_dict(), "gradient_mib": _gradient_mib(methods[0].model),
              "step_ms": {m: round(statistics.median(v) * 1e3, 2) for m, v in times.items()},
              "blocked_on_communication_ms": _waits_per_step(methods, rounds * block),
              "step_ms_all": {m: [round(t * 1e3, 2) for t in v] for m, v in times.items()}}
    for method in methods:
        method.close()
    return result


def _ddp_group():
    """A gloo group of DDP's own (the transport's default group carries the transport's traffic).
    Made before the compute thread lowers its priority: gloo's threads, like the transport's,
    keep normal priority."""
    import torch.distributed as dist

    return dist.new_group(backend="gloo")


def worker(out: Path, batch: int, resolution: int, block: int, rounds: int, bucket_mib: float,
           fc_hidden: list[int], compute_nice: int) -> None:
    apply_thread_limit()
    from deepimage.parallel.lazy import yield_to_communication
    from deepimage.parallel.transport import init_transport

    transport = init_transport("horovod")
    ddp_group = _ddp_group()  # the transport opened the default gloo group (data path auto)
    yield_to_communication(transport, compute_nice)  # the same for every method, Horovod's too
    gen = torch.Generator().manual_seed(transport.rank)
    x = torch.randn(batch, 3, resolution, resolution, generator=gen)  # (B, 3, H, W) local batch
    specs = model_specs(resolution, fc_hidden)
    y = torch.randint(0, specs["default"].num_classes, (batch,), generator=gen)
    models = {name: bench_model(name, spec, transport, x, y, block, rounds, bucket_mib, ddp_group)
              for name, spec in specs.items()}
    if transport.rank == 0:
        out.write_text(json.dumps({
            "np": transport.size, "batch_per_rank": batch, "resolution": resolution,
            "block": block, "rounds": rounds, "bucket_mib": bucket_mib, "compute_nice": compute_nice,
            "data_path": transport.data_path, "models": models}))
    transport.barrier()
    transport.shutdown()


def summarize(result: dict) -> dict:
    """The ratios; the fc_heavy model's figures also at the top level (the keys of old)."""
    for figures in result["models"].values():
        ms = figures["step_ms"]
        figures["communication_share"] = round(1 - ms["compute"] / ms["sync"], 3)
        figures["lazy_speedup_vs_sync"] = round(ms["sync"] / ms["lazy"] - 1, 3)  # 0.10 = 10 % faster
        figures["lazy_speedup_vs_horovod"] = round(ms["horovod"] / ms["lazy"] - 1, 3)
        figures["lazy_speedup_vs_overlap"] = round(ms["overlap"] / ms["lazy"] - 1, 3)
        figures["lazy_vs_ddp"] = round(ms["ddp"] / ms["lazy_split"], 3)  # > 1: lazy + split FC faster
    result.update({k: v for k, v in result["models"]["fc_heavy"].items()})
    result["lazy_vs_ddp_fc_heavy"] = result["models"]["fc_heavy"]["lazy_vs_ddp"]
    result["lazy_vs_ddp"] = result["models"]["default"]["lazy_vs_ddp"]
    return result


LABELS = {"compute": "compute only", "sync": "synchronous", "overlap": "overlap", "lazy": "lazy",
          "lazy_split": "lazy + split FC", "horovod": "Horovod", "ddp": "DDP"}


def print_table(result: dict) -> None:
    print(f"training step, {result['np']} processes x 1 thread, batch {result['batch_per_rank']}/rank "
          f"at {result['resolution']} px; median of {result['rounds']} blocks of {result['block']} "
          f"steps; compute thread at nice {result['compute_nice']}, data path {result['data_path']}")
    for name, figures in result["models"].items():
        print(f" {name}: conv {figures['model']['conv']}, FC {figures['model']['fc_hidden']}, "
              f"{figures['gradient_mib']} MiB of gradients")
        for m in METHODS:
            blocked = figures["blocked_on_communication_ms"].get(m)
            note = f"  (blocked on communication {blocked:.2f} ms/step)" if blocked is not None else ""
            print(f"  {LABELS[m]:>16}: {figures['step_ms'][m]:8.2f} ms/step{note}")
        for key in ("communication_share", "lazy_speedup_vs_sync", "lazy_speedup_vs_overlap",
                    "lazy_speedup_vs_horovod", "lazy_vs_ddp"):
            print(f"  {key}: {figures[key]}")


def run(np: int, batch: int, resolution: int, block: int, rounds: int, bucket_mib: float,
        fc_hidden: list[int], compute_nice: int = TRAIN.compute_nice, timeout: float = 600) -> dict:
    """Launch the workers under horovodrun and return the summarized figures."""
    args = ["--batch", str(batch), "--resolution", str(resolution), "--block", str(block),
            "--rounds", str(rounds), "--bucket-mib", str(bucket_mib), "--fc-hidden", *map(str, fc_hidden),
            "--compute-nice", str(compute_nice)]
    return summarize(run_workers("deepimage.bench.train_step", np, args, timeout=timeout))


def check_args(a: argparse.Namespace) -> None:
    """One-line BenchError for a value the benchmark cannot run with."""
    if a.np < 2 or a.batch < 1 or a.block < 1 or a.rounds < 1 or a.resolution < 8 or min(a.fc_hidden) < 1:
        raise BenchError(f"bench.train_step: need --np >= 2, --batch/--block/--rounds >= 1 and "
                         f"--resolution >= 8 and --fc-hidden >= 1, got np={a.np} batch={a.batch} "
                         f"block={a.block} rounds={a.rounds} resolution={a.resolution} "
                         f"fc_hidden={a.fc_hidden}")
    if min(a.fc_hidden) < a.np:  # split FC cuts each layer across the ranks
        raise BenchError(f"bench.train_step: --fc-hidden {a.fc_hidden} must be >= --np ({a.np}) "
                         f"(split FC gives every rank part of each layer)")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    p.add_argument("--np", type=int, default=2)
    p.add_argument("--batch", type=int, default=16, help="samples per rank")
    p.add_argument("--resolution", type=int, default=RESOLUTION, help="default: the lowest of resolutions")
    p.add_argument("--block", type=int, default=4, help="steps per timed block")
    p.add_argument("--rounds", type=int, default=7, help="timed blocks per method")
    p.add_argument("--bucket-mib", type=float, default=TRAIN.bucket_mib, help="train.bucket_mib")
    p.add_argument("--fc-hidden", type=int, nargs=2, default=FC_HIDDEN,
                   help="widths of the FC-heavy model's two hidden FC layers")
    p.add_argument("--compute-nice", type=int, default=TRAIN.compute_nice, choices=range(20), metavar="0..19",
                   help="nice level of each worker's compute thread (train.compute_nice)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    try:
        check_args(a)
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
