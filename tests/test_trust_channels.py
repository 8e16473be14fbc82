"""Attacks on the ranks' channels by another user of the host, or by a stranger process of the
same user: the same-host shared-memory segments (shm.py), the Unix socket of the same-host
message path (cma.py), the rendezvous store of the Horovod transport (horovod.py) and the srun
rendezvous port (launch/slurm.py).

    pytest tests/test_trust_channels.py

The second user is a real Unix account (created here when missing); its processes run through
`setpriv` with the system Python, so they hold none of this process's rights.
"""
from __future__ import annotations

import json
import os
import pwd
import stat
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
import torch

from deepimage.launch import slurm
from deepimage.parallel.transport import cma_setup, shm

from workers.transport_launch import ROOT, launch_worker  # noqa: E402

OTHER_USER = "deepimage-channels-probe"
SYSTEM_PYTHON = "/usr/bin/python3"


@pytest.fixture(scope="module")
def other_user() -> tuple[int, int]:
    """(uid, gid) of a second, unprivileged account."""
    try:
        entry = pwd.getpwnam(OTHER_USER)
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin",
                        OTHER_USER], check=True, capture_output=True)
        entry = pwd.getpwnam(OTHER_USER)
    assert entry.pw_uid != os.getuid()
    return entry.pw_uid, entry.pw_gid


def _command(user: tuple[int, int] | None, code: str) -> list[str]:
    cmd = [SYSTEM_PYTHON, "-c", textwrap.dedent(code)]
    if user is not None:
        cmd = ["setpriv", f"--reuid={user[0]}", f"--regid={user[1]}", "--clear-groups", *cmd]
    return cmd


def run_as(user: tuple[int, int] | None, code: str, timeout: float = 60) -> dict:
    """Run `code` (which prints one JSON line) in the system Python as `user` (None: as this
    user, but a process that is no rank); return what it printed."""
    proc = subprocess.run(_command(user, code), capture_output=True, text=True, timeout=timeout,
                          cwd="/")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def try_open(user, path: str) -> dict:
    return run_as(user, f"""
        import json
        try:
            with open({path!r}, "rb") as f:
                print(json.dumps({{"read": len(f.read(16))}}))
        except OSError as err:
            print(json.dumps({{"error": type(err).__name__}}))
    """)


# -- shared-memory segments ------------------------------------------------------------------

def _rank0_gather(on_names):
    """gather() for rank 0 of two ranks alone in this process: the names go to `on_names` while
    they are live (before rank 1 would map them); rank 1 answers as rank 0 does."""
    calls = []

    def gather(obj):
        calls.append(obj)
        if len(calls) == 1:
            names, why = obj
            assert not why, why
            on_names(names)
        return [obj, obj]

    return gather


def _close(pairs):
    for pair in pairs or []:
        pair.close()


def test_a_live_segment_is_private_to_its_user_whatever_the_umask(other_user):
    seen = {}

    def attack(names):
        seen["modes"] = [stat.S_IMODE(os.lstat(n).st_mode) for n in names]
        seen["owners"] = [os.lstat(n).st_uid for n in names]
        seen["other"] = [try_open(other_user, n) for n in names]

    old = os.umask(0)
    try:
        pairs, why = shm.open_pairs(0, 2, _rank0_gather(attack), 5, lambda: None)
    finally:
        os.umask(old)
    try:
        assert why == "", why
        assert seen["modes"] == [0o600] * 3
        assert seen["owners"] == [os.getuid()] * 3
        assert all(r == {"error": "PermissionError"} for r in seen["other"]), seen["other"]
    finally:
        _close(pairs)


def test_a_planted_segment_name_is_refused_not_followed(other_user, monkeypatch, tmp_path):
    """Another user who knows the next name plants a symlink to one of our files, and another a
    file of their own: neither is opened, truncated or shared; the path is refused by name."""
    target = tmp_path / "ours.bin"
    target.write_bytes(b"keep me")
    for kind in ("symlink", "file"):
        name = f"deepimage-pair-planted-{kind}-{os.getpid()}"
        path = f"/dev/shm/{name}"
        make = (f"os.symlink({str(target)!r}, {path!r})" if kind == "symlink" else
                f"open({path!r}, 'wb').close(); os.chmod({path!r}, 0o666)")
        run_as(other_user, f"""
            import json, os
            {make}
            print(json.dumps({{}}))
        """)
        try:
            monkeypatch.setattr(shm, "_segment_name", lambda: path)
            pairs, why = shm.open_pairs(0, 2, lambda obj: [obj, obj], 5, lambda: None)
            assert pairs is None
            assert path in why and "exists" in why, why
            assert os.lstat(path).st_uid == other_user[0]
            assert target.read_bytes() == b"keep me"
        finally:
            os.unlink(path)


