"""The performance model of a training step at N workers, validated here and carried to Minwa's
scale: the predict_scaling stage.

    python -m deepimage.perfmodel --threads 2 --scaling results/scaling/scaling.json \
        --shards results/shards --config-json '{"seed": 0, ...}' --out results/scaling/perfmodel.json \
        --plots results/perfmodel --report-md results/perfmodel/perfmodel.md
    python -m deepimage.perfmodel profile --device cuda --bf16 --out deepimage/hardware/x_profile.json

The model is built from measured parts:
- compute: per-layer forward and backward times of the training step (profile.py, module
  hooks; the moment each parameter's gradient is complete in backward), medians over a few
  steps, one thread; for N workers on one host, N profiling processes at once, pinned, each
  computing rank 0's split FC share (host.py);
- buckets: GradientSync's bucketing (train.bucket_mib) of the replicated gradients, with the
  moment in backward each bucket is full and the offset in forward where its layer is next used;
- transport: message latency and bandwidth fitted to the butterfly sweep the scaling stage
  measured (scaling.json `allreduce.points`), residuals written beside the fit (costs.py).
Step time at N workers = compute + the communication overlap does not hide (costs.step_time).
The stage validates the model against steps measured with real workers
(deepimage.measure.measure_step, under train.launcher) and projects the paper's model widths to
144 workers on each hardware file in deepimage/hardware/ (projection.py); report.py writes the
plots, the report's section and the MLflow metrics.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from deepimage import config, tracking
from deepimage.config import Config
from deepimage.io import write_json
from deepimage.measure import measure_step, scaling_resolution
from deepimage.perfmodel import projection
from deepimage.perfmodel.costs import Link, fit_link, fit_plain, load_hardware, local_hardware, step_time
from deepimage.perfmodel.host import validation_profile
from deepimage.perfmodel.profile import measured_flops, profile
from deepimage.perfmodel.report import hardware_summary, log_result, plot, report_lines
from deepimage.perfmodel.spec import FC_HEAVY, PAPER, PerfModelError


def model_variant(cfg, name: str):
    """(cfg for this validation model, its resolution): the configured model at the scaling
    resolution, or FC_HEAVY at the lowest of `resolutions`."""
    if name == "default":
        return cfg, scaling_resolution(cfg.scaling.resolution, cfg.resolutions)
    model = dataclasses.replace(cfg.model, conv=tuple(map(tuple, FC_HEAVY["conv"])),
                                fc_hidden=tuple(FC_HEAVY["fc_hidden"]), per_resolution={})
    return dataclasses.replace(cfg, model=model), min(int(r) for r in cfg.resolutions)


def validate(cfg, shards: dict[int, Path], link: Link, workdir: Path, threads_per_worker: int,
             allreduce_link: Link | None = None) -> list[dict]:
    """Measured (measure_step, real workers under train.launcher) against predicted step
    time for the default and FC-heavy models, lazy update on and off, at each of scaling.np.
    Each point's profile (host_profile: its n workers' computation, at once, with that update)
    is taken right before its measurement, so both see the same machine."""
    pc, rows = cfg.perfmodel, []
    hw = local_hardware(link, max(cfg.scaling.np), allreduce_link)
    for name in ("default", "fc_heavy"):
        mcfg, res = model_variant(cfg, name)
        mcfg = dataclasses.replace(mcfg, scaling=dataclasses.replace(
            mcfg.scaling, resolution=res, batch_size=pc.validation_batch_size))
        for lazy in (True, False):
            lcfg = dataclasses.replace(mcfg, train=dataclasses.replace(mcfg.train, lazy_update=lazy))
            for n in cfg.scaling.np:
                # n pinned workers' computation, profiled at once right before their steps are
                # measured: what they cost each other on the shared host (at np=2 on 2 cores
                # the default model's compute grew 10-15 % over one worker alone), and with
                # split FC rank 0's shard of the head on the global batch
                prof, head = validation_profile(lcfg, shards[res], res, pc.validation_batch_size,
                                                pc.profile_steps, n=n, repeats=pc.profile_repeats)
                m = measure_step(lcfg, n, shards=shards[res], workdir=workdir, steps=pc.validation_steps,
                                 warmup_steps=pc.validation_warmup_steps, threads_per_worker=threads_per_worker)
                # deepimage.bench.timed_steps times steady-state steps: lazy updates wait in
                # the next forward (flushed once after the last step, outside the timed steps).
                p = step_time(prof, n, hw, lazy=lazy, split_fc=cfg.train.split_fc, head=head)
                rows.append({"np": n, "config": f"{name}/{'lazy' if lazy else 'sync'}", "model": name,
                             "lazy": lazy, "resolution": res, "measured_s": m["step_s"],
                             "predicted_s": p.total, "error": p.total / m["step_s"] - 1,
                             "measured_split": m["split"], "predicted_split": dataclasses.asdict(p),
                             "profile_flops_per_s": measured_flops(prof)})
    return rows


def library_allreduce(sweep: dict) -> tuple[Link | None, list[dict]]:
    """The fit of torch.distributed's all-reduce (transport.allreduce on CPU) from the sweep's
    "torch" times, when the sweep has them."""
    times = (sweep.get("median_s") or {}).get("torch")
    if not times or len(times) < 2:
        return None, []
    return fit_plain([{"bytes": s * 2**20, "seconds": t} for s, t in zip(sweep["sizes_mib"], times)])


def run_stage(cfg, scaling: dict, shards_root: Path, threads: int, workdir: Path) -> dict:
    """Fit, validate, project: perfmodel.json's content."""
    sweep = scaling.get("allreduce") or {}
    if not sweep.get("points"):
        raise PerfModelError("perfmodel: the scaling stage's output has no butterfly sweep "
                             "(allreduce.points): set scaling.allreduce_mib > 0 and np up to >= 2")
    link, fit = fit_link(sweep["points"], sweep["np"])
    allreduce_link, allreduce_fit = library_allreduce(sweep)
    per_worker = threads // max(cfg.scaling.np)
    resolutions = {model_variant(cfg, name)[1] for name in ("default", "fc_heavy")}
    shards = {r: shards_root / str(r) / "train" for r in resolutions}
    # The step's small all-reduces are charged on the butterfly's fit: the library fit's latency
    # (extrapolated from 0.25-16 MiB sweep points down to 8-byte to 512-KiB messages) moved from
    # 0.3 to 12 ms a step between quiet runs while the measured np=2 comm_wait stayed 2-7 ms.
    validation = validate(cfg, shards, link, workdir, per_worker)
    hardware = [load_hardware(h) for h in cfg.perfmodel.hardware]
    # the default model's one-worker profile, taken for the validation (no second profile)
    here_flops = next(v["profile_flops_per_s"] for v in validation if v["model"] == "default")
    default_lazy = [v for v in validation if v["config"] == "default/" + ("lazy" if cfg.train.lazy_update else "sync")]
    one = next(v["predicted_s"] for v in default_lazy if v["np"] == min(cfg.scaling.np))
    return {"link": dataclasses.asdict(link), "link_fit": fit,
            "allreduce_link": allreduce_link and dataclasses.asdict(allreduce_link),
            "allreduce_link_fit": allreduce_fit, "sweep_np": sweep["np"], "tolerance": cfg.perfmodel.tolerance,
            "validation": validation, "projection": projection.project(cfg, hardware),
            # weak scaling: efficiency(N) = T(1) / T(N), the predicted steps of the default model
            "this_host": [{"np": v["np"], "efficiency": one / v["predicted_s"]} for v in default_lazy],
            "this_host_flops_per_s": here_flops, "validation_batch": cfg.perfmodel.validation_batch_size,
            "hardware": [hardware_summary(h, here_flops) for h in hardware],
            "paper_model": f"conv {PAPER['conv']}, fc_hidden {PAPER['fc_hidden']}, {PAPER['num_classes']} classes",
            "projection_batch": cfg.perfmodel.batch_size,
            "fc_heavy": {**FC_HEAVY, "resolution": model_variant(cfg, "fc_heavy")[1]}}


