"""The cost model: what a training step of N workers costs on a machine, from a profile.

    link, residuals = fit_link(scaling_json["allreduce"]["points"], n=2)
    step = step_time(prof, 8, load_hardware("minwa"), lazy=True, split_fc=True, head=head)

Links (latency, bandwidth) fitted to the butterfly sweep the scaling stage measured; message
counts of the butterfly, ring and all-gather on nodes of workers; the split FC head's blocking
collectives; and step_time: compute + the communication overlap does not hide.
"""
from __future__ import annotations

import dataclasses
import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

from deepimage.parallel.butterfly import PAIR_MIB, PIECE_MIB
from deepimage.perfmodel.spec import FLOAT_BYTES, HARDWARE_DIR, PerfModelError


@dataclass
class Profile:
    """One worker's measured step: per-layer times (s), bucket readiness, in profile order."""

    forward_s: float  # whole forward incl. loss
    backward_s: float
    optimizer_s: float
    layers: list[dict]  # {name, kind, forward_s, backward_s, flops (forward, per step), params}
    buckets: list[dict]  # {bytes, ready_s (from backward start), first_use_s (forward offset)}
    buckets_split: list[dict]  # the same with the head split (its parameters not all-reduced)
    batch: int
    resolution: int
    data_s: float = 0.0  # loading and augmenting this worker's part of a batch
    head_param_fraction: float = 0.0  # of the optimizer's work: split FC steps 1/N of it per rank
    step_totals: list[float] = field(default_factory=list)  # each profiled step's compute (s)
    # each profiled step's compute between the points where the workers meet (s): with a split
    # head trunk forward / head forward and loss / head backward / trunk backward and update
    # (the gather of features, the loss's collectives, the scatter of their gradients, the next
    # step's count), otherwise the whole step
    step_segments: list[list[float]] = field(default_factory=list)
    # a split-head profile (profile(ranks=N)): the head shard's own update inside optimizer_s
    head_update_s: float = 0.0
    # workers the profile was taken for: rank 0 of `ranks` (its split FC shard), and with
    # host_profile `ranks` such processes at once, each step paced by the slowest
    ranks: int = 1

    @property
    def compute_s(self) -> float:
        return self.forward_s + self.backward_s + self.optimizer_s

    def flops(self) -> float:
        """Training FLOPs of the step (backward = 2x forward)."""
        return 3.0 * sum(layer["flops"] for layer in self.layers)

    def slowest_wait_s(self, n: int) -> float:
        """Expected wait for the slowest of n workers per step: E[max of n steps] - E[one step],
        with each worker's step drawn from this profile's measured steps (step_totals). The step's
        blocking collectives (the batch count, the split FC's) make every rank wait for the
        slowest, and the measured step is the slowest rank's; 0 without step_totals (counted)."""
        k = len(self.step_totals)
        if n == 1 or k < 2:
            return 0.0
        ordered = sorted(self.step_totals)
        # P(max of n draws = the i-th smallest of k) = (i/k)^n - ((i-1)/k)^n
        e_max = sum(t * ((i / k) ** n - ((i - 1) / k) ** n) for i, t in enumerate(ordered, 1))
        return e_max - statistics.fmean(ordered)



# ---------------------------------------------------------------------------------------------
# Transport: links, message counts, the fit


@dataclass(frozen=True)
class Link:
    """One path between workers: per-message latency (s) and bandwidth (bytes/s)."""

    latency_s: float
    bandwidth: float

    def time(self, messages: float, nbytes: float) -> float:
        return messages * self.latency_s + nbytes / self.bandwidth


@dataclass(frozen=True)
class Hardware:
    """A machine to predict: compute throughput, workers per node, the two links."""

    name: str
    flops_per_s: float  # sustained training FLOP/s of one worker
    workers_per_node: int
    intra: Link
    inter: Link
    nodes: int = 1
    copies_on_compute_core: bool = False  # CPU data path: the copies take the compute core's time
    source: dict = field(default_factory=dict)
    # transport.allreduce (the split FC's and the step's small blocking all-reduces) where it is
    # another library than the gradients' butterfly (CPU: torch.distributed's gloo): its own fit
    allreduce_link: Link | None = None
    # one worker's measured profile of the paper's model per resolution (the hardware file's
    # `profile:`, written by `python -m deepimage.perfmodel profile`); else compute is counted
    profiles: dict[int, Profile] = field(default_factory=dict)
    profile_meta: dict = field(default_factory=dict)


