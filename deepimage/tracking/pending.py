"""A job's MLflow writes that its tracking server did not take, kept in order until it answers.

    pending = Pending("results/train/64/mlflow_pending.jsonl")
    pending.add({"kind": "tag", "tracking_uri": uri, "run_id": run_id, "key": k, "value": v})
    pending.send(REPLAY, uri)    # deepimage.tracking.runs.REPLAY: each record's kind -> its write

One JSON object a line, in the job's results folder (PENDING_NAME). The folder may be shared, so
a record is replayed only as a call the workflow itself makes: its kind one of the table `send`
is given, its fields of the types that kind writes, its server the workflow's, every file it
names inside the workflow's results folder (symlinks resolved), its run one the workflow made
(deepimage.tracking.runs.not_workflow_run). A record that fails those
checks, or that the server refuses, is set aside in rejected/ beside the file (REJECTED_NAME),
with one line naming it and why, and the records after it are sent.
"""
from __future__ import annotations

import argparse
import json
import os
import re
from pathlib import Path
from typing import Callable, NamedTuple

from deepimage.redact import redact
from deepimage.tracking.store import unreachable

PENDING_NAME = "mlflow_pending.jsonl"  # in a job's results folder, while its server is down
REJECTED_NAME = Path("rejected") / PENDING_NAME  # beside it: records set aside, each with why
RESULTS = "results"  # the workflow's results folder (Snakemake's working directory's results/)
RUN_ID = re.compile(r"^[0-9a-f]{32}$")  # what MLflow makes


class Rejected(ValueError):
    """A pending record that is not one the workflow writes (the message says why)."""


class Replay(NamedTuple):
    """One kind of record: `check(record, root)` raises Rejected unless its fields are that
    kind's (root: the results folder, resolved); `send(record)` makes the MLflow call."""

    check: Callable[[dict, Path], None]
    send: Callable[[dict], None]


