"""Early stopping on a validation metric, with the order of checks of Lightning's
EarlyStopping: a non-finite value first, then improvement within the tolerance, then
patience."""

from __future__ import annotations

import math
from numbers import Real
from typing import Any

MODOS = ("min", "max")
STATE_KEYS = ("best", "counter", "modo", "paciencia", "porcentaje", "tol")


def _validate(modo: Any, paciencia: Any, porcentaje: Any, tol: Any) -> None:
    if modo not in MODOS:
        raise ValueError(f"modo must be one of {MODOS}, got {modo!r}")
    if isinstance(paciencia, bool) or not isinstance(paciencia, int) or paciencia < 1:
        raise ValueError(f"paciencia must be an int >= 1, got {paciencia!r}")
    if not isinstance(porcentaje, bool):
        raise ValueError(f"porcentaje must be a bool, got {porcentaje!r}")
    if isinstance(tol, bool) or not isinstance(tol, Real) or not math.isfinite(tol) or tol < 0:
        raise ValueError(f"tol must be a finite number >= 0, got {tol!r}")


class EarlyStopping:
    """Counts consecutive epochs whose validation metric is worse than the best so far by more
    than the tolerance; asks to stop when the count reaches ``paciencia``, or at once on a
    non-finite metric (a diverged run does not recover).

    ``tol`` is absolute, or a percentage of |best| when ``porcentaje`` is True.
    """

    def __init__(self, modo: str = "min", paciencia: int = 5, porcentaje: bool = False, tol: float = 0) -> None:
        _validate(modo, paciencia, porcentaje, tol)
        self.modo = modo
        self.paciencia = paciencia
        self.porcentaje = porcentaje
        self.tol = tol
        self.contador = 0
        self._mejor_valor: float | None = None
        self.reason: str | None = None
        """Why the last `deberia_parar` call returned True; None while training goes on."""

    @property
    def mejor_valor(self) -> float | None:
        """The best metric so far; None before the first finite one."""
        return self._mejor_valor

    def _margen(self) -> float:
        assert self._mejor_valor is not None
        return self.tol * abs(self._mejor_valor) / 100 if self.porcentaje else self.tol

    def mejor(self, metrica_validacion: float) -> bool:
        """Whether the value is not worse than the best so far by more than the tolerance
        (a tie counts). The first finite value always is; NaN and +-inf never are."""
        valor = float(metrica_validacion)
        if not math.isfinite(valor):
            return False
        if self._mejor_valor is None:
            return True
        if self.modo == "min":
            return valor <= self._mejor_valor + self._margen()
        return valor >= self._mejor_valor - self._margen()

    def improves(self, metrica_validacion: float) -> bool:
        """Whether the value is strictly better than the best so far (the first finite value is).
        Only then should the best weights be replaced: a value within ``tol`` of the best resets
        the patience (``mejor``) but is not better."""
        valor = float(metrica_validacion)
        if not math.isfinite(valor):
            return False
        if self._mejor_valor is None:
            return True
        return valor < self._mejor_valor if self.modo == "min" else valor > self._mejor_valor

    def deberia_parar(self, metrica_validacion: float) -> bool:
        """Record one epoch's metric and say whether training should stop now."""
        valor = float(metrica_validacion)
        self.reason = None
        if not math.isfinite(valor):
            self.contador += 1
            self.reason = f"non-finite metric {valor} (best so far {self._describe_best()})"
            return True
        if self.mejor(valor):
            self.contador = 0
            self._mejor_valor = valor if self._mejor_valor is None else self._better(self._mejor_valor, valor)
            return False
        self.contador += 1
        if self.contador >= self.paciencia:
            tolerance = f"{self.tol}%" if self.porcentaje else f"{self.tol}"
            self.reason = (
                f"validation metric ({self.modo}) did not improve on {self._describe_best()} "
                f"within tolerance {tolerance} for {self.contador} epochs"
            )
            return True
        return False

    def _better(self, a: float, b: float) -> float:
        return min(a, b) if self.modo == "min" else max(a, b)

    def _describe_best(self) -> str:
        return "none" if self._mejor_valor is None else f"{self._mejor_valor:.4f}"

    def state_dict(self) -> dict[str, Any]:
        return {
            "best": self._mejor_valor,
            "counter": self.contador,
            "modo": self.modo,
            "paciencia": self.paciencia,
            "porcentaje": self.porcentaje,
            "tol": self.tol,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a `state_dict`, settings included, so a resumed run keeps counting."""
        missing = [key for key in STATE_KEYS if key not in state]
        if missing:
            raise ValueError(f"early-stopping state lacks {missing}")
        _validate(state["modo"], state["paciencia"], state["porcentaje"], state["tol"])
        best, counter = state["best"], state["counter"]
        if best is not None and not math.isfinite(best):
            raise ValueError(f"early-stopping best must be None or finite, got {best!r}")
        if isinstance(counter, bool) or not isinstance(counter, int) or counter < 0:
            raise ValueError(f"early-stopping counter must be an int >= 0, got {counter!r}")
        self.modo, self.paciencia = state["modo"], state["paciencia"]
        self.porcentaje, self.tol = state["porcentaje"], state["tol"]
        self._mejor_valor = None if best is None else float(best)
        self.contador = counter
        self.reason = None
