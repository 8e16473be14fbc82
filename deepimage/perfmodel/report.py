"""The performance model's outputs: its plots, the report's section (markdown) and its MLflow
metrics, all from perfmodel.json's content.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

from deepimage.perfmodel.costs import Hardware


BEST = ("butterfly", True, True)  # the paper's system: butterfly, lazy update, split FC


def plot(result: dict, measured_rows: list[dict], folder: Path) -> list[Path]:
    """perfmodel_efficiency.png (measured and predicted points on one plot with the projected
    curves), perfmodel_projection.png (every variant) and perfmodel_validation.png."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    proj = result["projection"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for (hw, res), rows in _groups(proj, ("hardware", "resolution")).items():
        rows = [r for r in rows if (r["method"], r["lazy"], r["split_fc"]) == BEST]
        ax.plot([r["np"] for r in rows], [100 * r["efficiency"] for r in rows], "-", marker=".",
                label=f"predicted: {hw}, {res} px")
    here = result["this_host"]
    ax.plot([r["np"] for r in measured_rows], [100 * r["efficiency"] for r in measured_rows], "ks", ms=8,
            label="measured: this host (scaling stage)")
    ax.plot([r["np"] for r in here], [100 * r["efficiency"] for r in here], "o", mfc="none", mec="r", ms=10,
            label="predicted: this host, same runs")
    ax.set(xscale="log", xlabel="workers", ylabel="scaling efficiency (%)", ylim=(0, 110),
           title="Measured (filled) and predicted (hollow, lines) efficiency")
    ax.legend(fontsize=7)
    fig.tight_layout()
    paths = [folder / "perfmodel_efficiency.png"]
    fig.savefig(paths[0], dpi=110)
    plt.close(fig)
    paths.append(_plot_projection(plt, proj, folder))
    paths.append(_plot_validation(plt, result["validation"], result["tolerance"], folder))
    return paths


def _groups(rows: list[dict], keys: tuple[str, ...]) -> dict:
    out: dict = {}
    for r in rows:
        out.setdefault(tuple(r[k] for k in keys), []).append(r)
    return out


