"""Training throughput at each worker count: speed-up, scaling efficiency (weak scaling) and
where each step's time goes.

    python -m deepimage.scaling --threads 2 --train-shards results/shards/64/train \
        --config-json '{"seed": 0, "resolutions": [32, 64], "train": {...}, "model": {...},
                        "scaling": {...}}' --out results/scaling/scaling.json

Each worker count of scaling.np runs `deepimage.train --benchmark-out` under train.launcher with
a fixed per-worker batch and one fixed share of cores per worker (threads // max(np)), pinned to
it with scaling.pin (deepimage.launch.pin_to_share), the one-worker baseline included, so the
figures compare like with like: efficiency(N) = throughput(N) / (N * throughput(1)), taken
relative to the smallest worker count measured. Each row carries the step's time split
(deepimage.train.StepTimer). With scaling.allreduce_mib > 0 it also times the butterfly
all-reduce at SWEEP_MIB (and allreduce_mib) on the largest worker count against the launcher's
own all-reduces (deepimage.bench.allreduce_sweep), and logs everything to one MLflow run.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
from pathlib import Path

from deepimage import config, launch, tracking
from deepimage.config import Config

SWEEP_MIB = (0.25, 1, 4, 16)  # butterfly sizes for the performance model's latency/bandwidth fit
SPLIT = ("compute", "comm_wait", "data", "other")  # deepimage.train.SPLIT (not imported: torch)


def resolve_resolution(resolution: int | None, resolutions) -> int:
    """scaling.resolution, or the highest of `resolutions` when it is unset (null); the one place
    both the rule (which shards it) and the stage decide it."""
    return int(resolution) if resolution else max(int(r) for r in resolutions)


def measure_step(cfg: Config, n: int, *, shards: Path, workdir: Path, steps: int,
                 warmup_steps: int, threads_per_worker: int) -> dict:
    """Launch n workers of `deepimage.train --benchmark-out` and time `steps` training steps after
    `warmup_steps`; one configuration, one launch.

    cfg: the model and training to time (any overrides: train.lazy_update, train.split_fc,
    model.conv, model.fc_hidden, ...), launched under cfg.train.launcher; per-worker batch
    cfg.scaling.batch_size (global batch n times it); each worker gets threads_per_worker
    threads and, with cfg.scaling.pin, is pinned to its own share of the cores. shards: the
    train shard folder, at resolve_resolution(cfg.scaling.resolution, cfg.resolutions).
    workdir: an existing folder for the workers' result file (np<n>.json).

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
    resolution = resolve_resolution(cfg.scaling.resolution, cfg.resolutions)
    worker_args = ["--resolution", str(resolution), "--train-shards", str(shards),
                   "--config-json", json.dumps(sections), "--benchmark-out", str(out)]
    launch.run(cfg.train.launcher, n, "deepimage.train", worker_args, threads=threads_per_worker * n,
               pin=cfg.scaling.pin)
    result = json.loads(out.read_text())
    return {**result, "step_s": result["median_step_s"]}


def scaling_table(results: list[dict]) -> list[dict]:
    """Add speed-up and efficiency relative to the smallest worker count."""
    base = min(results, key=lambda r: r["np"])
    rows = []
    for r in sorted(results, key=lambda r: r["np"]):
        speedup = r["images_per_s"] / base["images_per_s"]
        rows.append({**r, "speedup": speedup, "efficiency": speedup / (r["np"] / base["np"])})
    return rows


