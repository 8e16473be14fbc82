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
are decoded (deepimage.data.decode.decode_stored_jpeg) straight into the batch.

Where each part of a batch is made:
- device None (training on the CPU): read, decode, augment and normalize together, in
  `num_workers` processes when > 0;
- device given (e.g. "cuda"): the processes only read and decode into a uint8 batch in shared
  memory (`read`); augmentation and normalization run on the device in the training process
  (`finish`). decode="gpu" leaves JPEG rows encoded until the device: the processes hand over
  the bytes and torchvision.io.decode_jpeg decodes the batch there (nvJPEG).
`read_epoch` is the CPU side alone, the decode-and-batch path that deepimage.bench.loader times.
"""
from __future__ import annotations

import copy
import ctypes
import os
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import torch

from deepimage.data.augment import AugmentConfig, augment_batch, center_crop, normalize
from deepimage.data.buffers import UNPOOLED, BufferSlots, prefault
from deepimage.data.decode import BadImage, decode_stored_jpeg
from deepimage.data.layout import DataError
from deepimage.data.manifest import Manifest, load_manifest, verify_shards
from deepimage.data.partition import num_steps, partition, rank_steps

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
# The CPU side's batch: (pixels, labels, ids); pixels uint8 (b, S, S, 3), or for decode="gpu"
# the rows' JPEG bytes; labels and ids int64 numpy arrays (b,). Only the pixels travel from a
# loader process through shared memory; the rest is pickled with the message.
RawBatch = tuple["torch.Tensor | list[bytes]", np.ndarray, np.ndarray]
DECODERS = ("cpu", "gpu")


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

    def _by_shard(self, rows: np.ndarray):
        """(shard, positions in `rows`, rows within that shard) for each shard `rows` touch."""
        if self._pid != os.getpid():
            self._open()
        shard = np.searchsorted(self.starts, rows, side="right") - 1   # (b,) shard of each row
        for s in np.unique(shard):
            where = np.flatnonzero(shard == s)
            yield int(s), where, rows[where] - self.starts[s]

    def images(self, rows: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """uint8 (b, S, S, 3) for global row indices `rows`, written into `out` when given."""
        if out is None:
            out = np.empty((len(rows), self.size, self.size, 3), np.uint8)
        for s, where, local in self._by_shard(rows):
            if self.manifest.format == "raw":
                out[where] = self._images[s][local]
                continue
            for w, r in zip(where, local):
                try:
                    decode_stored_jpeg(self._images[s][int(r)].as_py(), out[w])
                except BadImage as e:
                    raise DataError(f"{self.dir / self.manifest.shards[s].name}: row {int(r)}: "
                                    f"{e}: rerun the shard stage") from None
        return out

    def encoded(self, rows: np.ndarray) -> list[bytes]:
        """The stored JPEG bytes of `rows`, in order (JPEG shards)."""
        out: list[bytes] = [b""] * len(rows)
        for s, where, local in self._by_shard(rows):
            for w, r in zip(where, local):
                out[w] = self._images[s][int(r)].as_py()
        return out


class ArrowLoader:
    """Iterates this rank's part of each global mini-batch of a split's Arrow shards."""

    def __init__(self, shard_dir: str | Path, batch_size: int, rank: int = 0, world_size: int = 1,
                 seed: int = 0, train: bool = True, augment: AugmentConfig | None = None,
                 crop: int | None = None, verify: bool = True, num_workers: int = 0,
                 device: str | torch.device | None = None, decode: str = "cpu"):
        """`device`: where augmentation runs (e.g. "cuda"); None: with the decoding, on the CPU.
        `decode`: "gpu" decodes JPEG rows on `device` (a CUDA device); raw rows need none."""
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
        if decode not in DECODERS:
            raise ValueError(f"train.jpeg_decode must be one of {DECODERS}, got {decode!r}")
        if decode == "gpu" and (self.device is None or self.device.type != "cuda"):
            raise ValueError(f"train.jpeg_decode is 'gpu' but the batches go to "
                             f"{self.device or 'the CPU'}: it needs train.device cuda; "
                             f"set train.jpeg_decode: cpu")
        self.decode = decode if self.manifest.format == "jpeg" else "cpu"
        self.epoch, self.position = 0, 0
        self._pools: dict[bool, tuple] = {}     # whole batches / CPU side -> (keys, DataLoader)

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
        self._pools = {}                         # the workers' copies hold the old seed

    def steps(self, epoch: int) -> list[np.ndarray]:
        """This rank's global row indices for every step of `epoch`."""
        parts = partition(self.num_samples, self.seed, epoch, self.world_size, self.batch_size,
                          shuffle=self.train)                  # (steps, world, ceil(B / world))
        return rank_steps(parts, self.rank)

    def read(self, rows: np.ndarray, out: torch.Tensor | None = None) -> RawBatch:
        """The CPU side of a batch: read and decode the rows into `out` (a uint8 (b, S, S, 3)
        buffer; default: a new one in this process), or, decode="gpu", take their bytes."""
        ids, labels = self.store.sample_ids[rows], self.store.labels[rows]
        if self.decode == "gpu":
            return self.store.encoded(rows), labels, ids
        if out is None:
            out = torch.empty(self.pixels_shape(len(rows)), dtype=torch.uint8)
            prefault(out.data_ptr(), out.numel())
        self.store.images(rows, out=out.numpy())                         # (b, S, S, 3) uint8
        return out, labels, ids

    def pixels_shape(self, rows: int) -> tuple[int, int, int, int]:
        return (rows, self.store.size, self.store.size, 3)

    def finish(self, raw: RawBatch, epoch: int, out: torch.Tensor | None = None) -> Batch:
        """Augment (train) or centre-crop (eval), and normalize, on the device when one is set;
        `out`: where the augmented float batch goes (b, 3, crop, crop)."""
        pixels, labels, ids = raw
        if self.decode == "gpu":
            x = self._decode_on_device(pixels)                           # (b, 3, S, S) uint8
        else:
            if self.device is not None:
                pixels = pixels.to(self.device, non_blocking=True)
            x = pixels.permute(0, 3, 1, 2)                               # -> (b, 3, S, S)
        if self.train:
            x = augment_batch(x, ids, self.augment, self.seed, epoch, self.crop,
                              normalized=True, out=out)                  # -> (b, 3, crop, crop)
        else:
            x = normalize(center_crop(x, self.crop))                     # -> (b, 3, crop, crop)
        return x.contiguous(), torch.from_numpy(labels), torch.from_numpy(ids)

    def make_batch(self, rows: np.ndarray, epoch: int) -> Batch:
        """Read, augment (train) or centre-crop (eval), and normalize the given rows."""
        return self.finish(self.read(rows), epoch)

    def _decode_on_device(self, data: list[bytes]) -> torch.Tensor:
        """JPEG bytes -> uint8 (b, 3, S, S) on the device, one batched nvJPEG call."""
        from torchvision.io import ImageReadMode, decode_jpeg

        size = self.store.size
        if not data:
            return torch.empty((0, 3, size, size), dtype=torch.uint8, device=self.device)
        encoded = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in data]
        images = decode_jpeg(encoded, mode=ImageReadMode.RGB, device=self.device)  # b x (3, S, S)
        bad = next((im.shape for im in images if im.shape != (3, size, size)), None)
        if bad is not None:
            raise DataError(f"{self.dir}: a JPEG row decodes to {tuple(bad)}, the shards store "
                            f"(3, {size}, {size}): rerun the shard stage")
        return torch.stack(images)

    def __iter__(self) -> Iterator[Batch]:
        start = self.position if self.position < len(self) else 0
        epoch, steps = self.epoch, self.steps(self.epoch)[start:]
        if self.device is None:        # the CPU trains: the processes make whole batches
            batches = self._produce(steps, epoch, whole=True)
        else:                          # the device augments what the processes decoded
            batches = (self.finish(raw, epoch) for raw in self._produce(steps, epoch, whole=False))
        for i, batch in enumerate(batches):
            self.position = start + i + 1          # count a batch once it is delivered
            yield batch

    def read_epoch(self, epoch: int) -> Iterator[RawBatch]:
        """This rank's batches of `epoch` as the CPU side hands them to the device: decoded and
        batched (uint8, not augmented). Leaves the resume position alone."""
        return self._produce(self.steps(epoch), epoch, whole=False)

    def _produce(self, steps: list[np.ndarray], epoch: int, whole: bool) -> Iterator:
        if self.num_workers == 0:
            return (self.make_batch(rows, epoch) if whole else self.read(rows) for rows in steps)
        if whole not in self._pools:
            self._pools[whole] = self._pool(whole)
        keys, dl, slots = self._pools[whole]
        keys.items = [(rows, epoch) for rows in steps]
        return _delivered(dl, slots, whole)

    def _pool(self, whole: bool):
        """(keys, DataLoader, buffer slots): worker processes kept from epoch to epoch (no
        start-up per epoch or evaluation); each pass makes the batches of the (rows, epoch)
        items in `keys`, in shared-memory buffers that the processes reuse."""
        from torch.utils.data import DataLoader

        keys, view = _Keys(), copy.copy(self)    # the workers' copy: no pools, no cycle
        view._pools = {}
        slots = BufferSlots(self.num_workers)
        pin = not whole and self.device is not None and self.device.type == "cuda"
        return keys, DataLoader(_Steps(view, whole, slots), batch_size=None, sampler=keys,
                                collate_fn=_as_is, num_workers=self.num_workers,
                                worker_init_fn=init_loader_process, prefetch_factor=2,
                                pin_memory=pin, persistent_workers=True), slots


