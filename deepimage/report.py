"""results/report.md: the paper-style error table, the scaling table, plots and MLflow run ids.

    python -m deepimage.report --ensemble results/ensemble/metrics.json \
        --scaling results/scaling/scaling.json --train-metrics results/train/*/metrics.json \
        --run-records results/*/mlflow_run.json --out results/report.md --plots results/report \
        --error-table results/report/errors.html
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

import yaml

from deepimage import tracking

# Deep Image (arXiv 1501.02876), ImageNet 2012 validation, top-5 error.
PAPER = {"low": ("256 x 256", 0.0796), "high": ("512 x 512", 0.0742), "ensemble": ("average of both", 0.0697)}
# The multi-seed study's recorded per-seed errors (deepimage.bench.multiscale's output, README: Multi-scale).
MEASURED = Path(__file__).resolve().parent / "bench" / "recipes" / "measured.yaml"


def pct(x: float) -> str:
    return f"{100 * x:.2f} %"


def error_table(ens: dict) -> list[str]:
    res = sorted(ens["models"], key=int)
    rows = ["| model | top-1 error | top-5 error | paper, top-5 (ImageNet) |", "| --- | --- | --- | --- |"]
    for i, r in enumerate(res):
        m = ens["models"][r]
        paper = PAPER["low"] if i == 0 else PAPER["high"] if i == len(res) - 1 else None
        rows.append(f"| {r} x {r} | {pct(m['top1_error'])} | {pct(m['top5_error'])} | "
                    f"{f'{paper[0]}: {pct(paper[1])}' if paper else '-'} |")
    e = ens["ensemble"]
    rows.append(f"| average of {len(res)} resolutions | {pct(e['top1_error'])} | {pct(e['top5_error'])} | "
                f"{PAPER['ensemble'][0]}: {pct(PAPER['ensemble'][1])} |")
    return rows


def multiscale_lines(ens: dict, train: list[dict]) -> list[str]:
    """The per-resolution recipe of this run and, for each of the paper's two multi-scale
    claims, whether this run shows it (one run, one seed: the seed spread is in the README)."""
    recipe = [f"{t['resolution']} px: " + (f"warm start from {t['init_from']}, " if t.get("init_from") else "from scratch, ")
              + f"{t['epochs']} epochs" + (f", peak lr {t['lr']:g}" if "lr" in t else "") for t in train]
    res = sorted(ens["models"], key=int)
    lo, hi = ens["models"][res[0]]["top1_error"], ens["models"][res[-1]]["top1_error"]
    ens1, best = ens["ensemble"]["top1_error"], min(m["top1_error"] for m in ens["models"].values())
    says = lambda ok: "holds in this run" if ok else "does not hold in this run"
    return ["Recipe: " + "; ".join(recipe) + " (train.per_resolution).", "",
            f"- Higher resolution beats lower (paper: 7.96 -> 7.42 % top-5): {says(hi < lo)}, "
            f"{res[-1]} px {pct(hi)} vs {res[0]} px {pct(lo)} top-1 ({100 * (lo - hi):+.2f} points).",
            f"- The average beats every single model (paper: 7.42 -> 6.97 %): {says(ens1 < best)}, "
            f"{pct(ens1)} vs the best model's {pct(best)} top-1 ({100 * (best - ens1):+.2f} points).",
            "- One seed: whether a gap exceeds the seed-to-seed spread is measured by "
            "`python -m deepimage.bench.multiscale` (below and README, Multi-scale).", ""]


def sample_sd(values: list[float]) -> float:
    """Sample sd over seeds (n - 1), as every multi-seed figure quotes it; 0 for one seed."""
    return statistics.stdev(values) if len(values) > 1 else 0.0


def paired(per_seed: dict[int, dict]) -> dict:
    """Paired gaps in top-1 error per seed, positive when the claim holds: `ensemble`, best single
    model minus the average; `resolution`, lowest minus highest resolution. Each gap beats the
    spread (a) when every seed's gap is > 0 and the mean gap > 2 sd of the gap, and (b) when the
    mean gap > every single model's sd of its error over the seeds. sd: sample sd (n - 1), 0 for
    one seed. When every seed has the benchmark's `errors`, `ensemble_best_weight` is the ensemble
    gap of the best fixed weight of the two members (picked on val: a bound on what reweighting
    could reach, not a claim), under the same criteria."""
    runs = list(per_seed.values())
    res = sorted((k for k in runs[0] if k.isdigit()), key=int)
    best = [min(r[m]["top1_error"] for m in res) for r in runs]
    gaps = {"ensemble": [b - r["ensemble"]["top1_error"] for b, r in zip(best, runs)],
            "resolution": [r[res[0]]["top1_error"] - r[res[-1]]["top1_error"] for r in runs]}
    if all("best_weight_wrong" in r.get("errors", {}) for r in runs):
        gaps["ensemble_best_weight"] = [b - r["errors"]["best_weight_wrong"] / r["errors"]["val"]
                                        for b, r in zip(best, runs)]
    model_sd = {m: sample_sd([r[m]["top1_error"] for r in runs]) for m in res + ["ensemble"]}
    out = {"model_sd": model_sd}
    for name, g in gaps.items():
        mean = statistics.fmean(g)
        out[name] = {"per_seed": g, "mean": mean, "sd": sample_sd(g),
                     "beats_paired_spread": all(x > 0 for x in g) and mean > 2 * sample_sd(g),
                     "beats_model_spread": all(mean > v for m, v in model_sd.items() if m != "ensemble")}
    return out


def _claim(gap: dict, n: int) -> str:
    """One claim on one set: reproduced or not, by how much, against both spread criteria."""
    wins = sum(g > 0 for g in gap["per_seed"])
    both = gap["beats_paired_spread"] and gap["beats_model_spread"]
    verdict = ("reproduced" if both else "not reproduced" if gap["mean"] <= 0 or wins < n / 2
               else "in the paper's direction but not beyond the seed spread")
    return (f"{verdict}: {100 * gap['mean']:+.2f} points (sd {100 * gap['sd']:.2f}), in {wins} of {n} seeds; "
            f"beats the paired spread: {'yes' if gap['beats_paired_spread'] else 'no'}, each model's spread: "
            f"{'yes' if gap['beats_model_spread'] else 'no'}")


def _control(c: dict, res: list[str]) -> str:
    """One set's seed-pair control (deepimage.bench.multiscale.seed_control) in one sentence: the
    two-resolution average against the better resolution's average of two training seeds (and,
    with 4+ seeds, two models per resolution against four of the better resolution). "Lower" or
    "higher" only when the means differ by more than the sd of the seed averages they are held
    against; otherwise "within the spread of"."""
    mean = lambda key: statistics.fmean(c[key])

    def against(mine: str, other: str) -> str:
        diff, sd = mean(other) - mean(mine), sample_sd(c[other])
        word = "lower than" if diff > sd else "higher than" if diff < -sd else "within the spread of"
        return f"{pct(mean(mine))}, {word} {pct(mean(other))} (sd {100 * sd:.2f}, {len(c[other])} averages)"
    lo, hi = res[0], res[-1]
    best = min(lo, hi, key=lambda r: mean(f"same_{r}"))
    text = (f"the average of {lo} and {hi} px ({len(c['mixed'])} seeds) {against('mixed', f'same_{best}')} "
            f"of two {best} px models of different training seeds")
    if "mixed_x2" in c:
        best4 = min(lo, hi, key=lambda r: mean(f"same_{r}_x4"))
        gain = c["mixed_x2_gain"]
        text += (f"; two models of each resolution {against('mixed_x2', f'same_{best4}_x4')} of four {best4} px "
                 f"models, and beat their best member by {100 * statistics.fmean(gain):+.2f} points "
                 f"(sd {100 * sample_sd(gain):.2f})")
    return text


def study_lines(measured: dict) -> list[str]:
    """The multi-seed study beside the paper: one column per dataset (mean top-1 (sd); top-5 over
    the seeds) and, per claim and dataset, one sentence saying whether it was reproduced."""
    sets = measured["sets"]
    runs = [{int(k): {m: {"top1_error": v[0], "top5_error": v[1]} for m, v in r.items()}
             for k, r in st["per_seed"].items()} for st in sets]
    res = sorted((k for k in next(iter(runs[0].values())) if k != "ensemble"), key=int)
    head = " | ".join(f"{st['name']} ({st['val_images']} val, {len(r)} seeds)" for st, r in zip(sets, runs))
    rows = [f"| model | {head} | paper, top-5 (ImageNet) |", "| --- " * (len(sets) + 2) + "|"]
    for model, role in ((res[0], "low"), (res[-1], "high"), ("ensemble", "ensemble")):
        cells = []
        for r in runs:
            t1, t5 = ([x[model][m] for x in r.values()] for m in ("top1_error", "top5_error"))
            sd = sample_sd(t1)
            cells.append(f"{pct(statistics.fmean(t1))} (sd {100 * sd:.2f}); top-5 {pct(statistics.fmean(t5))}")
        name = "average of both" if model == "ensemble" else f"{model} x {model}"
        rows.append(f"| {name} | " + " | ".join(cells) + f" | {PAPER[role][0]}: {pct(PAPER[role][1])} |")
    claims = []
    for key, text in (("resolution", f"Higher resolution beats lower (paper: {pct(PAPER['low'][1])} -> "
                                     f"{pct(PAPER['high'][1])} top-5)"),
                      ("ensemble", f"The average beats every single model (paper: {pct(PAPER['high'][1])} -> "
                                   f"{pct(PAPER['ensemble'][1])})")):
        claims.append(f"- {text}:")
        claims += [f"  - {st['name']}: {_claim(paired(r)[key], len(r))}" + (f" ({st['note']})." if st.get("note") else ".")
                   for st, r in zip(sets, runs)]
    controls = [f"  - {st['name']}: {_control(st['seed_control'], res)}." for st in sets if st.get("seed_control")]
    if controls:  # a second model of any kind also helps: is the gain the resolutions' own?
        claims += ["- Control for the average (the same set and models; pairs share seeds, so their spread "
                   "is not that of independent runs):", *controls]
    return ["## Multi-scale over seeds (measured by the benchmark, not this run)", "",
            f"Top-1 error, mean over seeds (sample sd); {measured['recipe']}. Per-seed errors and commands: "
            f"`deepimage/bench/recipes/measured.yaml` (README, Multi-scale recipes). Gaps are paired per seed, "
            "in points, positive when the claim holds; beyond the spread means every seed's gap > 0 and the "
            "mean > 2 sd of the gap (paired), and the mean > each single model's sd over seeds.", "",
            *rows, "", *claims, ""]


def error_table_html(ens: dict) -> str:
    """The paper-style error table as a standalone HTML page (the Snakemake report embeds it)."""
    import html

    cell = lambda tag, c: f"<{tag}>{html.escape(c)}</{tag}>"

    def table(lines: list[str]) -> str:
        rows = [[c.strip() for c in line.strip("|").split("|")] for line in lines]
        head, body = rows[0], rows[2:]  # rows[1] is Markdown's | --- | line
        return (f"<table>\n<tr>{''.join(cell('th', c) for c in head)}</tr>\n"
                + "".join(f"<tr>{''.join(cell('td', c) for c in r)}</tr>\n" for r in body) + "</table>\n")
    study = ""
    if MEASURED.is_file():  # the multi-seed study: its table, then its claims as nested lists
        lines = study_lines(yaml.safe_load(MEASURED.read_text()))
        claims = "".join(f"<li>{html.escape(x[2:])}</li>" if x.startswith("- ") else
                         f"<ul><li>{html.escape(x[4:])}</li></ul>" for x in lines if x.lstrip().startswith("- "))
        study = (f"<h3>{html.escape(lines[0].lstrip('# '))}</h3>\n<p>{html.escape(lines[2])}</p>\n"
                 + table([x for x in lines if x.startswith("|")]) + f"<ul>{claims}</ul>\n")
    return ("<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>Error rates</title><style>"
            "body{font-family:sans-serif}table{border-collapse:collapse}"
            "th,td{border:1px solid #bbb;padding:4px 10px;text-align:right}th{background:#eee}"
            "td:first-child{text-align:left}</style></head><body>\n"
            f"<p>Validation set: {ens['samples']} images.</p>\n" + table(error_table(ens)) + study
            + "</body></html>\n")


SPLIT = ("compute", "comm_wait", "data", "other")  # scaling.json rows' "split" (seconds per step)


def scaling_rows(sc: dict) -> list[str]:
    """The measured scaling table, with each step's time split (ms, mean per step and rank)."""
    rows = ["| workers | images/s | speed-up | scaling efficiency | median step | "
            + " | ".join(SPLIT) + " | cores per rank |",
            "| --- " * (6 + len(SPLIT)) + "|"]
    for r in sc["rows"]:
        split = r.get("split") or {}
        parts = " | ".join(f"{1000 * split[k]:.1f} ms" if k in split else "-" for k in SPLIT)
        cores = " ".join(",".join(map(str, c)) for c in r.get("cores", [])) or "-"
        rows.append(f"| {r['np']} | {r['images_per_s']:.1f} | {r['speedup']:.2f}x | "
                    f"{100 * r['efficiency']:.1f} % | {1000 * r['median_step_s']:.1f} ms | {parts} | {cores} |")
    return rows + ["", "Measured, not predicted. The split is the compute thread's time per step "
                   "(mean over the timed steps and the ranks): compute (forward, backward, optimizer), "
                   "comm_wait (blocked on communication), data (the next batch), other (the rest)."
                   + (" Each worker pinned to its cores." if sc.get("pinned") else "")]