_LEFTOVER = """
    import os, signal, sys, time
    sys.path.insert(0, {root!r})
    from deepimage.parallel.transport import shm

    def gather(obj):
        print(" ".join(obj[0]), flush=True)
        {then}
    shm.open_pairs(0, 2, gather, 5, lambda: None)
"""


def _segment_owner(root: Path, then: str) -> tuple[subprocess.Popen, list[str]]:
    """A rank 0 of this user in its own process that created its segments, then `then`s in the
    gather before rank 1 maps them (os._exit: a rank that died; time.sleep: a live job)."""
    code = textwrap.dedent(_LEFTOVER).format(root=str(root), then=then)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(root)})
    names = proc.stdout.readline().split()
    assert len(names) == 3, names
    return proc, names


def test_the_next_start_sweeps_a_dead_ranks_segments_only(other_user):
    root = Path(__file__).resolve().parents[1]
    live, live_names = _segment_owner(root, "time.sleep(120)")
    dead, dead_names = _segment_owner(root, "os._exit(1)")  # its start leaves the live ones
    dead.wait(30)
    foreign = f"/dev/shm/deepimage-pair-0-0-{os.getpid():x}"
    run_as(other_user, f"""
        import json
        open({foreign!r}, "wb").close()
        print(json.dumps({{}}))
    """)
    try:
        assert all(os.path.exists(n) for n in dead_names + live_names)
        pairs, why = shm.open_pairs(0, 2, lambda obj: [obj, obj], 5, lambda: None)
        _close(pairs)
        assert why == "", why
        assert not any(os.path.exists(n) for n in dead_names), "a dead rank's segments were left"
        assert all(os.path.exists(n) for n in live_names), "a live job's segments were removed"
        assert os.path.exists(foreign), "another user's file was removed"
    finally:
        live.kill()
        live.wait()
        for name in live_names + [foreign]:
            if os.path.exists(name):
                os.unlink(name)


# -- the Unix socket of the same-host message path --------------------------------------------

_INTRUDER = """
    import json, socket, struct
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(20)
    s.connect({name!r})
    s.sendall(struct.pack("<I", 1))  # claims rank 1
    print("connected", flush=True)
    try:
        got = s.recv(64)
        print(json.dumps({{"closed": got == b"", "got": len(got)}}))
    except ConnectionError:
        print(json.dumps({{"closed": True, "got": 0}}))
    except socket.timeout:
        print(json.dumps({{"closed": False, "got": 0, "timeout": True}}))
"""


