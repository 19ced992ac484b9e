"""Reused shared batches (pipelines.shared_batches): same batches as DataLoader's own transport,
slots reused only once nothing can read them, fallbacks that keep every batch intact."""
from __future__ import annotations

import gc
import logging

import pytest
import torch
from torch.utils.data import Dataset

from pipelines.loaders import TorchvisionLoader
from pipelines.shared_batches import SharedBatchPool, slots_for

SHAPE = (3, 8, 8)


class Failing(Dataset):
    """Noisy images, except that index ``bad`` raises in the worker."""

    def __init__(self, n: int, bad: int) -> None:
        self.noisy, self.bad = Noisy(n), bad

    def __len__(self) -> int:
        return len(self.noisy)

    def __getitem__(self, i: int):
        if i == self.bad:
            raise OSError(f"cannot read image {i}")
        return self.noisy[i]


class Noisy(Dataset):
    """Each item draws from torch's generator (as the training transform does) and carries its index."""

    def __init__(self, n: int, shape=SHAPE) -> None:
        self.n, self.shape = n, shape

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        image = torch.rand(self.shape)
        image[0, 0, 0] = i
        return image, i % 2


def batches(shared: bool, order, *, keep: bool, batch_size: int = 4, workers: int = 2, dataset=None,
            seed: int = 3) -> tuple[list, TorchvisionLoader]:
    loader = TorchvisionLoader(dataset or Noisy(20), order, batch_size=batch_size, num_workers=workers,
                               seed=seed, shared_batches=shared, sample_shape=SHAPE)
    # keep=False copies each batch and drops it, as a training loop does; keep=True holds them all
    out = [(x, y) if keep else (x.clone(), y.clone()) for x, y in loader]
    return out, loader


def assert_same(a: list, b: list) -> None:
    assert [x.shape[0] for x, _ in a] == [x.shape[0] for x, _ in b]
    for (xa, ya), (xb, yb) in zip(a, b):
        assert torch.equal(xa, xb) and torch.equal(ya, yb) and yb.dtype == torch.int64


ORDER = [5, 1, 19, 1, 1, 0, 7, 3, 2, 11, 12, 13, 4, 6, 8, 9, 10, 14, 15, 16, 17, 18, 19]  # duplicates, 23 = 5x4+3


def test_pool_returns_a_slot_only_when_every_tensor_on_it_is_gone():
    pool = SharedBatchPool(2, 4, SHAPE)
    a, b = pool.acquire(), pool.acquire()
    assert pool.acquire() is None and pool.free_slots == 0
    images = pool.lease(a, 3)
    assert images.shape == (3, *SHAPE) and images.data_ptr() == pool.buffers[a].data_ptr()  # no copy
    part = images[1:]  # a view keeps the slot
    del images
    gc.collect()
    assert pool.free_slots == 0
    del part
    gc.collect()
    assert pool.free_slots == 1 and pool.acquire() == a
    pool.lease(b, 4).clone()  # the leased tensor dies at once; the clone owns its memory
    gc.collect()
    assert pool.acquire() == b


def test_shared_float32_is_shared_memory_of_the_right_shape(monkeypatch):
    from pipelines import shared_batches

    for fallback in (False, True):
        if fallback:
            monkeypatch.setattr(torch.UntypedStorage, "_new_shared", None, raising=False)  # as if gone
        t = shared_batches.shared_float32((2, *SHAPE))
        assert t.shape == (2, *SHAPE) and t.dtype == torch.float32 and t.is_shared() and t.is_contiguous()


def test_pool_rejects_empty_sizes():
    with pytest.raises(ValueError):
        SharedBatchPool(0, 4, SHAPE)


def test_loop_gets_the_same_batches_as_dataloaders_own_transport_through_the_slots():
    stock, _ = batches(False, ORDER, keep=False)
    shared, loader = batches(True, ORDER, keep=False)
    assert_same(stock, shared)
    assert [x.shape[0] for x, _ in shared] == [4, 4, 4, 4, 4, 3]  # partial batch delivered
    assert [int(v) for x, _ in shared for v in x[:, 0, 0, 0]] == ORDER  # every occurrence, in order
    assert loader.pool.leased == len(shared)  # every batch came through a slot


