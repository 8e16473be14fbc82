"""A performance model of a training step at N workers, validated here and carried to Minwa's scale.

    python -m deepimage.perfmodel --threads 2 --train-shards results/shards/64/train \
        --scaling results/scaling/scaling.json --config-json '{"seed": 0, ...}' \
        --out results/scaling/perfmodel.json --plots results/scaling/perfmodel

The model is built from measured parts:
- compute: per-layer forward and backward times (module hooks; the moment each parameter's
  gradient is complete in backward), medians over a few steps, one thread; for N workers on one
  host, N profiling processes at once, pinned, each computing rank 0's split FC share;
- buckets: GradientSync's bucketing (train.bucket_mib) of the replicated gradients, with the
  moment in backward each bucket is full and the offset in forward where its layer is next used;
- transport: message latency and bandwidth fitted to the butterfly sweep the scaling stage
  measured (scaling.json `allreduce.points`), residuals written beside the fit.
Step time at N workers = compute + the communication overlap does not hide (module `step_time`).
The stage validates the model against steps measured with real workers (scaling.measure_step,
under train.launcher) and projects the paper's model widths to 144 workers on each hardware
file in deepimage/hardware/.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml

from deepimage.model import DeepImageNet, ModelSpec, build_model
from deepimage.parallel.butterfly import PAIR_MIB, PIECE_MIB
from deepimage.parallel.lazy import make_buckets
from deepimage.parallel.split_fc import ColumnParallelLinear, RowParallelLinear, SplitFCHead

# The FC-heavy benchmark model (deepimage.bench.train_step imports it from here): few conv FLOPs,
# 73 MiB of FC gradients, the case where gradient traffic, not compute, sets the step time.
FC_HEAVY = {"conv": [[32], [64], [128, 128]], "fc_hidden": [4096, 4096], "resolution": 32}
# The paper's widths on our network: a 16-layer VGG-style trunk (Wu et al. 2015, sec. 4: "a basic
# configuration has 16 layers and is similar with VGG's work") and 4096-wide FC layers, 1000 classes.
PAPER = {"conv": [[64, 64], [128, 128], [256, 256, 256], [512, 512, 512], [512, 512, 512]],
         "fc_hidden": [4096, 4096], "num_classes": 1000}
HARDWARE_DIR = Path(__file__).parent / "hardware"
FLOAT_BYTES = 4


class PerfModelError(ValueError):
    """A bad hardware file or missing input (the message names it and the fix)."""


# ---------------------------------------------------------------------------------------------
# Profile: one worker, one thread, per layer


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


def layer_flops(module: torch.nn.Module, out: torch.Tensor) -> float:
    """Forward FLOPs (2 per multiply-add) of a conv or linear layer given its output."""
    if isinstance(module, torch.nn.Conv2d):
        k = module.in_channels // module.groups * module.kernel_size[0] * module.kernel_size[1]
        return 2.0 * out.numel() * k
    if isinstance(module, torch.nn.Linear):
        return 2.0 * out.numel() * module.in_features
    if isinstance(module, (ColumnParallelLinear, RowParallelLinear)):  # a split FC shard
        return 2.0 * out.numel() * module.weight.shape[1]
    return float(out.numel())  # norms, activations, pools: about one op per element


def _leaves(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if n and not list(m.children())]


@contextlib.contextmanager
def one_thread():
    """torch on one thread inside (a training worker's share here), the caller's count after.
    Both profiles and the data timing need it: left at the default, two intra-op threads pinned
    to one core made a batch's augmentation ~100x slower (1 ms -> 40-140 ms) than in training."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class _Clock:
    """Timestamps of a profiled step: perf_counter on a CPU; CUDA events on a GPU (recorded on
    the stream as the hooks run, read once the step is synchronized), so the GPU's own times are
    measured, not the host's launches."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def mark(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def since(self, ref, mark) -> float:
        """Seconds from ref to mark (two marks)."""
        return ref.elapsed_time(mark) / 1e3 if self.cuda else mark - ref

    def wait(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()


class _Timers:
    """Forward hooks (start, end, FLOPs per leaf) and gradient-ready marks per parameter."""

    def __init__(self, model: torch.nn.Module, clock: _Clock):
        self.clock = clock
        self.fwd_start: dict[str, object] = {}
        self.fwd_end: dict[str, object] = {}
        self.flops: dict[str, float] = {}
        self.grad_at: dict[int, object] = {}
        self.head_update: tuple | None = None
        self.handles = []
        for name, m in _leaves(model):
            self.handles.append(m.register_forward_pre_hook(self._pre(name)))
            self.handles.append(m.register_forward_hook(self._post(name)))
        for p in model.parameters():
            self.handles.append(p.register_post_accumulate_grad_hook(self._grad))

    def _pre(self, name):
        def hook(module, args):
            self.fwd_start[name] = self.clock.mark()
        return hook

    def _post(self, name):
        def hook(module, args, out):
            self.fwd_end[name] = self.clock.mark()
            self.flops[name] = layer_flops(module, out)
        return hook

    def _grad(self, p):
        self.grad_at[id(p)] = self.clock.mark()

    def time_head_update(self, optimizer: torch.optim.Optimizer) -> None:
        """Mark the start and end of each step of the split head's own optimizer."""
        marks = []
        self.handles.append(optimizer.register_step_pre_hook(lambda *_: marks.append(self.clock.mark())))
        self.handles.append(optimizer.register_step_post_hook(
            lambda *_: setattr(self, "head_update", (marks.pop(), self.clock.mark()))))

    def remove(self):
        for h in self.handles:
            h.remove()


def profile(cfg, spec: ModelSpec, batch: int, resolution: int, *, steps: int = 5,
            device: str = "cpu", lazy: bool = False, ranks: int = 1,
            batches: list[tuple[torch.Tensor, torch.Tensor]] | None = None) -> Profile:
    """Per-layer forward/backward times of one worker running training's own code path (the
    model and GradientSync that deepimage.parallel.parallelize builds, on the one-process
    transport, cfg.train.bucket_mib, train.bf16's autocast), medians over `steps` after one
    warm-up; on a CPU with one thread, on a GPU ("cuda") timed by CUDA events.

    lazy=False: the optimizer steps after backward (optimizer_s). lazy=True: as lazy update runs
    it, each bucket's update in its layer's next forward, so forward_s holds the updates (touching
    the weights right before their layer runs is faster on a CPU: measured 6-11 ms a step on the
    default model) and optimizer_s only what step() still does.

    ranks > 1 (with train.split_fc): rank 0 of `ranks` workers that hold the same batch
    (MirrorTransport): the head is that rank's split FC shard, run on the gathered global batch
    (ranks x batch rows) and stepped by its own optimizer; the collectives are local copies, so
    what is timed is the rank's own work. head_update_s times the shard's update.

    batches: real (images, labels) batches to step on in turn, as training does (real_batches);
    without them one random batch. On a CPU the random batch is slower: the default model took
    32-35 ms a step on it against 28-29 ms on a batch of the shards (denormal floats; with
    torch.set_flush_denormal both took 28-29 ms), so a validation profile steps on real data."""
    from deepimage.parallel.lazy import GradientSync
    from deepimage.parallel.split_fc import split_head
    from deepimage.parallel.transport.local import LocalTransport, MirrorTransport
    from deepimage.train import autocast, sgd

    dev = torch.device(device)
    with one_thread():
        train = dataclasses.replace(cfg.train, lazy_update=lazy, compute_nice=0)
        model = build_model(spec, cfg.seed).to(dev)
        if ranks > 1 and cfg.train.split_fc:
            model.head = split_head(model.head, MirrorTransport(ranks), seed=cfg.seed)
        # as parallelize builds it, on one process: the trunk's buckets, the split head's optimizer
        sync = GradientSync(model, LocalTransport(), sgd(train), bucket_mib=train.bucket_mib,
                            lazy=lazy, op="sum", compute_nice=0)
        model.train()
        timers = _Timers(model, _Clock(dev))
        if sync.local_optimizer is not None:
            timers.time_head_update(sync.local_optimizer)
        if not batches:
            batches = [(torch.randn(batch, 3, resolution, resolution),  # (b, 3, H, W)
                        torch.randint(0, spec.num_classes, (batch,)))]
        batches = [(x.to(dev), y.to(dev)) for x, y in batches]
        amp = autocast(model, train)
        samples = [_one_step(model, sync, timers, *batches[i % len(batches)], amp)
                   for i in range(steps + 1)][1:]
        timers.remove()
        sync.flush()
        sync.remove_hooks()
    return dataclasses.replace(_summarise(model, samples, batch, resolution, cfg.train.bucket_mib), ranks=ranks)


def _one_step(model, sync, timers: _Timers, x, y, amp) -> dict:
    clock = timers.clock
    t0 = clock.mark()
    with amp:
        if isinstance(model.head, SplitFCHead):  # as train.step: the global batch's mean loss
            loss = model.head.loss(model.trunk(x), y)[0]
        else:
            loss = F.cross_entropy(model(x).float(), y)
    t1 = clock.mark()
    # where train.step drops the gradients: after the forward, not before it. Before it, the
    # FC-heavy model's step took 6-9 % less than train.step's on the same batches in one process
    sync.zero_grad()
    loss.backward()
    t2 = clock.mark()
    sync.step()
    t3 = clock.mark()
    clock.wait()
    since = clock.since
    return {"forward": since(t0, t1), "backward": since(t1, t2), "optimizer": since(t2, t3),
            "fwd_start": {n: since(t0, m) for n, m in timers.fwd_start.items()},
            "fwd_dur": {n: since(timers.fwd_start[n], m) for n, m in timers.fwd_end.items()},
            "grad_at": {k: since(t1, m) for k, m in timers.grad_at.items()}, "flops": dict(timers.flops),
            "head_update": since(*timers.head_update) if timers.head_update else 0.0}


def _summarise(model: DeepImageNet, samples: list[dict], batch, resolution, bucket_mib) -> Profile:
    med = lambda key, k: statistics.median(s[key][k] for s in samples)  # noqa: E731
    grad_ready = {id(p): med("grad_at", id(p)) for p in model.parameters()}
    layers, owner = [], {}
    for name, m in _leaves(model):
        own = list(m.parameters(recurse=False))
        ready = [grad_ready[id(p)] for p in own]
        layers.append({"name": name, "kind": type(m).__name__, "forward_s": med("fwd_dur", name),
                       "start_s": med("fwd_start", name), "flops": samples[0]["flops"][name],
                       "params": sum(p.numel() for p in own), "grad_ready_s": max(ready, default=None)})
        for p in own:
            owner[id(p)] = layers[-1]
    _backward_per_layer(layers, statistics.median(s["backward"] for s in samples))
    return Profile(statistics.median(s["forward"] for s in samples),
                   statistics.median(s["backward"] for s in samples),
                   statistics.median(s["optimizer"] for s in samples), layers,
                   *_buckets(model, bucket_mib, grad_ready, owner), batch, resolution,
                   head_param_fraction=_head_fraction(model),
                   step_totals=[s["forward"] + s["backward"] + s["optimizer"] for s in samples],
                   step_segments=_segments(model, samples),
                   head_update_s=statistics.median(s["head_update"] for s in samples))


def _segments(model: DeepImageNet, samples: list[dict]) -> list[list[float]]:
    """Each profiled step cut where a split head's workers meet (Profile.step_segments)."""
    totals = [[s["forward"] + s["backward"] + s["optimizer"]] for s in samples]
    if not isinstance(model.head, SplitFCHead):
        return totals
    first = next(list(m.parameters(recurse=False)) for n, m in _leaves(model)
                 if n.startswith("head.") and list(m.parameters(recurse=False)))
    out = []
    for s in samples:
        head_start = min(v for n, v in s["fwd_start"].items() if n.startswith("head."))
        head_grads = max(s["grad_at"][id(p)] for p in first)
        out.append([head_start, s["forward"] - head_start, head_grads,
                    s["backward"] - head_grads + s["optimizer"]])
    return out


def _head_fraction(model) -> float:
    head = sum(p.numel() for p in model.head.parameters())
    return head / sum(p.numel() for p in model.parameters())


def _buckets(model, bucket_mib: float, ready: dict, owner: dict) -> tuple[list[dict], list[dict]]:
    """GradientSync's buckets (lazy.make_buckets, last layer first) of every parameter, and of the
    trunk's only (split FC: the head's shards are stepped locally), with their timing."""
    out = []
    for split in (False, True):
        params = [p for n, p in model.named_parameters() if not (split and n.startswith("head."))]
        out.append([{"bytes": b.flat.numel() * b.flat.element_size(),
                     "ready_s": max(ready[id(p)] for p in b.params),
                     "first_use_s": min(owner[id(p)]["start_s"] for p in b.params)}
                    for b in make_buckets(params[::-1], bucket_mib)])
    return out[0], out[1]


def _backward_per_layer(layers: list[dict], backward_s: float) -> None:
    """Each layer's backward time: the gap between its gradient and the previous layer's (in
    backward order); layers without parameters are folded into the next one that has some."""
    prev = 0.0
    for layer in reversed(layers):
        if layer["grad_ready_s"] is None:
            layer["backward_s"] = 0.0
            continue
        layer["backward_s"] = max(0.0, layer["grad_ready_s"] - prev)
        prev = layer["grad_ready_s"]
    if layers:
        layers[0]["backward_s"] += max(0.0, backward_s - prev)  # the input side's tail


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
    end before its layer's next forward, or at the step's end with flush_each_step (how
    deepimage.train --benchmark-out times a step); not lazy: GradientSync(lazy=False) launches
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


# ---------------------------------------------------------------------------------------------
# Projection: the paper's widths, counted in FLOPs


def counted_profile(spec: ModelSpec, batch: int, resolution: int, bucket_mib: float,
                    flops_per_s: float) -> Profile:
    """A Profile of a model too large to time here (the paper's widths at 256/512 px), counted:
    each layer's forward FLOPs from its output shape (meta tensors, nothing computed), its time
    FLOPs / flops_per_s, backward twice the forward, the optimizer ~10 FLOPs per parameter."""
    with torch.device("meta"):
        model = DeepImageNet(spec).train()
        x = torch.empty(batch, 3, resolution, resolution)  # (b, 3, H, W)
    flops: dict[str, float] = {}
    hooks = [m.register_forward_hook(lambda mod, a, out, n=n: flops.__setitem__(n, layer_flops(mod, out)))
             for n, m in _leaves(model)]
    model(x)
    for h in hooks:
        h.remove()
    layers, t = [], 0.0
    for name, m in _leaves(model):
        fwd = flops[name] / flops_per_s
        layers.append({"name": name, "kind": type(m).__name__, "forward_s": fwd, "start_s": t,
                       "backward_s": 2 * fwd, "flops": flops[name],
                       "params": sum(p.numel() for p in m.parameters(recurse=False))})
        t += fwd
    ready, done = {}, 0.0
    for (name, m), layer in zip(reversed(_leaves(model)), reversed(layers)):
        done += layer["backward_s"]
        for p in m.parameters(recurse=False):
            ready[id(p)] = done
    owner = {id(p): layer for (_, m), layer in zip(_leaves(model), layers) for p in m.parameters(recurse=False)}
    n_params = sum(p.numel() for p in model.parameters())
    return Profile(t, done, 10.0 * n_params / flops_per_s, layers,
                   *_buckets(model, bucket_mib, ready, owner), batch, resolution,
                   head_param_fraction=_head_fraction(model))


def head_shape(model_or_spec) -> dict:
    """The head's widths the split FC collectives move: features F, fc_hidden, classes."""
    spec = model_or_spec if isinstance(model_or_spec, ModelSpec) else model_or_spec.spec
    with torch.device("meta"):
        head = DeepImageNet(spec).head
    return {"features": head.fc1.in_features, "fc_hidden": list(spec.fc_hidden), "classes": spec.num_classes}


# ---------------------------------------------------------------------------------------------
# The stage: profile here, validate against real workers, project


def _train_loader(shards: Path, cfg, batch: int, resolution: int):
    """The ArrowLoader training reads one worker's batches with."""
    from deepimage.data.augment import AugmentConfig
    from deepimage.data.loader import ArrowLoader

    return ArrowLoader(shards, batch_size=batch, seed=cfg.seed, train=True, crop=resolution,
                       augment=AugmentConfig.from_config(cfg.train.augment.to_dict()))


def real_batches(shards: Path, cfg, batch: int, resolution: int, count: int) -> list[tuple]:
    """Up to `count` (images, labels) batches of the shards, as training's loader gives them."""
    out = []
    with one_thread():
        for images, labels, _ in _train_loader(shards, cfg, batch, resolution):
            out.append((images, labels))
            if len(out) == count:
                break
    return out


def data_time(shards: Path, cfg, batch: int, resolution: int, steps: int) -> float:
    """Median seconds to load and augment one worker's batch (ArrowLoader, one thread)."""
    loader = _train_loader(shards, cfg, batch, resolution)
    times, it = [], iter(loader)
    with one_thread():
        for _ in range(steps + 1):
            t0 = time.perf_counter()
            try:
                next(it)
            except StopIteration:
                it = iter(loader)
                next(it)
            times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])