@pytest.mark.parametrize("who", ["other user", "same user, not a rank"])
def test_an_intruder_cannot_join_the_ranks_socket(who, other_user, capfd):
    """Two ranks open their channels (one thread each); between the exchange of the socket
    names and the connections, an intruder connects to rank 0 first and claims rank 1. It is
    closed and named on stderr; the two ranks still get each other and exchange a message."""
    user = other_user if who == "other user" else None
    intruders: list[subprocess.Popen] = []
    results: dict[int, tuple] = {}
    turn = threading.Barrier(2, timeout=60)
    box: list = [None, None]
    calls = [0, 0]

    def gather_for(rank):
        def gather(obj):
            box[rank] = obj
            calls[rank] += 1
            turn.wait()
            out = list(box)
            turn.wait()
            if calls[rank] == 2 and rank == 1:  # the socket names are out: the intruder goes first
                proc = subprocess.Popen(_command(user, _INTRUDER.format(name=out[0][2])),
                                        stdout=subprocess.PIPE, text=True, cwd="/")
                intruders.append(proc)
                assert proc.stdout.readline().strip() == "connected"
            return out
        return gather

    def rank_main(rank):
        results[rank] = cma_setup.open_channels(rank, 2, gather_for(rank), timeout_s=10)

    threads = [threading.Thread(target=rank_main, args=(r,), daemon=True) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not any(t.is_alive() for t in threads), "opening the channels hung"
    (ch0, why0), (ch1, why1) = results[0], results[1]
    try:
        out, _ = intruders[0].communicate(timeout=60)
        intruder = json.loads(out.strip().splitlines()[-1])
        assert why0 == "" and why1 == "", (why0, why1)
        assert intruder["closed"] is True, intruder
        assert "refused a connection" in capfd.readouterr().err
        sent = torch.arange(1000, dtype=torch.float32)
        got = torch.empty(1000)
        send, recv = ch1.isend(sent, 0, tag=7), ch0.irecv(got, 1, tag=7)
        waits = [threading.Thread(target=w.wait, daemon=True) for w in (send, recv)]
        for w in waits:
            w.start()
        for w in waits:
            w.join(30)
        assert torch.equal(got, sent)
    finally:
        for ch in (ch0, ch1):
            if ch is not None:
                ch.close()
        for proc in intruders:
            proc.kill()
            proc.wait()


# -- the Horovod transport's rendezvous store --------------------------------------------------

def test_one_host_rendezvous_store_is_not_reachable_off_loopback(tmp_path):
    reports = launch_worker("horovod", 2, "tests.workers.store_check", tmp_path)
    rank0 = reports[0]
    assert rank0["data_path"] == "gloo"
    assert rank0["reachable"] == [], f"rank 0 accepts connections off loopback: {rank0}"


def test_srun_tasks_rendezvous_store_listens_on_master_addr_only(tmp_path):
    """Two processes as srun starts them (RANK, WORLD_SIZE, MASTER_ADDR / MASTER_PORT, no torchrun
    agent): rank 0's store takes MASTER_PORT on MASTER_ADDR only."""
    from workflow import free_port

    port = free_port()
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": "2",
           "LOCAL_WORLD_SIZE": "2", "OMP_NUM_THREADS": "1"}
    env.pop("TORCHELASTIC_RUN_ID", None)
    procs = [subprocess.Popen([sys.executable, "-m", "tests.workers.store_check", "--out", str(tmp_path),
                               "--transport", "torchrun"], cwd=ROOT,
                              env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in range(2)]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    rank0 = json.loads((tmp_path / "rank0.json").read_text())
    assert ["127.0.0.1", port] in rank0["listening"], rank0
    assert [a for a in rank0["listening"] if a[1] == port] == [["127.0.0.1", port]], rank0
    assert not [a for a in rank0["reachable"] if a[1] == port], f"the store answers off loopback: {rank0}"


class _TwoHosts:
    """hvd as seen by rank 0 of 2 ranks on 2 hosts."""

    @staticmethod
    def local_size() -> int:
        return 1


def _store_address_on_two_hosts(monkeypatch, env: dict) -> str:
    from deepimage.parallel.transport import horovod

    for key in ("HOROVOD_GLOO_IFACE", "HOROVOD_HOSTNAME"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    transport = object.__new__(horovod.HorovodTransport)
    transport._hvd, transport.size = _TwoHosts(), 2
    return transport._store_address()


def test_several_hosts_store_listens_on_the_jobs_interface_only(monkeypatch):
    import socket
    from datetime import timedelta

    import psutil
    import torch.distributed

    from deepimage.parallel.transport import TransportError
    from deepimage.parallel.transport.store import listening_store

    iface, address = next((name, a.address) for name, addrs in psutil.net_if_addrs().items()
                          for a in addrs if a.family == socket.AF_INET and name != "lo")
    assert _store_address_on_two_hosts(monkeypatch, {"HOROVOD_GLOO_IFACE": iface}) == address
    store, (host, port) = listening_store(address, 0, 2, timedelta(seconds=10))
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", port)) != 0, "the store also listens on loopback"
    client = torch.distributed.TCPStore(host, port, 2, is_master=False,
                                        timeout=timedelta(seconds=10))
    client.set("rendezvous", "ok")
    assert (host, store.get("rendezvous")) == (address, b"ok")
    del client, store
    with pytest.raises(TransportError, match="HOROVOD_GLOO_IFACE=nosuch0: no IPv4 address"):
        _store_address_on_two_hosts(monkeypatch, {"HOROVOD_GLOO_IFACE": "nosuch0"})
    with pytest.raises(TransportError, match="'localhost' resolves to a loopback address"):
        _store_address_on_two_hosts(monkeypatch, {"HOROVOD_HOSTNAME": "localhost"})


# -- the srun rendezvous port ------------------------------------------------------------------

def test_two_srun_steps_of_one_job_meet_on_different_ports(monkeypatch):
    """The launcher's environment plus each task's own: two trainings started as two steps of
    one allocation must not share MASTER_PORT."""
    monkeypatch.setattr(slurm, "expand_nodelist", lambda nodelist: ["n1", "n2"])
    monkeypatch.setattr(slurm, "node_address", lambda node: "10.0.0.1")
    batch = {"SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "n[1-2]", "SLURM_NTASKS": "4",
             "SLURM_NNODES": "2"}
    launched = {**batch, **slurm.srun_rendezvous(batch)}
    ports = set()
    for step in ("0", "1"):
        task = {**launched, "SLURM_STEP_ID": step, "SLURM_PROCID": "0", "SLURM_LOCALID": "0"}
        env = {**task, **slurm.srun_worker_env(task)}
        ports.add(env["MASTER_PORT"])
        assert 1024 < int(env["MASTER_PORT"]) < 65536
    assert len(ports) == 2, ports
