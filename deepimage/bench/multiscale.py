"""Per-resolution and ensemble top-1 / top-5 error over several seeds: real Snakemake runs.

    python -m deepimage.bench.multiscale --dataset synthetic --seeds 0 1 2 --json
    python -m deepimage.bench.multiscale --dataset realphoto --seeds 0 1 2 3 4 --json \
        --config recipe.yaml          # any config override, applied on top of config.yaml

For each seed a scratch folder under --workdir gets its own run of the workflow (`snakemake
--cores 2`, targets limited to results/ensemble/metrics.json: shard, train, evaluate, ensemble;
no robustness ablation, no scaling) with `seed: <seed>`. --dataset realphoto first builds the
real-photo folder of deepimage.realphoto with that seed (--rp-* options; with --rp-data-seed N
one folder drawn with N serves every seed, so the seeds vary only training, as on a fixed
benchmark) and points dataset.source at it; the defaults (24 classes = 4 neighbouring regions of each of 6
photographs on a 4 x 4 grid, crops of 35-100 % of a region's side, 128 px) make classes that
share a photograph's colours and differ in layout and fine detail. Its default size, 40 train /
200 val per class, keeps the models far from the set's floor (at 120 train per class both models
miss almost only the same near-uniform small crops, so an average has little to fix) and 4,800
val images shrink the sampling noise; `--rp-train 120 --rp-val 40` gives a smaller, easier set.
Each seed's run holds the machine-wide CPU lock (--lock) while it runs,
so seeds queue behind other people's experiments instead of sharing the cores with them. Prints
each seed's errors, then per model the mean, min-max and standard deviation over the seeds, then
the paired gaps per seed (best single model minus the average; lowest minus highest resolution)
and whether each beats the spread (see `paired`); each seed also gets `errors`, how the two
models' wrong images overlap (and, on real photos, the crop scale of those images, from the
set's crops.tsv). With --rp-data-seed (every seed's models see the same val images) it ends with
`seed_control`: the two-resolution average against averages of two (and four) training seeds of
one resolution, so that the ensemble claim's gain can be told from what any second model gives.
With --json the last line is one JSON object of all of it.
"""
from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import yaml

from deepimage.stats import paired, sample_sd

ROOT = Path(__file__).resolve().parents[2]
SNAKEMAKE = str(Path(sys.executable).with_name("snakemake"))
TARGET = "results/ensemble/metrics.json"
METRICS = ("top1_error", "top5_error")


@contextlib.contextmanager
def cpu_lock(path: str):
    """The machine-wide experiment lock (flock on `path`); no lock when path is empty."""
    if not path:
        yield
        return
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def realphoto_args(args) -> list[str]:
    """deepimage.realphoto's size options from this command's --rp-* options."""
    return ["--classes", str(args.rp_classes), "--train-per-class", str(args.rp_train),
            "--val-per-class", str(args.rp_val), "--image-size", str(args.rp_size),
            "--grid", str(args.rp_grid), "--per-photo", str(args.rp_per_photo),
            "--min-scale", str(args.rp_min_scale)]


def seed_folder(args, seed: int) -> Path:
    """One seed's scratch folder (its own with --rp-data-seed: those seeds share one set)."""
    fixed = "" if args.rp_data_seed is None else f"-data{args.rp_data_seed}"
    return Path(args.workdir).resolve() / f"{args.dataset}{fixed}-seed{seed}"


def data_folder(args, folder: Path) -> Path:
    """The real-photo folder a seed's run reads: its own (drawn with the seed), or with
    --rp-data-seed the one set every seed trains on, built once beside the seed folders (named by
    its size options too, so a --workdir can hold sets of several sizes)."""
    if args.rp_data_seed is None:
        return folder / "data"
    size = "-".join(a.removeprefix("--") if a.startswith("--") else a for a in realphoto_args(args))
    return Path(args.workdir).resolve() / f"realphoto-data{args.rp_data_seed}-{size}"


def seed_config(args, seed: int, folder: Path) -> dict:
    """The override config of one seed's run (on top of config.yaml and every --config)."""
    cfg: dict = {"seed": seed, "study": {"ablation": False},
                 "mlflow": {"tracking_uri": f"sqlite:///{folder / 'mlflow.db'}", "experiment": "multiscale"}}
    if args.dataset == "realphoto":
        cfg["dataset"] = {"source": str(data_folder(args, folder))}
    return cfg