def model_variant(cfg, name: str):
    """(cfg for this validation model, its resolution): the configured model at the scaling
    resolution, or FC_HEAVY at its own."""
    from deepimage.scaling import resolve_resolution

    if name == "default":
        return cfg, resolve_resolution(cfg.scaling.resolution, cfg.resolutions)
    model = dataclasses.replace(cfg.model, conv=tuple(map(tuple, FC_HEAVY["conv"])),
                                fc_hidden=tuple(FC_HEAVY["fc_hidden"]), per_resolution={})
    return dataclasses.replace(cfg, model=model), FC_HEAVY["resolution"]


def _host_worker(sections: dict, spec: dict, batch: int, resolution: int, shards: str, steps: int,
                 ranks: int, core: int | None, barrier, results) -> None:
    """One of `ranks` concurrent profiling processes (spawned), pinned to `core`."""
    import os

    from deepimage.config import Config

    if core is not None:
        os.sched_setaffinity(0, {core})
    cfg = Config.from_dict(sections)
    batches = real_batches(Path(shards), cfg, batch, resolution, steps + 1)
    barrier.wait()  # all N start together, so each is timed with the others running
    prof = profile(cfg, ModelSpec(**spec), batch, resolution, steps=steps, lazy=cfg.train.lazy_update, ranks=ranks,
                   batches=batches)
    prof.data_s = data_time(Path(shards), cfg, batch, resolution, steps)
    results.put(prof)


