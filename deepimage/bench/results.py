"""The results page: one JSON record per measurement, rendered into docs/results.md.

    python -m deepimage.bench.results record [--notes TEXT] ID -- python -m deepimage.bench.allreduce --json
    python -m deepimage.bench.results render            # docs/results/*.json -> docs/results.md

`record` runs a benchmark (any command whose standard output ends with one JSON object), and
writes docs/results/ID.json: the command, the date, the commit, the machine and the benchmark's
own JSON (`data`), with the headline figures taken from it by HEADLINES[ID]. `render` writes the
page from every record in the folder: a summary table (one line per measurement) and a section
per record. A record holds one current figure per measurement; its history is in git.

A record's fields:
    id, title, order         what it is and where it sits on the page
    command                  the command that produced it
    date, commit, machine    when, from which code, on what (cores, memory, GPU, library versions)
    figures                  [{name, value, unit?, spread?, baseline?, target?}], the first is the headline
    notes                    optional: one short paragraph of what the figure means
    data                     optional: the benchmark's whole JSON output
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shlex
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Callable

from deepimage.bench.headlines import HEADLINES
from deepimage.cli import prog

ROOT = Path(__file__).resolve().parents[2]
RECORDS = ROOT / "docs" / "results"
PAGE = ROOT / "docs" / "results.md"
LIBRARIES = ("torch", "horovod", "mlflow", "pyarrow", "snakemake", "numpy", "pillow", "torchvision")
REQUIRED = ("id", "title", "command", "date", "commit", "machine", "figures")


class ResultsError(ValueError):
    """A malformed record or a benchmark without JSON output (one-line message for the CLI)."""


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _gpu() -> str | None:
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    return f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"


def machine() -> dict:
    """What the figures were measured on: cores, memory, CPU and GPU model, library versions."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    libraries = {name: v for name in LIBRARIES if (v := _version(name))}
    return {"cores": os.cpu_count(), "memory_gib": round(memory), "cpu": cpu, "gpu": _gpu(),
            "python": platform.python_version(), "libraries": libraries}


def commit() -> str:
    """The checkout's commit (short), with "+dirty" when tracked files differ from it."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True,
                              check=True).stdout.strip()
    try:
        head = git("rev-parse", "--short=7", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


def _last_json(stdout: str) -> dict:
    for line in reversed(stdout.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                break
    raise ResultsError("the command's output does not end with a JSON object (run it with --json)")


def _at(data: dict, path: str):
    """data at a dotted key; a number indexes a list (`rows.1.efficiency`)."""
    value = data
    for key in path.split("."):
        if isinstance(value, list) and key.lstrip("-").isdigit() and -len(value) <= int(key) < len(value):
            value = value[int(key)]
        elif isinstance(value, dict) and key in value:
            value = value[key]
        else:
            raise ResultsError(f"the benchmark's JSON has no key {path!r}")
    return value


SPEC_ONLY = ("key", "spread_key", "scale", "spread_label")


def figures_from(spec: list[dict], data: dict) -> list[dict]:
    """Headline figures from a benchmark's JSON: each spec entry names its value by a dotted key
    (`key`) and optionally its spread (`spread_key`, written as "<spread_label> <value>"); both
    are multiplied by `scale` (fractions to %, seconds to ms); other fields are copied."""
    out = []
    for entry in spec:
        scale = entry.get("scale", 1)
        fig = {k: v for k, v in entry.items() if k not in SPEC_ONLY}
        fig["value"] = _scaled(_at(data, entry["key"]), scale)
        if "spread_key" in entry:
            spread = _fmt(_scaled(_at(data, entry["spread_key"]), scale), entry.get("decimals"))
            fig["spread"] = f"{entry['spread_label']} {spread}" if entry.get("spread_label") else spread
        out.append(fig)
    return out


def _scaled(value, scale):
    return value * scale if isinstance(value, (int, float)) and not isinstance(value, bool) and scale != 1 else value


def record(record_id: str, command: list[str], folder: Path = RECORDS, notes: str | None = None,
           runner: Callable[[list[str]], str] | None = None) -> dict:
    """Run `command`, take the JSON object its output ends with, and write folder/ID.json."""
    if record_id not in HEADLINES:
        raise ResultsError(f"no headline spec for {record_id!r}; known: {', '.join(sorted(HEADLINES))}")
    started = dt.datetime.now(dt.timezone.utc)
    if runner is None:
        try:
            proc = subprocess.run(command, capture_output=True, text=True)
        except OSError as e:
            raise ResultsError(f"cannot run {shlex.join(command)}: {e}") from e
        if proc.returncode != 0:
            tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-10:])
            raise ResultsError(f"{shlex.join(command)} failed (exit {proc.returncode}):\n{tail}")
        stdout = proc.stdout
    else:
        stdout = runner(command)
    data = _last_json(stdout)
    spec = HEADLINES[record_id]
    rec = {"id": record_id, "title": spec["title"], "order": spec["order"],
           "command": _display(command), "date": started.strftime("%Y-%m-%d %H:%M UTC"),
           "commit": commit(), "machine": machine(), "figures": figures_from(spec["figures"], data)}
    if notes:
        rec["notes"] = notes
    rec["data"] = data
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{record_id}.json").write_text(json.dumps(rec, indent=1, sort_keys=False) + "\n")
    return rec


def _display(command: list[str]) -> str:
    """The command as a user types it: `python` for this interpreter."""
    words = ["python" if c == sys.executable else c for c in command]
    return shlex.join(words)


def load(folder: Path = RECORDS) -> list[dict]:
    """Every record in folder, checked, in page order."""
    records = []
    for path in sorted(folder.glob("*.json")):
        try:
            rec = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ResultsError(f"{path}: not JSON ({e})") from e
        missing = [k for k in REQUIRED if k not in rec]
        if missing:
            raise ResultsError(f"{path}: missing {', '.join(missing)}")
        if rec["id"] != path.stem:
            raise ResultsError(f"{path}: id {rec['id']!r} differs from the file name")
        if not rec["figures"]:
            raise ResultsError(f"{path}: no figures")
        for i, fig in enumerate(rec["figures"]):
            if "name" not in fig or "value" not in fig:
                raise ResultsError(f"{path}: figure {i} needs a name and a value")
        records.append(rec)
    return sorted(records, key=lambda r: (r.get("order", 1000), r["id"]))


def _fmt(value, decimals: int | None = None) -> str:
    """A number as the record gives it: `decimals` places when the figure names them, else
    up to four significant digits (thousands separated)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if decimals is not None:
        return f"{value:,.{decimals}f}"
    if isinstance(value, int) or abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.4g}"


