"""Every random stream of a run, derived from the run's one seed with ``numpy.random.SeedSequence``.

A stream is named by a ``Stream`` member and optional integers (an epoch, a rank, a number of
TTA copies); ``derive_seed(seed, Stream.TRAIN_ORDER, epoch)`` hashes them together, so two
streams never share draws however close their seeds or epochs are, and the same seed gives the
same run.
"""
from __future__ import annotations

from enum import IntEnum

import numpy as np


class Stream(IntEnum):
    """The independent random streams of a run."""

    SPLIT = 1           # the 80/20 split and the --train-subset draw
    TRAIN_ORDER = 2     # the training sampler's order, per epoch
    VAL_ORDER = 3       # ReplicarMuestreoDePrueba's oversampling, per epoch
    DROPOUT = 4         # torch's global generator during training (dropout), per rank
    INIT = 5            # the network's initialisation
    EVAL = 6            # validation passes, per epoch
    TTA = 7             # the test-time augmentation copies, per number of copies
    LOADER = 8          # a loader's workers (per rank, per loader), from which its epochs derive
    TEST = 9            # the test pass without TTA
    BOOTSTRAP = 10      # the bootstrap resamples of the test figures
    CROSS_FIT = 11      # the halves of the cross-fitted validation threshold


def derive_seed(seed: int, *keys: int, bits: int = 63) -> int:
    """A ``bits``-bit seed for the stream ``keys`` of the run seeded with ``seed`` (>= 0 integers)."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be an int >= 0, got {seed!r}")
    if not 1 <= bits <= 64:
        raise ValueError(f"bits must be in [1, 64], got {bits}")
    entropy = [int(seed), *(int(k) for k in keys)]
    if any(k < 0 for k in entropy):
        raise ValueError(f"seed keys must be >= 0, got {entropy}")
    state = np.random.SeedSequence(entropy).generate_state(1, np.uint64)[0]
    return int(state) >> (64 - bits)