def allreduce_lines(sc: dict) -> list[str]:
    """The scaling stage's all-reduce comparison, if it ran one."""
    ar = sc.get("allreduce") or {}
    ar = ar.get("figures", ar)  # {"np", "method", "points", "figures"}; flat in older files
    prefix = "allreduce_ms_"
    times = {k[len(prefix):].rsplit("_", 1)[0]: v for k, v in ar.items() if k.startswith(prefix)}
    if not times:
        return []
    size = next(k for k in ar if k.startswith("allreduce_ms_")).rsplit("_", 1)[1]
    lines = [f"All-reduce of {size} on {sc['rows'][-1]['np']} workers (median):", "",
             "| method | time |", "| --- | --- |"]
    lines += [f"| {m} | {t:.1f} ms |" for m, t in sorted(times.items(), key=lambda kv: kv[1])]
    return lines + [""]


def plot(train: list[dict], sc: dict | None, folder: Path) -> list[Path]:
    """loss.png (loss per epoch, each resolution) and, with the scaling study's output,
    scaling.png (throughput, efficiency)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(1, 2, figsize=(9, 3.5))
    for t in train:
        ax[0].plot(range(1, len(t["history"]["loss"]) + 1), t["history"]["loss"], marker="o", label=f"{t['resolution']} px")
        line, = ax[1].plot(range(1, len(t["history"]["loss"]) + 1), [100 * e for e in t["history"]["train_top1_error"]],
                           marker="o", label=f"{t['resolution']} px train")
        if t["history"].get("val_top1_error"):
            ax[1].plot(range(1, len(t["history"]["val_top1_error"]) + 1), [100 * e for e in t["history"]["val_top1_error"]],
                       "--", marker="s", color=line.get_color(), label=f"{t['resolution']} px val")
    ax[0].set(xlabel="epoch", ylabel="training loss", title="Loss")
    ax[1].set(xlabel="epoch", ylabel="top-1 error (%)", title="Top-1 error")
    for a in ax:
        a.legend(), a.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(folder / "loss.png", dpi=110)
    plt.close(fig)
    if sc is None:
        return [folder / "loss.png"]
    nps = [r["np"] for r in sc["rows"]]
    fig, ax = plt.subplots(1, 2, figsize=(9, 3.5))
    ax[0].plot(nps, [r["images_per_s"] for r in sc["rows"]], marker="o", label="measured")
    ax[0].plot(nps, [sc["rows"][0]["images_per_s"] * n / nps[0] for n in nps], "--", label="linear")
    ax[0].set(xlabel="workers", ylabel="images/s", title="Training throughput", xticks=nps)
    ax[1].bar([str(n) for n in nps], [100 * r["efficiency"] for r in sc["rows"]])
    ax[1].set(xlabel="workers", ylabel="scaling efficiency (%)", ylim=(0, 110), title="Scaling efficiency")
    ax[0].legend(), ax[0].grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(folder / "scaling.png", dpi=110)
    plt.close(fig)
    return [folder / "loss.png", folder / "scaling.png"]


def robustness_section(result: dict, json_path: str, out: str) -> str:
    """deepimage.robustness's table and plot, the plot linked relative to the report."""
    from deepimage.robustness import report_section

    png = Path(json_path).with_name("robustness.png")
    return report_section(result, os.path.relpath(png, Path(out).parent))


