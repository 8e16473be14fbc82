"""Checkpoint cost: writing and loading a checkpoint of the paper-width VGG (2 workers, split FC)
against torch.save / torch.load of the same state in one process, and the share of training
time that checkpoints take in the default run at the default cadence.

    python -m deepimage.bench.checkpoint [--json] [--np 2] [--repeats 3] [--skip-run]

1. Write / load: `--np` workers (horovodrun) each build the paper-width VGG (VGG-16's conv
   stages, FC 4096 x 4096, 1000 classes; 224 px input) split over the workers, with SGD momentum
   state for every parameter. Write = what training waits for (deepimage.checkpoint.Saver.save):
   every rank gathers the weights, optimizer and random states (deepimage.parallel.state), rank
   0 serializes them in memory and hands the bytes to its writer thread. Durable = until that
   thread has written the temp file, fsynced it, renamed it and fsynced the folder. Load = every
   rank reads the file and takes its shards back. The baselines are rank 0 alone: torch.save /
   torch.load of the same gathered payload to / from a file (no fsync). Medians of --repeats
   rounds, slowest rank; write_ratio_vs_torch_save = write / torch.save (target <= 1.5).
2. Step overhead: the default configuration's 64 px model trained as the default run trains it
   (built-in synthetic dataset, 2 workers, 6 epochs, one checkpoint per epoch); step_overhead =
   the time spent checkpointing / the rest of the training time, both from that one run's
   metrics.json (target < 0.02).

With --json the last line is one JSON object with write_ratio_vs_torch_save and step_overhead.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from deepimage.bench import BenchError, run_workers

PAPER_CONV = [[64, 64], [128, 128], [256, 256, 256], [512, 512, 512], [512, 512, 512]]


# ---------------------------------------------------------------------------------------------
# 1. Write and load, in the workers

def _paper_model(transport):
    """The split paper-width VGG and its GradientSync, momentum state filled for every parameter."""
    from deepimage.config import Config
    from deepimage.model import ModelSpec, build_model
    from deepimage.parallel.parallelize import parallelize
    from deepimage.train import sgd

    cfg = Config.from_dict({"train": {"split_fc": True}})
    spec = ModelSpec(1000, conv=PAPER_CONV, fc_hidden=[4096, 4096], dropout=0.5)
    model, sync = parallelize(build_model(spec, 0), transport, cfg, sgd(cfg.train))
    for opt in sync.optimizers():
        for group in opt.param_groups:
            for p in group["params"]:
                opt.state[p] = {"momentum_buffer": torch.randn_like(p)}
    return model, sync


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def worker(a: argparse.Namespace) -> None:
    from deepimage import checkpoint
    from deepimage.parallel.state import gather_training_state, restore_training_state
    from deepimage.parallel.transport import init_transport
    from deepimage.runtime import apply_thread_limit

    apply_thread_limit()
    transport = init_transport("auto")
    rank0 = transport.rank == 0
    model, sync = _paper_model(transport)
    folder = Path(a.dir) / "checkpoints"
    plain = Path(a.dir) / "torch_save.pt"
    rounds: dict[str, list[float]] = {k: [] for k in ("gather", "write", "durable", "save", "load",
                                                      "torch_load")}
    writer = checkpoint.BackgroundWriter()
    for i in range(a.repeats):
        transport.barrier()
        t0 = time.perf_counter()
        payload = gather_training_state(model, sync)
        rounds["gather"].append(time.perf_counter() - t0)
        if rank0:  # what training waits for: gather, serialize, hand to the writer thread
            writer.submit(folder, checkpoint.serialize({**payload, "round": i}), i, keep=2)
        rounds["write"].append(time.perf_counter() - t0)
        writer.wait()
        transport.barrier()
        rounds["durable"].append(time.perf_counter() - t0)  # until the file is fsynced and renamed
        if rank0:
            rounds["save"].append(_timed(lambda: torch.save(payload, plain)))
        transport.barrier()
        path = checkpoint.listing(folder)[0]
        t0 = time.perf_counter()
        restore_training_state(model, sync, checkpoint.load(path), 0, 0)
        transport.barrier()
        rounds["load"].append(time.perf_counter() - t0)
        if rank0:
            rounds["torch_load"].append(_timed(lambda: torch.load(plain, weights_only=True)))
    slowest = {k: transport.allreduce(torch.tensor(v or [0.0] * a.repeats, dtype=torch.float64), "max").tolist()
               for k, v in rounds.items()}
    if rank0:
        med = {k: statistics.median(v) for k, v in slowest.items()}
        nbytes = checkpoint.listing(folder)[0].stat().st_size
        a.out.write_text(json.dumps({
            "np": transport.size, "checkpoint_mib": nbytes / 2**20, "repeats": a.repeats,
            "gather_s": med["gather"], "write_s": med["write"], "durable_s": med["durable"],
            "torch_save_s": med["save"], "durable_ratio_vs_torch_save": med["durable"] / med["save"],
            "load_s": med["load"], "torch_load_s": med["torch_load"],
            "write_ratio_vs_torch_save": med["write"] / med["save"],
            "load_ratio_vs_torch_load": med["load"] / med["torch_load"]}))
    transport.barrier()
    transport.shutdown()


# ---------------------------------------------------------------------------------------------
# 2. Step overhead in one default training run

def default_run(folder: Path, np: int, timeout: float) -> dict:
    """Train the default config's 64 px model on the default synthetic set; its metrics.json."""
    from deepimage import synthetic
    from deepimage.config import defaults
    from deepimage.dataset import build_synthetic
    from deepimage.shard import ShardParams, build, plan_split

    cfg = defaults()
    syn = cfg.dataset.synthetic
    spec = synthetic.SyntheticSpec(seed=cfg.seed, classes=syn.classes, train_per_class=syn.train_per_class,
                                   val_per_class=syn.val_per_class, image_size=syn.image_size)
    source = folder / "source.json"
    source.write_text(json.dumps(build_synthetic(folder / "dataset", spec, threads=2)))
    for split in ("train", "val"):
        build(plan_split(source, split), folder / "shards" / split, ShardParams(resolution=64))
    worker_cfg = {"seed": cfg.seed, "train": cfg.train.to_dict(), "model": cfg.model.to_dict()}
    cmd = [sys.executable, "-m", "deepimage.launch", "--launcher", "horovod", "--np", str(np),
           "--threads", str(np), "deepimage.train", "--resolution", "64",
           "--train-shards", str(folder / "shards" / "train"), "--val-shards", str(folder / "shards" / "val"),
           "--out", str(folder / "train"), "--config-json", json.dumps(worker_cfg),
           "--tracking-uri", f"sqlite:///{folder / 'mlflow.db'}", "--parent-file", str(folder / "none.json")]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    if r.returncode != 0:
        raise BenchError("default run failed:\n" + "\n".join((r.stdout + r.stderr).splitlines()[-15:]))
    m = json.loads((folder / "train" / "metrics.json").read_text())
    ckpt = m["checkpoint_seconds"]
    return {"epochs": m["epochs"], "train_seconds": m["train_seconds"], "checkpoint_seconds": ckpt,
            "checkpoints": m["epochs"] // max(cfg.train.checkpoint.every_epochs, 1),
            "step_overhead": ckpt / (m["train_seconds"] - ckpt)}


