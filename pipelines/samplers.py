"""Train/validation split and the samplers that decide each epoch's index order."""
from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch
from sklearn.model_selection import train_test_split
from torch.utils.data import Sampler

from .seeds import derive_seed


def split_train_val(targets: Sequence[int], val_fraction: float = 0.2,
                    seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Stratified split of ``range(len(targets))`` into sorted train and validation indices."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    targets = np.asarray(targets)
    indices = np.arange(len(targets))
    train_idx, val_idx = train_test_split(indices, test_size=val_fraction, random_state=seed,
                                          stratify=targets)
    return np.sort(train_idx), np.sort(val_idx)


def oversampled_counts(target_fractions: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Per-class sample counts with the target fractions that keep every available sample.

    The total N is the smallest for which no class has to drop samples (N = max n_c / p_c);
    class c then gets round(p_c N) >= n_c draws, so only the classes that are rarer than in the
    target are oversampled.
    """
    total = np.max(counts / target_fractions)
    return np.maximum(np.rint(target_fractions * total).astype(np.int64), counts)


class ReplicarMuestreoDePrueba(Sampler[int]):
    """Iterate over the validation indices with the test set's class proportions.

    Every validation index appears at least once per epoch; the classes that are rarer in
    validation than in test are topped up by drawing their indices with replacement
    (``numpy.random.Generator.choice``), so duplicates are expected.  Each ``__iter__`` is a new
    draw (epoch ``e`` uses the seed ``(seed, e)``; ``set_epoch`` sets ``e`` for resumed runs).
    """

    def __init__(self, etiquetas_prueba: Sequence[int], indices_val: Sequence[int],
                 etiquetas_val: Sequence[int], seed: int = 0) -> None:
        test = np.asarray(etiquetas_prueba, dtype=np.int64)
        self.indices_val = np.asarray(indices_val, dtype=np.int64)
        val = np.asarray(etiquetas_val, dtype=np.int64)
        if len(self.indices_val) != len(val):
            raise ValueError(f"indices_val ({len(self.indices_val)}) and etiquetas_val "
                             f"({len(val)}) must have the same length")
        if len(test) == 0 or len(val) == 0:
            raise ValueError("etiquetas_prueba and etiquetas_val must not be empty")
        self.classes = np.unique(test)
        missing = sorted(set(self.classes.tolist()) - set(val.tolist()))
        if missing:
            raise ValueError(f"classes {missing} are in the test labels but not in validation")
        self.target_fractions = np.array([(test == c).mean() for c in self.classes])
        self.by_class = [self.indices_val[val == c] for c in self.classes]
        self.counts = oversampled_counts(self.target_fractions,
                                         np.array([len(ix) for ix in self.by_class]))
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        rng = np.random.default_rng([self.seed, self.epoch])
        self.epoch += 1
        parts = [np.concatenate([ix, rng.choice(ix, size=n - len(ix), replace=True)])
                 for ix, n in zip(self.by_class, self.counts)]
        order = np.concatenate(parts)
        rng.shuffle(order)
        return iter(order.tolist())

    def __len__(self) -> int:
        return int(self.counts.sum())


class RepeatSampler(Sampler[int]):
    """Yield each index ``d`` times in a row (test-time augmentation: d augmented copies)."""

    def __init__(self, indices: Sequence[int], d: int) -> None:
        if d < 1:
            raise ValueError(f"d must be >= 1, got {d}")
        self.indices = np.asarray(indices, dtype=np.int64)
        self.d = d

    def __iter__(self) -> Iterator[int]:
        return iter(np.repeat(self.indices, self.d).tolist())

    def __len__(self) -> int:
        return len(self.indices) * self.d


class SeededSubsetRandomSampler(Sampler[int]):
    """``SubsetRandomSampler`` whose epoch ``e`` order depends only on ``(seed, e)``.

    Same order as ``torch.utils.data.SubsetRandomSampler`` with a generator seeded by
    ``derive_seed(seed, e)``,
    but resumable: ``set_epoch`` restores the order of any epoch without replaying the others.
    """

    def __init__(self, indices: Sequence[int], seed: int = 0) -> None:
        self.indices = np.asarray(indices, dtype=np.int64)
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(derive_seed(self.seed, self.epoch))
        self.epoch += 1
        sampler = torch.utils.data.SubsetRandomSampler(self.indices.tolist(), generator=g)
        return iter(list(sampler))

    def __len__(self) -> int:
        return len(self.indices)


class ShardedSampler(Sampler[int]):
    """One rank's share of another sampler's epoch order, for DistributedDataParallel.

    The epoch order is padded by wrapping around to a multiple of ``world_size`` (as
    ``DistributedSampler`` does) so every rank runs the same number of steps; rank r takes
    positions r, r + W, r + 2W, ...  ``unshard`` puts gathered per-rank results back in order.
    """

    def __init__(self, sampler: Sampler[int], rank: int, world_size: int) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        self.sampler, self.rank, self.world_size = sampler, rank, world_size

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)

    def __iter__(self) -> Iterator[int]:
        order = list(self.sampler)
        if order:
            order += order[: (-len(order)) % self.world_size]
        return iter(order[self.rank :: self.world_size])

    def __len__(self) -> int:
        return -(-len(self.sampler) // self.world_size)


def unshard(per_rank: list[np.ndarray], total: int) -> np.ndarray:
    """Interleave the ranks' results (rank r holds positions r, r + W, ...) and drop the padding."""
    world = len(per_rank)
    n = max(len(p) for p in per_rank)
    stacked = np.stack([np.asarray(p) for p in per_rank], axis=1)  # n x W x ...
    return stacked.reshape(n * world, *stacked.shape[2:])[:total]