def perfmodel_section(md_path: str, out: str) -> str:
    """The predict_scaling stage's section (deepimage.perfmodel.report_lines) and its plots, which
    lie beside it, linked relative to the report."""
    folder = Path(md_path).resolve().parent
    rel = os.path.relpath(folder, Path(out).resolve().parent)
    plots = [f"![{name}]({Path(rel, name).as_posix()}.png)" for name in
             ("perfmodel_efficiency", "perfmodel_validation", "perfmodel_projection")]
    return Path(md_path).read_text() + "\n" + "\n\n".join(plots) + "\n"


def runs_table(records: list[dict]) -> list[str]:
    rows = ["| stage | run name | MLflow run id |", "| --- | --- | --- |"]
    rows += [f"| {r['stage']} | {r['run_name']} | `{r['run_id']}` |" for r in records]
    return rows


def scaling_section(sc: dict | None, plot_path: str | None) -> list[str]:
    """The scaling study's table, all-reduce lines and plot; nothing when it did not run."""
    if sc is None:
        return []
    return ["## Scaling", "", f"Weak scaling: {sc['rows'][0]['per_worker_batch']} images per worker per step, "
            f"{sc['threads_per_worker']} compute thread(s) per worker.", "", *scaling_rows(sc), "",
            *allreduce_lines(sc), f"![scaling]({plot_path})", ""]


