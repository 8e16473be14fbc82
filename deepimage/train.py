"""Train one model at one resolution: a worker process, started N times by deepimage.launch.

    python -m deepimage.launch --launcher horovod --np 2 --threads 2 deepimage.train \
        --resolution 64 --train-shards results/shards/64/train \
        --val-shards results/shards/64/val --out results/train/64 --config-json '{...}'

Every rank reads its own part of each global mini-batch from the Arrow shards; the conv layers
are data-parallel (butterfly all-reduce, lazy update) and the FC layers split across ranks
(deepimage.parallel). Rank 0 logs to MLflow and writes a plain single-process checkpoint.
With --benchmark-steps it only times steps (the scaling stage) and writes their throughput.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from deepimage import models, tracking
from deepimage.data.augment import AugmentConfig
from deepimage.data.loader import ArrowLoader
from deepimage.launch import apply_thread_limit
from deepimage.metrics import save_checkpoint
from deepimage.model import ModelSpec, build_model
from deepimage.parallel.parallelize import parallelize
from deepimage.parallel.transport import init_transport


def lr_at(base_lr: float, epoch_float: float, epochs: int, warmup: float = 1.0) -> float:
    """Linear warm-up over the first epoch (large global batches), then cosine to zero."""
    if epoch_float < warmup:
        return base_lr * max(epoch_float, 0.05) / warmup
    progress = (epoch_float - warmup) / max(epochs - warmup, 1e-9)
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def pick_device(choice: str) -> torch.device:
    """train.device: this worker's local GPU (one process per GPU) or the CPU."""
    if choice == "cpu" or (choice == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError("train.device is 'cuda' but torch.cuda.is_available() is False "
                         "(a CPU build of torch, or no GPU visible): use train.device: auto or cpu")
    local = int(os.environ.get("LOCAL_RANK", os.environ.get("HOROVOD_LOCAL_RANK", "0")))
    torch.cuda.set_device(local)
    return torch.device("cuda", local)


def on_every_rank(transport, make):
    """make() on every rank, all failing together if any rank fails (a rank that verified a bad
    shard names it; the others stop with one line instead of a broken-connection traceback)."""
    result, error = None, None
    try:
        result = make()
    except ValueError as e:
        error = e
    failed = transport.allreduce(torch.tensor([float(error is not None)]), "sum").item()
    if error is not None:
        raise error
    if failed:
        raise ValueError(f"{int(failed)} other rank(s) could not open the data; their message names it")
    return result


def build(args, cfg: dict, transport, global_batch: int):
    """(loader, spec, trainer) for this rank."""
    train_cfg = cfg["train"]
    device = pick_device(train_cfg.get("device", "auto"))
    loader = on_every_rank(transport, lambda: ArrowLoader(
        args.train_shards, batch_size=global_batch, rank=transport.rank, world_size=transport.size,
        seed=cfg["seed"], train=True, augment=AugmentConfig.from_config(train_cfg["augment"]),
        crop=args.resolution, verify=True,
        device=device if device.type == "cuda" else None))  # augment on the GPU
    spec = ModelSpec.from_config(cfg["model"], args.resolution, len(loader.classes))
    model = build_model(spec, cfg["seed"]).to(device)
    trainer = parallelize(model, transport, train_cfg, cfg["seed"])
    return loader, spec, trainer


def train(args, cfg: dict, transport, run) -> dict:
    """The epochs; returns the metrics written beside the checkpoint."""
    tc = cfg["train"]
    loader, spec, trainer = build(args, cfg, transport, tc["batch_size"])
    val = None
    if args.val_shards:  # per-epoch validation curves, computed by all ranks together
        val = on_every_rank(transport, lambda: ArrowLoader(
            args.val_shards, batch_size=tc["batch_size"], rank=transport.rank,
            world_size=transport.size, seed=cfg["seed"], train=False, augment=None,
            crop=args.resolution, verify=True,
            device=trainer.device if trainer.device.type == "cuda" else None))
    steps = len(loader)
    history = {"loss": [], "train_top1_error": [], "images_per_s": [], "lr": [],
               "val_loss": [], "val_top1_error": [], "val_top5_error": []}
    start = time.perf_counter()
    for epoch in range(tc["epochs"]):
        loader.set_epoch(epoch)
        t0, loss_sum, correct, seen = time.perf_counter(), 0.0, 0, 0
        for i, (images, labels, _) in enumerate(loader):
            trainer.set_lr(lr_at(tc["lr"], epoch + i / steps, tc["epochs"]))
            s = trainer.step(images, labels)
            loss_sum, correct, seen = loss_sum + s.loss * s.count, correct + s.correct, seen + s.count
        seconds = time.perf_counter() - t0
        epoch_metrics = {"loss": loss_sum / seen, "train_top1_error": 1 - correct / seen,
                         "images_per_s": seen / seconds, "lr": lr_at(tc["lr"], epoch + 1, tc["epochs"])}
        if val is not None:
            epoch_metrics.update(trainer.evaluate(val))
        for k, v in epoch_metrics.items():
            history[k].append(v)
        run.log_metrics({**epoch_metrics, "epoch_seconds": seconds}, step=epoch)
        if transport.rank == 0:
            print(f"epoch {epoch}: " + " ".join(f"{k}={v:.4g}" for k, v in epoch_metrics.items()), flush=True)
    state = trainer.plain_state_dict()
    wall = time.perf_counter() - start
    summary = {"resolution": args.resolution, "np": transport.size, "launcher": transport.name,
               "epochs": tc["epochs"], "steps_per_epoch": steps, "samples": loader.num_samples,
               "final_loss": history["loss"][-1], "final_train_top1_error": history["train_top1_error"][-1],
               "images_per_s": float(np.median(history["images_per_s"])), "train_seconds": wall,
               "history": history}
    if transport.rank == 0:
        save_checkpoint(Path(args.out) / "model.pt", spec, state, list(loader.classes), args.resolution,
                        extra={"train": tc, "np": transport.size})
        models.log_trained_model(run, Path(args.out) / "model.pt", args.train_shards)  # deepimage-<res>px
        tracking.write_json(Path(args.out) / "metrics.json", summary)
        run.log_metrics({"final_loss": summary["final_loss"], "train_seconds": wall,
                         "median_images_per_s": summary["images_per_s"],
                         "comm_wait_seconds": trainer.sync.wait_seconds})
        run.log_artifact(Path(args.out) / "metrics.json")
    return summary


def benchmark(args, cfg: dict, transport, run) -> dict:
    """Time `--benchmark-steps` training steps after `--warmup-steps` (weak scaling)."""
    global_batch = args.per_worker_batch * transport.size
    loader, _, trainer = build(args, cfg, transport, global_batch)
    batches, times, epoch = iter(()), [], 0
    for i in range(args.warmup_steps + args.benchmark_steps):
        try:
            images, labels, _ = next(batches)
        except StopIteration:
            loader.set_epoch(epoch)
            epoch, batches = epoch + 1, iter(loader)
            images, labels, _ = next(batches)
        transport.barrier()
        t0 = time.perf_counter()
        trainer.step(images, labels)
        trainer.flush()  # count each step's communication inside its own time
        if trainer.device.type == "cuda":
            torch.cuda.synchronize(trainer.device)  # and its queued kernels
        if i >= args.warmup_steps:
            times.append(time.perf_counter() - t0)
    # The slowest rank sets the pace: take the max over ranks of each step time.
    step_times = transport.allreduce(torch.tensor(times, dtype=torch.float64), "max").numpy()
    median = float(np.median(step_times))
    result = {"np": transport.size, "launcher": transport.name, "per_worker_batch": args.per_worker_batch,
              "global_batch": global_batch, "median_step_s": median, "images_per_s": global_batch / median,
              "step_times_s": step_times.tolist()}
    if transport.rank == 0:
        tracking.write_json(args.benchmark_out, result)
    return result


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--resolution", type=int, required=True)
    p.add_argument("--train-shards", required=True)
    p.add_argument("--val-shards", default=None)
    p.add_argument("--out", default=None, help="folder for model.pt and metrics.json")
    p.add_argument("--config-json", required=True, help="{seed, train, model} sections as JSON")
    p.add_argument("--benchmark-steps", type=int, default=0, help="time this many steps; no training run")
    p.add_argument("--warmup-steps", type=int, default=3)
    p.add_argument("--per-worker-batch", type=int, default=32)
    p.add_argument("--benchmark-out", default=None)
    tracking.add_args(p)
    args = p.parse_args(argv)
    if not args.benchmark_steps and not args.out:
        p.error("--out is required unless --benchmark-steps is given")
    if args.benchmark_steps and not args.benchmark_out:
        p.error("--benchmark-out is required with --benchmark-steps")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    apply_thread_limit()
    cfg = json.loads(args.config_json)
    transport = init_transport("auto")  # Horovod under horovodrun, torch.distributed under torchrun
    try:
        if args.benchmark_steps:
            benchmark(args, cfg, transport, None)
            return
        params = {**cfg, "resolution": args.resolution, "np": transport.size, "launcher": transport.name}
        with tracking.stage_run(args, "train", params, enabled=transport.rank == 0,
                                tags={"deepimage.resolution": str(args.resolution)}) as run:
            train(args, cfg, transport, run)
    except (ValueError, OSError) as e:
        sys.exit(f"train (rank {transport.rank}): {e}")
    finally:
        transport.shutdown()


if __name__ == "__main__":
    main()
