"""Batches that DataLoader workers write straight into reused shared memory.

Why: a worker's ``default_collate`` stacks every batch into a *new* shared-memory segment, which
the main process maps and later unmaps; creating, zero-filling, mapping and releasing 38 MB per
batch of 64 float32 224 x 224 images costs 0.24-0.31 ms of wall time per image with 2 workers,
against 0.04-0.08 through these slots (``scripts/batch_transport_cost.py``); our whole transform
chain costs 3.3 ms per full-resolution image, 0.49 per image of the 224 set.

How: before the first epoch's workers start, ``SharedBatchPool`` allocates a few shared tensors of
one batch each (``slots_for(workers)``: the batches in flight, the one being handed over and the one
the consumer still holds), kept for the loader's later epochs (each epoch's workers inherit them).
DataLoader runs the batch sampler in the main process as it dispatches each batch, so ``SlotBatches`` takes a free slot there and sends its number with the
indices; the worker (``SlotWriter``) writes each image into that slot and returns only the slot
number and the labels.  The consumer gets a tensor over the slot's memory, *leased*: the slot
goes back to the pool when the last tensor using that memory (views included) is freed, never
earlier.  When no slot is free (a consumer that keeps its batches, ``list(loader)``), the batch
takes the ordinary way, a fresh segment, so a batch is never overwritten while a tensor on it
lives.  Two consequences: a leased batch is not a torch shared-memory tensor, so sending it to
another process copies it (``share_memory_`` moves it to new memory, which also frees the slot
under any numpy array taken earlier with ``.numpy()``: clone such a batch first); and the pool's
shared memory, ``slots x batch`` images (7 x 9.6 MB at batch 16 with 2 workers), lives as long as
its loader.
"""
from __future__ import annotations

import logging
import math
import weakref
from collections import deque
from collections.abc import Iterable, Iterator, Sequence

import torch
from torch.utils.data import Dataset
from torch.utils.data._utils.collate import default_collate

logger = logging.getLogger(__name__)

SLOT, FRESH = "slot", "fresh"  # how a worker's reply carries its images


PREFETCH_FACTOR = 2  # DataLoader's default, passed to it explicitly by the loader


def slots_for(num_workers: int, prefetch_factor: int = PREFETCH_FACTOR) -> int:
    """Slots a plain ``for`` loop never runs out of: the batches DataLoader keeps in flight, the
    one it has just received and the one the loop body still holds, plus one for slack."""
    return num_workers * prefetch_factor + 3


def shared_float32(shape: tuple[int, ...]) -> torch.Tensor:
    """An uninitialised float32 tensor in shared memory, allocated there directly (torch's private
    ``UntypedStorage._new_shared``, which DataLoader's collate uses too; ``share_memory_`` would
    allocate privately and copy, twice the time), or through ``share_memory_`` if it is gone."""
    new_shared = getattr(torch.UntypedStorage, "_new_shared", None)
    if new_shared is None:
        return torch.empty(shape, dtype=torch.float32).share_memory_()
    nbytes = math.prod(shape) * torch.finfo(torch.float32).bits // 8
    return torch.empty(0, dtype=torch.float32).set_(new_shared(nbytes)).view(shape)


class SharedBatchPool:
    """``slots`` shared-memory float32 tensors of ``batch_size x sample_shape``, lent out by lease."""

    def __init__(self, slots: int, batch_size: int, sample_shape: Sequence[int]) -> None:
        if slots < 1 or batch_size < 1:
            raise ValueError(f"need slots >= 1 and batch_size >= 1, got {slots} and {batch_size}")
        shape = (batch_size, *sample_shape)
        self.buffers = [shared_float32(shape) for _ in range(slots)]
        self._arrays = [b.numpy() for b in self.buffers]
        self._free: deque[int] = deque(range(slots))
        self.leased = 0  # batches handed over from slots (fallbacks are not counted)

    @property
    def free_slots(self) -> int:
        return len(self._free)

    def acquire(self) -> int | None:
        """A free slot's number, now reserved, or None when every slot is taken."""
        try:
            return self._free.popleft()
        except IndexError:
            return None

    def release(self, slot: int) -> None:
        """Give back a slot that was acquired but not leased."""
        self._free.append(slot)

    def lease(self, slot: int, n: int) -> torch.Tensor:
        """The first ``n`` samples of ``slot`` as a tensor that returns the slot when freed.

        The tensor is made from a numpy view created for this lease alone; torch's storage keeps
        that view alive while any tensor on the storage lives, and the view's finalizer gives the
        slot back.
        """
        view = self._arrays[slot][:n]
        weakref.finalize(view, self._free.append, slot)
        self.leased += 1
        return torch.from_numpy(view)


