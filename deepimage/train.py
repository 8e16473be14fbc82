"""Train one model at one resolution: a worker process, started N times by deepimage.launch.

    python -m deepimage.launch --launcher horovod --np 2 --threads 2 deepimage.train \
        --resolution 64 --train-shards results/shards/64/train \
        --val-shards results/shards/64/val --out results/train/64 \
        --config-json '{"seed": 0, "train": {...}, "model": {...}}'

Every rank reads its own part of each global mini-batch from the Arrow shards; the conv layers
are data-parallel (butterfly all-reduce, lazy update) and the FC layers split across ranks
(deepimage.parallel.parallelize). The step, the evaluation loop and the checkpoint gather are
in this file, top-down: `step` (autocast, forward, loss over the global batch, backward,
sync.step()), `evaluate`, `gather_weights`, then the epoch loop `train`. Rank 0 logs to MLflow
and writes a plain single-process checkpoint. The scaling stage and the performance model time
this file's `step` on their own workers (deepimage.bench.timed_steps).
"""
from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from deepimage import config, tracking
from deepimage.checkpoint import Position, ResumePoint, Saver, find_resume, run_config
from deepimage.config import Config, TrainConfig
from deepimage.data.augment import AugmentConfig
from deepimage.data.loader import ArrowLoader, check_classes
from deepimage.io import write_json
from deepimage.modelfile import save_checkpoint
from deepimage.model import DeepImageNet, ModelSpec, build_model
from deepimage.parallel.lazy import GradientSync
from deepimage.parallel.parallelize import is_split, parallelize
from deepimage.parallel.state import gather_state_dict
from deepimage.parallel.transport import init_transport
from deepimage.progress import progress
from deepimage.redact import redact
from deepimage.recipe import recipe, warm_start
from deepimage.runtime import Stopped, StopSignal, apply_thread_limit, set_comm_timeout


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
    if local >= torch.cuda.device_count():
        raise ValueError(f"train.device is {choice!r}: this worker is local rank {local}, but only "
                         f"{torch.cuda.device_count()} GPU(s) are visible on this node; run at most one "
                         f"worker per GPU (train.np, or train.nodes on a cluster) or set train.device: cpu")
    torch.cuda.set_device(local)
    return torch.device("cuda", local)


# ---------------------------------------------------------------------------------------------
# One training step, the evaluation loop and the checkpoint gather


@dataclass
class StepStats:
    loss: float  # mean cross-entropy over the global batch
    correct: int  # top-1 correct over the global batch
    count: int  # global batch size of this step


# The step's phases, in order: `step` calls timer.lap(phase) as each ends.
PHASES = ("data", "count", "forward", "backward", "update", "stats")


class _NoTimer:
    def lap(self, phase: str) -> None:
        pass


def sgd(train: TrainConfig):
    """The optimizer of a group of parameters (GradientSync makes one per bucket)."""
    def make(params):
        return torch.optim.SGD(params, lr=train.lr, momentum=train.momentum,
                               weight_decay=train.weight_decay)
    return make


def autocast(model: DeepImageNet, train: TrainConfig) -> torch.autocast:
    """train.bf16: bf16 autocast of the forward (GPU); the losses compute in fp32."""
    device = next(model.parameters()).device
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=train.bf16)


def step(model: DeepImageNet, sync: GradientSync, images: torch.Tensor, labels: torch.Tensor,
         amp: torch.autocast, timer=None) -> StepStats:
    """One training step on this rank's part of the global batch: images (b, 3, H, W), labels (b,).
    timer.lap(phase) is called as each of PHASES ends: deepimage.measure.StepTimer splits the
    step's wall time with it, the performance model's profile marks the phases' times."""
    transport, split = sync.transport, is_split(model)
    timer = timer or _NoTimer()
    device = next(model.parameters()).device
    model.train()
    images, labels = images.to(device), labels.to(device)
    timer.lap("data")
    # A small CPU tensor: gloo carries it under every transport, whatever the device.
    count = int(transport.allreduce(torch.tensor([float(len(labels))]), "sum").item())
    timer.lap("count")
    with amp:
        features = model.trunk(images)  # (b, 3, H, W) -> (b, F)
        if split:
            loss, correct = model.head.loss(features, labels)  # global mean, identical on all ranks
        else:
            logits = model.head(features).float()  # (b, F) -> (b, K)
            loss = F.cross_entropy(logits, labels, reduction="sum") / count
            correct = (logits.argmax(1) == labels).sum()
    timer.lap("forward")  # lazy update: the last step's bucket updates inside it
    sync.zero_grad()
    loss.backward()
    timer.lap("backward")
    sync.step()  # lazy: each bucket's wait and update move to its layer's next forward
    timer.lap("update")
    if not split:  # this rank's share -> global figures
        stats = transport.allreduce(torch.stack([loss.detach(), correct.float()]), "sum")
        loss, correct = stats[0], stats[1]
    result = StepStats(float(loss.detach()), int(correct), count)
    timer.lap("stats")
    return result


