"""Credentials in a tracking URI reach the MLflow client and nothing else: not MLflow's params or
tags, not the run and pending records, the report, the summary, error messages or any process's
command line (which every user of the host reads in `ps`).

    PYTHONPATH=$PWD .venv/bin/python -m pytest -q tests/test_trust_secrets.py
"""
from __future__ import annotations

import json
import os
import subprocess
import threading
import time
from pathlib import Path

import pytest
import yaml

from workflow import ROOT, SNAKEMAKE, free_port, start_mlflow_server, stop_process_group, tiny_config

SECRET = "s3cr3t"
TOKEN = "t0k3n"


@pytest.fixture(autouse=True)
def mlflow_credentials_stay_in_their_test(monkeypatch):
    """A client of a URI with credentials sets MLflow's credential variables in the process."""
    for key in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        monkeypatch.delenv(key, raising=False)


def closed_port_uri() -> str:
    """A tracking URI with credentials whose server does not answer."""
    return f"http://alice:{SECRET}@127.0.0.1:{free_port()}"


def hits_in_files(root: Path, secret: str = SECRET) -> list[str]:
    """Every file under root holding `secret`."""
    return sorted(p for p in root.rglob("*") if p.is_file() and secret.encode() in p.read_bytes())


def test_redact_removes_passwords_and_tokens_and_keeps_the_rest():
    from deepimage.redact import redact

    assert redact(f"http://alice:{SECRET}@127.0.0.1:5000") == "http://alice:***@127.0.0.1:5000"
    assert redact(f"https://host/mlflow?token={TOKEN}&x=1") == "https://host/mlflow?token=***&x=1"
    assert redact(f"postgresql://alice:{SECRET}@db:5432/mlflow") == "postgresql://alice:***@db:5432/mlflow"
    assert redact("sqlite:///mlflow.db") == "sqlite:///mlflow.db"
    assert redact("http://127.0.0.1:5000") == "http://127.0.0.1:5000"
    said = f"API request to http://alice:{SECRET}@h:1/api/2.0/mlflow/runs/get?access_token={TOKEN} failed"
    assert SECRET not in redact(said) and TOKEN not in redact(said)
    assert redact(redact(f"http://alice:{SECRET}@h:1")) == "http://alice:***@h:1"


def test_a_redacted_uri_connects_with_the_full_one_from_the_environment(monkeypatch):
    from deepimage.redact import redact, reveal

    full = f"http://alice:{SECRET}@127.0.0.1:5000"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", full)
    # MLflow gets the credentials in its own variables, never inside the URI it names in messages
    assert reveal(redact(full)) == "http://127.0.0.1:5000"
    assert (os.environ["MLFLOW_TRACKING_USERNAME"], os.environ["MLFLOW_TRACKING_PASSWORD"]) == ("alice", SECRET)
    assert reveal("sqlite:///other.db") == "sqlite:///other.db"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert reveal(redact(full)) == "http://127.0.0.1:5000"  # MLflow sends the environment's credentials
    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD")
    with pytest.raises(ValueError, match=r"http://alice:\*\*\*@127.0.0.1:5000.*MLFLOW_TRACKING_URI"):
        reveal(redact(full))


def test_the_client_of_a_redacted_uri_sends_the_full_credentials(monkeypatch):
    from deepimage import mlflow_client
    from deepimage.redact import redact

    full = f"http://alice:{SECRET}@127.0.0.1:5000"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", full)
    creds = mlflow_client.client(redact(full))._tracking_client.store.get_host_creds()
    assert (creds.host, creds.username, creds.password) == ("http://127.0.0.1:5000", "alice", SECRET)


def test_an_unreachable_server_is_named_without_its_password():
    from deepimage import tracking

    with pytest.raises(tracking.TrackingUnreachable) as e:
        tracking.check_reachable(closed_port_uri(), timeout_s=1)
    assert SECRET not in str(e.value) and "alice:***@127.0.0.1" in str(e.value)


def test_a_server_reached_with_credentials_is_found_reachable(tmp_path):
    """urllib takes no userinfo in a URL: the check must not call a live server down."""
    from deepimage import tracking

    port = free_port()
    proc = start_mlflow_server(f"sqlite:///{tmp_path / 'mlflow.db'}", port, tmp_path / "server.log")
    try:
        tracking.check_reachable(f"http://alice:{SECRET}@127.0.0.1:{port}", timeout_s=5)
    finally:
        stop_process_group(proc)


