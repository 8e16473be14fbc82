"""`snakemake --report` on the tiny run: one self-contained HTML file with the error table,
the training curves and the scaling plot, each under its category with its caption.

    .venv/bin/pytest -q tests/test_reports.py
"""
from __future__ import annotations

import base64
import json
import re

from workflow import snakemake


def script_var(html: str, name: str) -> dict:
    """The JSON object Snakemake's report assigns to `var <name> = {...};`."""
    m = re.search(rf"var {name} = (\{{.*?\}});\n", html, re.S)
    assert m, f"no `var {name}` in the report"
    return json.loads(m.group(1))


def decoded(data_uri: str) -> bytes:
    """The bytes of an embedded file (data:<mime>;...;base64,<payload>)."""
    return base64.b64decode(data_uri.split("base64,", 1)[1])


def test_snakemake_report_is_one_html_file_with_errors_curves_and_scaling(tiny_workflow, tmp_path):
    out_dir = tmp_path / "report"
    out_dir.mkdir()
    r = snakemake(tiny_workflow.workdir, "--cores", "2", "--report", str(out_dir / "report.html"),
                  config=tiny_workflow.config)
    assert r.returncode == 0, f"{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    assert [p.name for p in out_dir.iterdir()] == ["report.html"]  # one file, nothing beside it
    html = (out_dir / "report.html").read_text()
    # Self-contained: no script or stylesheet fetched from elsewhere.
    assert not re.search(r"<script[^>]+src=\"http|<link[^>]+href=\"http", html)

    categories, results = script_var(html, "categories"), script_var(html, "results")
    files = {cat: [f for sub in subs.values() for f in sub] for cat, subs in categories.items()}
    assert "results/report/errors.html" in files["Errors"]
    assert "results/report/loss.png" in files["Training"]
    assert "results/scaling/scaling.png" in files["Scaling"]
    assert {"results/robustness/robustness.png", "results/robustness/robustness.json"} <= set(files["Robustness"])

    errors = results["results/report/errors.html"]
    assert errors["labels"] == {"model": "each resolution and the ensemble", "figure": "error table"}
    assert "paper-style: top-1 and top-5 error" in errors["caption"]
    table = decoded(errors["data_uri"]).decode()
    n = len(tiny_workflow.config["resolutions"])
    for row in [*(f"{res} x {res}" for res in tiny_workflow.config["resolutions"]),
                f"average of {n} resolutions", "average of both: 6.97 %"]:
        assert f"<td>{row}</td>" in table, f"error table lacks {row!r}:\n{table}"
    assert table.count("<table>") == 1 and "over seeds" not in table  # the user's run only

    curves, scaling = results["results/report/loss.png"], results["results/scaling/scaling.png"]
    assert curves["labels"]["figure"] == "training curves" and "Training curves" in curves["caption"]
    assert scaling["labels"]["figure"] == "scaling plot" and "Weak scaling" in scaling["caption"]
    for plot in (curves, scaling):
        assert plot["mime_type"] == "image/png"
        assert decoded(plot["data_uri"]).startswith(b"\x89PNG\r\n\x1a\n")  # the PNG itself is embedded
    assert "Deep Image (Wu et al., 2015" in html  # report/workflow.rst, the report's front page
