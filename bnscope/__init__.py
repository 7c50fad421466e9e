"""bnscope: diagnose and fix BatchNorm statistics in PyTorch checkpoints.

Public API (imported lazily so that ``bnscope --help`` does not load torch; type checkers see
the real signatures through the imports under ``TYPE_CHECKING``)::

    import bnscope
    job = bnscope.open("ckpt.pt", model="model.py:make_model", data="data/train")
    job.precise(batches=100).save()                       # ckpt.precise.pt, as bnscope precise
    bnscope.write_report(job.inspect(), "report/")        # report.json, figures, report.html
    rep = bnscope.static_inspect(state_dict)             # no model code needed
    hook = bnscope.PreciseBNHook(model, loader, samples=2048, every_n_epochs=1)  # in a loop
    rep = bnscope.inspect(model, loader, batches=50)      # dynamic report: staleness, gap
    res = bnscope.precise_bn(model, loader, batches=100)  # exact population statistics, in place
    rep = bnscope.adapt_domains(model, {"fog": fog_loader, "snow": snow_loader})  # per domain
    gho = bnscope.ghost_analysis(model, loader, sizes=[2, 4, 8, 16, 32])  # NBS analysis
    lea = bnscope.leakage_analysis(model, loader, group_by="label")  # batch composition
    bnscope.load_checkpoint("ckpt.pt")                    # any supported checkpoint form
    bnscope.schema("precise")                             # the JSON Schema of its documents
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .version import __version__

if TYPE_CHECKING:  # the same names as _API, for type checkers and IDEs
    from .engine.capture import BNCapture
    from .engine.evaluate import compare_models, evaluate_models
    from .engine.stats import MomentAccumulator
    from .errors import BnscopeError, CheckpointError, DataError, ModelError, UsageError
    from .integrations.hook import PreciseBNHook
    from .io.checkpoint import load_checkpoint
    from .io.data import load_data
    from .io.fitting import load_into_model
    from .io.modelspec import build_model
    from .io.saving import save_checkpoint
    from .ops.adapt import adapt_bn
    from .ops.corruptions import corrupt
    from .ops.domains import adapt_domains, domain_state_dict
    from .ops.ghost import ghost_analysis
    from .ops.inspect import inspect
    from .ops.leakage import leakage_analysis
    from .ops.precise import precise_bn
    from .ops.static import static_inspect
    from .records import Finding, Report
    from .render.reports import report_view, write_report
    from .schemas import schema
    from .session import DomainsResult, Job, Options, Result, open

_API = {
    "open": "bnscope.session",
    "Job": "bnscope.session",
    "Options": "bnscope.session",
    "Result": "bnscope.session",
    "DomainsResult": "bnscope.session",
    "write_report": "bnscope.render.reports",
    "report_view": "bnscope.render.reports",
    "static_inspect": "bnscope.ops.static",
    "precise_bn": "bnscope.ops.precise",
    "adapt_bn": "bnscope.ops.adapt",
    "adapt_domains": "bnscope.ops.domains",
    "domain_state_dict": "bnscope.ops.domains",
    "ghost_analysis": "bnscope.ops.ghost",
    "leakage_analysis": "bnscope.ops.leakage",
    "inspect": "bnscope.ops.inspect",
    "evaluate_models": "bnscope.engine.evaluate",
    "corrupt": "bnscope.ops.corruptions",
    "compare_models": "bnscope.engine.evaluate",
    "load_checkpoint": "bnscope.io.checkpoint",
    "save_checkpoint": "bnscope.io.saving",
    "load_into_model": "bnscope.io.fitting",
    "load_data": "bnscope.io.data",
    "build_model": "bnscope.io.modelspec",
    "BNCapture": "bnscope.engine.capture",
    "PreciseBNHook": "bnscope.integrations.hook",
    "MomentAccumulator": "bnscope.engine.stats",
    "Report": "bnscope.records",
    "Finding": "bnscope.records",
    "schema": "bnscope.schemas",
    "BnscopeError": "bnscope.errors",
    "CheckpointError": "bnscope.errors",
    "ModelError": "bnscope.errors",
    "DataError": "bnscope.errors",
    "UsageError": "bnscope.errors",
}

__all__ = [
    "__version__",
    "open",
    "Job",
    "Options",
    "Result",
    "DomainsResult",
    "write_report",
    "report_view",
    "static_inspect",
    "precise_bn",
    "adapt_bn",
    "adapt_domains",
    "domain_state_dict",
    "ghost_analysis",
    "leakage_analysis",
    "inspect",
    "evaluate_models",
    "corrupt",
    "compare_models",
    "load_checkpoint",
    "save_checkpoint",
    "load_into_model",
    "load_data",
    "build_model",
    "BNCapture",
    "PreciseBNHook",
    "MomentAccumulator",
    "Report",
    "Finding",
    "schema",
    "BnscopeError",
    "CheckpointError",
    "ModelError",
    "DataError",
    "UsageError",
]


def __getattr__(name: str) -> Any:
    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'bnscope' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
