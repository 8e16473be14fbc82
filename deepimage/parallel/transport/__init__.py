"""One small interface to the collectives the parallel code needs, with one implementation per
launcher: Horovod (launched by `horovodrun`) and torch.distributed (launched by `torchrun`;
gloo on CPU, NCCL on GPU), and one process alone. The butterfly all-reduce and the split FC
layers are written once over `Transport`; nothing else in deepimage imports horovod or
torch.distributed directly.

    from deepimage.parallel.transport import init_transport
    transport = init_transport("auto")   # picks from the launcher's environment variables

The package:
- base.py: `Transport` (public collectives check their arguments once, then call the
  implementation's `_alltoall_async`, ...), Handle / Done / Pending, TransportError; the
  transport owns its tag counter and its progress threads (progress.py).
- local.py, torch.py, horovod.py: one transport each (horovod.py says which path each call takes);
  store.py: rank 0's rendezvous store, listening on the one address the job needs.
- datapath.py: the CPU data paths the gloo-backed transports hold (gloo lanes, the same-host
  path of cma.py, set up and its peers admitted by cma_setup.py); cpu.py: the CPU collectives
  written over them.

What carries the bytes (measured on the 2-core development machine, 2 processes, 16 MiB
float32: hvd.allreduce 60 ms, hvd.alltoall 15 ms, hvd.allgather of 8 MiB 25 ms; torch gloo
all_reduce 17 ms, all_to_all_single 10 ms, one isend/irecv exchange of 8 MiB 8 ms): CPU
tensors, both launchers, tagged point-to-point messages written straight into the result
tensor, over the same-host path when every rank is on this host (data_path "auto", the
default), else over gloo; `transport.data_path` says which. CUDA tensors: NCCL (torchrun's
NCCL backend, or Horovod's operations).
"""
from __future__ import annotations

import os

from deepimage.parallel.transport.base import Done, Handle, Pending, Transport, TransportError
from deepimage.parallel.transport.local import LocalTransport

KINDS = ("auto", "horovod", "torchrun", "local")

# The process's transports, by kind and options. A process-level registry is kept because
# init_transport promises "created once, then returned again": a process group and hvd.init()
# can be set up only once per process, and default_transport() must find the transport that
# the stage created without it being passed down. A transport that was shut down is dropped.
_CURRENT: dict[str, Transport] = {}


def detect_kind() -> str:
    """The launcher this process was started by: horovod, torchrun or local."""
    if "HOROVOD_RANK" in os.environ:
        return "horovod"
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return "torchrun"
    return "local"


def _create(kind: str, options: dict) -> Transport:
    if kind == "horovod":
        from deepimage.parallel.transport.horovod import HorovodTransport

        return HorovodTransport(**options)
    if kind == "torchrun":
        from deepimage.parallel.transport.torch import TorchTransport

        return TorchTransport(**options)
    return LocalTransport(**options)


def init_transport(kind: str = "auto", **options) -> Transport:
    """The process's transport for `kind` (created once, then returned again until shutdown).

    "auto": Horovod when HOROVOD_RANK is set, torch.distributed when RANK and WORLD_SIZE are
    (torchrun), else one local process. options go to the implementation (data_path=...)."""
    if kind not in KINDS:
        raise TransportError(f"transport kind must be one of {KINDS}, got {kind!r}")
    if kind == "auto":
        kind = detect_kind()
    key = f"{kind}{sorted(options.items())}"
    if key not in _CURRENT or _CURRENT[key].closed:
        _CURRENT[key] = _create(kind, options)
    return _CURRENT[key]


def default_transport() -> Transport:
    """The transport collectives use when none is passed: the first one init_transport created
    that is still open, else init_transport("auto")."""
    for transport in _CURRENT.values():
        if not transport.closed:
            return transport
    return init_transport("auto")


def __getattr__(name: str):
    """TorchTransport and HorovodTransport on first use (importing the package stays cheap)."""
    if name == "TorchTransport":
        from deepimage.parallel.transport.torch import TorchTransport

        return TorchTransport
    if name == "HorovodTransport":
        from deepimage.parallel.transport.horovod import HorovodTransport

        return HorovodTransport
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["Done", "Handle", "HorovodTransport", "KINDS", "LocalTransport", "Pending",
           "TorchTransport", "Transport", "TransportError", "default_transport", "detect_kind",
           "init_transport"]
