"""How the tables write a metric: `-` when it is missing, ∞ for an infinite one, also as MLflow stores it."""

from __future__ import annotations

import math
import sys


def format_number(value: float | None, fmt: str) -> str:
    """`-` for a missing value; ∞ for an infinite one, also as MLflow stores it (the largest float64)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if abs(value) >= sys.float_info.max:
        return "∞" if value > 0 else "-∞"
    return format(value, fmt)