def _plot_projection(plt, proj: list[dict], folder: Path) -> Path:
    panels = _groups(proj, ("hardware", "resolution"))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4), squeeze=False, sharey=True)
    for ax, ((hw, res), rows) in zip(axes[0], panels.items()):
        for (method, lazy, split), line in _groups(rows, ("method", "lazy", "split_fc")).items():
            label = f"{method}{', lazy' if lazy else ''}{', split FC' if split else ''}"
            ax.plot([r["np"] for r in line], [100 * r["efficiency"] for r in line], marker=".", label=label,
                    ls="-" if split else "--")
        ax.set(xscale="log", xlabel="workers", title=f"predicted: {hw}, {res} px", ylim=(0, 105))
    axes[0][0].set_ylabel("scaling efficiency (%)")
    axes[0][-1].legend(fontsize=6)
    fig.tight_layout()
    path = folder / "perfmodel_projection.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _plot_validation(plt, validation: list[dict], tol: float, folder: Path) -> Path:
    fig, ax = plt.subplots(figsize=(5, 4.5))
    hi = 1e3 * max(max(v["measured_s"], v["predicted_s"]) for v in validation) * 1.15
    ax.fill_between([0, hi], [0, hi * (1 - tol)], [0, hi * (1 + tol)], color="0.9", label=f"±{tol:.0%}")
    ax.plot([0, hi], [0, hi], "k-", lw=0.5)
    for v in validation:
        ax.plot(1e3 * v["measured_s"], 1e3 * v["predicted_s"], "o" if v["np"] == 1 else "s",
                label=f"{v['config']} np={v['np']}")
    ax.set(xlabel="measured step (ms)", ylabel="predicted step (ms)", xlim=(0, hi), ylim=(0, hi),
           title="Validation on this host")
    ax.legend(fontsize=6)
    fig.tight_layout()
    path = folder / "perfmodel_validation.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def report_lines(result: dict) -> list[str]:
    """The report's performance-model section (markdown): what is measured, what is predicted."""
    tol = result["tolerance"]
    residuals = ", ".join(f"{r['residual']:+.0%}" for r in result["link_fit"])
    lib = result.get("allreduce_link")
    library = (f"; the small blocking all-reduces (torch.distributed): latency {lib['latency_s'] * 1e3:.2f} ms, "
               f"bandwidth {lib['bandwidth'] / 1e9:.2f} GB/s" if lib else "")
    lines = ["## Performance model and projection", "",
             "MEASURED on this host: each validation point's step time (real workers, "
             "`deepimage.measure.measure_step`). PREDICTED: everything else, by `deepimage.perfmodel` "
             "from per-layer profiles (for N workers on this host, N pinned profiling processes at "
             "once, each computing rank 0's split FC share) and the fitted transport "
             f"(latency {result['link']['latency_s'] * 1e6:.0f} us, "
             f"bandwidth {result['link']['bandwidth'] / 1e9:.2f} GB/s; "
             f"fit residuals {residuals}){library}.", "",
             "| model / update | workers | measured step | predicted step | error "
             "| measured compute / comm wait / data / other (ms) "
             "| predicted compute / split FC / exposed comm / slowest-rank wait (ms) |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for v in result["validation"]:
        m, p = v["measured_split"], v["predicted_split"]
        ok = "" if abs(v["error"]) <= tol else " (outside)"
        measured = " / ".join(f"{1e3 * m[k]:.1f}" for k in ("compute", "comm_wait", "data", "other"))
        lines.append(f"| {v['config']} | {v['np']} | {v['measured_s'] * 1e3:.1f} ms | "
                     f"{v['predicted_s'] * 1e3:.1f} ms | {v['error']:+.1%}{ok} | {measured} | "
                     f"{1e3 * p['compute']:.1f} / {1e3 * p['split_fc']:.1f} / {1e3 * p['comm_exposed']:.1f} / "
                     f"{1e3 * p.get('slowest_wait', 0.0):.1f} |")
    lines += ["", f"PREDICTED, the paper's widths ({result['paper_model']}), {result['projection_batch']} images "
              "per worker, at the largest worker count:", "",
              "| hardware | px | workers | method | lazy | split FC | step | efficiency "
              "| compute / split FC / exposed comm (ms) |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    top = max(r["np"] for r in result["projection"])
    for r in result["projection"]:
        if r["np"] == top:
            lines.append(f"| {r['hardware']} | {r['resolution']} | {r['np']} | {r['method']} | "
                         f"{'on' if r['lazy'] else 'off'} | {'on' if r['split_fc'] else 'off'} | "
                         f"{r['step_s'] * 1e3:.1f} ms | {100 * r['efficiency']:.1f} % | "
                         f"{1e3 * r['compute_s']:.1f} / {1e3 * r['split_fc_s']:.1f} / "
                         f"{1e3 * r['comm_exposed_s']:.1f} |")
    lines += ["", "Hardware: " + "; ".join(f"{h['name']}: {h['flops_per_s']:.3g} FLOP/s per worker "
                                           f"({h['relative_throughput']:.0f}x this host's measured worker)"
                                           for h in result["hardware"]) + "."]
    for h in result["hardware"]:
        meta = h.get("profile_meta") or {}
        if h.get("profiled_resolutions"):
            lines.append(f"{h['name']}'s compute at {', '.join(f'{r} px' for r in h['profiled_resolutions'])} is "
                         f"MEASURED: one worker's per-layer profile on {meta.get('device')} "
                         f"({'bf16 autocast' if meta.get('bf16') else 'fp32'}, torch {meta.get('torch')}, "
                         f"{meta.get('date')}); elsewhere it is counted FLOPs at the file's FLOP/s.")
    lines.append("")
    return lines


def hardware_summary(hw: Hardware, here_flops: float) -> dict:
    """A hardware file as perfmodel.json records it: its numbers and sources, and what its
    measured profile (if any) was taken on, not the profile's layers."""
    d = {k: v for k, v in dataclasses.asdict(hw).items() if k != "profiles"}
    return {**d, "profiled_resolutions": sorted(hw.profiles), "relative_throughput": hw.flops_per_s / here_flops}


def log_result(run, result: dict, paths: list[Path]) -> None:
    """Validation errors and the best variant's projected efficiency as MLflow metrics."""
    for v in result["validation"]:
        key = v["config"].replace("/", "_")
        run.log_metrics({f"validation_error_{key}_np{v['np']}": v["error"],
                         f"validation_measured_s_{key}_np{v['np']}": v["measured_s"],
                         f"validation_predicted_s_{key}_np{v['np']}": v["predicted_s"]})
    run.log_metrics({"link_latency_s": result["link"]["latency_s"],
                     "link_bandwidth_bytes_per_s": result["link"]["bandwidth"],
                     "validation_max_abs_error": max(abs(v["error"]) for v in result["validation"])})
    for (hw, res), rows in _groups(result["projection"], ("hardware", "resolution")).items():
        for r in rows:
            if (r["method"], r["lazy"], r["split_fc"]) == BEST:
                run.log_metrics({f"projected_efficiency_{hw}_{res}px": r["efficiency"]}, step=r["np"])
    for p in paths:
        run.log_artifact(p)