# ---------------------------------------------------------------------------------------------
# Command line

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", action="store_true", help="end with one JSON line")
    p.add_argument("--np", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--skip-run", action="store_true", help="only the write / load part")
    p.add_argument("--dir", default=None, help="scratch folder (default: a temporary one)")
    p.add_argument("--timeout", type=float, default=900.0)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.np < 1 or a.repeats < 1:
        raise BenchError(f"--np and --repeats must be >= 1, got {a.np} and {a.repeats}")
    return a


def main(argv: list[str] | None = None) -> None:
    try:
        a = parse_args(argv)
        if a.worker:
            worker(a)
            return
        with tempfile.TemporaryDirectory(dir=a.dir) as tmp:
            io = run_workers("deepimage.bench.checkpoint", a.np,
                             ["--repeats", str(a.repeats), "--dir", tmp], timeout=a.timeout)
            run = None if a.skip_run else default_run(Path(tmp) / "run", a.np, a.timeout)
    except BenchError as err:
        sys.exit(f"bench.checkpoint: {err}")
    print(f"paper-width VGG (224 px, FC 4096, 1000 classes), {io['np']} workers, split FC: "
          f"{io['checkpoint_mib']:.0f} MiB checkpoint, median of {io['repeats']}")
    print(f"  write, as training waits for it (gather {io['gather_s']:.2f} s + serialize): "
          f"{io['write_s']:.2f} s; torch.save in one process: {io['torch_save_s']:.2f} s "
          f"-> {io['write_ratio_vs_torch_save']:.2f}x")
    print(f"  until the file is durable (writer thread: temp file, fsync, rename, fsync dir): "
          f"{io['durable_s']:.2f} s -> {io['durable_ratio_vs_torch_save']:.2f}x torch.save")
    print(f"  load (read + re-split): {io['load_s']:.2f} s; torch.load: {io['torch_load_s']:.2f} s "
          f"-> {io['load_ratio_vs_torch_load']:.2f}x")
    if run:
        print(f"default run (64 px, {run['epochs']} epochs, {run['checkpoints']} checkpoints): "
              f"{run['checkpoint_seconds']:.2f} s of {run['train_seconds']:.1f} s checkpointing "
              f"-> step overhead {100 * run['step_overhead']:.2f} %")
    if a.json:
        print(json.dumps({**io, **({f"run_{k}": v for k, v in run.items()} if run else {}),
                          "step_overhead": run["step_overhead"] if run else None}))


if __name__ == "__main__":
    main()