def run_seed(args, seed: int) -> dict:
    """One seed's workflow run; {"<res>": {top1_error, top5_error}, "ensemble": {...}, "seconds"}."""
    folder = seed_folder(args, seed)
    folder.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    data = data_folder(args, folder)
    if args.dataset == "realphoto" and not data.exists():
        data_seed = seed if args.rp_data_seed is None else args.rp_data_seed
        subprocess.run([sys.executable, "-m", "deepimage.realphoto", "--out", str(data),
                        "--seed", str(data_seed), *realphoto_args(args)], check=True, env=env)
    (folder / "seed.yaml").write_text(yaml.safe_dump(seed_config(args, seed, folder)))
    configs = [str(Path(c).resolve()) for c in args.config] + [str(folder / "seed.yaml")]
    cmd = [SNAKEMAKE, "--snakefile", str(ROOT / "Snakefile"), "--directory", str(folder),
           "--cores", str(args.cores), "--configfile", *configs, "--", TARGET]
    with cpu_lock(args.lock):  # the test-resolution forwards too: they are part of the measurement
        start = time.perf_counter()
        r = subprocess.run(cmd, capture_output=True, text=True, env=env)
        seconds = time.perf_counter() - start
        if r.returncode != 0:
            raise RuntimeError(f"seed {seed}: snakemake failed in {folder} (exit {r.returncode}):\n{r.stderr[-3000:]}")
        result = json.loads((folder / TARGET).read_text())
        out = {res: {m: v[m] for m in METRICS} for res, v in result["models"].items()}
        out["ensemble"] = {m: result["ensemble"][m] for m in METRICS}
        out["seconds"] = seconds
        if args.test_res:
            out["test_res"] = test_resolutions(folder, sorted(int(r) for r in result["models"]))
    out["errors"] = error_overlap(folder, sorted(int(r) for r in result["models"]), data)
    return out


