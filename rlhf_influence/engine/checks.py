"""Range checks of user-given numbers, worded once for the recipe's flags and the CLI's arguments."""

from __future__ import annotations

import math


def whole_number_problem(value, low: int) -> str | None:
    """Why ``value`` is not a whole number >= ``low`` (for a one-line error), or None."""
    if isinstance(value, int) and value >= low:
        return None
    return f"must be a whole number >= {low}, got {value!r}"


def finite_number_problem(
    value: float, low: float, high: float = math.inf, low_included: bool = True
) -> str | None:
    """Why ``value`` is not a finite number from ``low`` (included or not) to ``high``, or None."""
    inside = (value >= low if low_included else value > low) and value <= high
    if math.isfinite(value) and inside:
        return None
    bound = f"{'>=' if low_included else '>'} {low:g}" + ("" if high == math.inf else f" and <= {high:g}")
    return f"must be a finite number {bound}, got {value!r}"
