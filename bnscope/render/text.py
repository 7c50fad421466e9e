"""Formatting shared by tables (plain data in, strings out); the number formats live in
:mod:`bnscope.fmt` and are re-exported here."""

from __future__ import annotations

from typing import Any

from ..fmt import num, pct, percent, span

__all__ = ["momentum_cell", "num", "pct", "percent", "span"]


def momentum_cell(layer: Any) -> str:
    """A layer's momentum for tables: the value, "cum." for a cumulative average
    (``momentum=None``), "-" for a frozen layer (no EMA)."""
    if getattr(layer, "status", None) == "frozen":
        return "-"
    momentum = getattr(layer, "momentum", None)
    return "cum." if momentum is None else num(momentum)