def test_the_pool_serves_every_epoch_and_batches_kept_from_one_survive_the_next():
    def epochs(shared: bool) -> tuple[list, list, TorchvisionLoader]:
        loader = TorchvisionLoader(Noisy(20), ORDER, batch_size=4, num_workers=2, seed=3,
                                   shared_batches=shared, sample_shape=SHAPE)
        first = list(loader)  # kept while the next epoch runs
        loader.set_epoch(1)
        second = [(x.clone(), y) for x, y in loader]
        return first, second, loader

    stock_first, stock_second, _ = epochs(False)
    first, second, loader = epochs(True)
    assert_same(stock_first, first)
    assert_same(stock_second, second)
    assert not torch.equal(first[0][0], second[0][0])  # a new epoch, new draws
    # epoch 0's kept batches hold 6 of the 7 slots, so epoch 1 had one slot (its first batch, still
    # bound in the loop when the others were dispatched) and its other batches took DataLoader's way
    assert loader.slots == 7 and loader.pool.leased == len(first) + 1
    del first
    gc.collect()
    assert loader.pool.free_slots == loader.slots  # and the kept ones came back once dropped


def test_kept_batches_are_never_overwritten():
    order = list(range(20)) * 2  # 20 batches of 2 > slots
    stock, _ = batches(False, order, keep=True, batch_size=2)
    shared, loader = batches(True, order, keep=True, batch_size=2)
    assert loader.slots == slots_for(2) < len(shared)
    assert loader.pool.leased == loader.slots  # the rest took the ordinary way
    assert_same(stock, shared)
    del shared
    gc.collect()
    assert loader.pool.free_slots == loader.slots


def test_images_of_another_shape_fall_back_with_a_warning(caplog):
    # workers=0 has no slots; call the worker side in-process to see its warning
    loader = TorchvisionLoader(Noisy(6, shape=(3, 5, 5)), range(6), batch_size=3, num_workers=2,
                               sample_shape=SHAPE)
    pool = SharedBatchPool(loader.slots, 3, SHAPE)
    loader.writer.buffers = pool.buffers
    with caplog.at_level(logging.WARNING, logger="pipelines.shared_batches"):
        kind, slot, (images, labels) = loader.writer.__getitems__((pool.acquire(), [0, 1, 2]))
    assert kind == "fresh" and slot == 0 and images.shape == (3, 3, 5, 5) and labels.tolist() == [0, 1, 0]
    assert "do not fit the shared batches" in caplog.text
    # and through the workers: the right batches
    stock, _ = batches(False, range(6), keep=False, dataset=Noisy(6, shape=(3, 5, 5)))
    shared, loader = batches(True, range(6), keep=False, dataset=Noisy(6, shape=(3, 5, 5)))
    assert_same(stock, shared)
    assert loader.pool.leased == 0 and loader.pool.free_slots == loader.slots  # slots given back


def test_no_workers_means_no_shared_memory():
    loader = TorchvisionLoader(Noisy(4), range(4), batch_size=2, num_workers=0)
    assert loader.slots == 0 and [x.shape[0] for x, _ in loader] == [2, 2] and loader.pool is None


def test_a_cuda_loader_keeps_dataloaders_pinned_transport():
    loader = TorchvisionLoader(Noisy(4), range(4), batch_size=2, num_workers=2, device="cuda")
    assert loader.slots == 0 and loader.dataloader.pin_memory  # built without touching a GPU


def test_the_benchmarks_plain_baseline_keeps_dataloaders_transport():
    from pipelines.bench_loaders import loader_factories

    factories = loader_factories(2)
    plain = factories["torchvision plain (PIL + transforms as listed)"](["a.jpeg"], [0], 4)
    ours = factories["torchvision ours (cv2)"](["a.jpeg"], [0], 4)
    assert plain.slots == 0 and ours.slots == slots_for(2)


def test_a_long_loop_takes_every_batch_through_the_slots():
    """40 batches through 7 slots: each slot must come back after its batch is dropped."""
    loader = TorchvisionLoader(Noisy(80), range(80), batch_size=2, num_workers=2, sample_shape=SHAPE)
    for images, _ in loader:
        pass
    assert loader.pool.leased == 40 and loader.pool.free_slots == loader.slots - 1  # `images` holds one
    del images
    assert loader.pool.free_slots == loader.slots


def test_slots_come_back_after_break_next_and_a_workers_error():
    loader = TorchvisionLoader(Noisy(80), range(80), batch_size=2, num_workers=2, sample_shape=SHAPE)
    for k, (images, _) in enumerate(loader):
        if k == 3:
            break
    del images
    gc.collect()
    assert loader.pool.free_slots == loader.slots  # the batches dispatched but never delivered too
    next(iter(loader))
    gc.collect()
    assert loader.pool.free_slots == loader.slots
    failing = TorchvisionLoader(Failing(80, bad=30), range(80), batch_size=2, num_workers=2, sample_shape=SHAPE)
    with pytest.raises(OSError, match="cannot read image 30"):
        for images, _ in failing:
            del images
    gc.collect()
    assert failing.pool.free_slots == failing.slots
    failing.dataloader.dataset.dataset.bad = None  # the next epoch reads everything
    before = failing.pool.leased
    assert sum(len(x) for x, _ in failing) == 80 and failing.pool.leased - before == 40
