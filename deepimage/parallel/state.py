"""Training state in plain form: gathered from the workers, re-split for any worker count.

    from deepimage.parallel.state import gather_training_state, restore_training_state
    state = gather_training_state(model, sync)        # every rank calls it; whole on rank 0
    # {"model": plain DeepImageNet state dict, "optimizer": {param name: {"momentum_buffer": ...}},
    #  "rng": [rank 0's random states, rank 1's, ...], "world_size": N}
    note = restore_training_state(model, sync, state)  # any worker count; says what it did

The one module that gathers and re-splits training state (deepimage.checkpoint writes it):

- model: the split FC shards gathered to full shape (`gather_state_dict`), cut again for this
  rank of any N (`shard_state_dict`); replicated parameters pass through.
- optimizer: per parameter name, state tensors shaped like a shard gathered the same way
  (`gather_optimizer_state`), cut again on load (`load_optimizer_state`); the bucket layout of
  GradientSync does not matter (`GradientSync.state_dict` keys its state by name too).
- random states, one entry per rank (`gather_rng_states`): torch CPU (+ CUDA), numpy and
  Python's `random`, as tensors and numbers, type-checked before use (never a pickle).
  Augmentation draws nothing from them (it is a pure function of seed, epoch and sample id,
  deepimage.data.augment), the sample order is a pure function of (seed, epoch)
  (deepimage.data.partition) and the dropout masks, split head or plain, a pure function of
  (seed, global step, layer, row, column) (deepimage.model.dropout_keep), so none of those needs
  saving: the head's step is set from the checkpoint's global step.

At the same worker count every rank gets its own random states back: the continuation is bit for
bit the uninterrupted run. At ANOTHER worker count every rank takes rank 0's torch / numpy /
Python states; the dropout masks are the uninterrupted run's anyway, so the run matches it to
float rounding (1e-5 relative).
"""
from __future__ import annotations

import json
import random
from typing import Iterable

import numpy as np
import torch
from torch import nn

from deepimage.model import FCHead
from deepimage.parallel.even_split import partition_range
from deepimage.parallel.split_fc import SplitFCHead
from deepimage.parallel.transport import Transport


# ---------------------------------------------------------------------------------------------
# Model weights: plain state dicts in, plain state dicts out

def split_layout(prefix: str = "head.") -> dict[str, int]:
    """State-dict key -> the dim cut across ranks, for a SplitFCHead whose keys start `prefix`."""
    return {f"{prefix}{layer}.{name}": dim for layer, cls in SplitFCHead.LAYERS.items()
            for name, dim in cls.SPLIT_DIMS.items()}


def _model_layout(model: nn.Module) -> tuple[dict[str, int], int, int]:
    """(split_layout of every SplitFCHead inside `model`, rank, size); ({}, 0, 1) if none."""
    layout, rank, size = {}, 0, 1
    for name, module in model.named_modules():
        if isinstance(module, SplitFCHead):
            layout.update(split_layout(f"{name}." if name else ""))
            rank, size = module.rank, module.size
    return layout, rank, size


def _shard(full: torch.Tensor, dim: int, rank: int, size: int) -> torch.Tensor:
    start, stop = partition_range(full.shape[dim], rank, size)
    return full.narrow(dim, start, stop - start).clone()  # clone: the shard owns its memory


def _gather_dim(shard: torch.Tensor, dim: int, transport: Transport) -> torch.Tensor:
    """Concatenate every rank's shard along `dim` (0 or 1), in rank order."""
    if dim == 0:
        return transport.allgather(shard.contiguous())
    # all-gather concatenates dim 0: gather the transpose, (out, in_r) -> (in, out) -> (out, in).
    return transport.allgather(shard.transpose(0, 1).contiguous()).transpose(0, 1).contiguous()


def _gather_dim_to_root(shard: torch.Tensor, dim: int, transport: Transport) -> torch.Tensor:
    """Rank 0 gets every rank's shard concatenated along `dim` (0 or 1), in rank order; the other
    ranks get an empty tensor. Half the traffic of an all-gather with two ranks: an alltoall in
    which every rank sends all its rows to rank 0 and none elsewhere."""
    rows = shard if dim == 0 else shard.transpose(0, 1)  # (out_r, in) or (in_r, out)
    splits = [rows.shape[0]] + [0] * (transport.size - 1)
    got = transport.alltoall_async(rows.contiguous(), splits).wait()  # rank 0: (sum rows, ...)
    return got if dim == 0 else got.transpose(0, 1).contiguous()