def load_hardware(name_or_path: str) -> Hardware:
    """A hardware YAML by name (deepimage/hardware/<name>.yaml) or path."""
    path = Path(name_or_path)
    if not path.suffix:
        path = HARDWARE_DIR / f"{name_or_path}.yaml"
    if not path.exists():
        known = sorted(p.stem for p in HARDWARE_DIR.glob("*.yaml"))
        raise PerfModelError(f"perfmodel.hardware: no hardware file {path}; known: {known}")
    d = yaml.safe_load(path.read_text())
    try:
        link = lambda k: Link(float(d[k]["latency_s"]), float(d[k]["bandwidth_bytes_per_s"]))  # noqa: E731
        hw = Hardware(d["name"], float(d["flops_per_s"]), int(d["workers_per_node"]),
                      link("intra_node"), link("inter_node"), int(d.get("nodes", 1)),
                      source={k: v for k, v in d.items() if k.endswith("_source")})
    except (KeyError, TypeError, ValueError) as e:
        raise PerfModelError(f"{path}: missing or bad key {e}; needs name, flops_per_s, workers_per_node, "
                             f"intra_node/inter_node: {{latency_s, bandwidth_bytes_per_s}}") from None
    if d.get("profile"):
        meta, profiles = load_profiles(path.parent / d["profile"], where=f"{path}: profile")
        hw = dataclasses.replace(hw, profiles=profiles, profile_meta=meta)
    return hw


def load_profiles(path: Path, where: str) -> tuple[dict, dict[int, Profile]]:
    """(what was profiled, {resolution: Profile}) from a `perfmodel profile` file."""
    try:
        d = json.loads(Path(path).read_text())
        profiles = {int(r): Profile(**p) for r, p in d.pop("profiles").items()}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise PerfModelError(f"{where} {path}: not a profile written by `python -m deepimage.perfmodel "
                             f"profile` ({e})") from None
    return d, profiles


def butterfly_counts(nbytes: float, n: int, piece_mib: float = PIECE_MIB) -> tuple[float, float]:
    """(messages, bytes) each rank sends in one butterfly of nbytes (butterfly.py): two ranks and at
    most PAIR_MIB: one whole-piece exchange per piece; else per piece an alltoall and an allgather,
    N-1 messages of piece/N each."""
    if n == 1 or nbytes == 0:
        return 0.0, 0.0
    pieces = max(1, math.ceil(nbytes / (piece_mib * 2**20)))
    if n == 2 and nbytes <= PAIR_MIB * 2**20:
        return float(pieces), float(nbytes)
    return 2.0 * (n - 1) * pieces, 2.0 * (n - 1) / n * nbytes


def fit_plain(points: list[dict]) -> tuple[Link, list[dict]]:
    """Latency and bandwidth of a library's all-reduce from [{bytes, seconds}]: seconds =
    latency + bytes / bandwidth (least squares on relative error); the points with residuals."""
    a = np.array([[1.0, p["bytes"]] for p in points])
    t = np.array([p["seconds"] for p in points])
    coef, *_ = np.linalg.lstsq(a / t[:, None], np.ones_like(t), rcond=None)
    link = Link(max(float(coef[0]), 0.0), 1.0 / max(float(coef[1]), 1e-15))
    return link, [{"bytes": p["bytes"], "seconds": p["seconds"], "fitted_s": link.time(1, p["bytes"]),
                   "residual": link.time(1, p["bytes"]) / p["seconds"] - 1.0} for p in points]


def fit_link(points: list[dict], n: int) -> tuple[Link, list[dict]]:
    """Latency and bandwidth from butterfly sweep points [{bytes, seconds}] at n ranks (least
    squares of seconds = messages * latency + bytes_sent / bandwidth); the points with residuals."""
    if len(points) < 2:
        raise PerfModelError("perfmodel: the butterfly sweep (scaling.json allreduce.points) needs at "
                             "least 2 sizes to fit latency and bandwidth; set scaling.allreduce_mib > 0")
    a = np.array([butterfly_counts(p["bytes"], n) for p in points])  # (P, 2): messages, bytes
    t = np.array([p["seconds"] for p in points])
    w = 1.0 / t  # relative errors: small sizes count as much as large ones
    coef, *_ = np.linalg.lstsq(a * w[:, None], t * w, rcond=None)
    latency, inv_bw = max(coef[0], 0.0), max(coef[1], 1e-15)
    link = Link(latency, 1.0 / inv_bw)
    rows = [{"bytes": p["bytes"], "seconds": p["seconds"], "fitted_s": link.time(*row),
             "residual": link.time(*row) / p["seconds"] - 1.0} for p, row in zip(points, a)]
    return link, rows


