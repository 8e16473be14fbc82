"""Training checkpoints: atomic files in results/train/<res>/checkpoints/, the newest good one
found again after any interruption.

    from deepimage import checkpoint
    path = checkpoint.write(folder, payload, keep=2)          # rank 0; temp file, fsync, rename
    found = checkpoint.load_latest(folder)                     # None, or (payload, path)
    checkpoint.check_compatible(found[0]["config"], current, found[1])   # refuses naming keys

A checkpoint is one torch.save file, `ckpt-<global step, 9 digits>.pt`, holding what
deepimage.parallel.state gathers (plain weights, gathered optimizer state, every rank's random
states) plus the loader position, the epoch's running sums, the metric history, the config it
was made with and the MLflow run id (deepimage.train builds it). The folder is not a Snakemake
output, so a failed job's checkpoints survive Snakemake's clean-up of its outputs.

Written atomically: a temporary file in the same folder, fsync, rename over the final name,
fsync of the folder (the rename itself survives a power cut); only the newest `keep` remain.
In training, rank 0 serializes the gathered state in memory and a writer thread does the file
and its fsyncs while training goes on (Saver.close() waits for it before any rank exits).
A latest checkpoint that is truncated or unreadable is skipped with one line naming it, and
the one before is used.
"""
from __future__ import annotations

import io
import math
import os
import re
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from deepimage.parallel.state import gather_training_state, restore_training_state

NAME = re.compile(r"^ckpt-(\d{9})\.pt$")
TEMP_NAME = re.compile(r"^\.ckpt-\d{9}\.pt\.tmp\d+$")  # write()'s temporary file
MODEL_TEMP_NAME = ".model.pt.tmp"  # deepimage.modelfile.save_checkpoint's, beside checkpoints/

# Keys of the checkpoint's config that may differ from the current one on resume (everything
# else must match, or the checkpoint is refused naming the keys): how many workers and how they
# are launched (the state is plain, re-split for any count), how gradients travel (same update),
# checkpoint cadence, and the epoch count (a longer or shorter run continues: the learning-rate
# schedule then follows the new count from the resume point on).
MAY_DIFFER = ("train.np", "train.nodes", "train.launcher", "train.device", "train.epochs",
              "train.bucket_mib", "train.lazy_update", "train.compute_nice", "train.split_fc",
              "train.comm_timeout_s", "train.resume", "train.checkpoint")


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed (the message names the file, the keys and the fix)."""


def path_for(folder: str | Path, global_step: int) -> Path:
    return Path(folder) / f"ckpt-{global_step:09d}.pt"


def listing(folder: str | Path) -> list[Path]:
    """The folder's checkpoints, newest (highest global step) first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), folder / n) for n in os.listdir(folder) if (m := NAME.match(n))]
    return [p for _, p in sorted(found, reverse=True)]


def sweep_temp_files(folder: str | Path) -> list[Path]:
    """Remove the temporary files writers killed mid-write left: write()'s in `folder`, the model
    file's beside it (only those names; a job's folder has one writer at a time). Returns them."""
    folder = Path(folder)
    found = [folder / n for n in os.listdir(folder) if TEMP_NAME.match(n)] if folder.is_dir() else []
    model_tmp = folder.parent / MODEL_TEMP_NAME
    found += [model_tmp] if model_tmp.is_file() and not model_tmp.is_symlink() else []
    for path in found:
        path.unlink(missing_ok=True)
    return found


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def serialize(payload: dict) -> memoryview:
    """The bytes of a checkpoint file (torch.save in memory): a snapshot training may move past."""
    buf = io.BytesIO()
    torch.save(payload, buf)
    return buf.getbuffer()


