"""Timed training steps on one worker of N: what deepimage.measure.measure_step launches.

    python -m deepimage.launch --launcher horovod --np 2 --threads 2 deepimage.bench.timed_steps \
        --resolution 64 --train-shards results/shards/64/train --out np2.json \
        --config-json '{"seed": 0, "train": {...}, "model": {...}, "scaling": {...}}'

Each worker builds the training stage's data and parallelized model (deepimage.train.build) with
a global batch of scaling.batch_size per worker (weak scaling) and runs the training stage's
step (deepimage.train.step) scaling.warmup_steps + scaling.steps times; the timed steps are
split into deepimage.measure.SPLIT. Rank 0 writes the figures every rank agrees on to --out.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import torch

from deepimage import config
from deepimage.io import write_json
from deepimage.measure import SPLIT, StepTimer
from deepimage.parallel.commclock import instrument
from deepimage.parallel.transport import init_transport
from deepimage.runtime import PIN_ENV, apply_thread_limit, set_comm_timeout
from deepimage.recipe import recipe
from deepimage.train import autocast, build, step


def time_steps(args, cfg, transport) -> dict:
    """Time scaling.steps training steps after scaling.warmup_steps, each split into SPLIT."""
    sc = cfg.scaling
    loader, _, model, sync = build(args, cfg, transport, sc.batch_size * transport.size)
    amp, device = autocast(model, cfg.train), next(model.parameters()).device
    timer = StepTimer(instrument(transport, sync))
    batches, times, splits, epoch = iter(()), [], [], 0
    last = sc.warmup_steps + sc.steps - 1
    for i in range(last + 1):
        if i in (0, sc.warmup_steps):
            transport.barrier()  # the ranks start the timed steps together
        t0 = time.perf_counter()
        timer.start()
        images, labels, batches, epoch = next_batch(loader, batches, epoch)
        timer.lap("data")
        step(model, sync, images, labels, amp, timer)
        # Steady state, as training runs: a step's deferred (lazy) updates wait in the next
        # step's forward, overlapping its compute; only the last step's are flushed here, in
        # its own time. (A flush after every step would serialise what lazy update overlaps.)
        if i == last:
            sync.flush()
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # and its queued kernels
        timer.lap("update")  # flush()'s optimizer steps (its waits: comm_wait)
        if i >= sc.warmup_steps:
            times.append(time.perf_counter() - t0)
            splits.append([timer.parts[k] for k in SPLIT])
        if i + 1 == sc.warmup_steps:
            timer.clock.by_call.clear()
    figures = result(transport, sc.batch_size, times, splits)
    # per step, rank 0; the figures' own collectives (just above) are counted in it
    by_call = {k: v / sc.steps for k, v in sorted(timer.clock.by_call.items())}
    return {**figures, "comm_wait_by_call_rank0": by_call}


def next_batch(loader, batches, epoch: int):
    """(images, labels, batches, epoch): the next batch, starting a new epoch when one ends."""
    try:
        images, labels, _ = next(batches)
    except StopIteration:
        loader.set_epoch(epoch)
        epoch, batches = epoch + 1, iter(loader)
        images, labels, _ = next(batches)
    return images, labels, batches, epoch


def result(transport, per_worker_batch: int, times: list[float], splits: list[list[float]]) -> dict:
    """The figures every rank agrees on."""
    # The slowest rank sets the pace: take the max over ranks of each step time.
    step_times = transport.allreduce(torch.tensor(times, dtype=torch.float64), "max").numpy()
    # The split: each part's mean over the timed steps, averaged over the ranks (means add up,
    # so the parts sum to split_wall_s, the ranks' mean step time, exactly).
    parts = transport.allreduce(torch.tensor(splits, dtype=torch.float64).mean(0), "sum") / transport.size
    split = dict(zip(SPLIT, parts.tolist()))
    median, global_batch = float(np.median(step_times)), per_worker_batch * transport.size
    return {"np": transport.size, "launcher": transport.name, "per_worker_batch": per_worker_batch,
            "global_batch": global_batch, "median_step_s": median, "images_per_s": global_batch / median,
            "step_times_s": step_times.tolist(), "split": split, "split_wall_s": sum(split.values()),
            "split_of": "mean over timed steps, mean over ranks", "cores": rank_cores(transport),
            "pinned": os.environ.get(PIN_ENV) == "1"}


def rank_cores(transport) -> list[list[int]]:
    """The cores each rank may run on (its CPU affinity), by rank."""
    ncpu = os.cpu_count() or 1
    mask = torch.zeros(ncpu, dtype=torch.float64)
    mask[sorted(c for c in os.sched_getaffinity(0) if c < ncpu)] = 1.0
    rows = transport.allgather(mask.view(1, ncpu))  # (1, C) -> (N, C)
    return [[c for c in range(ncpu) if row[c] > 0] for row in rows.tolist()]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--resolution", type=int, required=True)
    p.add_argument("--train-shards", required=True)
    p.add_argument("--out", required=True, help="rank 0's figures (JSON)")
    config.add_argument(p, "seed, train, model and scaling")
    args = p.parse_args(argv)
    apply_thread_limit()
    try:  # before the transport: its process groups and Horovod read train.comm_timeout_s when made
        cfg = recipe(config.from_args(args), args.resolution)
        set_comm_timeout(cfg.train.comm_timeout_s)
    except ValueError as e:
        sys.exit(f"timed_steps: {e}")
    transport = init_transport("auto")  # Horovod under horovodrun, torch.distributed under torchrun
    try:
        figures = time_steps(args, cfg, transport)
        if transport.rank == 0:
            write_json(args.out, figures)
    except (ValueError, OSError) as e:
        sys.exit(f"timed_steps (rank {transport.rank}): {e}")
    finally:
        transport.shutdown()


if __name__ == "__main__":
    main()
