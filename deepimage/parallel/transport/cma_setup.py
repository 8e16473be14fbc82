"""Setting up the same-host message path (cma.py): which ranks can use it, and one Unix socket
per pair of ranks, admitted by the kernel's record of who is at the other end.

    channels, why_not = open_channels(rank, size, gather, timeout_s)   # collective

The sockets are in the abstract namespace, which has no file permissions: any process of the
host may connect to a name it reads from /proc/net/unix. So a rank admits a connection only from
a process it knows: SO_PEERCRED (filled in by the kernel, not claimed by the peer) must give this
user's uid and the pid of the rank that the connection's hello names, from the pids every rank
published through the launcher's process group; the connecting rank checks the listener the same
way. Anything else is closed, named on stderr, and never given a rank; the accepts stay bounded
by one deadline, however many strangers knock.
"""
from __future__ import annotations

import os
import socket
import struct
import sys
import time
import uuid
from typing import Callable

import torch

from deepimage.parallel.node import node_name
from deepimage.parallel.transport.cma import Channels, read_remote

_PROBE_BYTES = 4096
_ACCEPT_TIMEOUT_S = 60.0  # for all of a rank's connections together
_UCRED = struct.Struct("3i")  # pid, uid, gid (SO_PEERCRED)


def _host_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = "?"
    return f"{socket.gethostname()}/{boot}"


def open_channels(rank: int, size: int, gather: Callable[[object], list],
                  timeout_s: float | None = None) -> tuple[Channels | None, str]:
    """Collective: Channels between all ranks, or (None, why not). `gather(obj)` must return
    every rank's obj in rank order (an all-gather over the existing process group);
    `timeout_s` bounds each wait of a message."""
    # Same host means same node: two SLURM nodes on one machine must still use the network.
    nodes = set(gather(node_name()))
    if len(nodes) > 1:
        return None, f"ranks on {len(nodes)} nodes"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    name = f"\0deepimage-cma-{uuid.uuid4().hex}"  # abstract namespace: nothing to clean up
    listener.bind(name)
    listener.listen(size)
    probe = torch.full((_PROBE_BYTES,), rank + 1, dtype=torch.uint8)
    infos = gather((_host_id(), os.getpid(), name, probe.data_ptr()))
    try:
        if len({host for host, *_ in infos}) > 1:
            return None, "the ranks are on more than one host"
        why = _probe(rank, infos)
        whys = [w for w in gather(why) if w]
        if whys:
            return None, whys[0]
        peers, why = _connect(rank, size, listener, infos)
        whys = [w for w in gather(why) if w]
        if whys:
            for sock in peers.values():
                sock.close()
            return None, whys[0]
        return Channels(rank, size, [pid for _, pid, _, _ in infos], peers, timeout_s), ""
    finally:
        listener.close()
        gather(None)  # every rank has read every probe: it may go


def _probe(rank: int, infos: list) -> str:
    """'' when this rank can read every other rank's probe buffer, else why not."""
    got = torch.empty(_PROBE_BYTES, dtype=torch.uint8)
    for peer, (_, pid, _, address) in enumerate(infos):
        if peer == rank:
            continue
        try:
            read_remote(pid, address, got)
        except OSError as err:
            return f"rank {rank} cannot read rank {peer}'s memory ({err})"
        if not bool((got == peer + 1).all()):
            return f"rank {rank} read wrong bytes from rank {peer} (another PID namespace?)"
    return ""


def _connect(rank: int, size: int, listener: socket.socket,
             infos: list) -> tuple[dict[int, socket.socket], str]:
    """One Unix socket per pair: rank j connects to every lower rank, which accepts. Each end
    checks the other's credentials (see the module doc)."""
    pids = [pid for _, pid, _, _ in infos]
    peers: dict[int, socket.socket] = {}
    try:
        for peer in range(rank):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            peers[peer] = sock
            sock.connect(infos[peer][2])
            pid, uid = _peer_credentials(sock)
            if uid != os.getuid() or pid != pids[peer]:
                return peers, (f"rank {rank}: the socket of rank {peer} is held by pid {pid} uid "
                               f"{uid}, not by rank {peer} (pid {pids[peer]} uid {os.getuid()})")
            sock.sendall(struct.pack("<I", rank))
        deadline = time.monotonic() + _ACCEPT_TIMEOUT_S
        while len(peers) < size - 1:
            listener.settimeout(max(deadline - time.monotonic(), 1e-3))
            sock, _ = listener.accept()
            peer = _admit(rank, sock, pids, peers, deadline)
            if peer is not None:
                peers[peer] = sock
    except OSError as err:
        return peers, f"rank {rank} could not connect its Unix sockets ({err})"
    return peers, ""


def _peer_credentials(sock: socket.socket) -> tuple[int, int]:
    """(pid, uid) of the process at the other end, as the kernel recorded them."""
    pid, uid, _ = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
    return pid, uid


def _admit(rank: int, sock: socket.socket, pids: list[int], peers: dict,
           deadline: float) -> int | None:
    """The rank a connection belongs to, or None (closed and named) when it is no rank's."""
    pid, uid = _peer_credentials(sock)
    claimed = None
    if uid == os.getuid() and pid in pids[rank + 1:]:
        sock.settimeout(max(deadline - time.monotonic(), 1e-3))
        claimed = struct.unpack("<I", _recv_exactly(sock, 4))[0]
        if rank < claimed < len(pids) and pids[claimed] == pid and claimed not in peers:
            sock.settimeout(None)
            return claimed
    print(f"cma: rank {rank} refused a connection from pid {pid} uid {uid}"
          f"{'' if claimed is None else f' claiming rank {claimed}'}: not a rank of this job "
          f"(ranks' pids {pids}, uid {os.getuid()})", file=sys.stderr, flush=True)
    sock.close()
    return None


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise OSError("connection closed during the hello")
        data += chunk
    return data