def write(folder: str | Path, payload: dict | memoryview, global_step: int, keep: int) -> Path:
    """Write payload (or serialize()'s bytes) as checkpoint `global_step` atomically; drop all
    but the newest `keep`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    final = path_for(folder, global_step)
    tmp = folder / f".{final.name}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            if isinstance(payload, dict):
                torch.save(payload, f)
            else:
                f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(folder)
    for old in listing(folder)[keep:]:
        old.unlink(missing_ok=True)
    return final


class BackgroundWriter:
    """Rank 0's writer thread: training goes on while the file is written and fsynced (the
    slow part); one checkpoint at a time, and wait() before exiting or reading the folder."""

    def __init__(self):
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self.seconds = 0.0  # time the thread spent writing

    def submit(self, folder: Path, data: memoryview, global_step: int, keep: int) -> Path:
        self.wait()

        def run():
            t0 = time.perf_counter()
            try:
                write(folder, data, global_step, keep)
            except BaseException as e:  # re-raised by wait() on the training thread
                self._error = e
            self.seconds += time.perf_counter() - t0

        self._thread = threading.Thread(target=run, name="checkpoint-writer")
        self._thread.start()
        return path_for(folder, global_step)

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise OSError(f"checkpoint write failed: {error}") from error


def load(path: str | Path) -> dict:
    """One checkpoint (plain tensors, dicts, lists, numbers, strings and bytes only)."""
    return torch.load(path, map_location="cpu", weights_only=True)


def load_latest(folder: str | Path, log=None) -> tuple[dict, Path] | None:
    """The newest readable checkpoint and its path, or None; each unreadable newer one is
    skipped with one line naming it (on `log`, default stderr)."""
    log = log or (lambda line: print(line, file=sys.stderr, flush=True))
    candidates = listing(folder)
    for i, path in enumerate(candidates):
        try:
            payload = load(path)
            if not isinstance(payload, dict) or "model" not in payload:
                raise ValueError("not a training checkpoint")
            return payload, path
        except Exception as e:  # truncated zip, bad pickle, I/O error: all mean "not usable"
            reason = str(e).strip().splitlines()[0][:120] if str(e).strip() else type(e).__name__
            then = f"using {candidates[i + 1].name}" if i + 1 < len(candidates) else "none left: starting over"
            log(f"checkpoint: skipping {path} (unreadable: {reason}); {then}")
    return None


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def differing_keys(saved: dict, current: dict) -> list[str]:
    """Config keys (dotted) whose values differ, ignoring MAY_DIFFER."""
    a, b = _flat(saved), _flat(current)
    allowed = lambda key: any(key == m or key.startswith(m + ".") for m in MAY_DIFFER)  # noqa: E731
    return sorted(k for k in a.keys() | b.keys() if not allowed(k) and a.get(k) != b.get(k))


def check_compatible(saved: dict, current: dict, path: str | Path) -> None:
    """Refuse a checkpoint made with another model or training config, naming the keys."""
    keys = differing_keys(saved, current)
    if keys:
        shown = ", ".join(f"{k} ({_flat(saved).get(k)!r} -> {_flat(current).get(k)!r})" for k in keys[:6])
        raise CheckpointError(
            f"{path} was made with another config: {shown}{' ...' if len(keys) > 6 else ''}; "
            f"set those keys back to resume it, or train.resume: false to start over")


# ---------------------------------------------------------------------------------------------
# The training loop's side: where training stands, how to write and resume


@dataclass
class Position:
    """Where training stands: `step` steps of `epoch` done, with the epoch's running sums."""

    epoch: int = 0
    step: int = 0
    loss_sum: float = 0.0  # sum over the epoch's samples so far of their loss
    correct: int = 0
    seen: int = 0
    seconds: float = 0.0  # time in this epoch's steps so far
    train_seconds: float = 0.0  # time since training started, over every job of the run

    def add(self, stats, step: int, seconds: float) -> None:
        self.loss_sum += stats.loss * stats.count
        self.correct, self.seen = self.correct + stats.correct, self.seen + stats.count
        self.step, self.seconds = step, seconds


@dataclass
class ResumePoint:
    payload: dict
    path: Path


def run_config(cfg, resolution: int) -> dict:
    """What a checkpoint records of the config (and compares on resume): the seed, the
    resolution, the train section and the model section as this resolution builds it."""
    model = cfg.model.to_dict()
    model["per_resolution"] = model.get("per_resolution", {}).get(str(resolution))
    return {"seed": cfg.seed, "resolution": resolution, "model": model, "train": cfg.train.to_dict()}


def find_resume(folder: Path, cfg, resolution: int, rank: int) -> ResumePoint | None:
    """The checkpoint to continue from (train.resume and an unfinished run's checkpoint), or
    None to start over; refuses one made with another config (CheckpointError)."""
    say = (lambda line: print(line, file=sys.stderr, flush=True)) if rank == 0 else (lambda line: None)
    if not cfg.train.resume:
        return None
    found = load_latest(folder, say)
    if found is None:
        return None
    payload, path = found
    if payload.get("finished"):
        say(f"checkpoint: {path} is of a finished run: training starts over")
        return None
    check_compatible(payload["config"], run_config(cfg, resolution), path)
    return ResumePoint(payload, path)


