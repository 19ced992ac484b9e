"""The torchvision loader: the common interface, sampler order, partial batches, seeds."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from pipelines.data import index_dataset
from pipelines.loaders import LoaderSettings, TorchvisionLoader, make_loader, make_loaders


@pytest.fixture(scope="module")
def index(tiny_folder):
    return index_dataset(tiny_folder)


def test_make_loaders_shapes_and_lengths(index):
    loaders = make_loaders(index, LoaderSettings(batch_size=5, num_workers=0))
    n_train, n_val = len(loaders.samplers.train_indices), len(loaders.samplers.val)
    assert len(loaders.train) == -(-n_train // 5) and len(loaders.val) == -(-n_val // 5)
    assert len(loaders.test) == -(-len(index.test) // 5)
    images, labels = next(iter(loaders.train))
    assert images.shape == (5, 3, 224, 224) and images.dtype == torch.float32
    assert labels.dtype == torch.int64
    assert 0 <= float(images.min()) and float(images.max()) <= 1.5


@pytest.mark.parametrize("workers", [0, 2])
def test_labels_follow_sampler_order_with_duplicates_and_partial_batch(index, workers):
    order = [0, 31, 31, 5, 20, 20, 20, 1, 30, 2, 12]  # 11 indices, duplicates, both classes
    loader = make_loader(index, "train", order, augment=False,
                         settings=LoaderSettings(batch_size=4, num_workers=workers))
    batches = list(loader)
    assert [b[0].shape[0] for b in batches] == [4, 4, 3] and len(loader) == 3
    labels = torch.cat([b[1] for b in batches]).tolist()
    assert labels == [index.train.targets[i] for i in order]
    images = torch.cat([b[0] for b in batches])
    assert torch.equal(images[1], images[2]) and torch.equal(images[4], images[6])


@pytest.mark.parametrize("workers", [0, 2])
def test_same_seed_same_batches(index, workers):
    def epoch(seed, epoch_no=0):
        torch.manual_seed(seed)
        loaders = make_loaders(index, LoaderSettings(batch_size=8, num_workers=workers, seed=seed))
        loaders.train.set_epoch(epoch_no)
        return [(x.clone(), y.clone()) for x, y in loaders.train]

    a, b, c = epoch(0), epoch(0), epoch(1)
    assert all(torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(a, b))
    assert not torch.equal(a[0][0], c[0][0])
    assert not torch.equal(a[0][0], epoch(0, 1)[0][0])


def test_val_and_test_loaders_cover_their_samplers(index):
    loaders = make_loaders(index, LoaderSettings(batch_size=6, num_workers=0))
    n_val = sum(x.shape[0] for x, _ in loaders.val)
    assert n_val == len(loaders.samplers.val)
    labels = torch.cat([y for _, y in loaders.test]).tolist()
    assert labels == index.test.targets


def test_settings_validation():
    with pytest.raises(ValueError, match="back end"):
        LoaderSettings(backend="tf")
    with pytest.raises(ValueError):
        LoaderSettings(batch_size=0)


def test_loader_is_plain_iterable_of_pairs(index):
    ds = [(torch.zeros(3, 224, 224), 1)] * 3
    loader = TorchvisionLoader(ds, range(3), batch_size=2, num_workers=0)
    assert [x.shape[0] for x, _ in loader] == [2, 1]
    assert np.array_equal(np.concatenate([y.numpy() for _, y in loader]), [1, 1, 1])


@pytest.mark.parametrize("cached", [False, True])
def test_backends_are_interchangeable(index, cached):
    """Same interface, same labels in the same order, close images, DALI CPU against torchvision."""
    order = [3, 3, 17, 0, 25, 9, 30]
    out = {}
    for backend in ("torchvision", "dali"):
        settings = LoaderSettings(backend=backend, batch_size=3, num_workers=1, decoded_cache=cached)
        loader = make_loader(index, "train", order, augment=False, settings=settings)
        loader.set_epoch(0)
        batches = list(loader)
        assert len(loader) == 3 and [b[0].shape[0] for b in batches] == [3, 3, 1]
        out[backend] = (torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches]))
    (xt, yt), (xd, yd) = out["torchvision"], out["dali"]
    assert yt.tolist() == yd.tolist() == [index.train.targets[i] for i in order]
    assert xt.dtype == xd.dtype == torch.float32 and xt.shape == xd.shape == (7, 3, 224, 224)
    diff = (xt - xd).abs()
    # Different decoders and resize filters (OpenCV reduced decode + INTER_AREA against DALI's
    # antialiased linear): close on average, not equal.
    assert float(diff.mean()) < 2 / 255 and float(diff.max()) < 0.35


def test_decoded_cache_gives_dali_the_same_batches(index):
    order = list(range(0, 32, 3))
    batches = {}
    for cached in (False, True):
        torch.manual_seed(0)
        settings = LoaderSettings(backend="dali", batch_size=4, num_workers=1, decoded_cache=cached, seed=4)
        batches[cached] = [x for x, _ in make_loader(index, "train", order, augment=True, settings=settings)]
    assert all(torch.equal(a, b) for a, b in zip(batches[False], batches[True]))
