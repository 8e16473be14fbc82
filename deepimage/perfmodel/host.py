"""Profiles of N workers at once on this host, on the shards' batches: what the validation
predicts from.

    prof, head = validation_profile(cfg, Path("results/shards/64/train"), 64, batch=16, steps=15, n=2)

host_profile spawns n profiling processes pinned to their own cores, each timing rank 0's share
(deepimage.perfmodel.profile.profile(ranks=n)) on batches of training's own loader, and paces
each step by the slowest of them, as the step's collectives do.
"""
from __future__ import annotations

import dataclasses
import multiprocessing as mp
import os
import statistics
import time
from pathlib import Path

from deepimage.config import Config
from deepimage.data.augment import AugmentConfig
from deepimage.data.loader import ArrowLoader
from deepimage.data.manifest import load_manifest
from deepimage.model import ModelSpec
from deepimage.perfmodel.costs import Profile
from deepimage.perfmodel.profile import head_shape, one_thread, profile
from deepimage.perfmodel.spec import PerfModelError


def _train_loader(shards: Path, cfg, batch: int, resolution: int):
    """The ArrowLoader training reads one worker's batches with."""
    return ArrowLoader(shards, batch_size=batch, seed=cfg.seed, train=True, crop=resolution,
                       augment=AugmentConfig.from_config(cfg.train.augment.to_dict()))


def real_batches(shards: Path, cfg, batch: int, resolution: int, count: int) -> list[tuple]:
    """Up to `count` (images, labels) batches of the shards, as training's loader gives them."""
    out = []
    with one_thread():
        for images, labels, _ in _train_loader(shards, cfg, batch, resolution):
            out.append((images, labels))
            if len(out) == count:
                break
    return out


def data_time(shards: Path, cfg, batch: int, resolution: int, steps: int) -> float:
    """Median seconds to load and augment one worker's batch (ArrowLoader, one thread)."""
    loader = _train_loader(shards, cfg, batch, resolution)
    times, it = [], iter(loader)
    with one_thread():
        for _ in range(steps + 1):
            t0 = time.perf_counter()
            try:
                next(it)
            except StopIteration:
                it = iter(loader)
                next(it)
            times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])



def _host_worker(sections: dict, spec: dict, batch: int, resolution: int, shards: str, steps: int,
                 ranks: int, core: int | None, barrier, results) -> None:
    """One of `ranks` concurrent profiling processes (spawned), pinned to `core`."""
    if core is not None:
        os.sched_setaffinity(0, {core})
    cfg = Config.from_dict(sections)
    batches = real_batches(Path(shards), cfg, batch, resolution, steps + 1)
    barrier.wait()  # all N start together, so each is timed with the others running
    prof = profile(cfg, ModelSpec(**spec), batch, resolution, steps=steps, lazy=cfg.train.lazy_update, ranks=ranks,
                   batches=batches)
    prof.data_s = data_time(Path(shards), cfg, batch, resolution, steps)
    results.put(prof)


def host_profile(cfg, spec: ModelSpec, batch: int, resolution: int, shards: Path, steps: int,
                 n: int) -> Profile:
    """The profile of one worker of n while n run at once on this host, each pinned to its own
    core (as scaling.pin pins training's) and each computing rank 0's share (profile(ranks=n)):
    what the workers' computation costs when they share the host's memory and caches. Each step
    the slowest of the n sets the pace, since the step's collectives make the workers meet."""
    cores = sorted(os.sched_getaffinity(0))
    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(n), ctx.Queue()
    sections = {"seed": cfg.seed, "train": cfg.train.to_dict(), "model": cfg.model.to_dict()}
    procs = [ctx.Process(target=_host_worker, args=(sections, spec.to_dict(), batch, resolution, str(shards),
                                                    steps, n, cores[k] if n <= len(cores) else None,
                                                    barrier, results))
             for k in range(n)]
    for p in procs:
        p.start()
    profs = [results.get(timeout=600) for _ in procs]
    for p in procs:
        p.join()
        if p.exitcode:
            raise PerfModelError(f"perfmodel: a profiling process failed (exit {p.exitcode})")
    return _slowest(profs)


def _slowest(profs: list[Profile]) -> Profile:
    """profs[0] scaled so its compute is the median over steps of the pace the workers set when
    they wait for each other where they meet: each segment of a step (Profile.step_segments)
    takes the slowest worker's time."""
    base = profs[0]
    paced = statistics.median(sum(map(max, zip(*steps))) for steps in zip(*(p.step_segments for p in profs)))
    k = paced / statistics.median(base.step_totals)
    layers = [{**layer, "forward_s": layer["forward_s"] * k, "backward_s": layer["backward_s"] * k,
               "start_s": layer["start_s"] * k} for layer in base.layers]
    buckets = [[{**b, "ready_s": b["ready_s"] * k, "first_use_s": b["first_use_s"] * k} for b in bs]
               for bs in (base.buckets, base.buckets_split)]
    return dataclasses.replace(base, forward_s=base.forward_s * k, backward_s=base.backward_s * k,
                               optimizer_s=base.optimizer_s * k, layers=layers, buckets=buckets[0],
                               buckets_split=buckets[1], data_s=max(p.data_s for p in profs))


def validation_profile(cfg, shards: Path, resolution: int, batch: int, steps: int,
                       n: int = 1, repeats: int = 1) -> tuple[Profile, dict]:
    """The profile of cfg's model at resolution with n workers on this host, with its
    train.lazy_update and train.split_fc (and the head's widths): of `repeats` profiles, each
    its own processes, the one with the median step."""
    classes = len(load_manifest(shards).classes)
    spec = ModelSpec.from_config(cfg.model.to_dict(), resolution, classes)
    profs = sorted((host_profile(cfg, spec, batch, resolution, shards, steps, n) for _ in range(repeats)),
                   key=lambda p: p.data_s + p.compute_s)
    return profs[len(profs) // 2], head_shape(spec)