def host_profile(cfg, spec: ModelSpec, batch: int, resolution: int, shards: Path, steps: int,
                 n: int) -> Profile:
    """The profile of one worker of n while n run at once on this host, each pinned to its own
    core (as scaling.pin pins training's) and each computing rank 0's share (profile(ranks=n)):
    what the workers' computation costs when they share the host's memory and caches. Each step
    the slowest of the n sets the pace, since the step's collectives make the workers meet."""
    import multiprocessing as mp
    import os

    cores = sorted(os.sched_getaffinity(0))
    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(n), ctx.Queue()
    sections = {"seed": cfg.seed, "train": cfg.train.to_dict(), "model": cfg.model.to_dict()}
    procs = [ctx.Process(target=_host_worker, args=(sections, spec.to_dict(), batch, resolution, str(shards),
                                                    steps, n, cores[k] if n <= len(cores) else None,
                                                    barrier, results))
             for k in range(n)]
    for p in procs:
        p.start()
    profs = [results.get(timeout=600) for _ in procs]
    for p in procs:
        p.join()
        if p.exitcode:
            raise PerfModelError(f"perfmodel: a profiling process failed (exit {p.exitcode})")
    return _slowest(profs)


def _slowest(profs: list[Profile]) -> Profile:
    """profs[0] scaled so its compute is the median over steps of the pace the workers set when
    they wait for each other where they meet: each segment of a step (Profile.step_segments)
    takes the slowest worker's time."""
    base = profs[0]
    paced = statistics.median(sum(map(max, zip(*steps))) for steps in zip(*(p.step_segments for p in profs)))
    k = paced / statistics.median(base.step_totals)
    layers = [{**layer, "forward_s": layer["forward_s"] * k, "backward_s": layer["backward_s"] * k,
               "start_s": layer["start_s"] * k} for layer in base.layers]
    buckets = [[{**b, "ready_s": b["ready_s"] * k, "first_use_s": b["first_use_s"] * k} for b in bs]
               for bs in (base.buckets, base.buckets_split)]
    return dataclasses.replace(base, forward_s=base.forward_s * k, backward_s=base.backward_s * k,
                               optimizer_s=base.optimizer_s * k, layers=layers, buckets=buckets[0],
                               buckets_split=buckets[1], data_s=max(p.data_s for p in profs))


