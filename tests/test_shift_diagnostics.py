"""The two pure functions of scripts/test_shift_diagnostics.py (the script itself reads a trained
modelo.h5 and the whole test split: minutes, run by hand)."""
from __future__ import annotations

import numpy as np
import pytest

from .helpers import load_script


@pytest.fixture(scope="module")
def diag():
    return load_script("test_shift_diagnostics")


def test_reweighting_follows_bayes_rule(diag):
    # a classifier calibrated where NORMAL was 1/4: p = 0.5 means a likelihood ratio of 3 for NORMAL;
    # where NORMAL is 1/2 that gives 3/4
    p = diag.reweighted(np.array([[0.5, 0.5], [0.2, 0.8]]), np.array([0.25, 0.75]), np.array([0.5, 0.5]))
    np.testing.assert_allclose(p, [[0.75, 0.25], [0.2 * 3 / (0.2 * 3 + 0.8), 0.8 / (0.2 * 3 + 0.8)]])
    same = diag.reweighted(np.array([[0.3, 0.7]]), np.array([0.4, 0.6]), np.array([0.4, 0.6]))
    np.testing.assert_allclose(same, [[0.3, 0.7]])


def test_oracle_accuracy_is_the_best_threshold(diag):
    labels = np.array([0, 0, 1, 1, 0])
    p = np.array([0.1, 0.6, 0.7, 0.9, 0.8])
    # thresholds: above 0.65 -> predictions 0,0,1,1,1: 4 of 5; no threshold gets all 5 (0.8 is NORMAL)
    assert diag.oracle_accuracy(labels, p) == pytest.approx(0.8)
    assert diag.oracle_accuracy(np.array([0, 1]), np.array([0.2, 0.9])) == pytest.approx(1.0)
