"""Checks of the numeric arguments of the public API (MGG sizes, meta-training and adaptation
settings). Each returns the value in its plain Python type or raises an error that names the
argument: a ``TypeError`` for the wrong kind of value (a ``bool`` is not a number here, although
Python counts it as an ``int``), a ``ValueError`` for a value out of range. Callers run them
before they change anything, so a bad call fails cleanly instead of deep inside torch."""

from __future__ import annotations

import math
import numbers
from typing import Any


def _describe(value: Any) -> str:
    return f"{type(value).__name__} {value!r}"


def whole_number(name: str, value: Any, minimum: int | None = None, maximum: int | None = None) -> int:
    """``value`` as an ``int``: any integral number (NumPy's too), not a bool, within the bounds."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {_describe(value)}")
    value = int(value)
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be an int <= {maximum}, got {value}")
    return value


def finite_number(name: str, value: Any, minimum: float = 0.0) -> float:
    """``value`` as a ``float``: a real number (not a bool), finite and >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {_describe(value)}")
    result = float(value)
    if not math.isfinite(result) or result < minimum:
        raise ValueError(f"{name} must be a finite number >= {minimum:g}, got {value!r}")
    return result


def beta_pair(name: str, value: Any) -> tuple[float, float]:
    """``value`` as ``(beta1, beta2)``: two real numbers, each in [0, 1) (moment coefficients)."""
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise TypeError(f"{name} must be a pair of numbers in [0, 1), got {_describe(value)}")
    pair = tuple(finite_number(f"{name}[{i}]", b) for i, b in enumerate(value))
    bad = [b for b in pair if not b < 1.0]
    if bad:
        raise ValueError(f"{name} must be a pair of numbers in [0, 1), got {tuple(value)!r}")
    return pair  # type: ignore[return-value]
