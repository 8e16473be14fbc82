"""Profiles of one worker's training step: per-layer forward and backward times, when each
gradient bucket is full in backward and when its layer is next used in forward.

    prof = profile(cfg, spec, batch=16, resolution=64, steps=5, lazy=True)

`profile` times the training stage's own step (deepimage.train.step on the model and
GradientSync that deepimage.parallel.parallelize builds) from outside: module hooks per layer,
post-accumulate-grad hooks per parameter, and the step's phase laps. `counted_profile` counts a
model too large to time here in FLOPs.
"""
from __future__ import annotations

import contextlib
import dataclasses
import statistics
import time

import torch

from deepimage.model import DeepImageNet, ModelSpec, build_model
from deepimage.parallel.lazy import make_buckets
from deepimage.parallel.parallelize import parallelize
from deepimage.parallel.split_fc import ColumnParallelLinear, RowParallelLinear, SplitFCHead
from deepimage.parallel.transport.local import LocalTransport, MirrorTransport
from deepimage.perfmodel.costs import Profile
from deepimage.train import autocast, sgd, step


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
    """Forward hooks (start, end, FLOPs per leaf), gradient-ready marks per parameter, and the
    end of each of the step's phases (deepimage.train.step's timer: lap(phase))."""

    def __init__(self, model: torch.nn.Module, clock: _Clock):
        self.clock = clock
        self.phase_at: dict[str, object] = {}
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

    def lap(self, phase: str) -> None:
        self.phase_at[phase] = self.clock.mark()

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
    """Per-layer forward/backward times of one worker running training's own step
    (deepimage.train.step on the model and GradientSync that deepimage.parallel.parallelize
    builds, on the one-process transport, cfg.train.bucket_mib, train.bf16's autocast), medians
    over `steps` after one warm-up; on a CPU with one thread, on a GPU ("cuda") timed by CUDA events.

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
    dev = torch.device(device)
    with one_thread():
        pcfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, lazy_update=lazy, compute_nice=0))
        model, sync = parallelize(build_model(spec, cfg.seed).to(dev), LocalTransport(), pcfg,
                                  sgd(pcfg.train), head_transport=MirrorTransport(ranks) if ranks > 1 else None)
        timers = _Timers(model, _Clock(dev))
        if sync.local_optimizer is not None:
            timers.time_head_update(sync.local_optimizer)
        if not batches:
            batches = [(torch.randn(batch, 3, resolution, resolution),  # (b, 3, H, W)
                        torch.randint(0, spec.num_classes, (batch,)))]
        batches = [(x.to(dev), y.to(dev)) for x, y in batches]
        amp = autocast(model, pcfg.train)
        samples = [_one_step(model, sync, timers, *batches[i % len(batches)], amp)
                   for i in range(steps + 1)][1:]
        timers.remove()
        sync.flush()
        sync.remove_hooks()
    return dataclasses.replace(_summarise(model, samples, batch, resolution, cfg.train.bucket_mib), ranks=ranks)


def _one_step(model, sync, timers: _Timers, x, y, amp) -> dict:
    """One training step (deepimage.train.step), its phases and layers marked by `timers`."""
    clock = timers.clock
    step(model, sync, x, y, amp, timer=timers)
    clock.wait()
    since, at = clock.since, timers.phase_at
    t0, t1, t2, t3 = at["count"], at["forward"], at["backward"], at["update"]  # forward starts at t0
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



def measured_flops(prof: Profile) -> float:
    """The profiled worker's measured training FLOP/s (forward + backward of the conv and FC layers)."""
    return prof.flops() / (prof.forward_s + prof.backward_s)