def _wrong(folder: Path, res: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(sample_ids, labels, top-1 predictions, probs) of one model's val posteriors, in id order."""
    with np.load(folder / f"results/evaluate/{res}/posteriors.npz") as z:
        order = np.argsort(z["sample_ids"])
        probs = z["probs"][order]  # (N, K)
        return z["sample_ids"][order], z["labels"][order], probs.argmax(1), probs


def _val_scales(folder: Path, data: Path, res: int, ids: np.ndarray) -> np.ndarray | None:
    """Each val sample's crop scale (data/crops.tsv), in `ids` order; None when the set has none."""
    import pyarrow as pa

    crops = data / "crops.tsv"
    if not crops.is_file():
        return None
    rows = (line.split("\t") for line in crops.read_text().splitlines()[1:])
    scale = {f[2].removeprefix("val/"): float(f[7]) for f in rows if f[0] == "val"}
    by_id = {}
    for shard in sorted((folder / f"results/shards/{res}/val").glob("shard-*.arrow")):
        t = pa.ipc.open_file(str(shard)).read_all()
        by_id.update(zip(t.column("sample_id").to_pylist(), t.column("path").to_pylist()))
    return np.array([scale[by_id[int(i)]] for i in ids])


def error_overlap(folder: Path, resolutions: list[int], data: Path) -> dict:
    """How the lowest and highest resolution's top-1 errors overlap (counts of val images), and on
    real photos the crop scales of the images both miss against all val images'. An average of
    the two can only fix images that one model gets right: `only_low_wrong` bounds its gain over
    the high-resolution model, `only_high_wrong` over the low one. `best_weight_wrong` is the
    fewest images any fixed-weight average w * low + (1 - w) * high misses (w in steps of 1/40,
    at `best_weight`); it is picked on val itself, so it is a bound on what reweighting the two
    members could gain, not a result."""
    lo, hi = resolutions[0], resolutions[-1]
    ids, labels, p_lo, probs_lo = _wrong(folder, lo)
    _, _, p_hi, probs_hi = _wrong(folder, hi)
    w_lo, w_hi = p_lo != labels, p_hi != labels
    w_ens = (probs_lo + probs_hi).argmax(1) != labels
    both = w_lo & w_hi
    out = {"val": int(len(ids)), "both_wrong": int(both.sum()), "both_same_class": int((both & (p_lo == p_hi)).sum()),
           "only_low_wrong": int((w_lo & ~w_hi).sum()), "only_high_wrong": int((~w_lo & w_hi).sum()),
           "ensemble_wrong": int(w_ens.sum())}
    weights = np.linspace(0.0, 1.0, 41)  # holds 0, 0.5 and 1: each model alone and the plain average
    wrong = [int(((w * probs_lo + (1 - w) * probs_hi).argmax(1) != labels).sum()) for w in weights]
    out["best_weight"], out["best_weight_wrong"] = float(weights[int(np.argmin(wrong))]), min(wrong)
    scales = _val_scales(folder, data, lo, ids)
    if scales is not None:
        out["scale_median_all"] = float(np.median(scales))
        out["scale_median_both_wrong"] = float(np.median(scales[both])) if both.any() else None
        out["under_half_all"] = float((scales < 0.5).mean())  # fraction of val crops below half the region
        out["under_half_both_wrong"] = float((scales[both] < 0.5).mean()) if both.any() else None
    return out


def seed_control(folders: dict[int, Path], resolutions: list[int]) -> dict | None:
    """The ensemble claim's control, for seeds that share one set (--rp-data-seed): does
    averaging two resolutions beat averaging two training seeds of one resolution? Top-1 errors:
    `mixed`, per seed, the plain average of the lowest and highest resolution (the workflow's
    ensemble); `same_<res>`, per pair of seeds, the average of that resolution's two models; with
    4 or more seeds `mixed_x2`, per pair of seeds s < t, the average of the four models (low s,
    low t, high s, high t), `mixed_x2_gain` its best member's error minus its own, and
    `same_<res>_x4`, per set of four seeds, the average of that resolution's four models. Pairs
    share seeds, so their sds are not independent draws. None for fewer than 2 seeds."""
    import itertools

    from deepimage.ensemble import align, load_posteriors

    seeds = sorted(folders)
    if len(seeds) < 2:
        return None
    lo, hi = resolutions[0], resolutions[-1]
    files = {(res, s): str(folders[s] / f"results/evaluate/{res}/posteriors.npz") for s in seeds for res in (lo, hi)}
    _, labels, probs = align({f: load_posteriors(f) for f in files.values()})  # raises naming the file
    p = {key: probs[f] for key, f in files.items()}
    err = lambda *keys: float((sum(p[k] for k in keys).argmax(1) != labels).mean())
    pairs = list(itertools.combinations(seeds, 2))
    out = {"seeds": seeds, "pairs": [list(st) for st in pairs],
           "mixed": [err((lo, s), (hi, s)) for s in seeds]}
    out.update({f"same_{res}": [err((res, s), (res, t)) for s, t in pairs] for res in (lo, hi)})
    if len(seeds) >= 4:
        out["mixed_x2"] = [err((lo, s), (lo, t), (hi, s), (hi, t)) for s, t in pairs]
        out["mixed_x2_gain"] = [min(err(m) for m in ((lo, s), (lo, t), (hi, s), (hi, t))) - e
                                for (s, t), e in zip(pairs, out["mixed_x2"])]
        fours = list(itertools.combinations(seeds, 4))
        out["fours"] = [list(f) for f in fours]
        out.update({f"same_{res}_x4": [err(*((res, s) for s in f)) for f in fours] for res in (lo, hi)})
    return out


def test_resolutions(folder: Path, resolutions: list[int]) -> dict:
    """Test-time resolution ("FixRes"): each model on the val shards of every resolution at or
    above its own, centre-cropped to that resolution and to the whole stored image;
    {"<train res>@<shards res>/<crop>": {top1_error, top5_error}}. Needs nothing retrained."""
    import torch

    from deepimage.config import default
    from deepimage.data.loader import ArrowLoader
    from deepimage.evaluate import posteriors
    from deepimage.metrics import topk_error
    from deepimage.modelfile import load_checkpoint

    torch.set_num_threads(1)
    out = {}
    for res in resolutions:
        model, _ = load_checkpoint(folder / f"results/train/{res}/model.pt")
        for shards in (r for r in resolutions if r >= res):
            val = folder / f"results/shards/{shards}/val"
            stored = json.loads((val / "manifest.json").read_text())["stored_size"]
            for crop in sorted({shards, stored}):
                loader = ArrowLoader(val, batch_size=default("evaluate.batch_size"), train=False, augment=None,
                                     crop=crop)
                probs, labels, _ = posteriors(model, loader)
                out[f"{res}@{shards}/{crop}"] = {m: topk_error(probs, labels, k)
                                                 for m, k in zip(METRICS, (1, 5))}
    return out


def summarize(per_seed: dict[int, dict]) -> dict:
    """Per model and metric: mean, min, max, std (sample sd over the seeds, n - 1, as the README
    and paired() quote it; 0 for one seed) of the errors."""
    models = [k for k in next(iter(per_seed.values())) if k not in ("seconds", "test_res", "errors")]
    summary = {}
    tests = {f"test_res {k}": [r["test_res"][k] for r in per_seed.values()]
             for k in next(iter(per_seed.values())).get("test_res", {})}
    for model in models + list(tests):
        summary[model] = {}
        for m in METRICS:
            values = tests[model] if model in tests else [r[model] for r in per_seed.values()]
            values = [v[m] for v in values]
            summary[model][m] = {"mean": statistics.fmean(values), "min": min(values), "max": max(values),
                                 "std": sample_sd(values)}
    return summary


def print_table(per_seed: dict[int, dict], summary: dict, gaps: dict) -> None:
    """One line per seed, then mean [min-max] +- std per model, then the paired gaps (errors in %)."""
    models = [m for m in summary if not m.startswith("test_res")]
    print("seed  " + "  ".join(f"{m:>19}" for m in models) + "   (top-1 / top-5 error %)")
    for seed, r in per_seed.items():
        cells = [f"{100 * r[m]['top1_error']:8.2f} / {100 * r[m]['top5_error']:6.2f}" for m in models]
        print(f"{seed:>4}  " + "  ".join(f"{c:>19}" for c in cells) + f"   {r['seconds']:.0f} s")
    for m in summary:
        t1 = summary[m]["top1_error"]
        print(f"{m:>9}: top-1 mean {100 * t1['mean']:.2f} % [{100 * t1['min']:.2f} - {100 * t1['max']:.2f}]"
              f" std {100 * t1['std']:.2f}; top-5 mean {100 * summary[m]['top5_error']['mean']:.2f} %")
    for name in (n for n in gaps if n != "model_sd"):
        g = gaps[name]
        print(f"{name} gap (points): " + " ".join(f"{100 * x:+.2f}" for x in g["per_seed"])
              + f"; mean {100 * g['mean']:+.2f} sd {100 * g['sd']:.2f}; beats paired spread "
              f"{g['beats_paired_spread']}, beats model spread {g['beats_model_spread']}")


def print_control(control: dict | None) -> None:
    """The seed-pair control's mean (sd) top-1 error per ensemble (see seed_control)."""
    if control is None:
        return
    def fmt(key: str, v: list[float]) -> str:
        mean = (f"{100 * statistics.fmean(v):+.2f} points" if key.endswith("gain")
                else f"{100 * statistics.fmean(v):.2f} %")
        return f"{key} {mean} (sd {100 * sample_sd(v):.2f}, n {len(v)})"
    print("seed control (top-1, one set): " + "; ".join(
        fmt(k, v) for k, v in control.items() if k not in ("seeds", "pairs", "fours")))


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", choices=["synthetic", "realphoto"], default="synthetic")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--config", action="append", default=[], help="extra --configfile (recipe), repeatable")
    p.add_argument("--workdir", default="results/bench/multiscale", help="scratch folders go here")
    p.add_argument("--cores", type=int, default=2)
    p.add_argument("--lock", default="/tmp/deepimage-cpu.lock", help="CPU lock file ('' = none)")
    p.add_argument("--rp-classes", type=int, default=24)
    p.add_argument("--rp-train", type=int, default=40, help="real-photo train images per class")
    p.add_argument("--rp-val", type=int, default=200, help="real-photo val images per class")
    p.add_argument("--rp-size", type=int, default=128)
    p.add_argument("--rp-grid", type=int, default=4)
    p.add_argument("--rp-per-photo", type=int, default=4)
    p.add_argument("--rp-min-scale", type=float, default=0.35)
    p.add_argument("--rp-data-seed", type=int, default=None,
                   help="every seed trains and is evaluated on the one set drawn with this seed (the seed "
                        "then varies only training, as on a fixed benchmark); default: each seed draws its own")
    p.add_argument("--test-res", action="store_true",
                   help="also each model at higher test resolutions (FixRes), no retraining")
    p.add_argument("--json", action="store_true", help="end with one JSON line of everything")
    args = p.parse_args(argv)
    if len(set(args.seeds)) != len(args.seeds):
        p.error(f"--seeds {args.seeds}: each seed once")
    for c in args.config:
        if not Path(c).is_file():
            p.error(f"--config {c}: no such file")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    per_seed = {}
    for seed in args.seeds:
        try:
            per_seed[seed] = run_seed(args, seed)
        except (RuntimeError, subprocess.CalledProcessError) as e:
            sys.exit(f"bench.multiscale: {e}")
        print(f"seed {seed}: " + json.dumps(per_seed[seed]), flush=True)
    summary, gaps = summarize(per_seed), paired(per_seed)
    print_table(per_seed, summary, gaps)
    control = None
    if args.dataset == "realphoto" and args.rp_data_seed is not None:  # one set: the val images agree
        resolutions = sorted(int(k) for k in next(iter(per_seed.values())) if k.isdigit())
        try:
            control = seed_control({s: seed_folder(args, s) for s in per_seed}, resolutions)
        except (ValueError, OSError) as e:  # posteriors of another set, or missing: name the file
            sys.exit(f"bench.multiscale: seed control: {e}")
        print_control(control)
    if args.json:
        print(json.dumps({"dataset": args.dataset, "configs": args.config, "seeds": args.seeds,
                          "realphoto": realphoto_args(args) if args.dataset == "realphoto" else None,
                          "realphoto_data_seed": args.rp_data_seed,
                          "per_seed": {str(s): r for s, r in per_seed.items()}, "summary": summary,
                          "paired": gaps, "seed_control": control}))


if __name__ == "__main__":
    main()
