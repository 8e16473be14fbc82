"""Many workflows and many writers at once against one MLflow tracking server, checked through
MLflow's client.

    make tracking-server      # MLflow on PostgreSQL at http://127.0.0.1:5055
    python -m deepimage.bench.tracking_load --tracking-uri http://127.0.0.1:5055 --compare-sqlite --json

Two loads, one after the other:
- workflows: --workflows real `snakemake` invocations at once (train, evaluate, ensemble of a tiny
  synthetic config, one resolution each, --cores 1 each), two per experiment, resolutions cycled;
- stress: --writers processes, each with its own run, logging one metric per step through the
  workflow's own path (deepimage.tracking.StageRun; --no-retry: MlflowClient alone, without its
  backoff while SQLite is locked) for --seconds; each call's latency is timed.

Then, through MlflowClient: every run a workflow made is a child of that workflow's parent run;
every epoch's metric of every training run is stored exactly once; every model version a run
names is registered to that run; `champion` of each registered name that has one is on its best
version; every stress write that returned is stored exactly once (lost writes, duplicates).
--compare-sqlite runs the same stress against `mlflow server` on a SQLite file (started here)
and with the SQLite file as the tracking URI itself (each writer opens it). With --json the last
line is one JSON object: the command, date, commit, machine, the figures and the checks.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import json
import multiprocessing
import os
import platform
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from pathlib import Path

import yaml

from deepimage import lineage, mlflow_client, tracking
from deepimage.bench import BenchError

ROOT = Path(__file__).resolve().parents[2]
TARGET = "results/ensemble/metrics.json"  # dataset, shard, train, evaluate, ensemble
EPOCH_METRICS = ("loss", "train_top1_error", "lr", "epoch_seconds")
CHAMPION, ERROR_TAG = "champion", "val_top1_error"  # deepimage.models' alias and version tag
STRESS_KEY = "stress"
MAX_WRITERS, MAX_SECONDS = 64, 600

# The smallest workflow that trains, evaluates and registers a model and an ensemble.
BASE_CONFIG = {
    "dataset": {"synthetic": {"classes": 4, "train_per_class": 8, "val_per_class": 4, "image_size": 32}},
    "model": {"conv": [[4]], "fc_hidden": [16, 16]},
    "train": {"np": 1, "epochs": 2, "batch_size": 16},
    "evaluate": {"batch_size": 32},
}


# ---------------------------------------------------------------------------- workflows
def workflow_configs(n: int, uri: str, prefix: str, resolutions: list[int], epochs: int) -> list[dict]:
    """n configs: two per experiment (<prefix>-0, -1, ...), resolutions cycled within each."""
    out = []
    for i in range(n):
        cfg = json.loads(json.dumps(BASE_CONFIG))
        cfg["resolutions"] = [resolutions[i % len(resolutions)]]
        cfg["train"]["epochs"] = epochs
        cfg["mlflow"] = {"tracking_uri": uri, "experiment": f"{prefix}-{i // 2}"}
        out.append(cfg)
    return out


def start_workflow(folder: Path, cfg: dict, cores: int) -> subprocess.Popen:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.yaml").write_text(yaml.safe_dump(cfg))
    snakemake = str(Path(sys.executable).with_name("snakemake"))
    cmd = [snakemake, TARGET, "--snakefile", str(ROOT / "Snakefile"), "--directory", str(folder),
           "--cores", str(cores), "--configfile", str(folder / "config.yaml")]
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(cmd, stdout=open(folder / "snakemake.out", "w"), stderr=subprocess.STDOUT,
                            start_new_session=True, env=env)


def run_workflows(workdir: Path, configs: list[dict], cores: int, timeout: float) -> tuple[list[Path], float]:
    """Start every workflow at once; wait for all; BenchError naming the first that failed."""
    folders = [workdir / f"workflow-{i}" for i in range(len(configs))]
    t0 = time.monotonic()
    procs = [start_workflow(f, c, cores) for f, c in zip(folders, configs)]
    try:
        for f, p in zip(folders, procs):
            if p.wait(timeout=max(1.0, timeout - (time.monotonic() - t0))) != 0:
                tail = (f / "snakemake.out").read_text(errors="replace").splitlines()[-20:]
                raise BenchError(f"workflow in {f} failed (exit {p.returncode}):\n" + "\n".join(tail))
    except subprocess.TimeoutExpired:
        raise BenchError(f"the workflows ran past {timeout:.0f} s") from None
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    return folders, time.monotonic() - t0


def check_workflow(client, folder: Path, epochs: int) -> dict:
    """The checks of one finished workflow's runs; a list of problems (empty: all hold)."""
    parent = json.loads((folder / tracking.DEFAULT_PARENT_FILE).read_text())
    records = [json.loads(p.read_text()) for p in sorted((folder / "results").rglob("mlflow_run.json"))]
    problems, registered = [], []
    if client.get_run(parent["run_id"]).info.status != "FINISHED":
        problems.append(f"{folder}: parent run {parent['run_id']} not FINISHED")
    children = client.search_runs([parent["experiment_id"]], max_results=1000,
                                  filter_string=f"tags.mlflow.parentRunId = '{parent['run_id']}'")
    if sorted(r.info.run_id for r in children) != sorted(r["run_id"] for r in records):
        problems.append(f"{folder}: children of {parent['run_id']} are {len(children)} runs, its jobs "
                        f"recorded {len(records)}")
    for rec in records:
        run = client.get_run(rec["run_id"])
        tags, where = run.data.tags, f"{folder.name}/{rec['stage']} run {rec['run_id']}"
        if tags.get("mlflow.parentRunId") != parent["run_id"] or run.info.status != "FINISHED":
            problems.append(f"{where}: parent {tags.get('mlflow.parentRunId')}, status {run.info.status}")
        if not {lineage.COMMIT_TAG, lineage.CONFIG_DIGEST_TAG} <= set(tags):
            problems.append(f"{where}: no commit or config digest tag")
        if rec["stage"] == "train":
            for key in EPOCH_METRICS:
                steps = sorted(m.step for m in client.get_metric_history(rec["run_id"], key))
                if steps != list(range(epochs)):
                    problems.append(f"{where}: {key} stored at steps {steps}, expected 0..{epochs - 1} once each")
            if not run.inputs.dataset_inputs:
                problems.append(f"{where}: no dataset input")
        if rec["stage"] in ("train", "ensemble"):
            name_version = tags.get("deepimage.registered_model")
            if name_version is None:
                problems.append(f"{where}: no registered model")
                continue
            name, version = name_version.rsplit("/", 1)
            if client.get_model_version(name, version).run_id != rec["run_id"]:
                problems.append(f"{where}: {name_version} is registered to another run")
            registered.append(name)
    return {"runs": len(records) + 1, "problems": problems, "registered": registered}


