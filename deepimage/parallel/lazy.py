"""Gradient synchronisation by butterfly all-reduce, with Deep Image's lazy update.

    sync = GradientSync(model, transport, lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9),
                        bucket_mib=cfg.train.bucket_mib)   # the config's (schema's) bucket size
    for x, y in batches:
        sync.zero_grad()
        loss = F.cross_entropy(model(x), y, reduction="sum") / global_batch
        loss.backward()   # each full bucket's butterfly starts from the backward hooks
        sync.step()       # lazy: the wait and the optimizer step move to the layer's next forward
    sync.flush()          # before evaluation, a checkpoint, or the end

Replicated parameters are packed, last layer first (the order backward produces them), into
flat buckets of about `bucket_mib`, each with its own optimizer from `optimizer_factory`. The
last buckets (the first layers, up to `priority_fraction` of the bytes) travel on the
transport's second lane: backward produces them last and the next forward needs them first, so
they must not queue behind the later layers' gradients.
Parameters marked model-parallel (split_fc.is_model_parallel: the split FC layers' shards) are
not communicated: one more optimizer steps them at `step()`.

lazy=False: `step()` launches every bucket (or, with overlap=True, those backward has not
already launched), waits for them and steps every optimizer. lazy=True: `step()`
steps only the local parameters; each bucket's wait and optimizer step run in a forward
pre-hook of the modules owning its parameters, i.e. just before the layer is next used, so
the remaining communication overlaps the start of the next step. Both give the same weights.

Buckets start strictly in order (a bucket that fills early waits for those before it), and
`step()` starts whatever backward left (parameters without a gradient count as zeros), so
every rank issues the same butterflies in the same order whatever its local batch held.

compute_nice > 0 (the workflow passes train.compute_nice; 0 leaves the caller's priority alone)
lowers the calling (training) thread's scheduling priority to that nice level once
the communication threads exist (the butterfly's progress threads, the transport's receivers),
so that they run as soon as a message needs them instead of after the compute thread's time
slice. Overlap needs it where the cores are all busy computing: 2 workers on 2 cores, 73 MiB of
gradients, lazy took 277 ms a step at nice 0 and 236 ms at nice 5, against 214 ms of compute
(python -m deepimage.bench.train_step --fc-hidden 4096 4096). It cannot be undone by an
unprivileged process: use it in worker processes (training, benchmarks), not in a notebook.

Rules: one backward per step (no gradient accumulation); a parameter must be used inside the
forward of a module that owns it (true of every nn.Module layer), or its deferred update is
applied only at the next step() or flush(); a parameter with no gradient on any rank still gets
its momentum and weight decay (it is stepped with a zero gradient).
"""
from __future__ import annotations

import os
import threading
import time
from typing import Callable

import torch
from torch import nn

from deepimage.parallel.butterfly import OPS, PIECE_MIB, allreduce_flat_async_, start_progress
from deepimage.parallel.split_fc import is_model_parallel
from deepimage.parallel.transport import Handle, Transport

OptimizerFactory = Callable[[list[nn.Parameter]], torch.optim.Optimizer]


class GradientSyncError(ValueError):
    """Bad arguments to GradientSync, or optimizer state that does not fit its model (the
    message names the argument or the parameters)."""


class _Bucket:
    """Replicated parameters of one dtype/device sharing one flat gradient buffer."""

    def __init__(self, index: int, params: list[nn.Parameter]):
        self.index, self.params = index, params
        self.flat = torch.zeros(sum(p.numel() for p in params), dtype=params[0].dtype,
                                device=params[0].device)
        self.views, offset = [], 0
        for p in params:  # (numel,) windows of the buffer, shaped like each parameter
            self.views.append(self.flat[offset:offset + p.numel()].view_as(p))
            offset += p.numel()
        self.optimizer: torch.optim.Optimizer | None = None
        self.ready: set[int] = set()  # id() of parameters whose gradient is in this step
        self.handle: Handle | None = None  # the butterfly in flight
        self.pending = False  # reduced (or reducing) gradient not yet applied
        self.lane = 0  # 1: the first layers' buckets, sent on the transport's priority lane
        self.step_lrs: list[float] = []  # learning rates when step() deferred the update

    def pack(self) -> None:
        """Copy this step's gradients into the buffer (None counts as zero)."""
        for p, view in zip(self.params, self.views):
            if p.grad is None:
                view.zero_()
            elif p.grad.data_ptr() != view.data_ptr():
                view.copy_(p.grad)


def make_buckets(params: list[nn.Parameter], bucket_mib: float) -> list[_Bucket]:
    """Pack `params` in the given order into buckets of at most bucket_mib (one dtype/device each;
    a parameter larger than that gets a bucket of its own)."""
    if bucket_mib <= 0:
        raise GradientSyncError(f"GradientSync: bucket_mib must be > 0, got {bucket_mib}")
    limit = bucket_mib * 2**20
    groups: list[list[nn.Parameter]] = []
    size = 0.0
    for p in params:
        nbytes = p.numel() * p.element_size()
        same_kind = groups and (groups[-1][0].dtype, groups[-1][0].device) == (p.dtype, p.device)
        if not same_kind or size + nbytes > limit:
            groups.append([])
            size = 0.0
        groups[-1].append(p)
        size += nbytes
    return [_Bucket(i, g) for i, g in enumerate(groups)]