# ---------------------------------------------------------------------------------------------
# Collective costs on a machine of nodes


def _layout(hw: Hardware, n: int) -> tuple[int, int]:
    """(workers per node actually used, nodes) for n workers."""
    w = min(n, hw.workers_per_node)
    return w, math.ceil(n / w)


def butterfly_time(nbytes: float, n: int, hw: Hardware) -> float:
    """One butterfly: each of 2 phases sends N-1 slices of size/N per piece; the w-1 partners on
    the node over the intra link, the N-w others over the node's one inter link, which carries
    all w workers' slices."""
    if n == 1 or nbytes == 0:
        return 0.0
    w, nodes = _layout(hw, n)
    messages, sent = butterfly_counts(nbytes, n)
    if nodes == 1:
        return hw.intra.time(messages, sent)
    per_msg = sent / messages
    intra = hw.intra.time(messages * (w - 1) / (n - 1), per_msg * messages * (w - 1) / (n - 1))
    outside = messages * (n - w) / (n - 1)
    inter = hw.inter.time(outside, w * per_msg * outside)  # the NIC carries every local worker's slices
    return max(intra, inter)


def ring_time(nbytes: float, n: int, hw: Hardware) -> float:
    """Ring all-reduce: 2(N-1) steps of size/N; across nodes, each step crosses one inter link per node."""
    if n == 1 or nbytes == 0:
        return 0.0
    _, nodes = _layout(hw, n)
    link = hw.intra if nodes == 1 else hw.inter
    return link.time(2 * (n - 1), 2 * (n - 1) * nbytes / n)


def allgather_time(nbytes_each: float, n: int, hw: Hardware) -> float:
    """Every rank sends its nbytes_each to every other rank (one message each)."""
    if n == 1:
        return 0.0
    w, nodes = _layout(hw, n)
    if nodes == 1:
        return hw.intra.time(n - 1, (n - 1) * nbytes_each)
    return max(hw.intra.time(w - 1, (w - 1) * nbytes_each),
               hw.inter.time(n - w, w * (n - w) * nbytes_each))


ALLREDUCE = {"butterfly": butterfly_time, "ring": ring_time}


def blocking_allreduce_time(nbytes: float, n: int, hw: Hardware) -> float:
    """transport.allreduce of nbytes: its own fitted link where the hardware has one, else the butterfly."""
    if n == 1:
        return 0.0
    if hw.allreduce_link is not None:
        return hw.allreduce_link.time(1, nbytes)
    return butterfly_time(nbytes, n, hw)


def split_fc_time(batch: int, n: int, head: dict, hw: Hardware) -> float:
    """The split FC head's blocking collectives in one step (parallel/split_fc.py, mappings.py):
    row counts and labels (tiny all-gathers), features (b, F) all-gathered forward and
    reduce-scattered backward, fc2's (B, H2) output all-reduced forward and its copy's gradient
    all-reduced backward, the cross-entropy's two small all-reduces and the loss's (B, K_r)."""
    if n == 1:
        return 0.0
    big_b = batch * n
    f, h2 = head["features"], head["fc_hidden"][1]
    tiny = 2 * allgather_time(8 * batch, n, hw) + blocking_allreduce_time(FLOAT_BYTES * big_b, n, hw) \
        + blocking_allreduce_time(FLOAT_BYTES * big_b * (2 + n), n, hw)
    features = 2 * allgather_time(FLOAT_BYTES * batch * f, n, hw)  # forward gather, backward reduce-scatter
    fc2 = 2 * blocking_allreduce_time(FLOAT_BYTES * big_b * h2, n, hw)
    return tiny + features + fc2


# ---------------------------------------------------------------------------------------------
# The step


@dataclass(frozen=True)
class Step:
    """What one step of N workers is made of (seconds): compute (forward, backward, optimizer),
    the split FC's blocking collectives, and the gradient communication not hidden."""

    compute: float
    split_fc: float
    comm_exposed: float
    slowest_wait: float = 0.0  # waiting for the slowest rank at the step's blocking collectives

    @property
    def total(self) -> float:
        return self.compute + self.split_fc + self.comm_exposed + self.slowest_wait