def check_champions(client, names: set[str]) -> list[str]:
    """`champion` of each name that has one is on a version with the lowest val_top1_error."""
    problems = []
    for name in sorted(names):
        versions = client.search_model_versions(f"name = '{name}'", max_results=10000)
        errors = {v.version: float(v.tags[ERROR_TAG]) for v in versions if ERROR_TAG in v.tags}
        if not errors:
            continue  # a name without a champion (the per-resolution models)
        champion = client.get_model_version_by_alias(name, CHAMPION)
        if errors.get(champion.version) != min(errors.values()):
            problems.append(f"{name}: champion is version {champion.version} (error {errors.get(champion.version)}), "
                            f"best is {min(errors.values())} ({len(errors)} versions)")
    return problems


# ---------------------------------------------------------------------------- stress
def writer(uri: str, experiment: str, seconds: float, index: int, retry: bool = True) -> dict:
    """One writer process: a run of its own, one metric per step until the deadline, through the
    workflow's StageRun (retry) or MlflowClient.log_metric alone."""
    try:
        exp = tracking.experiment_id(uri, experiment)
        c = mlflow_client.client(uri)
        run_id = mlflow_client.retry(lambda: c.create_run(exp, run_name=f"writer-{index}")).info.run_id
    except Exception as e:  # the store refused a writer's start: counted, and named
        return {"run_id": None, "written": [], "failed": 0, "latencies": [],
                "first_error": f"start: {type(e).__name__}: {str(e)[:300]}"}
    run = tracking.StageRun(uri, run_id)
    log = (lambda step: run.log_metrics({STRESS_KEY: float(step)}, step=step)) if retry else \
        (lambda step: c.log_metric(run_id, STRESS_KEY, float(step), step=step))
    written, failed, latencies, first_error = [], 0, [], None
    deadline, step = time.monotonic() + seconds, 0
    while time.monotonic() < deadline:
        t0 = time.perf_counter()
        try:
            log(step)
            written.append(step)
        except Exception as e:  # counted, and named in the result
            failed += 1
            first_error = first_error or f"{type(e).__name__}: {str(e)[:300]}"
        latencies.append(time.perf_counter() - t0)
        step += 1
    return {"run_id": run_id, "written": written, "failed": failed, "latencies": latencies,
            "first_error": first_error}


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


