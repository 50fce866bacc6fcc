"""Values read from the trials' JSON files: coercion to numbers (`as_float`, `as_int`) and the
compact text shown for them in tables, plots and progress lines (`fmt_*`)."""

from __future__ import annotations

import json
import math
from typing import Any


def as_float(value: Any) -> float | None:
    """`value` as a float if it is a number (or a numeric string), else None. Booleans are not."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None


def as_int(value: Any) -> int | None:
    """`value` as an int if it is an integral number (or such a numeric string), else None."""
    x = as_float(value)
    if x is None or not math.isfinite(x) or not x.is_integer():
        return None
    return int(x)


def fmt_number(x: Any, digits: int = 4) -> str:
    """A compact rendering: integers as such, large values without exponent, else %.{digits}g."""
    if x is None:
        return ""
    if isinstance(x, int) and not isinstance(x, bool):
        return str(x)
    x = as_float(x)
    if x is None:
        return ""
    if not math.isfinite(x):
        return str(x)
    if 1e4 <= abs(x) < 1e15:
        return f"{x:.0f}"
    return f"{x:.{digits}g}"


def fmt_duration(seconds: Any) -> str:
    """Seconds as '42s', '3m07s' or '2h05m'."""
    x = as_float(seconds)
    if x is None:
        return ""
    if not math.isfinite(x):
        return str(x)
    s = int(round(abs(x)))
    sign = "-" if x < 0 else ""
    if s < 60:
        return f"{sign}{x:.3g}s" if abs(x) < 10 else f"{sign}{s}s"
    if s < 3600:
        return f"{sign}{s // 60}m{s % 60:02d}s"
    return f"{sign}{s // 3600}h{s % 3600 // 60:02d}m"


def fmt_value(value: Any) -> str:
    """An axis value or text for a Markdown cell."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return fmt_number(value) if isinstance(value, int) else f"{value:.4g}"
    return json.dumps(value, default=str)
