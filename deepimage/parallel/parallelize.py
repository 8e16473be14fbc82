"""Apply the paper's parallelism to a plain DeepImageNet, in this order:

1. split FC (deepimage.parallel.split_fc): the head's fc1 / fc2 / classifier are cut across the
   workers, which all see the global batch's features; its parameters are marked model-parallel;
2. butterfly all-reduce with lazy update (deepimage.parallel.lazy.GradientSync) for every other
   (convolutional, replicated) parameter.

    model, sync = parallelize(model, transport, cfg, optimizer_factory)

It only parallelizes: the training step (forward, loss, backward, sync.step()), the evaluation
loop and the checkpoint gather read top-down in deepimage/train.py. The step's loss must be the
mean over the GLOBAL mini-batch on every rank, so the replicated gradients are summed (op="sum")
and a rank whose local batch is empty still works.
"""
from __future__ import annotations

from deepimage.config import Config
from deepimage.model import DeepImageNet
from deepimage.parallel.lazy import GradientSync, OptimizerFactory
from deepimage.parallel.split_fc import SplitFCHead, split_head
from deepimage.parallel.transport import Transport


def parallelize(model: DeepImageNet, transport: Transport, cfg: Config,
                optimizer_factory: OptimizerFactory, *, head_transport: Transport | None = None,
                overlap: bool | None = None) -> tuple[DeepImageNet, GradientSync]:
    """(model with its head split when train.split_fc and more than one rank, its GradientSync).

    cfg.seed seeds the split head's dropout masks, which are the plain head's (build_model with
    the same seed) at any worker count. The synchronizer builds one optimizer per gradient bucket
    (and one for the split head) with optimizer_factory.

    head_transport: the split head's collectives (default `transport`); the performance model
    profiles rank 0 of N on one process with a MirrorTransport(N) here. overlap: GradientSync's
    (None: with lazy update only; True without it: launched in backward, waited for in step())."""
    train, head_transport = cfg.train, head_transport or transport
    if train.split_fc and head_transport.size > 1:
        model.head = split_head(model.head, head_transport, seed=cfg.seed)
    sync = GradientSync(model, transport, optimizer_factory, bucket_mib=train.bucket_mib,
                        lazy=train.lazy_update, op="sum", overlap=overlap,
                        compute_nice=train.compute_nice)
    return model, sync


def is_split(model: DeepImageNet) -> bool:
    """Whether parallelize() split this model's head across the ranks."""
    return isinstance(model.head, SplitFCHead)