def shard_state_dict(plain_sd: dict, rank: int, size: int, prefix: str = "head.") -> dict:
    """Rank's state dict of the split model, cut from a plain DeepImageNet (or FCHead, with
    prefix="") state dict; keys are unchanged, other entries are passed through."""
    layout = split_layout(prefix)
    missing = [k for k in layout if k not in plain_sd]
    if missing:
        raise KeyError(f"state dict has no {missing[0]!r}: not a DeepImageNet state dict "
                       f"(keys start {sorted(plain_sd)[:3]}), or pass prefix= for where the head is")
    out = dict(plain_sd)
    for key, dim in layout.items():
        if plain_sd[key].shape[dim] < size:
            raise ValueError(f"{key} has {plain_sd[key].shape[dim]} rows/columns to split, fewer "
                             f"than {size} processes")
        out[key] = _shard(plain_sd[key], dim, rank, size)
    return out


def gather_tensors(model: nn.Module, named: dict, transport: Transport, root_only: bool = False) -> dict:
    """Reassemble plain tensors from a dict keyed like model.state_dict() (shards gathered,
    everything else passed through). Every rank must call it with the same keys in order;
    root_only: only rank 0's result is whole (the shards travel to rank 0 alone)."""
    layout, _, _ = _model_layout(model)
    gather = _gather_dim_to_root if root_only else _gather_dim
    return {key: gather(value, layout[key], transport) if key in layout else value
            for key, value in named.items()}


def gather_state_dict(model: nn.Module, transport: Transport, copy: bool = True,
                      root_only: bool = False) -> dict:
    """A plain DeepImageNet state dict (same keys, full shapes) from a model with a split head,
    the same on every rank; a snapshot (copies) unless copy=False (then the replicated tensors
    are the model's own: for a caller that serializes them before the next step)."""
    gathered = gather_tensors(model, model.state_dict(), transport, root_only)
    if not copy:
        return {k: v.detach() if torch.is_tensor(v) else v for k, v in gathered.items()}
    return {k: v.detach().clone() if torch.is_tensor(v) else v for k, v in gathered.items()}


def load_plain_state_dict(model: nn.Module, plain_sd: dict) -> None:
    """Load a plain state dict into a (split or plain) model, cut for this rank."""
    layout, rank, size = _model_layout(model)
    sd = dict(plain_sd)
    for key, dim in layout.items():
        sd[key] = _shard(plain_sd[key], dim, rank, size)
    model.load_state_dict(sd, strict=True)


# ---------------------------------------------------------------------------------------------
# Optimizer state (e.g. SGD momentum), so a re-split run continues exactly

def _optimizers(optimizers) -> list[torch.optim.Optimizer]:
    return [optimizers] if isinstance(optimizers, torch.optim.Optimizer) else list(optimizers)


def gather_optimizer_state(model: nn.Module, optimizers: torch.optim.Optimizer | Iterable,
                           transport: Transport, copy: bool = True,
                           root_only: bool = False) -> dict[str, dict]:
    """Per-parameter optimizer state keyed by the plain model's parameter names, with the state
    tensors of shards (those shaped like their parameter) gathered to full shape (the others
    copied, unless copy=False).

    Every rank must hold state for the same parameters (true after one step of SGD or Adam).
    """
    layout, _, _ = _model_layout(model)
    gather = _gather_dim_to_root if root_only else _gather_dim
    state_of = {p: st for opt in _optimizers(optimizers) for p, st in opt.state.items()}
    out: dict[str, dict] = {}
    for name, p in model.named_parameters():
        if not state_of.get(p):
            continue
        out[name] = {k: gather(v, layout[name], transport)
                     if name in layout and torch.is_tensor(v) and v.shape == p.shape
                     else (v.detach().clone() if torch.is_tensor(v) and copy else v)
                     for k, v in state_of[p].items()}
    return out


