"""The CPU data paths of the gloo-backed transports (torch.py, horovod.py): objects a transport
holds, each carrying tagged point-to-point messages behind one small interface.

    paths = DataPaths(rank, size, "auto")          # collective, right after the process group
    works = paths.current.send_recv(sends, recvs, tag, lane)   # [(tensor, peer)] each
    paths.use("gloo")                              # benchmarks compare the two

- GlooLanes: isend/irecv of torch.distributed gloo groups. gloo sends the messages between two
  ranks over one connection, in order; lane 1 is a second gloo group with its own connections,
  so urgent messages (the first layers' gradients, needed first) overtake queued bulk ones.
- SameHost: when every rank is on this host, each message is one kernel copy from the sender's
  tensor into the receiver's (cma.py's Channels): a 16 MiB all-reduce several times faster
  than over loopback TCP. One connection per pair and no queue, so lanes do not apply. Two
  ranks also get shared-memory segments (shm.py): one per butterfly lane, and one for the
  blocking Transport.allreduce (blocking_pair; cpu.allreduce).
"""
from __future__ import annotations

import abc
from datetime import timedelta

from deepimage.parallel.transport.base import TransportError, comm_timeout_s

CHOICES = ("auto", "cma", "gloo")


class DataPath(abc.ABC):
    """Tagged point-to-point messages between the ranks."""

    name: str

    @abc.abstractmethod
    def send_recv(self, sends: list, recvs: list, tag: int, lane: int = 0) -> list:
        """Post (tensor, peer) sends and receives under one tag; return their works (each
        has wait()). Empty tensors are not sent."""

    def close(self) -> None:
        """Release what this path opened."""


class GlooLanes(DataPath):
    """Messages over the default gloo group (lane 0) and, when opened, a second one (lane 1)."""

    name = "gloo"

    def __init__(self, second_lane: bool = True):
        """Collective when second_lane: every rank, once, right after the process group."""
        import torch.distributed as dist

        timeout = timedelta(seconds=comm_timeout_s())  # bounds every wait on this group
        self._groups = [None, dist.new_group(backend="gloo", timeout=timeout)] if second_lane else [None]

    def send_recv(self, sends, recvs, tag, lane=0):
        import torch.distributed as dist

        group = self._groups[lane] if lane < len(self._groups) else None
        works = [dist.isend(t, peer, group=group, tag=tag) for t, peer in sends if t.numel()]
        works += [dist.irecv(t, peer, group=group, tag=tag) for t, peer in recvs if t.numel()]
        return works


class SameHost(DataPath):
    """Messages as one kernel copy each, between the ranks of one host (cma.py); with two ranks
    also one shared-memory segment per lane (`pairs`, shm.py) that the butterfly all-reduce
    uses instead of messages."""

    name = "cma"

    def __init__(self, channels, pairs=None, pair_note: str = ""):
        self.channels = channels  # cma.Channels
        self.pairs = pairs  # [shm.Pair] per lane, or None (pair_note says why)
        self.pair_note = pair_note

    def send_recv(self, sends, recvs, tag, lane=0):
        works = [self.channels.irecv(t, peer, tag) for t, peer in recvs if t.numel()]
        return works + [self.channels.isend(t, peer, tag) for t, peer in sends if t.numel()]

    def close(self) -> None:
        self.channels.close()
        for pair in self.pairs or []:
            pair.close()


def _gather_objects(size: int):
    import torch.distributed as dist

    def gather(obj):
        out = [None] * size
        dist.all_gather_object(out, obj)
        return out

    return gather


def open_same_host(rank: int, size: int) -> tuple[SameHost | None, str]:
    """Collective: the same-host path, or (None, why it is not available here)."""
    from deepimage.parallel.transport import cma_setup

    gather = _gather_objects(size)
    channels, why = cma_setup.open_channels(rank, size, gather, comm_timeout_s())
    if channels is None:
        return None, why
    pairs, pair_note = None, f"{size} ranks"
    if size == 2:
        from deepimage.parallel.transport import shm

        gone = shm.socket_gone(channels.socket(1 - rank), channels)
        pairs, pair_note = shm.open_pairs(rank, size, gather, comm_timeout_s(), gone)
    return SameHost(channels, pairs, pair_note), ""


def pair_of(transport, lane: int):
    """The transport's shared-memory pair segment for `lane` (shm.Pair), or None: only two
    ranks of one host on the same-host path have one."""
    paths = getattr(transport, "paths", None)
    pairs = getattr(getattr(paths, "current", None), "pairs", None)
    return pairs[lane] if pairs and len(pairs) > lane else None


def blocking_pair(transport):
    """The segment Transport.allreduce uses on the caller's thread (shm.BLOCKING_LANE), or None
    (not two ranks of one x86-64 host on the same-host path). Its own segment, so a blocking
    all-reduce never waits behind the butterflies queued on lanes 0 and 1."""
    from deepimage.parallel.transport.shm import BLOCKING_LANE

    return pair_of(transport, BLOCKING_LANE)


class DataPaths:
    """The paths a transport opened, by name, and the one its CPU messages take (`current`)."""

    def __init__(self, rank: int, size: int, choice: str, second_lane: bool = True):
        """Collective, after the process group: "auto" takes the same-host path when every
        rank can use it and keeps gloo otherwise; "cma" insists; "gloo" keeps gloo."""
        self.note = ""  # why "auto" kept gloo
        self.opened: dict[str, DataPath] = {"gloo": GlooLanes(second_lane)}
        self.current: DataPath = self.opened["gloo"]
        if choice == "gloo" or size == 1:
            return
        same_host, why = open_same_host(rank, size)
        if same_host is None:
            if choice == "cma":
                raise TransportError(f"data_path 'cma' is not available: {why}")
            self.note = f"same-host path unavailable, gloo kept: {why}"
            return
        self.opened["cma"] = self.current = same_host

    def use(self, name: str) -> None:
        """Switch CPU messages to another opened path (benchmarks compare them)."""
        if name not in self.opened:
            raise TransportError(f"use_data_path: {name!r} is not open here (open: "
                                 f"{sorted(self.opened, key=lambda n: n != 'gloo')})")
        self.current = self.opened[name]

    def close(self) -> None:
        for path in self.opened.values():
            path.close()
        self.opened = {}