def _delivered(dl, slots: BufferSlots, whole: bool) -> Iterator:
    """The pool's batches, each buffer's slot freed for reuse once the batch is dropped here."""
    for batch, slot in dl:
        slots.release_when_freed(batch[0], slot)
        if whole:
            x, labels, ids = batch
            batch = x, torch.from_numpy(labels), torch.from_numpy(ids)
        yield batch


class _Keys(torch.utils.data.Sampler):
    """The items of the next pass over the worker pool, set by the loader before each pass."""

    def __init__(self):
        self.items: list[tuple[np.ndarray, int]] = []

    def __iter__(self):
        return iter(list(self.items))

    def __len__(self) -> int:
        return len(self.items)


class _Steps(torch.utils.data.Dataset):
    """Item (rows, epoch) -> (the whole local batch (whole=True) or its CPU side (`read`), the
    slot of the shared buffer holding its pixels)."""

    def __init__(self, loader: ArrowLoader, whole: bool, slots: BufferSlots):
        self.loader, self.whole, self.slots = loader, whole, slots

    def __getitem__(self, key: tuple[np.ndarray, int]):
        rows, epoch = key
        loader = self.loader
        if not self.whole:
            if loader.decode == "gpu":
                return loader.read(rows), UNPOOLED
            out, slot = self.slots.acquire(loader.pixels_shape(len(rows)), torch.uint8)
            return loader.read(rows, out=out), slot
        out, slot = None, UNPOOLED
        if loader.train:
            out, slot = self.slots.acquire((len(rows), 3, loader.crop, loader.crop), torch.float32,
                                           populate=False)
        x, labels, ids = loader.finish(loader.read(rows), epoch, out=out)
        return (x, labels.numpy(), ids.numpy()), slot   # labels, ids pickled with the message


def _as_is(item):
    """No conversion in the loader process: numpy arrays stay arrays (pickled, not shared)."""
    return item


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3          # glibc mallopt parameters


def init_loader_process(_worker_id: int = 0) -> None:
    """One thread per loader process, and batch-sized buffers kept in its heap once freed:
    glibc otherwise maps each one anew, and the page faults of touching it again cost as much
    as an augmentation at 512 px."""
    torch.set_num_threads(1)
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:                     # not glibc: its allocator's own policy
        return
    libc.mallopt(_M_MMAP_THRESHOLD, 1 << 30)
    libc.mallopt(_M_TRIM_THRESHOLD, 1 << 30)


def check_classes(train_loader, val_loader, train_dir, val_dir) -> None:
    """Stop before training when the validation set's classes are not the training set's."""
    if val_loader is None or list(val_loader.classes) == list(train_loader.classes):
        return
    t, v = set(train_loader.classes), set(val_loader.classes)
    if t == v:
        diff = "the same classes in another order"
    else:
        diff = f"only in train: {sorted(t - v)}; only in val: {sorted(v - t)}"
    raise ValueError(f"{val_dir}: validation classes differ from {train_dir}'s ({diff}): "
                     f"shard train and val from one dataset with the same class folders")