def _serial_finish(launch: list[float], cost: list[float]) -> list[float]:
    """Finish times of transfers sharing one link in launch order."""
    done, out = 0.0, []
    for t, c in zip(launch, cost):
        done = max(done, t) + c
        out.append(done)
    return out


def step_time(prof: Profile, n: int, hw: Hardware, *, method: str = "butterfly", lazy: bool = True,
              split_fc: bool = True, head: dict | None = None, flush_each_step: bool = False,
              fusion_mib: float = 64.0, cycle_s: float = 0.005) -> Step:
    """Predicted step of n workers: data + compute (the profile's) + the split FC's collectives +
    the step's small all-reduces + gradient communication not hidden by overlap.

    lazy: each bucket's all-reduce starts when backward fills it (in order, one link) and must
    end before its layer's next forward, or at the step's end with flush_each_step (a flush
    after every step); not lazy: GradientSync(lazy=False) launches
    every bucket after backward and waits for all. hw.copies_on_compute_core (a CPU data path on
    busy cores): the copies take the compute cores' time, nothing is hidden. method "horovod":
    buckets fused up to fusion_mib, each fusion a ring started on the cycle tick after its last
    bucket is ready, all waited for after backward (Horovod has no lazy update)."""
    split_on = split_fc and n > 1 and head is not None
    split = split_fc_time(prof.batch, n, head, hw) if split_on else 0.0
    if n > 1:  # the global batch count, and without split FC the loss / accuracy sums
        split += blocking_allreduce_time(8, n, hw) * (1 if split_on else 2)
    buckets = prof.buckets_split if split_on else prof.buckets
    if prof.head_update_s:  # a split-head profile: its shard's update (1/ranks of the head) measured
        optimizer = prof.optimizer_s + prof.head_update_s * (prof.ranks / (n if split_on else 1) - 1)
    else:
        optimizer = prof.optimizer_s * (1 - prof.head_param_fraction * (1 - 1 / n if split_on else 0))
    compute = prof.data_s + prof.forward_s + prof.backward_s + optimizer
    # a profile of n concurrent workers is already paced by the slowest of them
    slowest = 0.0 if prof.ranks == n else prof.slowest_wait_s(n)
    if n == 1 or not buckets:
        return Step(compute, split, 0.0, slowest)
    bwd_start = prof.data_s + prof.forward_s + split
    end_bwd = bwd_start + prof.backward_s
    if method == "horovod":
        return Step(compute, split, _horovod_exposed(buckets, n, hw, bwd_start, end_bwd, fusion_mib, cycle_s), slowest)
    cost = [ALLREDUCE[method](b["bytes"], n, hw) for b in buckets]
    if not lazy or hw.copies_on_compute_core:
        return Step(compute, split, sum(cost), slowest)
    finish = _serial_finish([bwd_start + b["ready_s"] for b in buckets], cost)
    if flush_each_step:
        return Step(compute, split, max(0.0, finish[-1] - end_bwd), slowest)
    next_forward = compute + split + prof.data_s  # where the next step's forward starts
    stall = max(f - (next_forward + b["first_use_s"]) for f, b in zip(finish, buckets))
    return Step(compute, split, max(0.0, stall), slowest)


def _horovod_exposed(buckets, n, hw, bwd_start, end_bwd, fusion_mib, cycle_s) -> float:
    groups: list[list[float]] = []  # [bytes, ready_s of its last bucket]
    for b in buckets:
        if groups and groups[-1][0] + b["bytes"] <= fusion_mib * 2**20:
            groups[-1] = [groups[-1][0] + b["bytes"], b["ready_s"]]
        else:
            groups.append([b["bytes"], b["ready_s"]])
    launch = [bwd_start + math.ceil(r / cycle_s) * cycle_s for _, r in groups]
    finish = _serial_finish(launch, [ring_time(size, n, hw) for size, _ in groups])
    return max(0.0, finish[-1] - end_bwd)


def local_hardware(link: Link, cores: int, allreduce_link: Link | None = None) -> Hardware:
    """This host as a Hardware: every worker on one node, the fitted same-host links."""
    return Hardware("this host", 1.0, cores, link, link, allreduce_link=allreduce_link)

