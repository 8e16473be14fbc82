"""Worker for tests/test_loader.py: one Horovod rank reads its part of an epoch and saves it.

    horovodrun -np 2 -H localhost:2 --gloo python -m tests.workers.loader_worker \
        --shards DIR --batch 8 --out DIR
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import horovod.torch as hvd
import torch

from deepimage.data.loader import ArrowLoader
from deepimage.runtime import apply_thread_limit


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--shards", required=True)
    p.add_argument("--batch", type=int, required=True)
    p.add_argument("--out", required=True)
    a = p.parse_args()
    apply_thread_limit()
    hvd.init()
    loader = ArrowLoader(a.shards, batch_size=a.batch, rank=hvd.rank(), world_size=hvd.size(),
                         seed=7, train=True, crop=24)
    loader.set_epoch(1)
    ids, sizes = [], []
    for images, labels, sample_ids in loader:
        ids += sample_ids.tolist()
        sizes.append(len(sample_ids))
    # Every rank must run the same number of steps: a collective per step proves it.
    steps = hvd.allreduce(torch.tensor([len(sizes)]), op=hvd.Max).item()
    Path(a.out, f"rank{hvd.rank()}.json").write_text(json.dumps(
        {"ids": ids, "sizes": sizes, "max_steps": steps, "len": len(loader)}))


if __name__ == "__main__":
    main()
