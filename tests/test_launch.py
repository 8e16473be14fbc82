"""Unit tests of the launcher's SLURM side and of the same-node decision:

    .venv/bin/pytest -q tests/test_launch.py

No cluster needed: SLURM environments are given as dicts, `scontrol show hostnames` expands
node lists offline, and open_channels gets a fake all-gather.
"""
from __future__ import annotations

import os
import shutil
import socket

import pytest

from deepimage import launch
from deepimage.launch import command, slurm
from deepimage.parallel.transport import cma_setup
from deepimage.parallel.node import node_name

BATCH = {"SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "n[1-2]", "SLURM_NTASKS": "2", "SLURM_NNODES": "2"}


def test_auto_picks_srun_in_a_batch_script_with_np_tasks():
    assert launch.resolve_launcher("auto", 2, BATCH) == "srun"


def test_auto_stays_local_outside_slurm_inside_a_step_or_with_too_few_tasks():
    assert launch.resolve_launcher("auto", 2, {}) == "horovod"
    assert launch.resolve_launcher("auto", 2, {**BATCH, "SLURM_STEP_ID": "0"}) == "horovod"
    assert launch.resolve_launcher("auto", 4, BATCH) == "horovod"
    assert launch.resolve_launcher("torchrun", 2, BATCH) == "torchrun"


def test_srun_task_env_maps_slurm_ids_to_torch_distributed():
    env = {"SLURM_PROCID": "3", "SLURM_NTASKS": "4", "SLURM_LOCALID": "1", "SLURM_NNODES": "2",
           "SLURM_NTASKS_PER_NODE": "2", "SLURM_JOB_ID": "4242", "SLURM_STEP_ID": "1"}
    assert slurm.srun_worker_env(env) == {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1",
                                           "LOCAL_WORLD_SIZE": "2",
                                           "MASTER_PORT": str(20000 + (4242 * 32 + 1) % 20000)}


def test_srun_task_env_outside_srun_is_one_line_error():
    with pytest.raises(SystemExit, match="SLURM_PROCID is not set"):
        slurm.srun_worker_env({})


def test_srun_command_runs_one_task_per_worker_through_the_task_wrapper(monkeypatch):
    monkeypatch.setattr(command, "slurm_job", lambda env=None: {"nnodes": "2"})
    cmd = launch.launch_command("srun", 2, "deepimage.train", ["--out", "x"])
    assert cmd[:5] == ["srun", "--ntasks", "2", "--nodes", "2"]
    assert cmd[-6:] == ["--srun-task", "--np", "2", "deepimage.train", "--out", "x"]


def test_auto_must_be_resolved_before_building_a_command():
    with pytest.raises(ValueError, match="auto resolved first"):
        launch.launch_command("auto", 2, "deepimage.train", [])


def test_rendezvous_port_follows_the_job_and_step_ids_and_address_is_the_first_node(monkeypatch):
    monkeypatch.setattr(slurm, "expand_nodelist", lambda nl: ["n1", "n2"])
    monkeypatch.setattr(slurm, "node_address", lambda n: {"n1": "10.0.0.1"}[n])
    assert slurm.srun_rendezvous(BATCH) == {"MASTER_ADDR": "10.0.0.1"}
    ports = {slurm.rendezvous_port(job, step) for job in ("4242", "4243") for step in ("0", "1")}
    assert len(ports) == 4 and all(20000 <= p < 40000 for p in ports)


def test_rendezvous_outside_slurm_says_how_to_fix():
    with pytest.raises(RuntimeError, match="train.launcher: horovod"):
        slurm.srun_rendezvous({})


@pytest.mark.skipif(shutil.which("scontrol") is None, reason="scontrol not installed (tests/cluster/install.sh)")
def test_nodelist_expands_without_a_cluster(tmp_path, monkeypatch):
    """scontrol needs a slurm.conf to read, not a running controller: a two-line one will do
    (as on a login node whose slurmctld is down)."""
    if shutil.which("scontrol") is None:
        why = "scontrol is not installed (tests/cluster/install.sh installs it)"
        pytest.fail(why) if os.environ.get("CI") == "true" else pytest.skip(why)
    conf = tmp_path / "slurm.conf"
    conf.write_text("ClusterName=offline\nSlurmctldHost=localhost\n")
    monkeypatch.setenv("SLURM_CONF", str(conf))
    assert slurm.expand_nodelist("gpu[01-02],n7") == ["gpu01", "gpu02", "n7"]


def test_horovod_host_list_spreads_np_over_the_nodes(monkeypatch):
    monkeypatch.setenv("SLURM_JOB_NODELIST", "n[1-2]")
    monkeypatch.setattr(slurm.shutil, "which", lambda exe: "/usr/bin/" + exe)
    monkeypatch.setattr(slurm, "expand_nodelist", lambda nl: ["n1", "n2"])
    assert slurm.slurm_hosts(4) == "n1:2,n2:2"


def test_node_name_is_slurms_node_else_the_hostname(monkeypatch):
    monkeypatch.delenv("SLURMD_NODENAME", raising=False)
    assert node_name() == socket.gethostname()
    monkeypatch.setenv("SLURMD_NODENAME", "n2")
    assert node_name() == "n2"


def test_ranks_on_two_nodes_keep_gloo_with_the_reason(monkeypatch):
    """Two SLURM nodes on one machine: same hostname, different node names -> no same-host path."""
    monkeypatch.setenv("SLURMD_NODENAME", "n1")
    gathered = []

    def gather(obj):  # rank 0's view of an all-gather with a rank 1 on node n2
        gathered.append(obj)
        return [obj, "n2"]

    channels, why = cma_setup.open_channels(0, 2, gather)
    assert channels is None and why == "ranks on 2 nodes"
    assert gathered == ["n1"]  # decided on the first gather, before any socket or probe


def test_semaphores_of_a_sigkilled_process_group_are_removed_and_live_ones_kept():
    """What the session's clean-up does after tests that SIGKILL whole jobs: a semaphore whose
    creator and resource tracker were SIGKILLed together is unlinked, one a living process holds
    (this one's spawn-context lock) is kept."""
    import multiprocessing
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    from workflow import remove_orphaned_semaphores

    since = time.time() - 1.0
    code = ("import multiprocessing, time; lock = multiprocessing.get_context('spawn').Lock(); "
            "print(lock._semlock.name, flush=True); time.sleep(120)")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                            start_new_session=True)
    orphan = Path("/dev/shm/sem." + proc.stdout.readline().strip().lstrip("/"))
    os.killpg(proc.pid, signal.SIGKILL)  # the creator and its resource tracker, as a node failure
    proc.wait()
    live = multiprocessing.get_context("spawn").Lock()
    held = Path("/dev/shm/sem." + live._semlock.name.lstrip("/"))
    assert orphan.exists() and held.exists()
    deadline = time.monotonic() + 30  # the tracker, reparented, may take a moment to be reaped
    removed = remove_orphaned_semaphores(since)
    while orphan.name not in removed and time.monotonic() < deadline:
        time.sleep(0.2)
        removed += remove_orphaned_semaphores(since)
    assert orphan.name in removed and not orphan.exists()
    assert held.name not in removed and held.exists()


