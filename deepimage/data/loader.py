"""The Arrow loader: memory-mapped shards -> this rank's part of each global mini-batch.

    loader = ArrowLoader("results/shards/64/train", batch_size=128, rank=r, world_size=n,
                         seed=0, train=True, augment=AugmentConfig(), crop=64)
    for epoch in range(start_epoch, epochs):
        loader.set_epoch(epoch)
        for images, labels, sample_ids in loader:   # (b, 3, 64, 64) float32, (b,), (b,) int64
            ...
        state = loader.state_dict()                 # {"epoch", "position", "seed"}: resume point

`batch_size` is the GLOBAL batch: step s of an epoch covers the samples partition() gives it
(deepimage.data.partition), split over ranks; a rank's part may be empty on the last step.
Raw shards are read zero-copy (pyarrow.memory_map + ipc.open_file -> numpy views); JPEG rows
are decoded. With num_workers > 0, whole batches are produced in worker processes.
"""
from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import torch

from deepimage.data.augment import AugmentConfig, augment_batch, center_crop, normalize
from deepimage.data.layout import DataError
from deepimage.data.manifest import Manifest, load_manifest, verify_shards
from deepimage.data.partition import num_steps, partition, rank_steps

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


class ShardStore:
    """Random access to the rows of a split's shards; opens its memory maps lazily per process."""

    def __init__(self, shard_dir: str | Path, manifest: Manifest):
        self.dir, self.manifest = Path(shard_dir), manifest
        self.size = manifest.stored_size
        self._pid: int | None = None
        self._images: list = []
        self._open()
        parts = [(b.column("label").to_numpy(), b.column("sample_id").to_numpy())
                 for b in self._batches]
        self.labels = np.concatenate([p[0] for p in parts] or [np.empty(0, np.int64)])
        self.sample_ids = np.concatenate([p[1] for p in parts] or [np.empty(0, np.int64)])
        rows = [s.rows for s in manifest.shards]
        self.starts = np.concatenate([[0], np.cumsum(rows)]).astype(np.int64)  # (shards + 1,)
        if len(self.labels) != manifest.num_samples:
            raise DataError(f"{self.dir}: shards hold {len(self.labels)} rows, manifest says "
                            f"{manifest.num_samples}: rerun the shard stage")

    def _open(self) -> None:
        self._batches, self._images = [], []
        for s in self.manifest.shards:
            path = self.dir / s.name
            try:
                reader = pa.ipc.open_file(pa.memory_map(str(path), "r"))
                if reader.num_record_batches == 1:                     # what shard.py writes
                    batch = reader.get_batch(0)
                else:                                                  # foreign files: one copy
                    batch = reader.read_all().combine_chunks().to_batches()[0]
            except (pa.ArrowInvalid, OSError) as e:
                raise DataError(f"{path}: unreadable shard ({e}): rerun the shard stage") from None
            if batch.num_rows != s.rows:
                raise DataError(f"{path}: {batch.num_rows} rows, manifest says {s.rows}")
            self._batches.append(batch)
            self._images.append(self._image_view(batch.column("image")))
        self._pid = os.getpid()

    def _image_view(self, col: pa.Array):
        """Raw: a zero-copy (rows, S, S, 3) uint8 view of the mapped file. JPEG: the column."""
        if self.manifest.format != "raw":
            return col
        width = self.size * self.size * 3
        data = col.buffers()[1]                                        # contiguous row bytes
        flat = np.frombuffer(data, dtype=np.uint8, count=len(col) * width,
                             offset=col.offset * width)
        return flat.reshape(len(col), self.size, self.size, 3)        # (rows, S, S, 3)

    def __getstate__(self):
        state = dict(self.__dict__)
        state.update(_batches=[], _images=[], _pid=None)               # reopened in the child
        return state

    def images(self, rows: np.ndarray) -> np.ndarray:
        """uint8 (b, S, S, 3) for global row indices `rows`."""
        if self._pid != os.getpid():
            self._open()
        out = np.empty((len(rows), self.size, self.size, 3), np.uint8)
        shard = np.searchsorted(self.starts, rows, side="right") - 1   # (b,) shard of each row
        for s in np.unique(shard):
            where = np.flatnonzero(shard == s)
            local = rows[where] - self.starts[s]
            if self.manifest.format == "raw":
                out[where] = self._images[s][local]
            else:
                for w, r in zip(where, local):
                    out[w] = _decode_jpeg(self._images[s][int(r)].as_py(), self.size)
        return out


def _decode_jpeg(data: bytes, size: int) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        arr = np.asarray(im.convert("RGB"), dtype=np.uint8)
    if arr.shape != (size, size, 3):
        raise DataError(f"JPEG row decodes to {arr.shape}, expected {(size, size, 3)}")
    return arr


