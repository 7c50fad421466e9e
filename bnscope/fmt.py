"""Number formatting for words and tables: plain numbers in, strings out. Used by the finding
catalog and by the renderers."""

from __future__ import annotations

import math


def num(x: float | None, digits: int = 3) -> str:
    """Compact float: 3 significant digits, 'n/a' for None, 'nan'/'inf' spelled out."""
    if x is None:
        return "n/a"
    if isinstance(x, str):
        return x
    if math.isnan(x):
        return "nan"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    if x == 0:
        return "0"
    return f"{x:.{digits}g}"


def span(lo: float | None, hi: float | None) -> str:
    """'lo .. hi', or a single value when both ends agree."""
    if lo is None or hi is None:
        return "n/a"
    a, b = num(lo), num(hi)
    return a if a == b else f"{a} .. {b}"


def percent(x: float | None) -> str:
    if x is None:
        return "n/a"
    if x == 0:
        return "0"
    if x < 0.001:
        return "<0.1%"
    return f"{100 * x:.1f}%"


def pct(x: float | None, digits: int = 1) -> str:
    """A fraction as a percentage with fixed decimals ('96.5%'), 'n/a' for None (accuracy,
    agreement: unlike :func:`percent`, small values are not folded into '<0.1%')."""
    return "n/a" if x is None else f"{100 * x:.{digits}f}%"
