"""Apply the paper's parallelism to a plain DeepImageNet, in this order:

1. split FC (deepimage.parallel.split_fc): the head's fc1 / fc2 / classifier are cut across the
   workers, which all see the global batch's features; its parameters are marked model-parallel;
2. butterfly all-reduce with lazy update (deepimage.parallel.lazy.GradientSync) for every other
   (convolutional, replicated) parameter.

The loss of a step is the mean over the GLOBAL mini-batch on every rank in both modes, so the
replicated gradients are summed (op="sum") and a rank whose local batch is empty still works.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from deepimage.model import DeepImageNet
from deepimage.parallel.lazy import GradientSync
from deepimage.parallel.split_fc import gather_state_dict, split_head
from deepimage.parallel.transport import Transport


@dataclass
class StepStats:
    loss: float  # mean cross-entropy over the global batch
    correct: int  # top-1 correct over the global batch
    count: int  # global batch size of this step


def sgd_factory(train_cfg: dict):
    """The optimizer for a group of parameters (GradientSync makes one per bucket)."""
    def make(params):
        return torch.optim.SGD(params, lr=train_cfg["lr"], momentum=train_cfg["momentum"],
                               weight_decay=train_cfg["weight_decay"])
    return make


class ParallelTrainer:
    """One training step of a parallelised DeepImageNet: forward, loss, backward, update."""

    def __init__(self, model: DeepImageNet, transport: Transport, train_cfg: dict, seed: int = 0):
        self.model, self.transport = model, transport
        self.device = next(model.parameters()).device
        # bf16 autocast of the forward (GPU); the class-parallel loss computes in fp32.
        self.autocast = torch.autocast(self.device.type, dtype=torch.bfloat16,
                                       enabled=bool(train_cfg.get("bf16", False)))
        self.split_fc = bool(train_cfg.get("split_fc", True)) and transport.size > 1
        if self.split_fc:
            model.head = split_head(model.head, transport, seed=seed)  # seed: same dropout mask on all ranks
        self.sync = GradientSync(model, transport, sgd_factory(train_cfg),
                                 bucket_mib=float(train_cfg.get("bucket_mib", 4.0)),
                                 lazy=bool(train_cfg.get("lazy_update", True)), op="sum",
                                 compute_nice=int(train_cfg.get("compute_nice", 0)))

    def step(self, images: torch.Tensor, labels: torch.Tensor) -> StepStats:
        """images (b, 3, H, W) and labels (b,): this rank's part of the global batch."""
        self.model.train()
        images, labels = images.to(self.device), labels.to(self.device)
        # A small CPU tensor: gloo carries it under every transport, whatever the device.
        count = int(self.transport.allreduce(torch.tensor([float(len(labels))]), "sum").item())
        with self.autocast:
            features = self.model.trunk(images)  # (b, 3, H, W) -> (b, F)
            if self.split_fc:
                loss, correct = self.model.head.loss(features, labels)  # global mean, identical
            else:
                logits = self.model.head(features).float()  # (b, F) -> (b, K)
                loss = F.cross_entropy(logits, labels, reduction="sum") / count
                correct = (logits.argmax(1) == labels).sum()
        self.sync.zero_grad()
        loss.backward()
        self.sync.step()
        if not self.split_fc:  # this rank's share -> global figures
            stats = self.transport.allreduce(torch.stack([loss.detach(), correct.float()]), "sum")
            loss, correct = stats[0], stats[1]
        return StepStats(float(loss.detach()), int(correct), count)

    @torch.no_grad()
    def evaluate(self, loader) -> dict[str, float]:
        """Loss and top-1 / top-5 error over a loader partitioned across the ranks (every rank
        gets the same figures). Split FC: each rank sees the global batch's logits."""
        self.flush()
        self.model.eval()
        totals = torch.zeros(4, dtype=torch.float64)  # loss sum, top-1 correct, top-5 correct, count
        for images, labels, _ in loader:
            with self.autocast:
                features = self.model.trunk(images.to(self.device))  # (b, 3, H, W) -> (b, F)
                # split FC: (B, K), the global batch, the same on every rank; else (b, K)
                head = self.model.head.full_logits if self.split_fc else self.model.head
                logits = head(features).float().cpu()
            labels = labels.cpu().to(torch.int64).contiguous()
            if self.split_fc:
                labels = self.transport.allgather(labels)  # (b,) -> (B,)
            k = min(5, logits.shape[1])
            top = logits.topk(k, dim=1).indices  # (b, k)
            totals += torch.tensor([F.cross_entropy(logits, labels, reduction="sum").item() if len(labels) else 0.0,
                                    (top[:, 0] == labels).sum().item(),
                                    (top == labels[:, None]).any(1).sum().item(), len(labels)],
                                   dtype=torch.float64)
        if not self.split_fc:
            totals = self.transport.allreduce(totals, "sum")
        loss, c1, c5, n = totals.tolist()
        return {"val_loss": loss / n, "val_top1_error": 1 - c1 / n, "val_top5_error": 1 - c5 / n}

    def set_lr(self, lr: float) -> None:
        self.sync.set_lr(lr)

    def flush(self) -> None:
        """Apply every pending lazy update (before evaluation, checkpoints, the end)."""
        self.sync.flush()

    def plain_state_dict(self) -> dict:
        """The weights as a single-process DeepImageNet state dict (FC shards gathered)."""
        self.flush()
        if self.split_fc:
            return gather_state_dict(self.model, self.transport)
        return {k: v.detach().clone() for k, v in self.model.state_dict().items()}


def parallelize(model: DeepImageNet, transport: Transport, train_cfg: dict, seed: int = 0) -> ParallelTrainer:
    return ParallelTrainer(model, transport, train_cfg, seed)