class Saver:
    """Writes the training checkpoints of one job: every rank gathers, rank 0 serializes and
    hands the bytes to its writer thread. When to write is the training loop's to say; `due`,
    `old_enough` and `epoch_due` give train.checkpoint's cadence."""

    def __init__(self, folder: str | Path, settings, config: dict, seed: int, transport,
                 classes: list[str], steps: int, run_id: str, fresh: bool):
        """folder: the job's checkpoints/; settings: train.checkpoint; config: run_config's
        record; steps: per epoch; run_id: the MLflow run the checkpoint names (resume continues
        it); fresh: starting over, so the folder's old checkpoints go at the first write. Rank 0
        removes the temporary files that killed writers left (sweep_temp_files)."""
        self.folder, self.cc, self.config, self.seed = Path(folder), settings, config, seed
        self.transport, self.classes, self.steps, self.run_id = transport, classes, steps, run_id
        self.fresh = fresh
        self.last_write: float | None = None  # monotonic time of the last checkpoint of this job
        self.seconds = 0.0  # training time spent on checkpoints (gather, serialize, waits)
        self.writer = BackgroundWriter()
        if transport.rank == 0:
            sweep_temp_files(self.folder)

    def restore(self, resume: ResumePoint, model, sync, loader) -> tuple[Position, dict, list[float]]:
        """Load the checkpoint into this rank's model, optimizers, random states and loader;
        returns where training stands, the metric history and the epochs' seconds."""
        p = resume.payload
        if list(p["classes"]) != self.classes:
            raise CheckpointError(f"{resume.path} was trained on other classes ({len(p['classes'])}: "
                                  f"{p['classes'][:4]}...): train.resume: false to start over")
        pos = Position(**p["position"])
        try:
            note = restore_training_state(model, sync, p, self.seed, pos.epoch * self.steps + pos.step)
        except ValueError as e:
            raise CheckpointError(f"{resume.path}: {e}; train.resume: false to start over") from e
        loader.load_state_dict(p["loader"])
        self.last_write = time.monotonic()  # the state on disk is the state now
        if self.transport.rank == 0:
            print(f"resumed from {resume.path}: epoch {pos.epoch}, step {pos.step} "
                  f"(saved by {p['world_size']} workers, now {self.transport.size}; {note})", flush=True)
        return pos, {k: list(v) for k, v in p["history"].items()}, list(p["epoch_seconds"])

    def _age(self) -> float:
        return math.inf if self.last_write is None else time.monotonic() - self.last_write

    def due(self) -> bool:
        """Rank 0: train.checkpoint.every_minutes have passed since the last checkpoint."""
        every = self.cc.every_minutes
        return self.transport.rank == 0 and every > 0 and self._age() >= 60 * every

    def old_enough(self) -> bool:
        """Rank 0: the last checkpoint is older than on_signal_min_age_s (a stop writes one)."""
        return self.transport.rank == 0 and self._age() >= self.cc.on_signal_min_age_s

    def epoch_due(self, epochs_done: int) -> bool:
        """Every train.checkpoint.every_epochs epochs."""
        every = self.cc.every_epochs
        return bool(every) and epochs_done % every == 0

    def save(self, model, sync, loader, pos: Position, history: dict, epoch_seconds: list[float],
             elapsed: float, finished: bool = False) -> Path | None:
        """Gather on every rank; rank 0 serializes and hands the bytes to its writer thread."""
        t0 = time.perf_counter()
        state = gather_training_state(model, sync)
        path = None
        if self.transport.rank == 0:
            if self.fresh:
                for old in listing(self.folder):
                    old.unlink()
                self.fresh = False
            g = pos.epoch * self.steps + pos.step
            payload = {**state, "global_step": g, "finished": finished,
                       "loader": {"epoch": pos.epoch, "position": pos.step, "seed": loader.seed},
                       "lr_schedule": {"epoch_float": pos.epoch + pos.step / self.steps,
                                       "lr": sync.optimizers()[0].param_groups[0]["lr"]},
                       "position": {**asdict(pos), "train_seconds": elapsed},
                       "history": history, "epoch_seconds": epoch_seconds,
                       "config": self.config, "classes": self.classes, "run_id": self.run_id}
            path = self.writer.submit(self.folder, serialize(payload), g, self.cc.keep)
        self.last_write = time.monotonic()
        self.seconds += time.perf_counter() - t0
        return path

    def close(self) -> None:
        """Wait for rank 0's file to be complete, on every rank (before exiting or finishing)."""
        t0 = time.perf_counter()
        self.writer.wait()
        self.transport.barrier()
        self.seconds += time.perf_counter() - t0
