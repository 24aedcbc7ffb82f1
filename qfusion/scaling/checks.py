"""Argument checks shared by the scaling analysis's public functions.

Each error names the argument, what was expected and what was given. A bool is refused where a
number or a count is expected: ``n_bootstrap=True`` is a mistake, not one resample.
"""

from __future__ import annotations

import math
import numbers


def count(value, name: str, minimum: int = 0) -> int:
    """``value`` as an int >= ``minimum``, or a TypeError / ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name}: expected an integer >= {minimum}, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name}: expected >= {minimum}, got {value!r}")
    return int(value)


def number(value, name: str) -> float:
    """``value`` (an int or float, not a bool) as a float, or a TypeError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}: expected a number, got {value!r}")
    return float(value)


def positive(value, name: str) -> float:
    """``value`` as a finite float > 0, or a TypeError / ValueError naming ``name``."""
    as_float = number(value, name)
    if not (math.isfinite(as_float) and as_float > 0):
        raise ValueError(f"{name}: expected a finite number > 0, got {value!r}")
    return as_float
