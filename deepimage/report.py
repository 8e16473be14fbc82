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
import sys
from pathlib import Path

from deepimage import lineage, tracking
from deepimage.redact import redact

# Deep Image (arXiv 1501.02876), ImageNet 2012 validation, top-5 error.
PAPER = {"low": ("256 x 256", 0.0796), "high": ("512 x 512", 0.0742), "ensemble": ("average of both", 0.0697)}


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
    recipe = [f"{t['resolution']} px: "
              + (f"warm start from {t['init_from']}, " if t.get("init_from") else "from scratch, ")
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
            "`python -m deepimage.bench.multiscale` (README, Multi-scale).", ""]


def error_table_html(ens: dict) -> str:
    """The paper-style error table as a standalone HTML page (the Snakemake report embeds it)."""
    import html

    cell = lambda tag, c: f"<{tag}>{html.escape(c)}</{tag}>"

    def table(lines: list[str]) -> str:
        rows = [[c.strip() for c in line.strip("|").split("|")] for line in lines]
        head, body = rows[0], rows[2:]  # rows[1] is Markdown's | --- | line
        return (f"<table>\n<tr>{''.join(cell('th', c) for c in head)}</tr>\n"
                + "".join(f"<tr>{''.join(cell('td', c) for c in r)}</tr>\n" for r in body) + "</table>\n")
    return ("<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>Error rates</title><style>"
            "body{font-family:sans-serif}table{border-collapse:collapse}"
            "th,td{border:1px solid #bbb;padding:4px 10px;text-align:right}th{background:#eee}"
            "td:first-child{text-align:left}</style></head><body>\n"
            f"<p>Validation set: {ens['samples']} images.</p>\n" + table(error_table(ens))
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


def plot(train: list[dict], folder: Path) -> Path:
    """loss.png: loss and top-1 error per epoch, each resolution."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(1, 2, figsize=(9, 3.5))
    for t in train:
        ax[0].plot(range(1, len(t["history"]["loss"]) + 1), t["history"]["loss"], marker="o",
                   label=f"{t['resolution']} px")
        line, = ax[1].plot(range(1, len(t["history"]["loss"]) + 1), [100 * e for e in t["history"]["train_top1_error"]],
                           marker="o", label=f"{t['resolution']} px train")
        if t["history"].get("val_top1_error"):
            ax[1].plot(range(1, len(t["history"]["val_top1_error"]) + 1),
                       [100 * e for e in t["history"]["val_top1_error"]], "--", marker="s",
                       color=line.get_color(), label=f"{t['resolution']} px val")
    ax[0].set(xlabel="epoch", ylabel="training loss", title="Loss")
    ax[1].set(xlabel="epoch", ylabel="top-1 error (%)", title="Top-1 error")
    for a in ax:
        a.legend(), a.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(folder / "loss.png", dpi=110)
    plt.close(fig)
    return folder / "loss.png"


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
    uri = redact(records[0]["tracking_uri"] if records else tracking.DEFAULT_URI)
    lines = ["# Deep Image reproduction: report", "",
             f"Validation set: {ens['samples']} images. Errors are fractions of the validation set; the paper's "
             "figures (ImageNet 2012 validation, 256 and 512 px) are shown beside ours for the same role "
             "(lowest and highest resolution, and their average).", "",
             "## Error rates", "", *error_table(ens), "", *multiscale_lines(ens, train),
             "## Training", "",
             "| resolution | workers | epochs | final loss | final train top-1 error | images/s | wall time |",
             "| --- | --- | --- | --- | --- | --- | --- |",
             *[f"| {t['resolution']} px | {t['np']} ({t['launcher']}) | {t['epochs']} | {t['final_loss']:.3f} | "
               f"{pct(t['final_train_top1_error'])} | {t['images_per_s']:.1f} | {t['train_seconds']:.0f} s |"
               for t in train],
             "", f"![loss]({rel(plots[0])})", "",
             *scaling_section(sc, rel(plots[1]) if sc is not None else None), *sections,
             "## MLflow runs", "", f"Store: `{uri}`, open it with `mlflow ui --backend-store-uri {uri}`, then "
             f"http://127.0.0.1:5000/#/experiments/{records[0]['experiment_id'] if records else '0'}/runs"
             "?workflowType=machine_learning (the runs table; MLflow 3.17 opens GenAI pages otherwise).", "",
             *runs_table(records), "", "## Lineage", "", *lineage.report_lines(records), ""]
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
    inputs = [args.ensemble, *([args.scaling] if args.scaling else []), *args.train_metrics]
    with tracking.stage_run(args, "report", {"inputs": inputs}) as run:
        # the scaling stage draws its plot beside scaling.json (deepimage.plots.scaling_plot)
        plots = [plot(train, Path(args.plots)), *([Path(args.scaling).with_name("scaling.png")] if sc else [])]
        write_report(ens, sc, train, records, Path(args.out), plots, sections)
        if args.error_table:
            Path(args.error_table).write_text(error_table_html(ens))
        for f in [Path(args.out), *plots]:
            run.log_artifact(f)
    print(f"report: wrote {args.out}")


if __name__ == "__main__":
    main()
