"""Tests of EarlyStopping on scripted metric sequences: both modes, absolute and percentage
tolerance, ties, NaN and inf, exact patience, reset, resume through state_dict and invalid
arguments."""

from __future__ import annotations

import math

import pytest

from models import EarlyStopping

NAN, INF = math.nan, math.inf


def _decisions(stopper: EarlyStopping, values: list[float]) -> list[bool]:
    return [stopper.deberia_parar(value) for value in values]


# (kwargs, metric sequence, expected deberia_parar per epoch, expected best at the end)
SEQUENCES = {
    "min: patience reached exactly at the third bad epoch": (
        {"modo": "min", "paciencia": 3},
        [1.0, 0.8, 0.9, 0.85, 0.81],
        [False, False, False, False, True],
        0.8,
    ),
    "max: patience reached exactly": (
        {"modo": "max", "paciencia": 2},
        [0.5, 0.7, 0.6, 0.69],
        [False, False, False, True],
        0.7,
    ),
    "min: improvement resets the counter": (
        {"modo": "min", "paciencia": 2},
        [1.0, 1.1, 0.9, 1.0, 0.95, 0.96],
        [False, False, False, False, True, True],
        0.9,
    ),
    "max: improvement resets the counter": (
        {"modo": "max", "paciencia": 2},
        [0.1, 0.05, 0.2, 0.1, 0.3, 0.29, 0.28],
        [False, False, False, False, False, False, True],
        0.3,
    ),
    "min: ties count as mejor with tol 0": (
        {"modo": "min", "paciencia": 1},
        [0.5, 0.5, 0.5, 0.5000001],
        [False, False, False, True],
        0.5,
    ),
    "max: ties count as mejor with tol 0": (
        {"modo": "max", "paciencia": 1},
        [0.5, 0.5, 0.4999999],
        [False, False, True],
        0.5,
    ),
    "min: absolute tolerance keeps the best and forgives small rises": (
        {"modo": "min", "paciencia": 1, "tol": 0.1},
        [1.0, 1.05, 1.1, 1.0999, 1.11],
        [False, False, False, False, True],
        1.0,
    ),
    "max: absolute tolerance": (
        {"modo": "max", "paciencia": 2, "tol": 0.05},
        [0.9, 0.86, 0.84, 0.83, 0.95],
        [False, False, False, True, False],
        0.95,
    ),
    "min: percentage tolerance is relative to |best|": (
        {"modo": "min", "paciencia": 1, "porcentaje": True, "tol": 10},
        [2.0, 2.19, 2.21],
        [False, False, True],
        2.0,
    ),
    "min: percentage tolerance with a negative best": (
        {"modo": "min", "paciencia": 1, "porcentaje": True, "tol": 10},
        [-2.0, -1.81, -1.79],
        [False, False, True],
        -2.0,
    ),
    "max: percentage tolerance": (
        {"modo": "max", "paciencia": 1, "porcentaje": True, "tol": 5},
        [0.8, 0.761, 0.759],
        [False, False, True],
        0.8,
    ),
    "min: NaN stops at once and keeps the best": (
        {"modo": "min", "paciencia": 5},
        [0.4, 0.3, NAN],
        [False, False, True],
        0.3,
    ),
    "max: +inf is not an improvement and stops": (
        {"modo": "max", "paciencia": 5},
        [0.4, INF],
        [False, True],
        0.4,
    ),
    "min: -inf stops before any best": (
        {"modo": "min", "paciencia": 5},
        [-INF],
        [True],
        None,
    ),
}


@pytest.mark.parametrize("kwargs, values, expected, best", SEQUENCES.values(), ids=SEQUENCES.keys())
def test_scripted_sequences(kwargs: dict, values: list[float], expected: list[bool], best: float | None) -> None:
    stopper = EarlyStopping(**kwargs)
    assert stopper.mejor_valor is None
    assert _decisions(stopper, values) == expected
    assert stopper.mejor_valor == best


@pytest.mark.parametrize("modo", ["min", "max"])
@pytest.mark.parametrize("value", [NAN, INF, -INF])
def test_non_finite_is_never_mejor(modo: str, value: float) -> None:
    stopper = EarlyStopping(modo=modo)
    assert not stopper.mejor(value)
    stopper.deberia_parar(1.0)
    assert not stopper.mejor(value)
    assert stopper.deberia_parar(value)
    assert stopper.reason is not None and "non-finite" in stopper.reason


