"""A job's MLflow writes that its tracking server did not take, kept in order until it answers.

    pending = Pending("results/train/64/mlflow_pending.jsonl")
    pending.add({"kind": "tag", "tracking_uri": uri, "run_id": run_id, "key": k, "value": v})
    pending.send(REPLAY)    # deepimage.tracking.runs.REPLAY: each record's kind -> its write

One JSON object a line, in the job's results folder (PENDING_NAME). A record is replayed only
through the table `send` is given; one whose kind the table lacks is set aside, unsent, in
UNKNOWN_NAME beside the file, with one line naming it.
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Callable

PENDING_NAME = "mlflow_pending.jsonl"  # in a job's results folder, while its server is down
UNKNOWN_NAME = "mlflow_pending.unknown.jsonl"  # records of a kind no replay table knows


class Pending:
    """A job's MLflow writes that its server did not take, in order, one JSON object a line;
    `send` replays them. Metrics keep their timestamps, so a record sent twice (a replay cut
    short) stores nothing new."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def add(self, record: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def records(self) -> list[dict]:
        if not self.path.is_file():
            return []
        lines = self.path.read_text().splitlines()
        return [json.loads(line) for line in lines if line.strip()]

    def __len__(self) -> int:
        return len(self.records())

    def send(self, replay: dict[str, Callable[[dict], None]]) -> int:
        """Send every record in order through replay[record["kind"]]; the ones not sent stay in
        the file (gone when all are). Returns how many were sent; raises the error that stopped it."""
        records = self.records()
        sent = 0
        for i, rec in enumerate(records):
            write = replay.get(rec.get("kind"))
            if write is None:
                self.set_aside(rec)
                continue
            try:
                write(rec)
            except Exception:
                write_lines(self.path, records[i:])
                raise
            sent += 1
        self.path.unlink(missing_ok=True)
        return sent

    def set_aside(self, record: dict) -> None:
        """A record of a kind no replay knows: kept, unsent, in UNKNOWN_NAME beside the file."""
        aside = self.path.with_name(UNKNOWN_NAME)
        with open(aside, "a") as f:
            f.write(json.dumps(record) + "\n")
        print(f"tracking: {self.path} holds a record of unknown kind {record.get('kind')!r}; "
              f"not sent, kept in {aside}", flush=True)


def write_lines(path: Path, records: list[dict]) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
    os.replace(tmp, path)


def pending_for(args: argparse.Namespace) -> Pending | None:
    """The job's pending file: beside its run record, in its results folder."""
    return Pending(Path(args.run_record).parent / PENDING_NAME) if getattr(args, "run_record", None) else None