class Pending:
    """A job's MLflow writes that its server did not take, in order, one JSON object a line;
    `send` replays them. Metrics keep their timestamps, so a record sent twice (a replay cut
    short) stores nothing new."""

    def __init__(self, path: str | Path, root: str | Path = RESULTS):
        self.path, self.root = Path(path), Path(root)

    def add(self, record: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def records(self) -> list:
        """The file's records in order (a line that is not JSON comes back as its text)."""
        if not self.path.is_file():
            return []
        out = []
        for line in self.path.read_text().splitlines():
            if line.strip():
                try:
                    out.append(json.loads(line))
                except ValueError:
                    out.append(line)
        return out

    def __len__(self) -> int:
        return len(self.records())

    def send(self, replay: dict[str, Replay], tracking_uri: str,
             whose: Callable[[str, str, Path], str | None] | None = None) -> int:
        """Send every record in order through replay[record["kind"]], those that fail its checks
        or that the server refuses set aside; the file is gone when all are done. Returns how
        many were sent. whose(tracking_uri, run_id, root): None if the run is the workflow's,
        else why not (its records are set aside). If the server stops answering, the rest stay
        in the file and the error is raised."""
        records, root, sent, verdicts = self.records(), self.root.resolve(), 0, {}
        for i, rec in enumerate(records):
            try:
                entry = _checked(rec, replay, root, tracking_uri)
                if whose is not None:
                    if rec["run_id"] not in verdicts:
                        verdicts[rec["run_id"]] = whose(tracking_uri, rec["run_id"], root)
                    if verdicts[rec["run_id"]]:
                        raise Rejected(verdicts[rec["run_id"]])
                entry.send(rec)
            except Rejected as e:
                self.set_aside(rec, str(e))
                continue
            except Exception as e:
                if unreachable(e):
                    write_lines(self.path, records[i:])
                    raise
                reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
                self.set_aside(rec, f"the server refused it: {reason}")
                continue
            sent += 1
        self.path.unlink(missing_ok=True)
        return sent

    def set_aside(self, record, reason: str) -> None:
        """A record not replayed: kept, with why, in rejected/ beside the file."""
        aside = self.path.parent / REJECTED_NAME
        aside.parent.mkdir(exist_ok=True)
        with open(aside, "a") as f:
            f.write(json.dumps({"reason": reason, "record": record}) + "\n")
        kind = record.get("kind") if isinstance(record, dict) else None
        print(f"tracking: record of kind {kind!r} in {self.path} set aside in {aside}, not sent: {reason}",
              flush=True)


def _checked(rec, replay: dict[str, Replay], root: Path, tracking_uri: str) -> Replay:
    """The record's Replay, once its common fields and its kind's check pass (Rejected if not)."""
    if not isinstance(rec, dict):
        raise Rejected(f"not a JSON object: {str(rec)[:80]!r}")
    entry = replay.get(rec.get("kind")) if isinstance(rec.get("kind"), str) else None
    if entry is None:
        raise Rejected(f"unknown kind {rec.get('kind')!r}")
    if rec.get("tracking_uri") != redact(tracking_uri):            # records name it as shown
        raise Rejected(f"it names tracking server {rec.get('tracking_uri')!r}, not the workflow's "
                       f"{redact(tracking_uri)}")
    if not isinstance(rec.get("run_id"), str) or not RUN_ID.match(rec["run_id"]):
        raise Rejected(f"run_id {rec.get('run_id')!r} is not an MLflow run id")
    entry.check(rec, root)
    return entry


def inside(value, root: Path, what: str, want: str = "file") -> Path:
    """`value` (a path string) resolved, symlinks followed; Rejected unless it lies inside `root`
    (resolved) and is a `want` ("file" or "dir") when it exists."""
    if not isinstance(value, str) or not value or "\0" in value:
        raise Rejected(f"{what} {value!r} is not a path")
    path = Path(value).resolve()
    if not path.is_relative_to(root):
        target = "" if str(path) == value else f" (-> {path})"
        raise Rejected(f"{what} {value}{target} is outside the results folder {root}")
    if path.exists() and not (path.is_file() if want == "file" else path.is_dir()):
        raise Rejected(f"{what} {value} is not a {'regular file' if want == 'file' else 'folder'}")
    return path


def write_lines(path: Path, records: list) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text("".join((json.dumps(r) if isinstance(r, dict) else r) + "\n" for r in records))
    os.replace(tmp, path)


def pending_for(args: argparse.Namespace) -> Pending | None:
    """The job's pending file: beside its run record, in its results folder."""
    return Pending(Path(args.run_record).parent / PENDING_NAME) if getattr(args, "run_record", None) else None


# ---- the checks of each kind of record (runs.REPLAY pairs each with its write)
def _fields(rec: dict, types: dict[str, tuple], kind: str) -> None:
    """Rejected unless each of `types`' fields is one of its types."""
    for name, allowed in types.items():
        value = rec.get(name)
        if isinstance(value, bool) or not isinstance(value, allowed):
            raise Rejected(f"{kind} record's {name} is {type(value).__name__}, not "
                           f"{' or '.join(t.__name__ for t in allowed)}")


def _rows(value, types: tuple, kind: str, name: str) -> None:
    """Rejected unless `value` is a list of rows, each of `types` in order."""
    ok = isinstance(value, list) and all(
        isinstance(row, list) and len(row) == len(types) and
        all(isinstance(v, t) and not isinstance(v, bool) for v, t in zip(row, types)) for row in value)
    if not ok:
        shown = ", ".join("number" if isinstance(t, tuple) else t.__name__ for t in types)
        raise Rejected(f"{kind} record's {name} are not rows of ({shown})")


def check_metrics(rec: dict, root: Path) -> None:
    _rows(rec.get("metrics"), (str, (int, float), int, int), "metrics", "metrics")


def check_params(rec: dict, root: Path) -> None:
    _rows(rec.get("params"), (str, str), "params", "params")


def check_tag(rec: dict, root: Path) -> None:
    _fields(rec, {"key": (str,), "value": (str,)}, "tag")


def check_artifact(rec: dict, root: Path) -> None:
    inside(rec.get("path"), root, "artifact")
    dest = rec.get("artifact_path")
    if dest is not None and (not isinstance(dest, str) or dest.startswith("/") or ".." in dest.split("/")):
        raise Rejected(f"artifact_path {dest!r} is not a relative folder name")


def check_trained_model(rec: dict, root: Path) -> None:
    args = rec.get("args")
    if not (isinstance(args, list) and len(args) == 3 and (args[2] is None or isinstance(args[2], str))):
        raise Rejected("log_trained_model record's args are not [model file, shard folder, name or null]")
    inside(args[0], root, "model file")
    inside(args[1], root, "shard folder", want="dir")


def check_dataset(rec: dict, root: Path) -> None:
    _fields(rec, {"context": (str,)}, "dataset")
    inside(rec.get("shard_dir"), root, "shard folder", want="dir")


def check_terminated(rec: dict, root: Path) -> None:
    _fields(rec, {"end_time": (int,)}, "terminated")
    if rec.get("status") not in END_STATUSES:
        raise Rejected(f"terminated record's status {rec.get('status')!r} is not one of {END_STATUSES}")


END_STATUSES = ("FINISHED", "FAILED", "KILLED")
