"""The results page: records written by `deepimage.bench.results record`, the page rendered from
them, and the page in the tree kept in step with the records in the tree."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from deepimage.bench import results
from workflow import ROOT


def test_the_page_in_the_tree_is_the_render_of_the_records_in_the_tree():
    r = subprocess.run([sys.executable, "-m", "deepimage.bench.results", "render", "--check"],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert (ROOT / "docs" / "results.md").read_text() == results.render(results.load())


def test_every_record_names_its_command_date_commit_and_machine():
    records = results.load()
    assert records, "docs/results/ holds no record"
    for rec in records:
        for key in ("command", "date", "commit", "machine"):
            assert rec[key], f"{rec['id']}: empty {key}"
        assert rec["figures"][0]["value"] not in (None, ""), rec["id"]


def test_record_runs_the_benchmark_and_writes_its_provenance(tmp_path, monkeypatch):
    monkeypatch.setitem(results.HEADLINES, "toy", {
        "title": "A toy benchmark", "order": 5,
        "figures": [{"name": "speed-up", "key": "ratio", "unit": "x"},
                    {"name": "efficiency", "key": "rows.1.efficiency", "scale": 100, "unit": "%",
                     "spread_key": "rows.1.sd", "spread_label": "sd"}]})
    bench = [sys.executable, "-c", "import json; print('table'); print(json.dumps("
             "{'ratio': 2.5, 'rows': [{'efficiency': 1.0, 'sd': 0}, {'efficiency': 0.875, 'sd': 0.0125}]}))"]
    rec = results.record("toy", bench, folder=tmp_path)
    on_disk = json.loads((tmp_path / "toy.json").read_text())
    assert on_disk == rec
    assert rec["command"].startswith("python -c ")
    assert rec["commit"] != "unknown" and len(rec["commit"].split("+")[0]) == 7
    assert rec["machine"]["cores"] >= 1 and "torch" in rec["machine"]["libraries"]
    assert rec["figures"][0] == {"name": "speed-up", "unit": "x", "value": 2.5}
    assert rec["figures"][1]["value"] == pytest.approx(87.5) and rec["figures"][1]["spread"] == "sd 1.25"
    page = results.render(results.load(tmp_path))
    assert "| [A toy benchmark](#toy) | speed-up: 2.5 x |" in page
    assert "| efficiency | 87.50 % (sd 1.25) |" in page


def test_a_benchmark_without_json_output_is_a_one_line_error(tmp_path, capsys):
    code = results.main(["record", "--folder", str(tmp_path), "allreduce", "--",
                         sys.executable, "-c", "print('no json here')"])
    assert code == 1
    err = capsys.readouterr().err
    assert err.startswith("results: ") and "JSON" in err and "Traceback" not in err
    assert not list(tmp_path.iterdir())


def test_a_bad_record_is_named(tmp_path):
    (tmp_path / "broken.json").write_text(json.dumps({"id": "broken", "title": "t"}))
    with pytest.raises(results.ResultsError, match=r"broken\.json: missing command, date, commit, machine, figures"):
        results.load(tmp_path)