@torch.no_grad()
def evaluate(model: DeepImageNet, sync: GradientSync, loader, amp: torch.autocast) -> dict[str, float]:
    """Loss and top-1 / top-5 error over a loader partitioned across the ranks (every rank gets
    the same figures). Split FC: each rank sees the global batch's logits."""
    transport, split = sync.transport, is_split(model)
    device = next(model.parameters()).device
    sync.flush()  # every pending lazy update first
    model.eval()
    totals = torch.zeros(4, dtype=torch.float64)  # loss sum, top-1 correct, top-5 correct, count
    for images, labels, _ in loader:
        with amp:
            features = model.trunk(images.to(device))  # (b, 3, H, W) -> (b, F)
            # split FC: (B, K), the global batch, the same on every rank; else (b, K)
            logits = (model.head.full_logits if split else model.head)(features).float().cpu()
        labels = labels.cpu().to(torch.int64).contiguous()
        if split:
            labels = transport.allgather(labels)  # (b,) -> (B,)
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices  # (b, k)
        loss = F.cross_entropy(logits, labels, reduction="sum").item() if len(labels) else 0.0
        totals += torch.tensor([loss, (top[:, 0] == labels).sum().item(),
                                (top == labels[:, None]).any(1).sum().item(), len(labels)],
                               dtype=torch.float64)
    if not split:
        totals = transport.allreduce(totals, "sum")
    loss, c1, c5, n = totals.tolist()
    return {"val_loss": loss / n, "val_top1_error": 1 - c1 / n, "val_top5_error": 1 - c5 / n}


def gather_weights(model: DeepImageNet, sync: GradientSync) -> dict:
    """The weights as a single-process DeepImageNet state dict (FC shards gathered); every rank
    must call it. GradientSync.state_dict() is the optimizer's counterpart (resume)."""
    sync.flush()
    if is_split(model):
        return gather_state_dict(model, sync.transport)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ---------------------------------------------------------------------------------------------
# The stage


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


def build(args, cfg: Config, transport, global_batch: int):
    """(loader, spec, model, sync) for this rank: the data, the parallelized model."""
    device = pick_device(cfg.train.device)
    loader = on_every_rank(transport, lambda: ArrowLoader(
        args.train_shards, batch_size=global_batch, rank=transport.rank, world_size=transport.size,
        seed=cfg.seed, train=True, augment=AugmentConfig.from_config(cfg.train.augment.to_dict()),
        crop=args.resolution, verify=True, num_workers=cfg.train.loader_workers, decode=cfg.train.jpeg_decode,
        device=device if device.type == "cuda" else None))  # augment on the GPU
    spec = ModelSpec.from_config(cfg.model.to_dict(), args.resolution, len(loader.classes))
    net = build_model(spec, cfg.seed)
    if getattr(args, "init_from", None):
        warm_start(net, args.init_from, list(loader.classes))
    model, sync = parallelize(net.to(device), transport, cfg, sgd(cfg.train))
    return loader, spec, model, sync


def empty_history() -> dict[str, list]:
    return {"loss": [], "train_top1_error": [], "images_per_s": [], "lr": [],
            "val_loss": [], "val_top1_error": [], "val_top5_error": []}


def agree(transport, stop: StopSignal, saver: Saver) -> tuple[int, bool, bool]:
    """(signal, checkpoint due, last checkpoint old enough), the same on every rank: any rank's
    signal and rank 0's checkpoint clock, in one small all-reduce."""
    flags = transport.allreduce(torch.tensor([float(stop.signum), float(saver.due()),
                                              float(saver.old_enough())]), "max")
    return int(flags[0]), bool(flags[1]), bool(flags[2])


def log_epoch(run, logged: set[int], epoch: int, metrics: dict) -> None:
    """One value per epoch in MLflow: an epoch the run already holds is not logged again."""
    if epoch not in logged:
        run.log_metrics(metrics, step=epoch)
        logged.add(epoch)


