"""What a finished workflow run produced, in a few lines: printed when `snakemake` succeeds.

    python -m deepimage.summary [--results results] [--registered NAME ...]

The error table (each resolution and the ensemble), the scaling efficiency where the scaling
study ran, and where to look next: the report, the MLflow UI on the runs, the registered models.
Only what the run wrote is shown; a target that stopped before the ensemble prints what exists.
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from deepimage.cli import prog
from deepimage.redact import redact


def _load(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _pct(x: float) -> str:
    return f"{100 * x:6.2f} %"


def error_lines(ensemble: dict) -> list[str]:
    """Top-1 / top-5 validation error of each resolution and of the ensemble."""
    lines = ["  model         top-1     top-5"]
    models = sorted(ensemble.get("models", {}).items(), key=lambda kv: int(kv[0]))
    for res, m in models:
        lines.append(f"  {res + ' px':<10} {_pct(m['top1_error'])} {_pct(m['top5_error'])}")
    ens = ensemble.get("ensemble")
    if ens:
        lines.append(f"  {'ensemble':<10} {_pct(ens['top1_error'])} {_pct(ens['top5_error'])}")
    return lines


def scaling_line(scaling: dict) -> str | None:
    rows = scaling.get("rows") or []
    if len(rows) < 2:
        return None
    last = rows[-1]
    return (f"Scaling efficiency at {last['np']} workers: {100 * last['efficiency']:.1f} % "
            f"({last['images_per_s']:.0f} images/s; {rows[0]['images_per_s']:.0f} on {rows[0]['np']}).")


def ui_lines(tracking_uri: str, experiment_id: str) -> list[str]:
    """How to look at the runs: `mlflow ui` on a local store, then the experiment's runs table
    (model-training pages: MLflow's UI opens its GenAI pages without workflowType)."""
    page = f"#/experiments/{experiment_id}/runs?workflowType=machine_learning"
    tracking_uri = redact(tracking_uri)
    if tracking_uri.startswith(("http://", "https://")):
        return [f"  MLflow UI:  {tracking_uri.rstrip('/')}/{page}"]
    return [f"  MLflow UI:  MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false mlflow ui --backend-store-uri "
            f"{shlex.quote(tracking_uri)}",
            f"              then http://127.0.0.1:5000/{page}"]


def summary(results: Path, registered: list[str]) -> list[str]:
    """The lines to print; empty when the run wrote nothing this module reads."""
    lines: list[str] = []
    ensemble = _load(results / "ensemble" / "metrics.json")
    if ensemble:
        lines += ["Validation error:", *error_lines(ensemble)]
    scaling = _load(results / "scaling" / "scaling.json")
    if scaling and (line := scaling_line(scaling)):
        lines.append(line)
    record = next((r for p in sorted(results.glob("*/mlflow_run.json")) if (r := _load(p))), None)
    if not lines and record is None:
        return []
    lines.append("Next:")
    if (results / "report.md").is_file():
        lines.append(f"  report:     {results / 'report.md'}  (HTML: snakemake --report {results / 'report.html'})")
    if record:
        lines += ui_lines(record["tracking_uri"], record["experiment_id"])
    if registered:
        lines.append(f"  models:     {', '.join(registered)}  (alias champion; "
                     f"deepimage-predict --model models:/{registered[-1]}@champion --out predictions.csv IMAGES)")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog=prog("deepimage.summary"), description=__doc__.splitlines()[0])
    p.add_argument("--results", type=Path, default=Path("results"))
    p.add_argument("--registered", nargs="*", default=[], help="registered model names, the ensemble last")
    a = p.parse_args(argv)
    print("\n".join(summary(a.results, a.registered)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