def test_a_sigkilled_launchs_failure_folder_is_removed_by_the_next_launch(tmp_path):
    """A real torchrun launch SIGKILLed with its whole group leaves its failure folder; the next
    launch on the host removes it, keeps the folder of a launcher that is still running (this
    process's pid stands for one) and removes its own when it ends."""
    import signal
    import subprocess
    import sys
    import time

    from workflow import ROOT

    env = {**os.environ, "TMPDIR": str(tmp_path)}
    def launch_cmd(code):
        return [sys.executable, "-m", "deepimage.launch", "--launcher", "torchrun", "--np", "1",
                "--threads", "1", "timeit", "-n", "1", "-r", "1", code]

    killed = subprocess.Popen(launch_cmd("import time; time.sleep(300)"), cwd=ROOT, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    prefix = launch.failure_dir_prefix(killed.pid)
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob(prefix + "*")):
        assert killed.poll() is None and time.monotonic() < deadline, "the launch made no failure folder"
        time.sleep(0.1)
    os.killpg(killed.pid, signal.SIGKILL)  # the launcher, torchrun and the worker: a node's kill -9
    killed.wait()
    left = list(tmp_path.glob(prefix + "*"))
    live = tmp_path / (launch.failure_dir_prefix(os.getpid()) + "x")
    live.mkdir()
    assert len(left) == 1 and left[0].is_dir()

    done = subprocess.run(launch_cmd("pass"), cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"launch: removed 1 failure folder(s) of killed launches in {tmp_path}" in done.stdout
    assert not left[0].exists()
    assert live.is_dir()
    # The second launch's own folder is gone too (torchrun's torchelastic_* folders are not ours).
    assert [p.name for p in tmp_path.glob("deepimage-launch-*")] == [live.name]


def test_a_launch_past_its_time_limit_stops_every_worker(tmp_path):
    """launch.run's time limit (what the benchmarks' run_workers passes): two workers that sleep
    for an hour are stopped with their launcher, and LaunchFailed says the launch ran past it."""
    import io
    import time

    import psutil

    out = io.StringIO()
    with pytest.raises(launch.LaunchFailed, match="ran past 30 s; all workers stopped") as e:
        launch.run("torchrun", 2, "tests.workers.sleeper", ["--out", str(tmp_path)], threads=2,
                   timeout_s=30, out=out)
    assert e.value.reason == "ran past 30 s"
    assert "launch: " in out.getvalue()  # the launch's lines went to `out`
    pids = [int((tmp_path / f"rank{r}.pid").read_text()) for r in range(2)]
    deadline = time.monotonic() + 10  # init reaps the orphans' zombies

    def alive(pid: int) -> bool:
        try:
            return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
        except psutil.Error:
            return False

    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not [p for p in pids if alive(p)], "a worker outlived its launch's time limit"