def write_report(ens: dict, sc: dict | None, train: list[dict], records: list[dict], out: Path, plots: list[Path],
                 sections: list[str] = ()) -> str:
    """The report's Markdown; `sections` (ready Markdown, e.g. robustness) go before the run ids."""
    rel = lambda p: Path(p).resolve().relative_to(out.parent.resolve()).as_posix()
    uri = records[0]["tracking_uri"] if records else tracking.DEFAULT_URI
    lines = ["# Deep Image reproduction: report", "",
             f"Validation set: {ens['samples']} images. Errors are fractions of the validation set; the paper's "
             "figures (ImageNet 2012 validation, 256 and 512 px) are shown beside ours for the same role "
             "(lowest and highest resolution, and their average).", "",
             "## Error rates", "", *error_table(ens), "", *multiscale_lines(ens, train),
             *(study_lines(yaml.safe_load(MEASURED.read_text())) if MEASURED.is_file() else []),
             "## Training", "", "| resolution | workers | epochs | final loss | final train top-1 error | images/s | wall time |",
             "| --- | --- | --- | --- | --- | --- | --- |",
             *[f"| {t['resolution']} px | {t['np']} ({t['launcher']}) | {t['epochs']} | {t['final_loss']:.3f} | "
               f"{pct(t['final_train_top1_error'])} | {t['images_per_s']:.1f} | {t['train_seconds']:.0f} s |" for t in train],
             "", f"![loss]({rel(plots[0])})", "",
             *scaling_section(sc, rel(plots[1]) if sc is not None else None), *sections,
             "## MLflow runs", "", f"Store: `{uri}`, open it with `mlflow ui --backend-store-uri {uri}`, then "
             f"http://127.0.0.1:5000/#/experiments/{records[0]['experiment_id'] if records else '0'}/runs"
             "?workflowType=machine_learning (the runs table; MLflow 3.17 opens GenAI pages otherwise).", "",
             *runs_table(records), ""]
    text = "\n".join(lines)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    return text


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ensemble", required=True)
    p.add_argument("--scaling", default=None, help="scaling.json of the scaling study, when it ran")
    p.add_argument("--train-metrics", nargs="+", required=True)
    p.add_argument("--run-records", nargs="*", default=[])
    p.add_argument("--out", required=True)
    p.add_argument("--plots", required=True, help="folder for the PNG plots")
    p.add_argument("--robustness", default=None,
                   help="robustness.json of the robustness stage (its robustness.png beside it)")
    p.add_argument("--error-table", default=None, help="also write the error table here as HTML")
    p.add_argument("--perfmodel", default=None,
                   help="perfmodel.md of the predict_scaling stage (its plots beside it)")
    tracking.add_args(p)
    args = p.parse_args(argv)
    load = lambda f: json.loads(Path(f).read_text())
    try:
        ens = load(args.ensemble)
        sc = load(args.scaling) if args.scaling else None
        train = sorted((load(f) for f in args.train_metrics), key=lambda t: t["resolution"])
        records = [load(f) for f in args.run_records]
        sections = [robustness_section(load(args.robustness), args.robustness, args.out)] if args.robustness else []
        if args.perfmodel:
            sections.append(perfmodel_section(args.perfmodel, args.out))
    except (OSError, json.JSONDecodeError, KeyError) as e:
        sys.exit(f"report: cannot read an input: {e}")
    with tracking.stage_run(args, "report", {"inputs": [args.ensemble, *([args.scaling] if args.scaling else []), *args.train_metrics]}) as run:
        plots = plot(train, sc, Path(args.plots))
        write_report(ens, sc, train, records, Path(args.out), plots, sections)
        if args.error_table:
            Path(args.error_table).write_text(error_table_html(ens))
        for f in [Path(args.out), *plots]:
            run.log_artifact(f)
    print(f"report: wrote {args.out}")


if __name__ == "__main__":
    main()