def _value(fig: dict) -> str:
    decimals = fig.get("decimals", 2 if fig.get("unit") == "%" and isinstance(fig["value"], float) else None)
    text = _fmt(fig["value"], decimals) + (f" {fig['unit']}" if fig.get("unit") else "")
    if fig.get("spread") not in (None, ""):
        text += f" ({_fmt(fig['spread'], decimals)})"
    return text


def _machine_line(m) -> str:
    if isinstance(m, str):
        return m
    gpu = m.get("gpu") or "no GPU"
    libs = ", ".join(f"{k} {v}" for k, v in m.get("libraries", {}).items())
    return f"{m.get('cores')} cores, {m.get('memory_gib')} GiB, {m.get('cpu')}, {gpu}; {libs}"


def _anchor(rec: dict) -> str:
    return rec["id"].replace("_", "-")


def render(records: list[dict]) -> str:
    """The results page (Markdown) from the records, deterministic for the same records."""
    lines = ["# Measured results", "",
             "Generated by `make results` from `docs/results/*.json`; do not edit by hand. Each",
             "measurement has one current figure with the command that reproduces it, its date,",
             "commit and machine. Timings are medians; a spread in brackets is the one the record",
             "names (sd over seeds, or min-max over repeats).", "",
             "| measurement | headline | baseline | date |", "| --- | --- | --- | --- |"]
    for rec in records:
        head = rec["figures"][0]
        lines.append(f"| [{rec['title']}](#{_anchor(rec)}) | {head['name']}: {_value(head)} | "
                     f"{head.get('baseline', '')} | {rec['date'][:10]} |")
    for rec in records:
        lines += ["", f'<a id="{_anchor(rec)}"></a>', f"## {rec['title']}", ""]
        if rec.get("notes"):
            lines += [rec["notes"], ""]
        has_base = any(f.get("baseline") for f in rec["figures"])
        has_target = any(f.get("target") for f in rec["figures"])
        header = ["figure", "value"] + (["baseline"] if has_base else []) + (["target"] if has_target else [])
        lines += ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
        for fig in rec["figures"]:
            row = [fig["name"], _value(fig)]
            row += [str(fig.get("baseline", ""))] if has_base else []
            row += [str(fig.get("target", ""))] if has_target else []
            lines.append("| " + " | ".join(row) + " |")
        lines += ["", "```bash", rec["command"], "```", "",
                  f"{rec['date']}, commit `{rec['commit']}`, {_machine_line(rec['machine'])}."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog=prog("deepimage.bench.results"), description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("record", help="run a benchmark and write docs/results/ID.json")
    r.add_argument("id")
    r.add_argument("--notes")
    r.add_argument("--folder", type=Path, default=RECORDS)
    r.add_argument("command", nargs=argparse.REMAINDER, help="-- then the benchmark's command")
    w = sub.add_parser("render", help="write the page from the records")
    w.add_argument("--folder", type=Path, default=RECORDS)
    w.add_argument("--out", type=Path, default=PAGE)
    w.add_argument("--check", action="store_true", help="exit 1 when the page differs from the render")
    a = p.parse_args(argv)
    try:
        if a.cmd == "record":
            command = a.command[1:] if a.command[:1] == ["--"] else a.command
            if not command:
                p.error("record needs the benchmark's command after --")
            rec = record(a.id, command, a.folder, a.notes)
            print(f"wrote {a.folder / (a.id + '.json')}: {rec['figures'][0]['name']} = {_value(rec['figures'][0])}")
            return 0
        page = render(load(a.folder))
        if a.check:
            if not a.out.exists() or a.out.read_text() != page:
                print(f"{a.out} is not the render of {a.folder}/*.json: run `make results`", file=sys.stderr)
                return 1
            return 0
        a.out.write_text(page)
        print(f"wrote {a.out} from {len(load(a.folder))} records")
        return 0
    except ResultsError as e:
        print(f"results: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
