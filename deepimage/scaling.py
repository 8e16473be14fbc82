"""Training throughput at each worker count: speed-up, scaling efficiency (weak scaling) and
where each step's time goes.

    python -m deepimage.scaling --threads 2 --train-shards results/shards/64/train \
        --config-json '{"seed": 0, "resolutions": [32, 64], "train": {...}, "model": {...},
                        "scaling": {...}}' --out results/scaling/scaling.json

Each worker count of scaling.np times the training step (deepimage.measure.measure_step) under
train.launcher with a fixed per-worker batch and one fixed share of cores per worker
(threads // max(np)), pinned to it with scaling.pin (deepimage.runtime.pin_to_share), the
one-worker baseline included, so the figures compare like with like: efficiency(N) =
throughput(N) / (N * throughput(1)), taken relative to the smallest worker count measured. Each
row carries the step's time split (deepimage.measure.StepTimer). With scaling.allreduce_mib > 0
it also times the butterfly all-reduce at SWEEP_MIB (and allreduce_mib) on the largest worker
count against the launcher's own all-reduces (deepimage.bench.allreduce_sweep), and logs
everything to one MLflow run.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from deepimage import config, launch, tracking
from deepimage.config import Config
from deepimage.io import write_json
from deepimage.measure import SPLIT, measure_step, scaling_resolution
from deepimage.plots import scaling_plot

SWEEP_MIB = (0.25, 1, 4, 16)  # butterfly sizes for the performance model's latency/bandwidth fit


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
    p.add_argument("--plot", default=None, help="also draw throughput and efficiency here (PNG)")
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
              "resolution": scaling_resolution(sc.resolution, cfg.resolutions)}
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
        write_json(args.out, {"threads_per_worker": per_worker, "pinned": sc.pin,
                                       "rows": rows, "allreduce": allreduce,
                                       "stage_modules": sorted(m for m in sys.modules if m.startswith("deepimage"))})
        run.log_artifact(args.out)
        if args.plot:
            run.log_artifact(scaling_plot({"rows": rows}, Path(args.plot)))
    for r in rows:
        print(f"np={r['np']}: {r['images_per_s']:.1f} img/s, speed-up {r['speedup']:.2f}, "
              f"efficiency {r['efficiency']:.2f}, split " +
              " ".join(f"{k} {r['split'][k] * 1e3:.1f} ms" for k in SPLIT))


if __name__ == "__main__":
    main()