def stress(uri: str, experiment: str, writers: int, seconds: float, retry: bool = True) -> dict:
    """--writers processes at once; the figures and what the store kept of their writes."""
    tracking.experiment_id(uri, experiment)  # one process makes the store and the experiment
    ctx = multiprocessing.get_context("spawn")
    t0 = time.monotonic()
    with concurrent.futures.ProcessPoolExecutor(writers, mp_context=ctx) as pool:
        results = list(pool.map(writer, [uri] * writers, [experiment] * writers, [seconds] * writers,
                                range(writers), [retry] * writers))
    wall = time.monotonic() - t0
    c = mlflow_client.client(uri)
    lost = duplicates = 0
    for r in results:
        if r["run_id"] is None:
            continue
        stored = Counter(m.step for m in c.get_metric_history(r["run_id"], STRESS_KEY))
        lost += sum(1 for s in r["written"] if stored[s] == 0)
        duplicates += sum(n - 1 for n in stored.values())
    latencies = [x for r in results for x in r["latencies"]]
    writes = sum(len(r["written"]) for r in results)
    return {"tracking_uri": uri, "writers": writers, "seconds": seconds, "retry": retry, "wall_s": round(wall, 1),
            "writers_not_started": sum(r["run_id"] is None for r in results),
            "writes": writes, "failed_calls": sum(r["failed"] for r in results),
            "writes_per_s": round(writes / seconds, 1),
            "latency_p50_ms": round(1000 * statistics.median(latencies), 1) if latencies else None,
            "latency_p95_ms": round(1000 * percentile(latencies, 0.95), 1),
            "latency_max_ms": round(1000 * max(latencies, default=float("nan")), 1),
            "lost_writes": lost, "duplicate_writes": duplicates,
            "first_error": next((r["first_error"] for r in results if r["first_error"]), None)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sqlite_server(folder: Path):
    """`mlflow server` on a SQLite file in folder (free localhost port); (uri, process)."""
    port = free_port()
    folder.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri",
                             f"sqlite:///{folder / 'mlflow.db'}", "--host", "127.0.0.1", "--port", str(port),
                             "--workers", "2"], cwd=folder, stdout=open(folder / "server.log", "w"),
                            stderr=subprocess.STDOUT, start_new_session=True, env=env)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                return f"http://127.0.0.1:{port}", proc
        except OSError:
            time.sleep(0.5)
    stop(proc)
    raise BenchError(f"mlflow server on SQLite did not start: see {folder / 'server.log'}")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


# ---------------------------------------------------------------------------- the bench
def machine() -> dict:
    return {"host": platform.node(), "cpus": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version()}