def train(args, cfg: Config, transport, run, resume: ResumePoint | None = None) -> dict:
    """The epochs, from `resume` when given; returns the metrics written beside the model."""
    tc = cfg.train
    loader, spec, model, sync = build(args, cfg, transport, tc.batch_size)
    amp, device = autocast(model, tc), next(model.parameters()).device
    val = None
    if args.val_shards:  # per-epoch validation curves, by all ranks together, on the training crop
        val = on_every_rank(transport, lambda: ArrowLoader(
            args.val_shards, batch_size=tc.batch_size, rank=transport.rank,
            world_size=transport.size, seed=cfg.seed, train=False, augment=None,
            crop=args.resolution, verify=True, num_workers=tc.loader_workers, decode=tc.jpeg_decode,
            device=device if device.type == "cuda" else None))
    check_classes(loader, val, args.train_shards, args.val_shards)
    steps = len(loader)
    saver = Saver(Path(args.out) / "checkpoints", tc.checkpoint, run_config(cfg, args.resolution), cfg.seed,
                  transport, list(loader.classes), steps, run.run_id, fresh=resume is None)
    stop = StopSignal()  # SIGTERM / SIGINT: finish the step, checkpoint, raise Stopped
    pos, history, epoch_seconds, logged = Position(), empty_history(), [], set()
    if resume is not None:
        pos, history, epoch_seconds = saver.restore(resume, model, sync, loader)
        logged = run.metric_steps("loss")  # the epochs the MLflow run already holds
        for epoch in range(len(history["loss"])):  # and those the checkpoint has and MLflow lacks
            log_epoch(run, logged, epoch, {**{k: v[epoch] for k, v in history.items() if len(v) > epoch},
                                           "epoch_seconds": epoch_seconds[epoch]})
    start = time.perf_counter() - pos.train_seconds
    bar = progress(total=tc.epochs * steps, desc=f"train {args.resolution} px", unit="step",
                   enabled=transport.rank == 0)
    bar.update(pos.epoch * steps + pos.step)
    for epoch in range(pos.epoch, tc.epochs):
        loader.set_epoch(epoch)  # a no-op for a restored epoch: its position is kept
        t0 = time.perf_counter() - pos.seconds
        for i, (images, labels, _) in enumerate(loader, start=pos.step):
            sync.set_lr(lr_at(tc.lr, epoch + i / steps, tc.epochs))
            s = step(model, sync, images, labels, amp)
            pos.add(s, i + 1, time.perf_counter() - t0)
            bar.update()
            bar.set_postfix(epoch=f"{epoch + 1}/{tc.epochs}", step=epoch * steps + i + 1, loss=s.loss,
                            images_per_s=round(pos.seen / pos.seconds, 1))
            if i + 1 == steps:
                continue  # epoch ends are checkpointed below, after their metrics
            # Between steps: a checkpoint every train.checkpoint.every_minutes; on a signal to any
            # rank, a last one (unless the latest is recent), then every rank stops.
            signum, due, old_enough = agree(transport, stop, saver)
            path = None
            if due or (signum and old_enough):
                path = saver.save(model, sync, loader, pos, history, epoch_seconds, time.perf_counter() - start)
            if signum:
                saver.close()  # the file is complete before any rank exits
                raise Stopped(signum, pos.epoch * steps + pos.step, due or old_enough, path)
        epoch_metrics = {"loss": pos.loss_sum / pos.seen, "train_top1_error": 1 - pos.correct / pos.seen,
                         "images_per_s": pos.seen / pos.seconds, "lr": lr_at(tc.lr, epoch + 1, tc.epochs)}
        if val is not None:
            epoch_metrics.update(evaluate(model, sync, val, amp))
        for k, v in epoch_metrics.items():
            history[k].append(v)
        epoch_seconds.append(pos.seconds)
        log_epoch(run, logged, epoch, {**epoch_metrics, "epoch_seconds": pos.seconds})
        if transport.rank == 0:
            print(f"epoch {epoch}: " + " ".join(f"{k}={v:.4g}" for k, v in epoch_metrics.items()), flush=True)
        pos, last = Position(epoch=epoch + 1), epoch + 1 == tc.epochs
        if last or saver.epoch_due(epoch + 1):  # the last one marked finished
            saver.save(model, sync, loader, pos, history, epoch_seconds, time.perf_counter() - start,
                       finished=last)
    bar.close()
    saver.close()  # the last checkpoint is on disk before the outputs
    state = gather_weights(model, sync)
    wall = time.perf_counter() - start
    summary = {"resolution": args.resolution, "np": transport.size, "launcher": transport.name,
               "data_path": getattr(transport, "data_path", None),
               "data_path_note": getattr(transport, "data_path_note", None),
               "epochs": tc.epochs, "steps_per_epoch": steps, "samples": loader.num_samples,
               "final_loss": history["loss"][-1], "final_train_top1_error": history["train_top1_error"][-1],
               "images_per_s": float(np.median(history["images_per_s"])), "train_seconds": wall,
               "resumed_from": str(resume.path) if resume else None,
               "init_from": getattr(args, "init_from", None), "lr": tc.lr,
               "checkpoint_seconds": saver.seconds, "checkpoint_write_seconds": saver.writer.seconds,
               "history": history}
    if transport.rank == 0:
        save_checkpoint(Path(args.out) / "model.pt", spec, state, list(loader.classes), args.resolution,
                        extra={"train": tc.to_dict(), "np": transport.size})
        # <experiment>-<res>px; deferred to the pending file if the MLflow server is down.
        run.log_trained_model(str(Path(args.out) / "model.pt"), str(args.train_shards), args.registered_name)
        write_json(Path(args.out) / "metrics.json", summary)
        run.log_metrics({"final_loss": summary["final_loss"], "train_seconds": wall,
                         "median_images_per_s": summary["images_per_s"],
                         "comm_wait_seconds": sync.wait_seconds})
        run.log_artifact(Path(args.out) / "metrics.json")
    return summary


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--resolution", type=int, required=True)
    p.add_argument("--train-shards", required=True)
    p.add_argument("--val-shards", default=None)
    p.add_argument("--out", required=True, help="folder for model.pt and metrics.json")
    config.add_argument(p, "seed, train and model")
    p.add_argument("--init-from", default=None,
                   help="warm start: a lower resolution's model.pt whose weights this run starts from")
    p.add_argument("--registered-name", default=None,
                   help="MLflow registry name of the trained model (default <experiment>-<res>px)")
    tracking.add_args(p)
    return p.parse_args(argv)