def test_a_job_whose_server_is_down_keeps_no_password_on_disk_or_in_its_output(tmp_path, capfd):
    from deepimage.tracking import Pending, StageRun

    run = StageRun(closed_port_uri(), "0" * 32, Pending(tmp_path / "mlflow_pending.jsonl"))
    run.log_metrics({"loss": 1.0}, step=0)
    run.set_tag("deepimage.note", "x")
    out, err = capfd.readouterr()
    assert (tmp_path / "mlflow_pending.jsonl").is_file()
    assert "unreachable" in out, out + err
    assert SECRET not in out + err
    assert hits_in_files(tmp_path) == []


def test_summary_and_report_name_the_store_without_its_password(tmp_path):
    """A run record as a job writes it; the report's lineage reads the store (down: its error
    is shown)."""
    from deepimage import report, summary

    uri = closed_port_uri()
    record = {"stage": "train", "run_id": "0" * 32, "run_name": "train-16", "parent_run_id": None,
              "experiment_id": "1", "tracking_uri": uri}
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "mlflow_run.json").write_text(json.dumps(record))
    lines = summary.summary(tmp_path, ["deepimage-16px"])
    assert any("alice:***@127.0.0.1" in line for line in lines), lines
    assert SECRET not in "\n".join(lines)
    ens = {"samples": 1, "models": {"16": {"top1_error": 0.5, "top5_error": 0.1}},
           "ensemble": {"top1_error": 0.5, "top5_error": 0.1}}
    train = [{"resolution": 16, "epochs": 1, "np": 2, "launcher": "horovod", "final_loss": 1.0,
              "final_train_top1_error": 0.5, "images_per_s": 1.0, "train_seconds": 1.0}]
    text = report.write_report(ens, None, train, [record], tmp_path / "report.md", [tmp_path / "loss.png"])
    assert "alice:***@127.0.0.1" in text and "could not be read" in text, text
    assert SECRET not in text and hits_in_files(tmp_path) == [tmp_path / "train" / "mlflow_run.json"]


def test_the_store_guard_names_the_uri_without_its_password():
    from deepimage.store_guard import StoreError, check_tracking_store

    cfg = {"mlflow": {"tracking_uri": f"sqlite:///db?password={SECRET}"}, "train": {"nodes": 2}}
    with pytest.raises(StoreError) as e:
        check_tracking_store(cfg)
    assert SECRET not in str(e.value)


class CmdlineWatch(threading.Thread):
    """Samples every process's command line (/proc/*/cmdline) until stopped; keeps those
    holding the secret."""

    def __init__(self):
        super().__init__(daemon=True)
        self.hits: list[str] = []
        self.samples = 0
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            for p in Path("/proc").glob("[0-9]*/cmdline"):
                try:
                    line = p.read_bytes()
                except OSError:
                    continue
                if SECRET.encode() in line:
                    self.hits.append(line.replace(b"\0", b" ").decode(errors="replace")[:300])
            self.samples += 1
            time.sleep(0.005)

    def stop(self) -> None:
        self.done.set()
        self.join()


@pytest.fixture(scope="module")
def credentialed_run(tmp_path_factory):
    """A real workflow (dataset, shards, 2-worker training of the 16 px model) against a real
    `mlflow server` reached as http://alice:s3cr3t@127.0.0.1:PORT, every process's command line
    sampled while it runs."""
    server_dir, workdir = tmp_path_factory.mktemp("server"), tmp_path_factory.mktemp("run")
    port = free_port()
    server = start_mlflow_server(f"sqlite:///{server_dir / 'mlflow.db'}", port, server_dir / "server.log")
    uri = f"http://alice:{SECRET}@127.0.0.1:{port}"
    cfg = tiny_config(workdir)
    cfg["mlflow"] = {"tracking_uri": uri, "experiment": "secrets"}
    config_file = server_dir / "config.yaml"  # the user's own config: outside what the run leaves
    config_file.write_text(yaml.safe_dump(cfg))
    watch = CmdlineWatch()
    watch.start()
    env = {**os.environ, "PATH": f"{Path(SNAKEMAKE).parent}{os.pathsep}{os.environ['PATH']}"}
    env.pop("MLFLOW_TRACKING_URI", None)
    try:
        r = subprocess.run([SNAKEMAKE, "--snakefile", str(ROOT / "Snakefile"), "--directory", str(workdir),
                            "--cores", "2", "--configfile", str(config_file), "-p", "results/train/16/model.pt"],
                           capture_output=True, text=True, timeout=900, env=env)
    finally:
        watch.stop()
    try:
        yield {"workdir": workdir, "proc": r, "watch": watch, "port": port}
    finally:
        stop_process_group(server)