def run(a: argparse.Namespace) -> dict:
    workdir = Path(a.workdir or tempfile.mkdtemp(prefix="tracking-load-"))
    state = lineage.git_state()
    out = {"command": shlex.join(["python", "-m", "deepimage.bench.tracking_load", *a.argv]),
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "commit": state[0] if state else None, "dirty": state[1] if state else None,
           "machine": machine(), "tracking_uri": a.tracking_uri, "problems": []}
    client = mlflow_client.client(a.tracking_uri)
    if a.workflows:
        configs = workflow_configs(a.workflows, a.tracking_uri, a.prefix, a.resolutions, a.epochs)
        folders, wall = run_workflows(workdir, configs, a.cores, a.timeout)
        checks = [check_workflow(client, f, a.epochs) for f in folders]
        names = {n for c in checks for n in c["registered"]}
        problems = [p for c in checks for p in c["problems"]] + check_champions(client, names)
        out["workflows"] = {"count": a.workflows, "experiments": sorted({c["mlflow"]["experiment"] for c in configs}),
                            "resolutions": [c["resolutions"][0] for c in configs], "wall_s": round(wall, 1),
                            "runs": sum(c["runs"] for c in checks), "registered_names": sorted(names)}
        out["problems"] += problems
    if a.writers:
        load = (f"{a.prefix}-stress", a.writers, a.seconds, not a.no_retry)
        out["stress"] = {"server": stress(a.tracking_uri, *load)}
        if a.compare_sqlite:
            uri, proc = sqlite_server(workdir / "sqlite-server")
            try:
                out["stress"]["sqlite_server"] = stress(uri, *load)
            finally:
                stop(proc)
            out["stress"]["sqlite_file"] = stress(f"sqlite:///{workdir / 'direct.db'}", *load)
        for name, s in out["stress"].items():
            if s["lost_writes"] or s["duplicate_writes"]:
                out["problems"].append(f"stress {name}: {s['lost_writes']} lost, {s['duplicate_writes']} "
                                       f"duplicate writes")
    return out


def table(r: dict) -> str:
    lines = [f"tracking load on {r['tracking_uri']} ({r['date']}, {r['machine']['cpus']} CPUs)"]
    if "workflows" in r:
        w = r["workflows"]
        lines.append(f"  workflows: {w['count']} at once, {w['runs']} runs, {w['wall_s']} s; "
                     f"experiments {', '.join(w['experiments'])}; resolutions {w['resolutions']}")
    for name, s in r.get("stress", {}).items():
        lines.append(f"  stress {name:<13} {s['writers']} writers x {s['seconds']:.0f} s: {s['writes']} writes, "
                     f"{s['writes_per_s']}/s, p50 {s['latency_p50_ms']} ms, p95 {s['latency_p95_ms']} ms, "
                     f"max {s['latency_max_ms']} ms, failed {s['failed_calls']} (+{s['writers_not_started']} "
                     f"writers not started), lost {s['lost_writes']}, "
                     f"duplicates {s['duplicate_writes']}")
    lines += [f"  PROBLEM {p}" for p in r["problems"]] or ["  checks: all hold"]
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tracking-uri", required=True, help="the server under load (http://host:port)")
    p.add_argument("--workdir", default=None, help="the workflows' folders (default: a new temporary one)")
    p.add_argument("--workflows", type=int, default=4, help="snakemake invocations at once (0: none)")
    p.add_argument("--resolutions", type=int, nargs="+", default=[16, 32], help="cycled over the workflows")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--cores", type=int, default=1, help="--cores of each workflow")
    p.add_argument("--timeout", type=float, default=1800, help="seconds for all workflows together")
    p.add_argument("--writers", type=int, default=8, help="stress writer processes (0: no stress)")
    p.add_argument("--seconds", type=float, default=20, help="how long each writer logs")
    p.add_argument("--compare-sqlite", action="store_true",
                   help="the same stress against mlflow server on SQLite and a SQLite file directly")
    p.add_argument("--no-retry", action="store_true",
                   help="stress with MlflowClient.log_metric alone, "
                        "without the workflow's backoff while SQLite is locked")
    p.add_argument("--prefix", default=f"load-{time.strftime('%Y%m%d-%H%M%S')}", help="experiment names' prefix")
    p.add_argument("--json", action="store_true", help="end with one JSON line")
    a = p.parse_args(argv)
    if not 0 <= a.writers <= MAX_WRITERS or not 0 < a.seconds <= MAX_SECONDS:
        p.error(f"--writers must be 0..{MAX_WRITERS} and --seconds 0..{MAX_SECONDS}")
    if a.workflows < 0:
        p.error("--workflows must be 0 or more")
    a.argv = list(sys.argv[1:] if argv is None else argv)
    return a


def main(argv: list[str] | None = None) -> None:
    a = parse_args(argv)
    try:
        tracking.check_reachable(a.tracking_uri)
        r = run(a)
    except (BenchError, tracking.TrackingUnreachable) as e:
        sys.exit(f"tracking_load: {e}")
    print(table(r), flush=True)
    if a.json:
        print(json.dumps(r))
    if r["problems"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
