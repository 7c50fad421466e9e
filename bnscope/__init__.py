"""bnscope: diagnose and fix BatchNorm statistics in PyTorch checkpoints.

Public API (imported lazily so that ``bnscope --help`` does not load torch)::

    import bnscope
    rep = bnscope.static_inspect(state_dict)             # no model code needed
    rep = bnscope.inspect(model, loader, batches=50)      # dynamic report: staleness, gap
    res = bnscope.precise_bn(model, loader, batches=100)  # exact population statistics, in place
    gho = bnscope.ghost_analysis(model, loader, sizes=[2, 4, 8, 16, 32])  # NBS analysis
    bnscope.load_checkpoint("ckpt.pt")                    # any supported checkpoint form
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_API = {
    "static_inspect": "bnscope.ops.static",
    "precise_bn": "bnscope.ops.precise",
    "adapt_bn": "bnscope.ops.adapt",
    "ghost_analysis": "bnscope.ops.ghost",
    "inspect": "bnscope.ops.inspect",
    "evaluate_models": "bnscope.engine.evaluate",
    "corrupt": "bnscope.ops.corruptions",
    "compare_models": "bnscope.engine.evaluate",
    "load_checkpoint": "bnscope.io.checkpoint",
    "save_checkpoint": "bnscope.io.checkpoint",
    "load_into_model": "bnscope.io.checkpoint",
    "load_data": "bnscope.io.data",
    "build_model": "bnscope.io.modelspec",
    "BNCapture": "bnscope.engine.capture",
    "MomentAccumulator": "bnscope.engine.stats",
    "Report": "bnscope.records",
    "Finding": "bnscope.records",
    "BnscopeError": "bnscope.errors",
    "CheckpointError": "bnscope.errors",
    "ModelError": "bnscope.errors",
    "DataError": "bnscope.errors",
    "UsageError": "bnscope.errors",
}

__all__ = ["__version__", *_API]


def __getattr__(name: str) -> Any:
    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'bnscope' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