@pytest.mark.parametrize("modo, first", [("min", 1e9), ("max", -1e9)])
def test_first_finite_value_is_always_mejor(modo: str, first: float) -> None:
    stopper = EarlyStopping(modo=modo, paciencia=1)
    assert stopper.mejor(first)
    assert not stopper.deberia_parar(first)
    assert stopper.mejor_valor == first


def test_mejor_does_not_change_the_state() -> None:
    stopper = EarlyStopping(paciencia=1)
    stopper.deberia_parar(0.5)
    assert not stopper.mejor(0.9)
    assert stopper.mejor(0.1)
    assert stopper.state_dict()["counter"] == 0 and stopper.mejor_valor == 0.5


def test_reason_is_readable_and_cleared() -> None:
    stopper = EarlyStopping(modo="min", paciencia=2)
    assert not stopper.deberia_parar(0.312)
    assert not stopper.deberia_parar(0.4)
    assert stopper.reason is None
    assert stopper.deberia_parar(0.5)
    assert "0.3120" in stopper.reason and "2 epochs" in stopper.reason
    stopper.deberia_parar(0.1)
    assert stopper.reason is None


@pytest.mark.parametrize("split", [1, 2, 3, 4])
@pytest.mark.parametrize(
    "kwargs, values",
    [
        ({"modo": "min", "paciencia": 3, "tol": 0.01}, [1.0, 0.9, 0.95, 0.93, 0.8, 0.85, 0.86, 0.9]),
        ({"modo": "max", "paciencia": 2, "porcentaje": True, "tol": 1}, [0.5, 0.6, 0.55, 0.7, 0.69, 0.6, 0.5]),
    ],
)
def test_state_dict_round_trip_resumes_the_same_decisions(kwargs: dict, values: list[float], split: int) -> None:
    uninterrupted = _decisions(EarlyStopping(**kwargs), values)
    first = EarlyStopping(**kwargs)
    head = _decisions(first, values[:split])
    resumed = EarlyStopping()
    resumed.load_state_dict(first.state_dict())
    assert resumed.state_dict() == first.state_dict()
    assert head + _decisions(resumed, values[split:]) == uninterrupted
    assert any(uninterrupted)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"modo": "mean"},
        {"modo": "MIN"},
        {"paciencia": 0},
        {"paciencia": 2.0},
        {"paciencia": True},
        {"tol": -0.1},
        {"tol": NAN},
        {"tol": INF},
        {"tol": "0.1"},
        {"porcentaje": 1},
        {"porcentaje": "yes"},
    ],
)
def test_invalid_arguments_raise_value_error(kwargs: dict) -> None:
    name = next(iter(kwargs))
    with pytest.raises(ValueError, match=name):
        EarlyStopping(**kwargs)


@pytest.mark.parametrize(
    "change", [{"counter": -1}, {"best": NAN}, {"paciencia": 0}, {"modo": "avg"}]
)
def test_load_state_dict_rejects_bad_state(change: dict) -> None:
    state = {**EarlyStopping().state_dict(), **change}
    with pytest.raises(ValueError):
        EarlyStopping().load_state_dict(state)
    incomplete = EarlyStopping().state_dict()
    del incomplete["counter"]
    with pytest.raises(ValueError, match="counter"):
        EarlyStopping().load_state_dict(incomplete)


def test_improves_is_strict_where_mejor_accepts_a_tie_within_tol():
    stopper = EarlyStopping(modo="min", paciencia=2, tol=0.1)
    assert stopper.improves(1.0) and not stopper.deberia_parar(1.0)
    assert stopper.mejor(1.05) and not stopper.improves(1.05)  # within tol: patience reset, weights kept
    assert not stopper.improves(1.0) and stopper.improves(0.99)
    assert not stopper.improves(float("nan"))
    up = EarlyStopping(modo="max")
    assert up.improves(0.5) and not up.deberia_parar(0.5) and up.improves(0.51) and not up.improves(0.5)
