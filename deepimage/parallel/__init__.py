"""Parallelism applied to the plainly written network: transport, butterfly all-reduce, lazy
update (and the split fully connected layers beside them).

    from deepimage.parallel import butterfly_allreduce, init_transport, GradientSync
"""
from deepimage.parallel.butterfly import butterfly_allreduce, butterfly_allreduce_async
from deepimage.parallel.lazy import GradientSync
from deepimage.parallel.transport import Handle, Transport, TransportError, init_transport

__all__ = ["butterfly_allreduce", "butterfly_allreduce_async", "GradientSync", "Handle",
           "Transport", "TransportError", "init_transport"]
