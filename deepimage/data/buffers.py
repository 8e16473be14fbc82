"""Batch buffers in shared memory, reused from batch to batch by each loader process.

    slots = BufferSlots(num_workers)            # in the training process, before the workers start
    # in a loader process:
    out, slot = slots.acquire((64, 512, 512, 3), torch.uint8)
    ...fill out, send (out, ..., slot)...
    # back in the training process, as each batch arrives:
    slots.release_when_freed(out, slot)

A loader process hands a batch over by sending its shared-memory segment: nothing is copied. A
fresh segment per batch costs its page faults on first write and its unmapping and page freeing
once the training process drops it (at 512 px about as much as decoding 10 of the 64 images).
So each loader process keeps a few segments and writes the next batch into one that the training
process has finished with. A shared table of flags says which: the loader process sets a slot's
flag when it sends the buffer, and the training process clears it when the buffer's storage is
freed there (every tensor viewing it gone), so a batch still held anywhere is never written. When
all of a process's slots are held, it takes a fresh segment, as without reuse.
"""
from __future__ import annotations

import ctypes
import math
import os
import weakref

import torch

SLOTS_PER_PROCESS = 4      # the DataLoader's prefetch of 2 per process, plus batches being used
_MADV_POPULATE_WRITE = 23  # Linux >= 5.14
_FREE, _HELD = 0, 1
UNPOOLED = -1              # the slot of a buffer taken fresh (nothing to release)


class BufferSlots:
    """Reusable shared-memory batch buffers for `processes` loader processes."""

    def __init__(self, processes: int, per_process: int = SLOTS_PER_PROCESS):
        self.per_process = per_process
        self.flags = torch.zeros(processes * per_process, dtype=torch.int32).share_memory_()
        self._storages: dict[int, torch.UntypedStorage] = {}     # this process's segments

    def __getstate__(self):
        return {"per_process": self.per_process, "flags": self.flags, "_storages": {}}

    def acquire(self, shape: tuple[int, ...], dtype: torch.dtype,
                populate: bool = True) -> tuple[torch.Tensor, int]:
        """(uninitialized tensor in shared memory, its slot) in a loader process: a free slot's
        segment, grown when too small, or a fresh unpooled one when every slot is held
        (`populate`: see shared_buffer)."""
        info = torch.utils.data.get_worker_info()
        nbytes = math.prod(shape) * dtype.itemsize
        if info is None:
            return shared_buffer(shape, dtype, populate), UNPOOLED
        first = info.id * self.per_process
        for slot in range(first, first + self.per_process):
            if int(self.flags[slot]) != _FREE:
                continue
            storage = self._storages.get(slot)
            if storage is None or storage.nbytes() < nbytes:
                storage = shared_buffer((nbytes,), torch.uint8).untyped_storage()
                self._storages[slot] = storage
            self.flags[slot] = _HELD
            out = torch.empty(0, dtype=dtype).set_(storage, 0, shape)
            return out, slot
        return shared_buffer(shape, dtype, populate), UNPOOLED

    def release_when_freed(self, buffer: torch.Tensor, slot: int) -> None:
        """In the training process: free `slot` for its loader process once `buffer`'s storage is
        freed here."""
        if slot != UNPOOLED:
            weakref.finalize(buffer.untyped_storage(), _release, self.flags, slot)


def _release(flags: torch.Tensor, slot: int) -> None:
    flags[slot] = _FREE


def shared_buffer(shape: tuple[int, ...], dtype: torch.dtype = torch.uint8,
                  populate: bool = True) -> torch.Tensor:
    """An uninitialized tensor in a fresh shared-memory segment (private to the user: torch
    creates it exclusively, mode 0600, and unlinks its name at once). `populate`: its pages are
    mapped in one call rather than one fault each as they are first written."""
    empty = torch.empty(0, dtype=dtype)
    out = empty.new(empty._typed_storage()._new_shared(math.prod(shape))).view(shape)
    if populate:
        prefault(out.data_ptr(), out.numel() * out.element_size())
    return out


def prefault(address: int, length: int) -> None:
    """Fault in a fresh mapping's pages at once (a hint: where unsupported, nothing happens)."""
    if length == 0:
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    start = address & ~(os.sysconf("SC_PAGE_SIZE") - 1)
    libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(length + address - start),
                 ctypes.c_int(_MADV_POPULATE_WRITE))