class ArrowLoader:
    """Iterates this rank's part of each global mini-batch of a split's Arrow shards."""

    def __init__(self, shard_dir: str | Path, batch_size: int, rank: int = 0, world_size: int = 1,
                 seed: int = 0, train: bool = True, augment: AugmentConfig | None = None,
                 crop: int | None = None, verify: bool = True, num_workers: int = 0,
                 device: str | torch.device | None = None):
        """`device`: where augmentation runs when num_workers == 0 (e.g. "cuda"); default CPU."""
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} out of range for world_size {world_size}")
        if batch_size < 1 or num_workers < 0:
            raise ValueError(f"need batch_size >= 1 and num_workers >= 0, got {batch_size} "
                             f"and {num_workers}")
        self.dir = Path(shard_dir)
        self.manifest = load_manifest(self.dir)
        if verify:   # each rank checks its share of the shards; together they check all
            verify_shards(self.dir, self.manifest.shards[rank::world_size])
        self.store = ShardStore(self.dir, self.manifest)
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.seed, self.train, self.num_workers = seed, train, num_workers
        self.augment = augment if augment is not None else AugmentConfig()
        self.crop = crop or self.manifest.resolution
        if self.crop > self.manifest.stored_size:
            raise ValueError(f"crop {self.crop} px exceeds the stored {self.manifest.stored_size} "
                             f"px of {self.dir}")
        self.device = torch.device(device) if device is not None else None
        self.epoch, self.position = 0, 0

    @property
    def num_samples(self) -> int:
        return self.manifest.num_samples

    @property
    def classes(self) -> list[str]:
        return list(self.manifest.classes)

    def __len__(self) -> int:
        """Steps per epoch, identical on every rank."""
        return num_steps(self.num_samples, self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        """Start `epoch` (a no-op for the current epoch, so a restored position survives)."""
        if epoch != self.epoch:
            self.epoch, self.position = epoch, 0

    def state_dict(self) -> dict:
        """Resume point: `position` global steps of `epoch` have been delivered."""
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        missing = {"epoch", "position", "seed"} - set(state)
        if missing:
            raise ValueError(f"loader state lacks {sorted(missing)}: got {state}")
        self.epoch, self.position, self.seed = (int(state["epoch"]), int(state["position"]),
                                                int(state["seed"]))

    def steps(self, epoch: int) -> list[np.ndarray]:
        """This rank's global row indices for every step of `epoch`."""
        parts = partition(self.num_samples, self.seed, epoch, self.world_size, self.batch_size,
                          shuffle=self.train)                  # (steps, world, ceil(B / world))
        return rank_steps(parts, self.rank)

    def make_batch(self, rows: np.ndarray, epoch: int) -> Batch:
        """Read, augment (train) or centre-crop (eval), and normalize the given rows."""
        pixels = torch.from_numpy(self.store.images(rows))               # (b, S, S, 3) uint8
        if self.device is not None and self.num_workers == 0:
            pixels = pixels.to(self.device, non_blocking=True)     # augment on the device
        x = pixels.permute(0, 3, 1, 2)                                   # -> (b, 3, S, S)
        ids = self.store.sample_ids[rows]
        if self.train:
            x = augment_batch(x, ids, self.augment, self.seed, epoch, self.crop)
        else:
            x = center_crop(x, self.crop)                                # -> (b, 3, crop, crop)
        x = normalize(x).contiguous()
        return x, torch.from_numpy(self.store.labels[rows]), torch.from_numpy(ids)

    def __iter__(self) -> Iterator[Batch]:
        start = self.position if self.position < len(self) else 0
        epoch, steps = self.epoch, self.steps(self.epoch)
        batches = (self.make_batch(rows, epoch) for rows in steps[start:]) \
            if self.num_workers == 0 else self._worker_batches(steps[start:], epoch)
        for i, batch in enumerate(batches):
            self.position = start + i + 1          # count a batch once it is delivered
            yield batch

    def _worker_batches(self, steps: list[np.ndarray], epoch: int) -> Iterator[Batch]:
        from torch.utils.data import DataLoader

        dl = DataLoader(_Steps(self, steps, epoch), batch_size=None, shuffle=False,
                        num_workers=self.num_workers, worker_init_fn=_one_thread,
                        prefetch_factor=2)
        yield from dl


class _Steps(torch.utils.data.Dataset):
    """One item per step: the whole local batch, so workers batch, augment and normalize."""

    def __init__(self, loader: ArrowLoader, steps: list[np.ndarray], epoch: int):
        self.loader, self.steps, self.epoch = loader, steps, epoch

    def __len__(self) -> int:
        return len(self.steps)

    def __getitem__(self, i: int) -> Batch:
        return self.loader.make_batch(self.steps[i], self.epoch)


def _one_thread(_worker_id: int) -> None:
    torch.set_num_threads(1)
