"""Training throughput at each worker count: speed-up and scaling efficiency (weak scaling).

    python -m deepimage.scaling --threads 2 --train-shards results/shards/64/train \
        --config-json '{"seed": 0, "train": {...}, "model": {...}, "scaling": {...}}' \
        --out results/scaling/scaling.json

Each worker count of scaling.np runs `deepimage.train --benchmark-out` under train.launcher with
a fixed per-worker batch and one fixed share of cores per worker (threads // max(np)), so the
figures compare like with like: efficiency(N) = throughput(N) / (N * throughput(1)), taken
relative to the smallest worker count measured. With scaling.allreduce_mib > 0 it also times the
butterfly all-reduce against Horovod's and torch.distributed's at that size on the largest
worker count (deepimage.bench.allreduce), and logs those figures to the same MLflow run.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from deepimage import config, launch, tracking
from deepimage.config import Config


def measure(args, cfg: Config, n: int, threads_per_worker: int, workdir: Path) -> dict:
    """One launch of n workers timing scaling.steps steps; its rank-0 JSON result."""
    out = workdir / f"np{n}.json"
    sections = {"seed": cfg.seed, "train": cfg.train.to_dict(), "model": cfg.model.to_dict(),
                "scaling": cfg.scaling.to_dict()}
    worker_args = ["--resolution", str(cfg.scaling.resolution), "--train-shards", args.train_shards,
                   "--config-json", json.dumps(sections), "--benchmark-out", str(out)]
    launch.run(cfg.train.launcher, n, "deepimage.train", worker_args, threads=threads_per_worker * n)
    return json.loads(out.read_text())


def scaling_table(results: list[dict]) -> list[dict]:
    """Add speed-up and efficiency relative to the smallest worker count."""
    base = min(results, key=lambda r: r["np"])
    rows = []
    for r in sorted(results, key=lambda r: r["np"]):
        speedup = r["images_per_s"] / base["images_per_s"]
        rows.append({**r, "speedup": speedup, "efficiency": speedup / (r["np"] / base["np"])})
    return rows


def allreduce_figures(np: int, mib: float, repeats: int) -> dict[str, float]:
    """Median all-reduce times at `mib` MiB and the butterfly's ratios to Horovod and torch."""
    from deepimage.bench.allreduce import run as bench_allreduce

    r = bench_allreduce(np, [mib], repeats, mpi=False)  # the stage compares what training can use
    tag = f"{mib:g}MiB"
    figures = {f"allreduce_ms_{method}_{tag}": times[0] for method, times in r["median_ms"].items()}
    figures[f"allreduce_speedup_vs_horovod_{tag}"] = r["median_ms"]["horovod"][0] / r["median_ms"]["butterfly"][0]
    figures[f"allreduce_ratio_vs_torch_{tag}"] = r["median_ms"]["torch"][0] / r["median_ms"]["butterfly"][0]
    return figures


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, required=True, help="cores this job may use")
    p.add_argument("--train-shards", required=True, help="shards at scaling.resolution")
    p.add_argument("--out", required=True)
    p.add_argument("--allreduce-repeats", type=int, default=7)
    config.add_argument(p, "seed, train, model and scaling")
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
    params = {"scaling": sc, "threads_per_worker": per_worker, "launcher": cfg.train.launcher}
    with tracking.stage_run(args, "scaling", params) as run, tempfile.TemporaryDirectory() as tmp:
        rows = scaling_table([measure(args, cfg, n, per_worker, Path(tmp)) for n in sc.np])
        for r in rows:
            run.log_metrics({"images_per_s": r["images_per_s"], "speedup": r["speedup"],
                             "scaling_efficiency": r["efficiency"], "median_step_s": r["median_step_s"]},
                            step=r["np"])
        largest = rows[-1]
        run.log_metrics({f"scaling_efficiency_np{largest['np']}": largest["efficiency"]})
        allreduce = {}
        if sc.allreduce_mib > 0 and max(sc.np) >= 2:
            try:
                allreduce = allreduce_figures(max(sc.np), sc.allreduce_mib, args.allreduce_repeats)
            except RuntimeError as e:  # bench.BenchError included: one line, not a traceback
                sys.exit(f"scaling: the all-reduce comparison failed: {e}")
            run.log_metrics(allreduce)
        tracking.write_json(args.out, {"threads_per_worker": per_worker, "rows": rows, "allreduce": allreduce})
        run.log_artifact(args.out)
    for r in rows:
        print(f"np={r['np']}: {r['images_per_s']:.1f} img/s, speed-up {r['speedup']:.2f}, "
              f"efficiency {r['efficiency']:.2f}")


if __name__ == "__main__":
    main()