def shard_optimizer_state(model: nn.Module, plain_state: dict[str, dict]) -> dict[str, dict]:
    """gather_optimizer_state's output (or sync.state_dict()["state"] of a plain run)
    cut for this rank of a split model: shard state tensors sliced like their parameter."""
    layout, rank, size = _model_layout(model)
    params = dict(model.named_parameters())
    out: dict[str, dict] = {}
    for name, state in plain_state.items():
        if name not in params:
            raise KeyError(f"optimizer state for {name!r}: the model has no such parameter")
        p = params[name]
        out[name] = {}
        for k, v in state.items():
            if name in layout and torch.is_tensor(v) and v.dim() == p.dim():
                v = _shard(v, layout[name], rank, size)
            if torch.is_tensor(v) and v.dim() == p.dim() and v.shape != p.shape:
                raise ValueError(f"optimizer state {name}.{k} has shape {tuple(v.shape)}, "
                                 f"parameter has {tuple(p.shape)}")
            out[name][k] = v
    return out


def load_optimizer_state(model: nn.Module, optimizers: torch.optim.Optimizer | Iterable,
                         plain_state: dict[str, dict]) -> None:
    """Load gather_optimizer_state's output into the optimizers of a (split or plain) model,
    each shard's state cut for this rank (e.g. optimizers=GradientSync.optimizers())."""
    params = dict(model.named_parameters())
    owner = {p: opt for opt in _optimizers(optimizers) for g in opt.param_groups for p in g["params"]}
    for name, state in shard_optimizer_state(model, plain_state).items():
        p = params[name]
        if p not in owner:
            raise KeyError(f"optimizer state for {name!r}: no optimizer holds that parameter")
        owner[p].state[p] = {k: v.clone().to(p.device) if torch.is_tensor(v) and v.dim() > 0 else v
                             for k, v in state.items()}


# ---------------------------------------------------------------------------------------------
# Random states, one per rank, as tensors and numbers (a checkpoint loads them with
# weights_only; nothing in them is ever unpickled)

def rng_state(model: nn.Module) -> dict:
    """This rank's random states: torch CPU (+ every CUDA device), numpy, Python."""
    _, key, pos, has_gauss, cached = np.random.get_state()
    version, words, gauss_next = random.getstate()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": {"key": torch.from_numpy(key.astype(np.int64)), "pos": int(pos),  # (624,)
                      "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
            "random": {"version": version, "state": torch.tensor(words, dtype=torch.int64),  # (625,)
                       "gauss_next": gauss_next}}