def assign_lanes(buckets: list[_Bucket], priority_fraction: float) -> None:
    """Put the last buckets (the first layers: produced last by backward, needed first by the
    next forward), up to priority_fraction of the bytes and at least one, on lane 1, so they do
    not queue behind the later layers' traffic; the rest on lane 0."""
    if not 0 <= priority_fraction <= 1:
        raise GradientSyncError(f"GradientSync: priority_fraction must be in [0, 1], got {priority_fraction}")
    total = sum(b.flat.numel() * b.flat.element_size() for b in buckets)
    budget = priority_fraction * total
    for i, bucket in enumerate(reversed(buckets)):
        size = bucket.flat.numel() * bucket.flat.element_size()
        if len(buckets) == 1 or priority_fraction == 0 or (i > 0 and size > budget):
            break
        bucket.lane = 1
        budget -= size


def yield_to_communication(transport: Transport, nice: int) -> None:
    """Start the communication threads, then lower this thread's priority to at least nice
    level `nice` (Linux: per thread; the threads already running keep theirs). Module doc."""
    if not 0 <= nice <= 19:
        raise GradientSyncError(f"GradientSync: compute_nice must be in [0, 19], got {nice}")
    if nice == 0 or transport.size == 1 or not hasattr(os, "setpriority"):
        return
    start_progress(transport)
    tid = threading.get_native_id()
    if os.getpriority(os.PRIO_PROCESS, tid) < nice:
        os.setpriority(os.PRIO_PROCESS, tid, nice)