@contextlib.contextmanager
def open_run(args, params: dict, rank: int, resume: ResumePoint | None):
    """The job's MLflow run: the checkpoint's run continued when resuming (same id, so each
    epoch's metric has one value), else a new child run of the workflow."""
    run_id = resume.payload.get("run_id") if resume is not None and rank == 0 else None
    if run_id and not tracking.run_exists(args.tracking_uri, run_id):
        print(f"checkpoint's MLflow run {run_id} is not in {redact(args.tracking_uri)}: logging to a new run",
              file=sys.stderr, flush=True)
        run_id = None
    # stage_run with run_id continues that run (RUNNING again); either way the job's writes go
    # to its pending file while the MLflow server is down.
    with tracking.stage_run(args, "train", params, enabled=rank == 0, run_id=run_id or None,
                            tags={"deepimage.resolution": str(args.resolution)}) as run:
        if run_id:
            run.set_tag("deepimage.resumed_from", str(resume.path))
        run.log_dataset(str(args.train_shards), "training")
        if args.val_shards:
            run.log_dataset(str(args.val_shards), "validation")
        if args.init_from:
            run.set_tag("deepimage.init_from", str(args.init_from))
        yield run


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    apply_thread_limit()
    try:  # before the transport: its process groups and Horovod read train.comm_timeout_s when made
        set_comm_timeout(config.from_args(args).train.comm_timeout_s)
    except ValueError as e:
        sys.exit(f"train: {e}")
    transport = init_transport("auto")  # Horovod under horovodrun, torch.distributed under torchrun
    try:
        cfg = recipe(config.from_args(args), args.resolution)
        resume = find_resume(Path(args.out) / "checkpoints", cfg, args.resolution, transport.rank)
        params = {"seed": cfg.seed, "train": cfg.train, "model": cfg.model, "resolution": args.resolution,
                  "np": transport.size, "launcher": transport.name}
        with open_run(args, params, transport.rank, resume) as run:
            train(args, cfg, transport, run, resume)
    except Stopped as e:
        print(f"train (rank {transport.rank}): {e}", file=sys.stderr, flush=True)
        sys.exit(128 + e.signum)
    except (ValueError, OSError) as e:  # CheckpointError is a ValueError
        sys.exit(f"train (rank {transport.rank}): {e}")
    finally:
        transport.shutdown()


if __name__ == "__main__":
    main()
