"""Split and samplers: stratification, test-balance oversampling, fresh seeded draws."""
from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from pipelines.samplers import (ReplicarMuestreoDePrueba, RepeatSampler, SeededSubsetRandomSampler,
                                oversampled_counts, split_train_val)

# The real set's shape: train 1341/3875, test 156/260.
TRAIN_TARGETS = np.array([0] * 1341 + [1] * 3875)
TEST_TARGETS = np.array([0] * 156 + [1] * 260)


def test_split_is_stratified_disjoint_complete_and_seeded():
    tr, va = split_train_val(TRAIN_TARGETS, 0.2, seed=0)
    assert len(np.intersect1d(tr, va)) == 0 and len(tr) + len(va) == len(TRAIN_TARGETS)
    assert abs(len(va) / len(TRAIN_TARGETS) - 0.2) < 0.001
    assert abs(TRAIN_TARGETS[va].mean() - TRAIN_TARGETS.mean()) < 0.002
    assert np.array_equal(va, split_train_val(TRAIN_TARGETS, 0.2, seed=0)[1])
    assert not np.array_equal(va, split_train_val(TRAIN_TARGETS, 0.2, seed=1)[1])
    with pytest.raises(ValueError):
        split_train_val(TRAIN_TARGETS, 1.0)


def make_val_sampler(seed=0):
    _, va = split_train_val(TRAIN_TARGETS, 0.2, seed=0)
    return ReplicarMuestreoDePrueba(TEST_TARGETS, va, TRAIN_TARGETS[va], seed=seed), va


def test_replicar_matches_test_balance_with_only_val_indices():
    sampler, va = make_val_sampler()
    test_share = TEST_TARGETS.mean()
    shares = []
    for _ in range(50):
        order = np.array(list(sampler))
        assert len(order) == len(sampler)
        assert set(order) <= set(va.tolist())          # only validation indices
        assert set(va.tolist()) <= set(order)          # none of them dropped
        shares.append(TRAIN_TARGETS[order].mean())
        assert len(order) > len(set(order))            # duplicates: the minority is oversampled
    # Counts are rounded to whole samples: within 1/N of the test share.
    assert np.all(np.abs(np.array(shares) - test_share) <= 1 / len(sampler))


def test_replicar_oversamples_only_the_minority():
    sampler, va = make_val_sampler()
    counts = Counter(TRAIN_TARGETS[list(sampler)].tolist())
    val_counts = Counter(TRAIN_TARGETS[va].tolist())
    assert counts[1] == val_counts[1]           # majority kept as is
    assert counts[0] > val_counts[0]            # minority topped up


def test_replicar_new_draw_each_epoch_same_seed_same_draws():
    a, _ = make_val_sampler(seed=5)
    b, _ = make_val_sampler(seed=5)
    c, _ = make_val_sampler(seed=6)
    ea1, ea2 = list(a), list(a)
    assert ea1 != ea2
    assert list(b) == ea1 and list(b) == ea2
    assert list(c) != ea1
    a.set_epoch(1)
    assert list(a) == ea2


def test_replicar_rejects_bad_input():
    with pytest.raises(ValueError, match="same length"):
        ReplicarMuestreoDePrueba([0, 1], [1, 2, 3], [0, 1])
    with pytest.raises(ValueError, match="not in validation"):
        ReplicarMuestreoDePrueba([0, 1], [1, 2], [0, 0])


def test_oversampled_counts():
    assert oversampled_counts(np.array([0.5, 0.5]), np.array([10, 30])).tolist() == [30, 30]
    assert oversampled_counts(np.array([0.25, 0.75]), np.array([10, 30])).tolist() == [10, 30]


def test_repeat_sampler():
    s = RepeatSampler([4, 7], 3)
    assert list(s) == [4, 4, 4, 7, 7, 7] and len(s) == 6
    with pytest.raises(ValueError):
        RepeatSampler([1], 0)


def test_seeded_subset_sampler_permutes_subset_freshly_each_epoch():
    s = SeededSubsetRandomSampler([3, 5, 9, 11, 20], seed=0)
    e0, e1 = list(s), list(s)
    assert sorted(e0) == [3, 5, 9, 11, 20] and e0 != e1 or sorted(e1) == [3, 5, 9, 11, 20]
    s.set_epoch(0)
    assert list(s) == e0
    big = SeededSubsetRandomSampler(range(1000), seed=0)
    assert list(big) != list(big)


def test_derived_seeds_are_stable_distinct_and_in_range():
    from pipelines.seeds import Stream, derive_seed

    assert derive_seed(0, Stream.SPLIT) == derive_seed(0, Stream.SPLIT)
    seeds = {derive_seed(s, stream, e) for s in range(3) for stream in Stream for e in range(5)}
    assert len(seeds) == 3 * len(Stream) * 5  # no two streams, epochs or run seeds share one
    assert all(0 <= derive_seed(7, Stream.LOADER, r, bits=31) < 2**31 for r in range(50))
    assert 0 <= derive_seed(7, Stream.SPLIT, bits=32) < 2**32
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="seed must be an int >= 0"):
            derive_seed(bad)
    with pytest.raises(ValueError, match="bits"):
        derive_seed(0, bits=65)


def test_the_split_and_the_samplers_draw_from_their_own_streams():
    from pipelines.seeds import Stream, derive_seed

    labels = np.array([0] * 40 + [1] * 60)
    a_train, a_val = split_train_val(labels, 0.2, derive_seed(0, Stream.SPLIT, bits=32))
    b_train, b_val = split_train_val(labels, 0.2, derive_seed(1, Stream.SPLIT, bits=32))
    assert not np.array_equal(a_val, b_val)  # another run seed, another split
    sampler = SeededSubsetRandomSampler(a_train, seed=derive_seed(0, Stream.TRAIN_ORDER))
    first = list(sampler)
    assert list(sampler) != first  # the next epoch is another order
    sampler.set_epoch(0)
    assert list(sampler) == first  # and epoch 0 comes back on resume


def test_class_balance_counts_the_runs_split_and_draws_the_figure(tiny_folder, tmp_path):
    from pipelines.balance import class_balance, main, plot_class_balance
    from pipelines.data import index_dataset
    from pipelines.loaders import make_samplers

    index = index_dataset(tiny_folder)
    balance = class_balance(index, seed=3)
    samplers = make_samplers(index, seed=3)
    targets = np.asarray(index.train.targets)
    assert sum(balance["train"].values()) == len(samplers.train_indices)
    assert sum(balance["validation"].values()) == len(samplers.val_indices)
    assert sum(balance["validation (resampled)"].values()) == len(samplers.val)
    assert balance["validation"][index.classes[0]] == int(np.sum(targets[samplers.val_indices] == 0))
    test_share = balance["test"][index.classes[0]] / sum(balance["test"].values())
    resampled_share = balance["validation (resampled)"][index.classes[0]] / len(samplers.val)
    assert abs(resampled_share - test_share) < 0.1
    assert plot_class_balance(balance, tmp_path / "b.png").stat().st_size > 0
    assert main(["--data-dir", str(tiny_folder), "--out", str(tmp_path / "c.png")]) == 0
    assert (tmp_path / "c.png").is_file()
    assert main(["--data-dir", str(tmp_path / "missing")]) == 2
