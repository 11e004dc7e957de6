"""Validation of config values at the edges: one rule, one line, naming the key and the value.

Constructors call these once; every failure is a ``ValueError`` whose message
is ``key=value: rule`` on one line, which ``scripts/run.py`` prints as the
config error. Booleans are never accepted as numbers (``True == 1`` in
Python), and numbers must be finite unless a rule says otherwise.
"""

from __future__ import annotations

import math
from collections.abc import Collection
from numbers import Integral, Real
from typing import Any

import numpy as np


def fail(key: str, value: object, rule: str) -> ValueError:
    """The ``ValueError`` for ``key=value: rule`` (NumPy scalars shown as plain numbers)."""
    shown = value.item() if isinstance(value, np.generic) else value
    return ValueError(f"{key}={shown!r}: {rule}")


def _interval(low: float | None, high: float | None, *, open_low: bool, open_high: bool = False) -> str:
    left = "(" if open_low else "["
    right = ")" if open_high else "]"
    return f"{left}{low:g}, {high:g}{right}"


def check_int(key: str, value: object, *, minimum: int | None = None, maximum: int | None = None) -> int:
    """An integer (not a bool) in ``[minimum, maximum]``.

    Raises
    ------
    ValueError
        ``key=value: must be an integer ...`` with the bounds it breaks.
    """
    if minimum is not None and maximum is not None:
        rule = f"must be an integer in [{minimum}, {maximum}]"
    elif minimum is not None:
        rule = f"must be an integer >= {minimum}"
    elif maximum is not None:
        rule = f"must be an integer <= {maximum}"
    else:
        rule = "must be an integer"
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise fail(key, value, rule)
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        raise fail(key, value, rule)
    return int(value)


def check_real(
    key: str,
    value: object,
    *,
    minimum: float | None = None,
    maximum: float | None = None,
    above: float | None = None,
    below: float | None = None,
) -> float:
    """A finite real number (not a bool) with the given bounds.

    Parameters
    ----------
    key, value
        What is checked, for the message.
    minimum, maximum : float, optional
        Inclusive bounds.
    above : float, optional
        Exclusive lower bound (``value > above``); used instead of ``minimum``.
    below : float, optional
        Exclusive upper bound (``value < below``); used instead of ``maximum``.

    Raises
    ------
    ValueError
        ``key=value: must be ...`` naming the interval, or ``must be finite``.
    """
    low = above if above is not None else minimum
    high = below if below is not None else maximum
    if low is not None and high is not None:
        rule = f"must be in {_interval(low, high, open_low=above is not None, open_high=below is not None)}"
    elif low is not None:
        rule = f"must be {'>' if above is not None else '>='} {low:g}"
    elif high is not None:
        rule = f"must be {'<' if below is not None else '<='} {high:g}"
    else:
        rule = "must be finite"
    if isinstance(value, bool) or not isinstance(value, Real):
        raise fail(key, value, f"must be a number; {rule}" if rule != "must be finite" else "must be a number")
    if not math.isfinite(value):
        finite = rule if rule.startswith("must be in") or rule == "must be finite" else f"{rule} and finite"
        raise fail(key, value, finite)
    if (above is not None and not value > above) or (minimum is not None and value < minimum):
        raise fail(key, value, rule)
    if (maximum is not None and value > maximum) or (below is not None and not value < below):
        raise fail(key, value, rule)
    return float(value)


def check_fraction(key: str, value: object) -> float:
    """A number in ``[0, 1]``."""
    return check_real(key, value, minimum=0.0, maximum=1.0)


def check_bool(key: str, value: object) -> bool:
    """``True`` or ``False`` exactly."""
    if not isinstance(value, bool):
        raise fail(key, value, "must be true or false")
    return value


def check_choice(key: str, value: Any, choices: Collection[Any]) -> Any:
    """One of ``choices``."""
    if isinstance(value, bool) or value not in choices:
        raise fail(key, value, f"must be one of {list(choices)}")
    return value


def check_text(key: str, value: object) -> str:
    """A string (a path, a name)."""
    if not isinstance(value, str):
        raise fail(key, value, "must be a string")
    return value


def check_noise_multiplier(key: str, value: object) -> float:
    """0 (no noise: audits only) or a noise multiplier in ``[0.01, 1e6]``.

    Outside that range the accountants break down numerically: below 0.01 an
    epsilon is in the thousands and divisions underflow, and Opacus caps its
    own search at 1e6.
    """
    noise_multiplier = check_real(key, value, minimum=0.0, maximum=1e6)
    if 0 < noise_multiplier < 0.01:
        raise fail(key, value, "must be 0 (no noise, not private) or >= 0.01")
    return noise_multiplier


def check_delta(key: str, value: object, *, below: float = 1.0, below_name: str = "") -> float:
    """A delta in ``[1e-12, below)``: the PRV accountant's numerics end near 1e-15.

    ``below_name`` names the upper bound in the message (``1/num_clients``).
    """
    bound = f"{below_name} = {below:g}" if below_name else f"{below:g}"
    rule = f"must be in [1e-12, {bound})"
    if isinstance(value, bool) or not isinstance(value, Real) or not 1e-12 <= value < below:
        raise fail(key, value, rule)
    return float(value)