def set_rng_state(model: nn.Module, state: dict) -> None:
    """Put back what rng_state() returned (same process layout)."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    r = state["random"]
    random.setstate((r["version"], tuple(r["state"].tolist()), r["gauss_next"]))


def _tensor(value, dtype: torch.dtype, length: int | None, what: str) -> torch.Tensor:
    """`value` (a tensor, or a list from JSON) as a 1-D tensor of `dtype` and `length`."""
    if isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        value = torch.tensor(value, dtype=dtype)
    if not torch.is_tensor(value) or value.dtype != dtype or value.dim() != 1 or \
            (length is not None and value.numel() != length):
        shown = f"a {value.dtype} tensor of shape {tuple(value.shape)}" if torch.is_tensor(value) \
            else type(value).__name__
        raise ValueError(f"{what} is {shown}, not a 1-D {dtype} tensor" + (f" of {length}" if length else ""))
    return value


def _number(value, kinds: tuple, what: str):
    if isinstance(value, bool) or not isinstance(value, kinds):
        raise ValueError(f"{what} is {type(value).__name__}, not {' or '.join(k.__name__ for k in kinds)}")
    return value


def checked_rng_state(state, rank: int) -> dict:
    """rng_state()'s form, from a checkpoint or from JSON, with every field's type checked;
    ValueError naming the field otherwise (bytes, a pickle, are refused, never unpickled)."""
    where = f"random states of rank {rank}"
    if not isinstance(state, dict) or not isinstance(state.get("numpy"), dict) or \
            not isinstance(state.get("random"), dict) or not isinstance(state.get("cuda"), list):
        raise ValueError(f"{where} are {type(state).__name__}, not rng_state()'s dict of tensors "
                         f"and numbers: not loaded")
    n, r = state["numpy"], state["random"]
    return {"torch": _tensor(state.get("torch"), torch.uint8, None, f"{where}: torch"),
            "cuda": [_tensor(c, torch.uint8, None, f"{where}: cuda") for c in state["cuda"]],
            "numpy": {"key": _tensor(n.get("key"), torch.int64, 624, f"{where}: numpy key"),
                      "pos": _number(n.get("pos"), (int,), f"{where}: numpy pos"),
                      "has_gauss": _number(n.get("has_gauss"), (int,), f"{where}: numpy has_gauss"),
                      "cached_gaussian": float(_number(n.get("cached_gaussian"), (int, float),
                                                       f"{where}: numpy cached_gaussian"))},
            "random": {"version": _number(r.get("version"), (int,), f"{where}: random version"),
                       "state": _tensor(r.get("state"), torch.int64, 625, f"{where}: random state"),
                       "gauss_next": None if r.get("gauss_next") is None else
                       float(_number(r.get("gauss_next"), (int, float), f"{where}: random gauss_next"))}}


def _as_json(state: dict) -> bytes:
    plain = lambda v: v.tolist() if torch.is_tensor(v) else v  # noqa: E731
    return json.dumps({"torch": plain(state["torch"]), "cuda": [plain(c) for c in state["cuda"]],
                       "numpy": {k: plain(v) for k, v in state["numpy"].items()},
                       "random": {k: plain(v) for k, v in state["random"].items()}}).encode()


def set_dropout_step(model: nn.Module, global_step: int) -> None:
    """Point the heads' dropout, split or plain, at `global_step` (their masks are a pure
    function of it)."""
    for head in model.modules():
        if isinstance(head, (SplitFCHead, FCHead)):
            head.step = global_step


def gather_rng_states(model: nn.Module, transport: Transport) -> list[dict]:
    """Every rank's rng_state(), in rank order (the same list on every rank); they travel as
    JSON (floats round-trip exactly)."""
    mine = torch.frombuffer(bytearray(_as_json(rng_state(model))), dtype=torch.uint8)  # (n,)
    sizes = transport.allgather(torch.tensor([mine.numel()], dtype=torch.int64)).tolist()  # (N,)
    flat = transport.allgather_async(mine, sizes=sizes).wait()  # (sum n,)
    out, offset = [], 0
    for rank, n in enumerate(sizes):
        out.append(checked_rng_state(json.loads(flat[offset:offset + n].numpy().tobytes()), rank))
        offset += n
    return out


# ---------------------------------------------------------------------------------------------
# Everything at once

def gather_training_state(model: nn.Module, sync) -> dict:
    """Model, optimizer and random states of every rank in plain form, whole on rank 0 only
    (every rank calls it; pending lazy updates are applied first, which changes no bit of the
    continuation). The replicated tensors are the live ones, not copies: serialize the result
    before the next step."""
    sync.flush()
    transport = sync.transport
    return {"model": gather_state_dict(model, transport, copy=False, root_only=True),
            "optimizer": gather_optimizer_state(model, sync.optimizers(), transport, copy=False,
                                                root_only=True),
            "rng": gather_rng_states(model, transport), "world_size": transport.size}


def restore_training_state(model: nn.Module, sync, state: dict, seed: int, global_step: int) -> str:
    """Load gather_training_state's output on this rank of any worker count, the dropout masks
    pointed at `global_step`; returns how the random states were restored (module doc). `seed`
    goes unused (the masks take the head's own seed, the config's); deepimage.checkpoint passes it."""
    transport = sync.transport
    rngs = state["rng"]
    if not isinstance(rngs, list) or not rngs:
        raise ValueError(f"random states are {type(rngs).__name__}, not a list with one per rank: not loaded")
    same = len(rngs) == transport.size
    mine = checked_rng_state(rngs[transport.rank], transport.rank) if same else checked_rng_state(rngs[0], 0)
    load_plain_state_dict(model, state["model"])
    load_optimizer_state(model, sync.optimizers(), state["optimizer"])
    set_dropout_step(model, global_step)
    set_rng_state(model, mine)
    if same:
        return "random states: each rank its own"
    return (f"random states: saved by {len(rngs)} workers, resumed on {transport.size}: every rank "
            f"takes rank 0's; dropout masks depend on (seed, step) only")
