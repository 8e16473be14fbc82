"""Training steps measured on N real workers: the scaling stage's and the performance model's
measurement, one launch per configuration.

    row = measure_step(cfg, 2, shards=Path("results/shards/64/train"), workdir=tmp,
                       steps=20, warmup_steps=3, threads_per_worker=1)

measure_step launches N workers of deepimage.bench.timed_steps under train.launcher; each times
the training stage's own step (deepimage.train.step) and splits its wall time into SPLIT with a
StepTimer. No torch here: the workflow imports this module (scaling_resolution) when it parses.
"""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

from deepimage import launch

SPLIT = ("compute", "comm_wait", "data", "other")
# deepimage.train.PHASES (the step's laps) and the timing loop's own, by the SPLIT part they count to
PART_OF = {"data": "data", "count": "other", "forward": "compute", "backward": "compute",
           "update": "compute", "stats": "other"}


class StepTimer:
    """Splits the compute thread's wall time into SPLIT: each lap(phase) gives the seconds since
    the previous lap to PART_OF[phase], less what the CommClock counted meanwhile (comm_wait).
    The parts sum to the wall time from start() to the last lap. perf_counter only: no device sync."""

    def __init__(self, clock=None):
        self.clock = clock  # deepimage.parallel.commclock.CommClock, or None (no comm split)
        self.parts = dict.fromkeys(SPLIT, 0.0)
        self._t = self._comm = 0.0

    def start(self) -> None:
        self.parts = dict.fromkeys(SPLIT, 0.0)
        self._t, self._comm = time.perf_counter(), self._comm_now()

    def lap(self, phase: str) -> None:
        now, comm = time.perf_counter(), self._comm_now()
        self.parts["comm_wait"] += comm - self._comm
        self.parts[PART_OF[phase]] += (now - self._t) - (comm - self._comm)
        self._t, self._comm = now, comm

    def _comm_now(self) -> float:
        return self.clock.seconds if self.clock is not None else 0.0


def scaling_resolution(resolution: int | None, resolutions) -> int:
    """scaling.resolution, or the highest of `resolutions` when it is unset (null); the one place
    the rule (which shards it), the stage and the performance model decide it."""
    return int(resolution) if resolution else max(int(r) for r in resolutions)


def measure_step(cfg, n: int, *, shards: Path, workdir: Path, steps: int,
                 warmup_steps: int, threads_per_worker: int) -> dict:
    """Launch n workers of deepimage.bench.timed_steps and time `steps` training steps after
    `warmup_steps`; one configuration, one launch.

    cfg (deepimage.config.Config): the model and training to time (any overrides:
    train.lazy_update, train.split_fc, model.conv, model.fc_hidden, ...), launched under
    cfg.train.launcher; per-worker batch cfg.scaling.batch_size (global batch n times it); each
    worker gets threads_per_worker threads and, with cfg.scaling.pin, is pinned to its own share
    of the cores. shards: the train shard folder, at
    scaling_resolution(cfg.scaling.resolution, cfg.resolutions). workdir: an existing folder for
    the workers' result file (np<n>.json).

    Returns the rank-0 result, at least:
      np            n
      step_s        median over the timed steps of the slowest rank's step time (seconds)
      images_per_s  global batch / step_s
      split         {"compute", "comm_wait", "data", "other"}: seconds per step on the compute
                    thread, each the mean over the timed steps, then the mean over the ranks
                    (so they sum to split_wall_s, the mean step time, not to the median step_s)
      split_wall_s  sum of split
      step_times_s  every timed step (slowest rank); cores: each rank's cores, by rank;
      pinned, launcher, per_worker_batch, global_batch, median_step_s (= step_s)
    Raises SystemExit with one line when the launch fails.
    """
    cfg = dataclasses.replace(cfg, scaling=dataclasses.replace(cfg.scaling, steps=steps,
                                                               warmup_steps=warmup_steps))
    out = Path(workdir) / f"np{n}.json"
    sections = {"seed": cfg.seed, "train": cfg.train.to_dict(), "model": cfg.model.to_dict(),
                "scaling": cfg.scaling.to_dict()}
    resolution = scaling_resolution(cfg.scaling.resolution, cfg.resolutions)
    worker_args = ["--resolution", str(resolution), "--train-shards", str(shards),
                   "--config-json", json.dumps(sections), "--out", str(out)]
    launch.run(cfg.train.launcher, n, "deepimage.bench.timed_steps", worker_args,
               threads=threads_per_worker * n, pin=cfg.scaling.pin)
    result = json.loads(out.read_text())
    return {**result, "step_s": result["median_step_s"]}