def test_the_run_logs_to_the_credentialed_server(credentialed_run):
    from mlflow import MlflowClient

    r = credentialed_run["proc"]
    assert r.returncode == 0, f"{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    c = MlflowClient(tracking_uri=f"http://127.0.0.1:{credentialed_run['port']}")
    exp = c.get_experiment_by_name("secrets")
    runs = c.search_runs([exp.experiment_id])
    stages = sorted(run.data.tags.get("deepimage.stage", "") for run in runs)
    assert {"workflow", "train"} <= set(stages), stages
    assert all(run.info.status == "FINISHED" for run in runs if run.data.tags.get("deepimage.stage") == "train")


def test_no_process_command_line_held_the_password(credentialed_run):
    watch = credentialed_run["watch"]
    assert watch.samples > 10
    assert watch.hits == [], sorted(set(watch.hits))[:5]


def test_nothing_the_run_left_or_printed_holds_the_password(credentialed_run):
    r = credentialed_run["proc"]
    assert SECRET not in r.stdout and SECRET not in r.stderr
    assert "alice:***@127.0.0.1" in r.stderr and "carries credentials" in r.stderr, r.stderr[-2000:]
    assert hits_in_files(credentialed_run["workdir"]) == []


def test_mlflow_params_tags_and_artifacts_hold_no_password(credentialed_run, tmp_path):
    from mlflow import MlflowClient

    c = MlflowClient(tracking_uri=f"http://127.0.0.1:{credentialed_run['port']}")
    exp = c.get_experiment_by_name("secrets")
    runs = c.search_runs([exp.experiment_id])
    assert runs
    for run in runs:
        shown = json.dumps({"params": run.data.params, "tags": run.data.tags, "name": run.info.run_name})
        assert SECRET not in shown, shown
        assert "alice:***@" in shown or run.data.tags.get("deepimage.stage") != "workflow", shown
        local = Path(c.download_artifacts(run.info.run_id, "", str(tmp_path / run.info.run_id)))
        assert hits_in_files(local) == []


def test_horovod_workers_get_mlflows_password_and_no_command_line_shows_it(tmp_path, monkeypatch):
    """MLflow's documented way: MLFLOW_TRACKING_PASSWORD in the environment. horovodrun would
    write it into its workers' command lines; they get it all the same."""
    from deepimage.launch import supervise

    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "alice")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", SECRET)
    watch = CmdlineWatch()
    watch.start()
    seen: dict[int, bytes] = {}

    def read_workers_environment():
        deadline = time.monotonic() + 120
        while len(seen) < 2 and time.monotonic() < deadline:
            for r in range(2):
                pid_file = tmp_path / f"rank{r}.pid"
                if r not in seen and pid_file.is_file() and pid_file.read_text():
                    seen[r] = Path(f"/proc/{pid_file.read_text()}/environ").read_bytes()
            time.sleep(0.2)

    reader = threading.Thread(target=read_workers_environment)
    reader.start()
    try:
        with pytest.raises(supervise.LaunchFailed, match="ran past"):
            supervise.run("horovod", 2, "tests.workers.sleeper", ["--out", str(tmp_path)], threads=2,
                          timeout_s=30, out=open(os.devnull, "w"))
    finally:
        reader.join()
        watch.stop()
    assert sorted(seen) == [0, 1]
    for environ in seen.values():
        assert f"MLFLOW_TRACKING_PASSWORD={SECRET}".encode() in environ.split(b"\0")
        assert b"DEEPIMAGE_LAUNCH_SECRETS=" not in environ
    assert watch.hits == [], sorted(set(watch.hits))[:3]