class SlotBatches:
    """Batch sampler: each list of indices from ``batches`` paired with a free slot of ``pool``
    (None when there is no pool or no free slot).

    Each iteration records the slots it hands out in the ``in_flight`` set current when it starts
    (set by the loader for one DataLoader iterator); the loader takes them out as batches arrive
    and gives back what is left once that iterator's workers are down (an early ``break``, a
    worker's error), so slots never leak.
    """

    def __init__(self, batches: Iterable[list[int]]) -> None:
        self.batches = batches
        self.pool: SharedBatchPool | None = None
        self.in_flight: set[int] | None = None

    def __iter__(self) -> Iterator[tuple[int | None, list[int]]]:
        return self._pairs(self.pool, self.in_flight)

    def _pairs(self, pool: SharedBatchPool | None, in_flight: set[int] | None):
        for indices in self.batches:
            slot = pool.acquire() if pool is not None else None
            if slot is not None and in_flight is not None:
                in_flight.add(slot)
            yield slot, indices

    def __len__(self) -> int:
        return len(self.batches)


class SlotWriter(Dataset):
    """Wraps an ``(image, label)`` dataset; in a worker, writes a batch's images into its slot.

    ``buffers`` is set by the loader before the workers start, so they inherit it.  A batch
    without a slot, or whose images do not have the slot's shape, is collated the ordinary way.
    """

    def __init__(self, dataset) -> None:
        self.dataset = dataset
        self.buffers: list[torch.Tensor] = []
        self._warned = False

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        return self.dataset[index]

    def __getitems__(self, request: tuple[int | None, list[int]]) -> tuple:
        slot, indices = request
        if slot is None:
            return FRESH, None, default_collate([self.dataset[i] for i in indices])
        buffer = self.buffers[slot]
        samples = []
        for pos, index in enumerate(indices):
            image, label = sample = self.dataset[index]
            samples.append(sample)
            if tuple(image.shape) != tuple(buffer.shape[1:]) or image.dtype != buffer.dtype:
                self._warn_mismatch(image, buffer)
                samples += [self.dataset[i] for i in indices[pos + 1:]]
                return FRESH, slot, default_collate(samples)  # the main process frees the slot
            buffer[pos].copy_(image)
        labels = torch.as_tensor([label for _, label in samples], dtype=torch.int64)
        return SLOT, slot, len(indices), labels

    def _warn_mismatch(self, image: torch.Tensor, buffer: torch.Tensor) -> None:
        if not self._warned:
            logger.warning("images of shape %s %s do not fit the shared batches (%s %s): collated the "
                           "ordinary way", tuple(image.shape), image.dtype, tuple(buffer.shape[1:]), buffer.dtype)
            self._warned = True


def keep_as_is(batch):
    """collate_fn for ``SlotWriter``: its replies are already batches."""
    return batch


def unpack(reply: tuple, pool: SharedBatchPool, in_flight: set[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(images, labels) from a ``SlotWriter`` reply; its slot, if any, leaves ``in_flight``."""
    if reply[0] == SLOT:
        _, slot, n, labels = reply
        in_flight.discard(slot)
        return pool.lease(slot, n), labels
    _, slot, (images, labels) = reply
    if slot is not None:
        in_flight.discard(slot)
        pool.release(slot)
    return images, labels
