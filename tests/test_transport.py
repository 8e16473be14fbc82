"""Transport: every method under real horovodrun / torchrun launches, the local transport, and
a launch that times out stopping its workers (tests/workers/transport_launch.py).

    pytest tests/test_transport.py
"""
from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from deepimage.launch import launch_command, worker_env
from deepimage.parallel.transport import (LocalTransport, TransportError, detect_kind,
                                          init_transport)
from deepimage.parallel.transport.horovod import IDLE_CYCLE_MS

from workers.transport_launch import (LAUNCH_TIMEOUT, finish_launch, launch_worker, start_launch,
                                      stop_tree)

EXPECTED_CHECKS = {
    "picked_expected_transport",
    *(f"alltoall{kind}_{dtype}" for kind in ("", "_recv_splits", "_exclude_self_into_out")
      for dtype in ("float32", "int64", "bfloat16")),
    "alltoall_two_in_flight", "lane1_beside_lane0", "error_bad_lane", "allgather_uneven_rows",
    "allgather_sizes_into_out",
    "allgather_int64", "allreduce_sum", "allreduce_average", "allreduce_max",
    "allreduce_max_int64", "allreduce_leaves_input", "broadcast_from_last_rank", "barrier_returns",
    "tags_out_of_order_from_thread", "error_bad_splits", "error_splits_sum", "error_bad_op",
    "error_allgather_sizes", "error_0d"}


@pytest.mark.parametrize("np,data_path", [(2, "auto"), (3, "auto"), (2, "gloo"), (3, "gloo")])
@pytest.mark.parametrize("launcher", ["horovod", "torchrun"])
def test_every_method_gives_the_expected_values(launcher, np, data_path, tmp_path):
    """alltoall (uneven/zero splits, known recv splits, without own rows, into out, 2 in flight,
    lane 1 beside lane 0), allgather (a rank with no rows), allreduce sum/average/max, broadcast, barrier, tags used
    from another thread, and argument errors, on every rank of a real launch, over the
    same-host path ("auto" picks it: every rank is on this host) and over gloo."""
    reports = launch_worker(launcher, np, "tests.workers.transport_check", tmp_path,
                            "--expect", launcher, "--data-path", data_path)
    for report in reports:
        assert not report["errors"], f"rank {report['rank']}: {report['errors']}"
        assert report["size"] == np
        assert report["data_path"] == ("cma" if data_path == "auto" else "gloo")
        # Horovod carries no tensor on these paths: its background thread cycles slowly, not
        # every 1 ms on the worker's core
        assert report["horovod_cycle_ms"] == (str(IDLE_CYCLE_MS) if launcher == "horovod" else None)
        assert set(report["checks"]) == EXPECTED_CHECKS
        failed = [name for name, ok in report["checks"].items() if not ok]
        assert not failed, f"rank {report['rank']} ({launcher}, np={np}) failed {failed}"
    assert sorted(r["rank"] for r in reports) == list(range(np))


def test_horovod_data_path_moves_bytes_with_hvd_operations(tmp_path):
    """HorovodTransport(data_path="horovod") (the path CUDA tensors take): same values."""
    reports = launch_worker("horovod", 2, "tests.workers.transport_check", tmp_path,
                            "--expect", "horovod", "--data-path", "horovod")
    bf16 = {c for c in EXPECTED_CHECKS if c.endswith("bfloat16")}
    for report in reports:
        assert not report["errors"], f"rank {report['rank']}: {report['errors']}"
        assert set(report["checks"]) == EXPECTED_CHECKS - bf16
        assert report["horovod_cycle_ms"] is None  # Horovod's own default: it carries every byte
        assert all(report["checks"].values()), report["checks"]


def test_local_transport_is_the_identity():
    t = LocalTransport()
    x = torch.arange(6.0).view(3, 2)
    assert (t.rank, t.size) == (0, 1)
    for result in (t.alltoall(x, [3]), t.allgather(x), t.allreduce(x, "average"), t.broadcast(x)):
        assert torch.equal(result, x) and result.data_ptr() != x.data_ptr()
    assert t.alltoall_async(x, [3], include_self=False).wait().shape == (0, 2)
    t.barrier()
    with pytest.raises(TransportError, match="splits"):
        t.alltoall(x, [2])
    with pytest.raises(TransportError, match="op must be one of"):
        t.allreduce(x, "prod")


def test_auto_picks_the_launcher_from_the_environment(monkeypatch):
    for var in ("HOROVOD_RANK", "RANK", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    assert detect_kind() == "local"
    assert isinstance(init_transport("auto"), LocalTransport)
    assert init_transport("auto") is init_transport("local")  # one transport per process
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert detect_kind() == "torchrun"
    monkeypatch.setenv("HOROVOD_RANK", "0")
    assert detect_kind() == "horovod"
    with pytest.raises(TransportError, match="kind must be one of"):
        init_transport("mpi")


def test_tags_are_reserved_in_call_order():
    t = LocalTransport()
    first = t.reserve_tags(3)
    assert t.reserve_tags(1) == first + 3


def _alive(pid: int) -> bool:
    """True while `pid` exists and is not a zombie."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _worker_pids(proc, pid_files: list[Path]) -> list[int]:
    """The pids the workers wrote, once all have (while the launcher still runs)."""
    deadline = time.monotonic() + LAUNCH_TIMEOUT
    while not all(f.exists() and f.read_text() for f in pid_files):
        assert proc.poll() is None, f"the launcher exited before its workers started: {proc.communicate()}"
        assert time.monotonic() < deadline, f"the workers did not start in {LAUNCH_TIMEOUT} s"
        time.sleep(0.2)
    return [int(f.read_text()) for f in pid_files]


@pytest.mark.parametrize("launcher", ["horovod", "torchrun"])
def test_a_timed_out_launch_leaves_no_worker_running(launcher, tmp_path):
    """Two workers that sleep for an hour; once both are running, the launch's timeout (1 s
    from then) must stop the launcher and both workers: no worker pid is left alive."""
    cmd = launch_command(launcher, 2, "tests.workers.sleeper", ["--out", str(tmp_path)])
    proc = start_launch(cmd, worker_env(threads=2, np=2))
    try:
        pids = _worker_pids(proc, [tmp_path / f"rank{r}.pid" for r in range(2)])
    except BaseException:
        stop_tree(proc)  # a failed test leaves nothing running either
        raise
    assert all(_alive(p) for p in pids)
    with pytest.raises(TimeoutError, match="ran past 1 s"):
        finish_launch(proc, cmd, timeout=1)
    deadline = time.monotonic() + 10  # init reaps the orphans' zombies
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not [p for p in pids if _alive(p)], f"{launcher} workers still running after the timeout"