class GradientSync:
    """Butterfly all-reduce of replicated gradients from backward hooks, and the optimizer
    steps (deferred to each layer's next forward when lazy)."""

    def __init__(self, model: nn.Module, transport: Transport, optimizer_factory: OptimizerFactory,
                 *, bucket_mib: float, lazy: bool = True, op: str = "sum",
                 piece_mib: float = PIECE_MIB, priority_fraction: float = 0.25,
                 overlap: bool | None = None, compute_nice: int = 0):
        if op not in OPS:
            raise GradientSyncError(f"GradientSync: op must be one of {OPS}, got {op!r}")
        self.model, self.transport, self.lazy, self.op = model, transport, lazy, op
        # overlap: launch buckets from backward hooks. Lazy update needs it; without lazy update
        # the default is the paper's synchronous baseline (everything after backward), and
        # overlap=True gives the DDP-style middle ground (launch in backward, wait in step()).
        self.overlap = lazy if overlap is None else overlap
        if lazy and not self.overlap:
            raise GradientSyncError("GradientSync: lazy update launches from backward hooks; "
                                 "overlap=False needs lazy=False")
        self.piece_mib = piece_mib
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self._names = {id(p): n for n, p in named}
        local = [p for _, p in named if is_model_parallel(p)]
        replicated = [p for _, p in named if not is_model_parallel(p)]
        # Backward produces gradients last layer first: bucket them in that order.
        self.buckets = make_buckets(replicated[::-1], bucket_mib)
        self._bucket_of = {id(p): b for b in self.buckets for p in b.params}
        assign_lanes(self.buckets, priority_fraction)
        for b in self.buckets:
            b.optimizer = optimizer_factory(b.params)
        self.local_params = local
        self.local_optimizer = optimizer_factory(local) if local else None
        self._next_launch = 0  # buckets launch strictly in index order
        self.wait_seconds = 0.0  # time this thread spent blocked on communication (for logs)
        self._hooks = [p.register_post_accumulate_grad_hook(self._on_grad) for p in replicated]
        self._hooks += self._register_forward_hooks()
        if compute_nice:
            yield_to_communication(transport, compute_nice)

    # -- communication --------------------------------------------------------------------

    def _on_grad(self, p: torch.Tensor) -> None:
        """Backward hook: this parameter's gradient is complete; launch what is full."""
        bucket = self._bucket_of[id(p)]
        if bucket.handle is not None and not bucket.pending:
            raise RuntimeError(
                f"GradientSync: {self._names[id(p)]} received a gradient after its bucket was "
                f"sent; call backward once per step (no gradient accumulation between steps)")
        bucket.ready.add(id(p))
        if self.overlap:
            self._launch_full()

    def _launch_full(self) -> None:
        while (self._next_launch < len(self.buckets)
               and len(self.buckets[self._next_launch].ready) == len(self.buckets[self._next_launch].params)):
            self._launch(self.buckets[self._next_launch])

    def _launch(self, bucket: _Bucket) -> None:
        if bucket.pending:  # last step's update never met a forward: apply it before reuse
            self._apply(bucket)
        bucket.pack()
        bucket.handle = allreduce_flat_async_(bucket.flat, self.op, self.transport, self.piece_mib,
                                              lane=bucket.lane)
        self._next_launch += 1

    def _launch_rest(self) -> None:
        """Launch, in order, every bucket backward did not fill (missing gradients are zeros)."""
        while self._next_launch < len(self.buckets):
            self._launch(self.buckets[self._next_launch])

    # -- updates --------------------------------------------------------------------------

    def _apply(self, bucket: _Bucket) -> None:
        """Wait for a deferred bucket and step its optimizer with the step()-time learning rate;
        the parameters' .grad is left as it was (the next backward accumulates from there)."""
        self._wait(bucket)
        saved = [p.grad for p in bucket.params]
        now = [g["lr"] for g in bucket.optimizer.param_groups]
        for g, lr in zip(bucket.optimizer.param_groups, bucket.step_lrs):
            g["lr"] = lr
        for p, view in zip(bucket.params, bucket.views):
            p.grad = view
        bucket.optimizer.step()
        for p, grad in zip(bucket.params, saved):
            p.grad = grad
        for g, lr in zip(bucket.optimizer.param_groups, now):
            g["lr"] = lr
        bucket.pending = False
        bucket.handle = None

    def _wait(self, bucket: _Bucket) -> None:
        start = time.perf_counter()
        bucket.handle.wait()
        self.wait_seconds += time.perf_counter() - start

    def _register_forward_hooks(self) -> list:
        """A forward pre-hook on each module that directly owns bucketed parameters."""
        hooks = []
        for module in self.model.modules():
            owned = {id(self._bucket_of[id(p)]): self._bucket_of[id(p)]
                     for p in module.parameters(recurse=False) if id(p) in self._bucket_of}
            if owned:
                buckets = sorted(owned.values(), key=lambda b: b.index)
                hooks.append(module.register_forward_pre_hook(self._make_pre_hook(buckets)))
        return hooks

    def _make_pre_hook(self, buckets: list[_Bucket]):
        def pre_hook(module, args):
            for bucket in buckets:
                if bucket.pending:
                    self._apply(bucket)
        return pre_hook

    def step(self) -> None:
        """Finish this step's synchronisation (see the module doc for lazy vs not)."""
        self._launch_rest()
        if self.local_optimizer is not None:
            self.local_optimizer.step()
        for bucket in self.buckets:
            bucket.ready.clear()
            if self.lazy:
                bucket.pending = True
                bucket.step_lrs = [g["lr"] for g in bucket.optimizer.param_groups]
            else:
                self._wait(bucket)
                for p, view in zip(bucket.params, bucket.views):
                    p.grad = view  # the reduced gradient, as .grad is after a plain step
                bucket.optimizer.step()
                bucket.handle = None
        self._next_launch = 0

    def flush(self) -> None:
        """Wait for and apply every deferred update (before eval, a checkpoint, or the end)."""
        for bucket in self.buckets:
            if bucket.pending:
                self._apply(bucket)

    def zero_grad(self) -> None:
        """Drop every parameter's .grad (reduced gradients of deferred updates are kept)."""
        for b in self.buckets:
            for p in b.params:
                p.grad = None
        for p in self.local_params:
            p.grad = None

    def set_lr(self, lr: float) -> None:
        """Learning rate of every parameter group from the next step() on."""
        for opt in self.optimizers():
            for g in opt.param_groups:
                g["lr"] = lr

    def optimizers(self) -> list[torch.optim.Optimizer]:
        opts = [b.optimizer for b in self.buckets]
        return opts + ([self.local_optimizer] if self.local_optimizer is not None else [])

    def remove_hooks(self) -> None:
        """Detach from the model (flush first if updates may be pending)."""
        for h in self._hooks:
            h.remove()
        self._hooks = []

    # -- checkpoints ----------------------------------------------------------------------

    def _param_names(self, opt: torch.optim.Optimizer) -> list[list[str]]:
        return [[self._names[id(p)] for p in g["params"]] for g in opt.param_groups]

    def state_dict(self) -> dict:
        """The optimizers' state keyed by parameter name, hyper-parameters included, whatever the
        bucket layout (this rank's shards as they are: parallel.state gathers them); flushes."""
        self.flush()
        state, groups = {}, {}
        for opt in self.optimizers():
            sd = opt.state_dict()
            for names, group in zip(self._param_names(opt), sd["param_groups"]):
                hyper = {k: v for k, v in group.items() if k != "params"}
                for name, i in zip(names, group["params"]):
                    groups[name] = hyper
                    if i in sd["state"]:
                        state[name] = sd["state"][i]
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, sd: dict) -> None:
        """Restore what state_dict() returned (same parameter names; any bucket_mib)."""
        missing = [n for n in self._names.values() if n not in sd.get("param_groups", {})]
        if missing:
            raise GradientSyncError(f"GradientSync.load_state_dict: no optimizer state for "
                                    f"{missing[:3]}{'...' if len(missing) > 3 else ''} (the "
                                    f"checkpoint is from another model?)")
        for opt in self.optimizers():
            inner = {"state": {}, "param_groups": []}
            index = 0
            for names in self._param_names(opt):
                ids = list(range(index, index + len(names)))
                inner["param_groups"].append({**sd["param_groups"][names[0]], "params": ids})
                inner["state"].update({i: sd["state"][n] for i, n in zip(ids, names) if n in sd["state"]})
                index += len(names)
            opt.load_state_dict(inner)