def validation_profile(cfg, shards: Path, resolution: int, batch: int, steps: int,
                       n: int = 1, repeats: int = 1) -> tuple[Profile, dict]:
    """The profile of cfg's model at resolution with n workers on this host, with its
    train.lazy_update and train.split_fc (and the head's widths): of `repeats` profiles, each
    its own processes, the one with the median step."""
    from deepimage.data.manifest import load_manifest

    classes = len(load_manifest(shards).classes)
    spec = ModelSpec.from_config(cfg.model.to_dict(), resolution, classes)
    profs = sorted((host_profile(cfg, spec, batch, resolution, shards, steps, n) for _ in range(repeats)),
                   key=lambda p: p.data_s + p.compute_s)
    return profs[len(profs) // 2], head_shape(spec)


def local_hardware(link: Link, cores: int, allreduce_link: Link | None = None) -> Hardware:
    """This host as a Hardware: every worker on one node, the fitted same-host links."""
    return Hardware("this host", 1.0, cores, link, link, allreduce_link=allreduce_link)


def validate(cfg, shards: dict[int, Path], link: Link, workdir: Path, threads_per_worker: int,
             allreduce_link: Link | None = None) -> list[dict]:
    """Measured (scaling.measure_step, real workers under train.launcher) against predicted step
    time for the default and FC-heavy models, lazy update on and off, at each of scaling.np.
    Each point's profile (host_profile: its n workers' computation, at once, with that update)
    is taken right before its measurement, so both see the same machine."""
    from deepimage.scaling import measure_step

    pc, rows = cfg.perfmodel, []
    hw = local_hardware(link, max(cfg.scaling.np), allreduce_link)
    for name in ("default", "fc_heavy"):
        mcfg, res = model_variant(cfg, name)
        mcfg = dataclasses.replace(mcfg, scaling=dataclasses.replace(
            mcfg.scaling, resolution=res, batch_size=pc.validation_batch_size))
        for lazy in (True, False):
            lcfg = dataclasses.replace(mcfg, train=dataclasses.replace(mcfg.train, lazy_update=lazy))
            for n in cfg.scaling.np:
                # n pinned workers' computation, profiled at once right before their steps are
                # measured: what they cost each other on the shared host (at np=2 on 2 cores
                # the default model's compute grew 10-15 % over one worker alone), and with
                # split FC rank 0's shard of the head on the global batch
                prof, head = validation_profile(lcfg, shards[res], res, pc.validation_batch_size,
                                                pc.profile_steps, n=n, repeats=pc.profile_repeats)
                m = measure_step(lcfg, n, shards=shards[res], workdir=workdir, steps=pc.validation_steps,
                                 warmup_steps=pc.validation_warmup_steps, threads_per_worker=threads_per_worker)
                # deepimage.train --benchmark-out times steady-state steps: lazy updates wait in
                # the next forward (flushed once after the last step, outside the timed steps).
                p = step_time(prof, n, hw, lazy=lazy, split_fc=cfg.train.split_fc, head=head)
                rows.append({"np": n, "config": f"{name}/{'lazy' if lazy else 'sync'}", "model": name,
                             "lazy": lazy, "resolution": res, "measured_s": m["step_s"],
                             "predicted_s": p.total, "error": p.total / m["step_s"] - 1,
                             "measured_split": m["split"], "predicted_split": dataclasses.asdict(p),
                             "profile_flops_per_s": measured_flops(prof)})
    return rows


def paper_spec() -> ModelSpec:
    return ModelSpec(num_classes=PAPER["num_classes"], conv=PAPER["conv"], fc_hidden=PAPER["fc_hidden"], dropout=0.0)


def project(cfg, hardware: list[Hardware]) -> list[dict]:
    """The paper's widths at perfmodel.resolutions on each hardware, every np of perfmodel.np:
    butterfly and ring with lazy update on/off, Horovod-style fused ring, split FC on/off."""
    pc, spec, rows = cfg.perfmodel, paper_spec(), []
    head = head_shape(spec)
    variants = [(m, lazy, split) for m in ("butterfly", "ring") for lazy in (True, False) for split in (True, False)]
    variants += [("horovod", False, split) for split in (True, False)]
    for hw in hardware:
        for res in pc.resolutions:
            prof, source = projection_profile(hw, spec, pc.batch_size, res, cfg.train.bucket_mib)
            one = step_time(prof, 1, hw).total
            for method, lazy, split in variants:
                for n in pc.np:
                    s = step_time(prof, n, hw, method=method, lazy=lazy, split_fc=split, head=head)
                    rows.append({"hardware": hw.name, "resolution": res, "np": n, "method": method,
                                 "lazy": lazy, "split_fc": split, "step_s": s.total, "efficiency": one / s.total,
                                 "compute_from": source,
                                 "compute_s": s.compute, "split_fc_s": s.split_fc, "comm_exposed_s": s.comm_exposed})
    return rows


def projection_profile(hw: Hardware, spec: ModelSpec, batch: int, resolution: int,
                       bucket_mib: float) -> tuple[Profile, str]:
    """(profile, "measured" or "counted"): the hardware's measured profile of this resolution
    where it has one for this batch and bucket size, else counted at hw.flops_per_s."""
    prof, meta = hw.profiles.get(resolution), hw.profile_meta
    if prof is not None and prof.batch == batch and meta.get("bucket_mib") == bucket_mib \
            and meta.get("model") == spec.to_dict():
        return prof, "measured"
    return counted_profile(spec, batch, resolution, bucket_mib, hw.flops_per_s), "counted"


def measured_flops(prof: Profile) -> float:
    """The profiled worker's measured training FLOP/s (forward + backward of the conv and FC layers)."""
    return prof.flops() / (prof.forward_s + prof.backward_s)


# ---------------------------------------------------------------------------------------------
# Outputs: plots, the report's section, MLflow

BEST = ("butterfly", True, True)  # the paper's system: butterfly, lazy update, split FC


def plot(result: dict, measured_rows: list[dict], folder: Path) -> list[Path]:
    """perfmodel_efficiency.png (measured and predicted points on one plot with the projected
    curves), perfmodel_projection.png (every variant) and perfmodel_validation.png."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    proj = result["projection"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for (hw, res), rows in _groups(proj, ("hardware", "resolution")).items():
        rows = [r for r in rows if (r["method"], r["lazy"], r["split_fc"]) == BEST]
        ax.plot([r["np"] for r in rows], [100 * r["efficiency"] for r in rows], "-", marker=".",
                label=f"predicted: {hw}, {res} px")
    here = result["this_host"]
    ax.plot([r["np"] for r in measured_rows], [100 * r["efficiency"] for r in measured_rows], "ks", ms=8,
            label="measured: this host (scaling stage)")
    ax.plot([r["np"] for r in here], [100 * r["efficiency"] for r in here], "o", mfc="none", mec="r", ms=10,
            label="predicted: this host, same runs")
    ax.set(xscale="log", xlabel="workers", ylabel="scaling efficiency (%)", ylim=(0, 110),
           title="Measured (filled) and predicted (hollow, lines) efficiency")
    ax.legend(fontsize=7)
    fig.tight_layout()
    paths = [folder / "perfmodel_efficiency.png"]
    fig.savefig(paths[0], dpi=110)
    plt.close(fig)
    paths.append(_plot_projection(plt, proj, folder))
    paths.append(_plot_validation(plt, result["validation"], result["tolerance"], folder))
    return paths


def _groups(rows: list[dict], keys: tuple[str, ...]) -> dict:
    out: dict = {}
    for r in rows:
        out.setdefault(tuple(r[k] for k in keys), []).append(r)
    return out


def _plot_projection(plt, proj: list[dict], folder: Path) -> Path:
    panels = _groups(proj, ("hardware", "resolution"))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4), squeeze=False, sharey=True)
    for ax, ((hw, res), rows) in zip(axes[0], panels.items()):
        for (method, lazy, split), line in _groups(rows, ("method", "lazy", "split_fc")).items():
            label = f"{method}{', lazy' if lazy else ''}{', split FC' if split else ''}"
            ax.plot([r["np"] for r in line], [100 * r["efficiency"] for r in line], marker=".", label=label,
                    ls="-" if split else "--")
        ax.set(xscale="log", xlabel="workers", title=f"predicted: {hw}, {res} px", ylim=(0, 105))
    axes[0][0].set_ylabel("scaling efficiency (%)")
    axes[0][-1].legend(fontsize=6)
    fig.tight_layout()
    path = folder / "perfmodel_projection.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _plot_validation(plt, validation: list[dict], tol: float, folder: Path) -> Path:
    fig, ax = plt.subplots(figsize=(5, 4.5))
    hi = 1e3 * max(max(v["measured_s"], v["predicted_s"]) for v in validation) * 1.15
    ax.fill_between([0, hi], [0, hi * (1 - tol)], [0, hi * (1 + tol)], color="0.9", label=f"±{tol:.0%}")
    ax.plot([0, hi], [0, hi], "k-", lw=0.5)
    for v in validation:
        ax.plot(1e3 * v["measured_s"], 1e3 * v["predicted_s"], "o" if v["np"] == 1 else "s",
                label=f"{v['config']} np={v['np']}")
    ax.set(xlabel="measured step (ms)", ylabel="predicted step (ms)", xlim=(0, hi), ylim=(0, hi),
           title="Validation on this host")
    ax.legend(fontsize=6)
    fig.tight_layout()
    path = folder / "perfmodel_validation.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def report_lines(result: dict) -> list[str]:
    """The report's performance-model section (markdown): what is measured, what is predicted."""
    tol = result["tolerance"]
    residuals = ", ".join(f"{r['residual']:+.0%}" for r in result["link_fit"])
    lib = result.get("allreduce_link")
    library = (f"; the small blocking all-reduces (torch.distributed): latency {lib['latency_s'] * 1e3:.2f} ms, "
               f"bandwidth {lib['bandwidth'] / 1e9:.2f} GB/s" if lib else "")
    lines = ["## Performance model and projection", "",
             "MEASURED on this host: each validation point's step time (real workers, "
             "`deepimage.scaling.measure_step`). PREDICTED: everything else, by `deepimage.perfmodel` "
             "from per-layer profiles (for N workers on this host, N pinned profiling processes at "
             "once, each computing rank 0's split FC share) and the fitted transport "
             f"(latency {result['link']['latency_s'] * 1e6:.0f} us, "
             f"bandwidth {result['link']['bandwidth'] / 1e9:.2f} GB/s; "
             f"fit residuals {residuals}){library}.", "",
             "| model / update | workers | measured step | predicted step | error "
             "| measured compute / comm wait / data / other (ms) "
             "| predicted compute / split FC / exposed comm / slowest-rank wait (ms) |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for v in result["validation"]:
        m, p = v["measured_split"], v["predicted_split"]
        ok = "" if abs(v["error"]) <= tol else " (outside)"
        measured = " / ".join(f"{1e3 * m[k]:.1f}" for k in ("compute", "comm_wait", "data", "other"))
        lines.append(f"| {v['config']} | {v['np']} | {v['measured_s'] * 1e3:.1f} ms | "
                     f"{v['predicted_s'] * 1e3:.1f} ms | {v['error']:+.1%}{ok} | {measured} | "
                     f"{1e3 * p['compute']:.1f} / {1e3 * p['split_fc']:.1f} / {1e3 * p['comm_exposed']:.1f} / "
                     f"{1e3 * p.get('slowest_wait', 0.0):.1f} |")
    lines += ["", f"PREDICTED, the paper's widths ({result['paper_model']}), {result['projection_batch']} images "
              "per worker, at the largest worker count:", "",
              "| hardware | px | workers | method | lazy | split FC | step | efficiency "
              "| compute / split FC / exposed comm (ms) |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    top = max(r["np"] for r in result["projection"])
    for r in result["projection"]:
        if r["np"] == top:
            lines.append(f"| {r['hardware']} | {r['resolution']} | {r['np']} | {r['method']} | "
                         f"{'on' if r['lazy'] else 'off'} | {'on' if r['split_fc'] else 'off'} | "
                         f"{r['step_s'] * 1e3:.1f} ms | {100 * r['efficiency']:.1f} % | "
                         f"{1e3 * r['compute_s']:.1f} / {1e3 * r['split_fc_s']:.1f} / "
                         f"{1e3 * r['comm_exposed_s']:.1f} |")
    lines += ["", "Hardware: " + "; ".join(f"{h['name']}: {h['flops_per_s']:.3g} FLOP/s per worker "
                                           f"({h['relative_throughput']:.0f}x this host's measured worker)"
                                           for h in result["hardware"]) + "."]
    for h in result["hardware"]:
        meta = h.get("profile_meta") or {}
        if h.get("profiled_resolutions"):
            lines.append(f"{h['name']}'s compute at {', '.join(f'{r} px' for r in h['profiled_resolutions'])} is "
                         f"MEASURED: one worker's per-layer profile on {meta.get('device')} "
                         f"({'bf16 autocast' if meta.get('bf16') else 'fp32'}, torch {meta.get('torch')}, "
                         f"{meta.get('date')}); elsewhere it is counted FLOPs at the file's FLOP/s.")
    lines.append("")
    return lines


def library_allreduce(sweep: dict) -> tuple[Link | None, list[dict]]:
    """The fit of torch.distributed's all-reduce (transport.allreduce on CPU) from the sweep's
    "torch" times, when the sweep has them."""
    times = (sweep.get("median_s") or {}).get("torch")
    if not times or len(times) < 2:
        return None, []
    return fit_plain([{"bytes": s * 2**20, "seconds": t} for s, t in zip(sweep["sizes_mib"], times)])


def run_stage(cfg, scaling: dict, shards_root: Path, threads: int, workdir: Path) -> dict:
    """Fit, validate, project: perfmodel.json's content."""
    sweep = scaling.get("allreduce") or {}
    if not sweep.get("points"):
        raise PerfModelError("perfmodel: the scaling stage's output has no butterfly sweep "
                             "(allreduce.points): set scaling.allreduce_mib > 0 and np up to >= 2")
    link, fit = fit_link(sweep["points"], sweep["np"])
    allreduce_link, allreduce_fit = library_allreduce(sweep)
    per_worker = threads // max(cfg.scaling.np)
    resolutions = {model_variant(cfg, name)[1] for name in ("default", "fc_heavy")}
    shards = {r: shards_root / str(r) / "train" for r in resolutions}
    # The step's small all-reduces are charged on the butterfly's fit: the library fit's latency
    # (extrapolated from 0.25-16 MiB sweep points down to 8-byte to 512-KiB messages) moved from
    # 0.3 to 12 ms a step between quiet runs while the measured np=2 comm_wait stayed 2-7 ms.
    validation = validate(cfg, shards, link, workdir, per_worker)
    hardware = [load_hardware(h) for h in cfg.perfmodel.hardware]
    # the default model's one-worker profile, taken for the validation (no second profile)
    here_flops = next(v["profile_flops_per_s"] for v in validation if v["model"] == "default")
    default_lazy = [v for v in validation if v["config"] == "default/" + ("lazy" if cfg.train.lazy_update else "sync")]
    one = next(v["predicted_s"] for v in default_lazy if v["np"] == min(cfg.scaling.np))
    return {"link": dataclasses.asdict(link), "link_fit": fit,
            "allreduce_link": allreduce_link and dataclasses.asdict(allreduce_link),
            "allreduce_link_fit": allreduce_fit, "sweep_np": sweep["np"], "tolerance": cfg.perfmodel.tolerance,
            "validation": validation, "projection": project(cfg, hardware),
            # weak scaling: efficiency(N) = T(1) / T(N), the predicted steps of the default model
            "this_host": [{"np": v["np"], "efficiency": one / v["predicted_s"]} for v in default_lazy],
            "this_host_flops_per_s": here_flops, "validation_batch": cfg.perfmodel.validation_batch_size,
            "hardware": [hardware_summary(h, here_flops) for h in hardware],
            "paper_model": f"conv {PAPER['conv']}, fc_hidden {PAPER['fc_hidden']}, {PAPER['num_classes']} classes",
            "projection_batch": cfg.perfmodel.batch_size, "fc_heavy": FC_HEAVY}


def hardware_summary(hw: Hardware, here_flops: float) -> dict:
    """A hardware file as perfmodel.json records it: its numbers and sources, and what its
    measured profile (if any) was taken on, not the profile's layers."""
    d = {k: v for k, v in dataclasses.asdict(hw).items() if k != "profiles"}
    return {**d, "profiled_resolutions": sorted(hw.profiles), "relative_throughput": hw.flops_per_s / here_flops}


def log_result(run, result: dict, paths: list[Path]) -> None:
    """Validation errors and the best variant's projected efficiency as MLflow metrics."""
    for v in result["validation"]:
        key = v["config"].replace("/", "_")
        run.log_metrics({f"validation_error_{key}_np{v['np']}": v["error"],
                         f"validation_measured_s_{key}_np{v['np']}": v["measured_s"],
                         f"validation_predicted_s_{key}_np{v['np']}": v["predicted_s"]})
    run.log_metrics({"link_latency_s": result["link"]["latency_s"],
                     "link_bandwidth_bytes_per_s": result["link"]["bandwidth"],
                     "validation_max_abs_error": max(abs(v["error"]) for v in result["validation"])})
    for (hw, res), rows in _groups(result["projection"], ("hardware", "resolution")).items():
        for r in rows:
            if (r["method"], r["lazy"], r["split_fc"]) == BEST:
                run.log_metrics({f"projected_efficiency_{hw}_{res}px": r["efficiency"]}, step=r["np"])
    for p in paths:
        run.log_artifact(p)


def profile_main(argv: list[str]) -> None:
    """`python -m deepimage.perfmodel profile`: one worker's profile of the paper's model (the
    projection's compute), written for a hardware file's `profile:` key."""
    import argparse
    import sys

    from deepimage.config import Config

    p = argparse.ArgumentParser(prog="python -m deepimage.perfmodel profile",
                                description="Profile one worker (e.g. one GPU) on the paper's model for the "
                                            "projection.")
    p.add_argument("--device", default="cuda", help="torch device of the worker (default cuda)")
    p.add_argument("--bf16", action="store_true", help="train.bf16: bf16 autocast of the forward")
    p.add_argument("--resolutions", type=int, nargs="+", default=None, help="default perfmodel.resolutions")
    p.add_argument("--batch", type=int, default=None, help="images per worker (default perfmodel.batch_size)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--out", required=True, help="the profile file (JSON), e.g. deepimage/hardware/h100_profile.json")
    a = p.parse_args(argv)
    cfg = Config.from_dict({"train": {"bf16": a.bf16}})
    dev = torch.device(a.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        sys.exit("perfmodel profile: --device cuda but torch.cuda.is_available() is False (no GPU visible)")
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True
    spec, batch = paper_spec(), a.batch or cfg.perfmodel.batch_size
    out = {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu", "torch": torch.__version__,
           "bf16": a.bf16, "batch": batch, "bucket_mib": cfg.train.bucket_mib, "model": spec.to_dict(),
           "steps": a.steps, "date": time.strftime("%Y-%m-%d"), "flops_per_s": {}, "profiles": {}}
    for res in a.resolutions or cfg.perfmodel.resolutions:
        prof = profile(cfg, spec, batch, res, steps=a.steps, device=a.device)
        out["profiles"][str(res)] = dataclasses.asdict(prof)
        out["flops_per_s"][str(res)] = measured_flops(prof)
        print(f"{res} px, {batch} images: forward {prof.forward_s * 1e3:.1f} ms, backward "
              f"{prof.backward_s * 1e3:.1f} ms, optimizer {prof.optimizer_s * 1e3:.1f} ms, "
              f"{measured_flops(prof) / 1e12:.1f} TFLOP/s")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=1) + "\n")


def main(argv: list[str] | None = None) -> None:
    import argparse
    import sys
    import tempfile

    from deepimage import config, tracking

    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["profile"]:
        return profile_main(argv[1:])

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, required=True, help="cores this job may use")
    p.add_argument("--scaling", required=True, help="the scaling stage's scaling.json (sweep, measured rows)")
    p.add_argument("--shards", required=True, help="folder of <resolution>/train shard folders")
    p.add_argument("--out", required=True, help="perfmodel.json")
    p.add_argument("--plots", required=True, help="folder for the plots")
    p.add_argument("--report-md", required=True, help="the report's section (markdown)")
    config.add_argument(p, "seed, resolutions, train, model, scaling and perfmodel")
    tracking.add_args(p)
    args = p.parse_args(argv)
    try:
        cfg = config.from_args(args)
        scaling = json.loads(Path(args.scaling).read_text())
    except (config.ConfigError, OSError, ValueError) as e:
        sys.exit(f"perfmodel: {e}")
    if max(cfg.scaling.np) > args.threads:
        sys.exit(f"perfmodel: scaling.np up to {max(cfg.scaling.np)} needs that many cores, "
                 f"this job has {args.threads}")
    params = {"perfmodel": cfg.perfmodel, "scaling_np": cfg.scaling.np, "launcher": cfg.train.launcher}
    with tracking.stage_run(args, "perfmodel", params) as run, tempfile.TemporaryDirectory() as tmp:
        try:
            result = run_stage(cfg, scaling, Path(args.shards), args.threads, Path(tmp))
        except (PerfModelError, ValueError, OSError) as e:
            sys.exit(f"perfmodel: {e}")
        tracking.write_json(args.out, result)
        paths = plot(result, scaling.get("rows", []), Path(args.plots))
        Path(args.report_md).write_text("\n".join(report_lines(result)) + "\n")
        log_result(run, result, [Path(args.out), Path(args.report_md), *paths])
    for v in result["validation"]:
        print(f"{v['config']} np={v['np']}: measured {v['measured_s'] * 1e3:.1f} ms, predicted "
              f"{v['predicted_s'] * 1e3:.1f} ms ({v['error']:+.1%})")


if __name__ == "__main__":
    main()
