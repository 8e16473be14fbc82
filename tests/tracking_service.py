"""The team tracking server the tests share (envs/tracking_server.sh: MLflow on PostgreSQL).

    make tracking-server        # once; .ci/run starts it and exports DEEPIMAGE_TEST_TRACKING_URI

`require_tracking_server()` finds it (DEEPIMAGE_TEST_TRACKING_URI, else the `env` file in
TRACKING_SERVER_DIR or .tracking-server/) and skips, or fails under CI=true, when it is not up.
"""
from __future__ import annotations

import os
import subprocess
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "envs" / "tracking_server.sh"


@dataclass
class TrackingServer:
    uri: str
    folder: Path  # its private folder (PostgreSQL's cluster, pid file, logs)

    def script(self, action: str, timeout: float = 180) -> str:
        """`envs/tracking_server.sh <action>` on this server's folder; its output."""
        r = subprocess.run(["bash", str(SCRIPT), action], capture_output=True, text=True, timeout=timeout,
                           env={**os.environ, "TRACKING_SERVER_DIR": str(self.folder)})
        assert r.returncode == 0, f"tracking_server.sh {action}: {r.stdout}{r.stderr}"
        return r.stdout

    def client(self):
        from mlflow import MlflowClient

        return MlflowClient(tracking_uri=self.uri)


def read_env(path: Path) -> dict[str, str]:
    lines = path.read_text().splitlines() if path.is_file() else []
    return dict(line.split("=", 1) for line in lines if "=" in line)


def answers(uri: str) -> bool:
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=5) as r:
            return r.status == 200
    except OSError:
        return False


def require_tracking_server() -> TrackingServer:
    """The running team server; skip (fail under CI=true) naming how to start it."""
    folder = Path(os.environ.get("TRACKING_SERVER_DIR", ROOT / ".tracking-server"))
    env = read_env(folder / "env")
    uri = os.environ.get("DEEPIMAGE_TEST_TRACKING_URI") or env.get("DEEPIMAGE_TEST_TRACKING_URI")
    why = None
    if not uri:
        why = f"no tracking server ({folder / 'env'} missing): run `make tracking-server`"
    elif not answers(uri):
        why = f"tracking server {uri} does not answer: run `make tracking-server`"
    if why:
        if os.environ.get("CI") == "true":
            pytest.fail(why)
        pytest.skip(why)
    return TrackingServer(uri, Path(env.get("DEEPIMAGE_TRACKING_SERVER_DIR", folder)))
