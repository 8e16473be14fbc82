"""Training throughput at each worker count: speed-up and scaling efficiency (weak scaling).

    python -m deepimage.scaling --np 1 2 --threads 2 --train-shards results/shards/64/train \
        --resolution 64 --config-json '{...}' --out results/scaling/scaling.json

Each worker count runs `deepimage.train --benchmark-steps` under the configured launcher with a
fixed per-worker batch and one fixed share of cores per worker (threads // max(np)), so the
figures compare like with like: efficiency(N) = throughput(N) / (N * throughput(1)), taken
relative to the smallest worker count measured. With --allreduce-mib it also times the
butterfly all-reduce against Horovod's and torch.distributed's at that size on the largest
worker count (deepimage.bench.allreduce), and logs those figures to the same MLflow run.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from deepimage import launch, tracking


def measure(args, n: int, threads_per_worker: int, workdir: Path) -> dict:
    """One launch of n workers timing args.steps steps; its rank-0 JSON result."""
    out = workdir / f"np{n}.json"
    worker_args = ["--resolution", str(args.resolution), "--train-shards", args.train_shards,
                   "--config-json", args.config_json, "--benchmark-steps", str(args.steps),
                   "--warmup-steps", str(args.warmup_steps), "--per-worker-batch", str(args.batch_size),
                   "--benchmark-out", str(out)]
    launch.run(args.launcher, n, "deepimage.train", worker_args, threads=threads_per_worker * n)
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

    r = bench_allreduce(np, [mib], repeats)
    tag = f"{mib:g}MiB"
    figures = {f"allreduce_ms_{method}_{tag}": times[0] for method, times in r["median_ms"].items()}
    figures[f"allreduce_speedup_vs_horovod_{tag}"] = r["median_ms"]["horovod"][0] / r["median_ms"]["butterfly"][0]
    figures[f"allreduce_ratio_vs_torch_{tag}"] = r["median_ms"]["torch"][0] / r["median_ms"]["butterfly"][0]
    return figures


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--launcher", choices=launch.LAUNCHERS, default="horovod")
    p.add_argument("--np", type=int, nargs="+", required=True)
    p.add_argument("--threads", type=int, required=True, help="cores this job may use")
    p.add_argument("--train-shards", required=True)
    p.add_argument("--resolution", type=int, required=True)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup-steps", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=32, help="per worker")
    p.add_argument("--config-json", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--allreduce-mib", type=float, default=0, help="also time all-reduces of this size (0: skip)")
    p.add_argument("--allreduce-repeats", type=int, default=7)
    tracking.add_args(p)
    args = p.parse_args(argv)
    if max(args.np) > args.threads:
        sys.exit(f"scaling: scaling.np up to {max(args.np)} needs at least that many cores, "
                 f"this job has {args.threads} (run snakemake with --cores {max(args.np)} or more)")
    per_worker = args.threads // max(args.np)
    params = {"np": args.np, "threads_per_worker": per_worker, "steps": args.steps,
              "per_worker_batch": args.batch_size, "resolution": args.resolution, "launcher": args.launcher}
    with tracking.stage_run(args, "scaling", params) as run, tempfile.TemporaryDirectory() as tmp:
        rows = scaling_table([measure(args, n, per_worker, Path(tmp)) for n in args.np])
        for r in rows:
            run.log_metrics({"images_per_s": r["images_per_s"], "speedup": r["speedup"],
                             "scaling_efficiency": r["efficiency"], "median_step_s": r["median_step_s"]},
                            step=r["np"])
        largest = rows[-1]
        run.log_metrics({f"scaling_efficiency_np{largest['np']}": largest["efficiency"]})
        allreduce = {}
        if args.allreduce_mib > 0 and max(args.np) >= 2:
            allreduce = allreduce_figures(max(args.np), args.allreduce_mib, args.allreduce_repeats)
            run.log_metrics(allreduce)
        tracking.write_json(args.out, {"threads_per_worker": per_worker, "rows": rows, "allreduce": allreduce})
        run.log_artifact(args.out)
    for r in rows:
        print(f"np={r['np']}: {r['images_per_s']:.1f} img/s, speed-up {r['speedup']:.2f}, "
              f"efficiency {r['efficiency']:.2f}")


if __name__ == "__main__":
    main()