def allreduce_sweep(cfg: Config, np: int, threads: int, repeats: int, workdir: Path) -> dict:
    """The butterfly at SWEEP_MIB and scaling.allreduce_mib on np workers beside the launcher's
    own all-reduces: scaling.json's "allreduce" (points for the performance model, figures)."""
    mib = cfg.scaling.allreduce_mib
    sizes = sorted({*SWEEP_MIB, mib})
    out = Path(workdir) / "allreduce.json"
    launch.run(cfg.train.launcher, np, "deepimage.bench.allreduce_sweep",
               ["--sizes", *map(str, sizes), "--repeats", str(repeats), "--out", str(out)],
               threads=threads, pin=cfg.scaling.pin)
    r = json.loads(out.read_text())
    median = r["median_s"]
    points = [{"bytes": int(s * 2**20) // 4 * 4, "seconds": t} for s, t in zip(sizes, median["butterfly"])]
    at = sizes.index(mib)
    tag = f"{mib:g}MiB"
    figures = {f"allreduce_ms_{m}_{tag}": times[at] * 1e3 for m, times in median.items()}
    for m, name in (("horovod", "allreduce_speedup_vs_horovod"), ("torch", "allreduce_ratio_vs_torch")):
        if m in median:
            figures[f"{name}_{tag}"] = median[m][at] / median["butterfly"][at]
    return {"np": np, "method": "butterfly", "launcher": r["launcher"], "points": points,
            "median_s": median, "sizes_mib": sizes, "figures": figures}


def log_rows(run, rows: list[dict]) -> None:
    """Per worker count (MLflow step = np): throughput, efficiency and the time split."""
    for r in rows:
        run.log_metrics({"images_per_s": r["images_per_s"], "speedup": r["speedup"],
                         "scaling_efficiency": r["efficiency"], "median_step_s": r["step_s"],
                         **{f"split_{k}_s": r["split"][k] for k in SPLIT}}, step=r["np"])
    largest = rows[-1]
    run.log_metrics({f"scaling_efficiency_np{largest['np']}": largest["efficiency"]})


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, required=True, help="cores this job may use")
    p.add_argument("--train-shards", required=True, help="shards at scaling.resolution")
    p.add_argument("--out", required=True)
    p.add_argument("--allreduce-repeats", type=int, default=7)
    config.add_argument(p, "seed, resolutions, train, model and scaling")
    tracking.add_args(p)
    args = p.parse_args(argv)
    try:
        cfg = config.from_args(args)
    except config.ConfigError as e:
        sys.exit(f"scaling: {e}")
    sc = cfg.scaling
    if max(sc.np) > args.threads:
        sys.exit(f"scaling: scaling.np up to {max(sc.np)} needs at least that many cores, "
                 f"this job has {args.threads} (run snakemake with --cores {max(sc.np)} or more)")
    per_worker = args.threads // max(sc.np)
    params = {"scaling": sc, "threads_per_worker": per_worker, "launcher": cfg.train.launcher,
              "resolution": resolve_resolution(sc.resolution, cfg.resolutions)}
    with tracking.stage_run(args, "scaling", params) as run, tempfile.TemporaryDirectory() as tmp:
        rows = scaling_table([measure_step(cfg, n, shards=Path(args.train_shards), workdir=Path(tmp),
                                           steps=sc.steps, warmup_steps=sc.warmup_steps,
                                           threads_per_worker=per_worker) for n in sc.np])
        log_rows(run, rows)
        allreduce = {}
        if sc.allreduce_mib > 0 and max(sc.np) >= 2:
            allreduce = allreduce_sweep(cfg, max(sc.np), per_worker * max(sc.np), args.allreduce_repeats,
                                        Path(tmp))
            run.log_metrics(allreduce["figures"])
        tracking.write_json(args.out, {"threads_per_worker": per_worker, "pinned": sc.pin,
                                       "rows": rows, "allreduce": allreduce,
                                       "stage_modules": sorted(m for m in sys.modules if m.startswith("deepimage"))})
        run.log_artifact(args.out)
    for r in rows:
        print(f"np={r['np']}: {r['images_per_s']:.1f} img/s, speed-up {r['speedup']:.2f}, "
              f"efficiency {r['efficiency']:.2f}, split " +
              " ".join(f"{k} {r['split'][k] * 1e3:.1f} ms" for k in SPLIT))


if __name__ == "__main__":
    main()