def profile_main(argv: list[str]) -> None:
    """`python -m deepimage.perfmodel profile`: one worker's profile of the paper's model (the
    projection's compute), written for a hardware file's `profile:` key."""
    p = argparse.ArgumentParser(prog="python -m deepimage.perfmodel profile",
                                description="Profile one worker (e.g. one GPU) on the paper's model for the "
                                            "projection.")
    p.add_argument("--device", default="cuda", help="torch device of the worker (default cuda)")
    p.add_argument("--bf16", action="store_true", help="train.bf16: bf16 autocast of the forward")
    p.add_argument("--resolutions", type=int, nargs="+", default=None, help="default perfmodel.resolutions")
    p.add_argument("--batch", type=int, default=None, help="images per worker (default perfmodel.batch_size)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--out", required=True, help="the profile file (JSON), e.g. deepimage/hardware/h100_profile.json")
    a = p.parse_args(argv)
    cfg = Config.from_dict({"train": {"bf16": a.bf16}})
    dev = torch.device(a.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        sys.exit("perfmodel profile: --device cuda but torch.cuda.is_available() is False (no GPU visible)")
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True
    spec, batch = projection.paper_spec(), a.batch or cfg.perfmodel.batch_size
    out = {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu", "torch": torch.__version__,
           "bf16": a.bf16, "batch": batch, "bucket_mib": cfg.train.bucket_mib, "model": spec.to_dict(),
           "steps": a.steps, "date": time.strftime("%Y-%m-%d"), "flops_per_s": {}, "profiles": {}}
    for res in a.resolutions or cfg.perfmodel.resolutions:
        prof = profile(cfg, spec, batch, res, steps=a.steps, device=a.device)
        out["profiles"][str(res)] = dataclasses.asdict(prof)
        out["flops_per_s"][str(res)] = measured_flops(prof)
        print(f"{res} px, {batch} images: forward {prof.forward_s * 1e3:.1f} ms, backward "
              f"{prof.backward_s * 1e3:.1f} ms, optimizer {prof.optimizer_s * 1e3:.1f} ms, "
              f"{measured_flops(prof) / 1e12:.1f} TFLOP/s")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=1) + "\n")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["profile"]:
        return profile_main(argv[1:])

    p = argparse.ArgumentParser(prog="python -m deepimage.perfmodel", description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, required=True, help="cores this job may use")
    p.add_argument("--scaling", required=True, help="the scaling stage's scaling.json (sweep, measured rows)")
    p.add_argument("--shards", required=True, help="folder of <resolution>/train shard folders")
    p.add_argument("--out", required=True, help="perfmodel.json")
    p.add_argument("--plots", required=True, help="folder for the plots")
    p.add_argument("--report-md", required=True, help="the report's section (markdown)")
    config.add_argument(p, "seed, resolutions, train, model, scaling and perfmodel")
    tracking.add_args(p)
    args = p.parse_args(argv)
    try:
        cfg = config.from_args(args)
        scaling = json.loads(Path(args.scaling).read_text())
    except (config.ConfigError, OSError, ValueError) as e:
        sys.exit(f"perfmodel: {e}")
    if max(cfg.scaling.np) > args.threads:
        sys.exit(f"perfmodel: scaling.np up to {max(cfg.scaling.np)} needs that many cores, "
                 f"this job has {args.threads}")
    params = {"perfmodel": cfg.perfmodel, "scaling_np": cfg.scaling.np, "launcher": cfg.train.launcher}
    with tracking.stage_run(args, "perfmodel", params) as run, tempfile.TemporaryDirectory() as tmp:
        try:
            result = run_stage(cfg, scaling, Path(args.shards), args.threads, Path(tmp))
        except (PerfModelError, ValueError, OSError) as e:
            sys.exit(f"perfmodel: {e}")
        write_json(args.out, result)
        paths = plot(result, scaling.get("rows", []), Path(args.plots))
        Path(args.report_md).write_text("\n".join(report_lines(result)) + "\n")
        log_result(run, result, [Path(args.out), Path(args.report_md), *paths])
    for v in result["validation"]:
        print(f"{v['config']} np={v['np']}: measured {v['measured_s'] * 1e3:.1f} ms, predicted "
              f"{v['predicted_s'] * 1e3:.1f} ms ({v['error']:+.1%})")

