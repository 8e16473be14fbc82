"""Benchmarks, one module per measured target; each prints a table and, with --json, ends
with one JSON object. The multi-process ones start their own workers with `run_workers`, through
deepimage.launch like training."""
from __future__ import annotations

import io
import json
import tempfile
from pathlib import Path

from deepimage import launch


class BenchError(RuntimeError):
    """A failed launch or a bad argument (one-line message for the CLI)."""


def run_workers(module: str, np: int, args: list[str], launcher: str = "horovod",
                threads: int | None = None, timeout: float = 300) -> dict:
    """Start `np` workers of `python -m module --worker --out F args...` (deepimage.launch.run:
    a lost rank or `timeout` seconds stop them all); return rank 0's JSON F. The launch's output
    is kept, and its last lines are in the BenchError of a failed one."""
    output = io.StringIO()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        try:
            launch.run(launcher, np, module, ["--worker", "--out", str(out), *args],
                       threads=threads or np, timeout_s=timeout, out=output)
        except launch.LaunchFailed as e:
            raise BenchError(f"{module}: {launcher} with {np} workers {e.reason}:\n" + _tail(output)) from None
        if not out.exists():
            raise BenchError(f"{module}: {launcher} with {np} workers wrote no result:\n" + _tail(output))
        return json.loads(out.read_text())


def _tail(output: io.StringIO, lines: int = 15) -> str:
    return "\n".join(output.getvalue().strip().splitlines()[-lines:])
