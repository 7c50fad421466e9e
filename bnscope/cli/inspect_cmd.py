"""``bnscope inspect``: static report from a checkpoint (dynamic report: a later version)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..config import ProjectConfig
from ..errors import NotAvailableError, UsageError
from ..records import Report
from . import options as o
from .app import app
from .inputs import build_model_for, open_checkpoint
from .runtime import (
    Ui,
    check_fail_on,
    exit_code_for,
    finish,
    project_config,
    require_checkpoint,
)

HELP = (
    "Report every BN layer of a checkpoint and what is wrong with its statistics.\n\nWith "
    "the checkpoint alone (no model code): running-stat ranges, EMA warm-up, tiny "
    "variances, dead channels, never-updated layers, non-finite values. With --model, "
    "momentum and eps come from the model.\n\nExample: bnscope inspect runs/ckpt.pt --json"
)


@app.command("inspect", help=HELP)
def inspect_command(
    checkpoint: o.Checkpoint = None,
    key: o.Key = None,
    trust_checkpoint: o.Trust = False,
    model: o.Model = None,
    model_kwargs: o.ModelKwargs = None,
    data: o.Data = None,
    eval_data: o.EvalData = None,
    batches: o.Batches = None,
    device: o.Device = None,
    seed: o.Seed = 0,
    out: o.OutDir = None,
    json_: o.Json = False,
    quiet: o.Quiet = False,
    fail_on: o.FailOn = None,
    debug: o.Debug = False,
) -> None:
    ui = Ui(json=json_, quiet=quiet)
    level = check_fail_on(fail_on)
    config = project_config()
    path = require_checkpoint(checkpoint, config)
    if data is not None:
        raise NotAvailableError(
            "dynamic inspection (--data) is not available in this version of bnscope",
            "omit --data for the static report",
        )
    if eval_data is not None:
        raise UsageError("--eval-data needs dynamic inspection (--data)", "omit --eval-data")

    report = static_report_for(path, key, trust_checkpoint, model, model_kwargs, config)
    render_static(ui, report, out)
    finish(exit_code_for(report, level))


def static_report_for(
    path: Path,
    key: str | None,
    trust: bool,
    model: str | None,
    model_kwargs: str | None,
    config: ProjectConfig,
) -> Report:
    """Load the checkpoint (and the model when given) and build the static report."""
    from ..checkpoint import common_prefix, strip_prefix
    from ..static import static_inspect

    ckpt = open_checkpoint(path, key, trust, config)
    net, prefix, spec = build_model_for(ckpt, model, model_kwargs, config)
    extra: dict[str, Any] = {
        "format": ckpt.format,
        "key": ckpt.key,
        "prefix": prefix,
        "model": spec,
        "project_file": str(config.path) if config.path else None,
    }
    fix = _recompute_fix(str(path), spec)
    if net is not None:
        return static_inspect(net, checkpoint=str(path), recompute_fix=fix, extra=extra)
    prefix = common_prefix(ckpt.state_dict.keys())
    extra["prefix"] = prefix
    state = strip_prefix(ckpt.state_dict, prefix) if prefix else ckpt.state_dict
    return static_inspect(state, checkpoint=str(path), recompute_fix=fix, extra=extra)


def _recompute_fix(path: str, spec: str | None) -> str:
    model = spec if spec and not spec.startswith("(") else "SPEC"
    return f"recompute the statistics: bnscope precise {path} --model {model} --data TRAIN_DATA"


def render_static(ui: Ui, report: Any, out: str | None) -> None:
    from ..render.jsonout import report_json

    text = report_json(report)
    written = []
    if out is not None:
        from ..outputs import write_report_dir
        from ..render.figures import static_ranges_figure
        from ..static import DEFAULT_EPS, TINY_GAIN, TINY_VAR_FACTOR

        figures = {}
        if report.layers:
            eps = report.layers[0].eps if report.layers else DEFAULT_EPS
            figures["running_stats"] = static_ranges_figure(
                report.layers, tiny_var=TINY_VAR_FACTOR * eps, tiny_gain=TINY_GAIN
            )
        written = write_report_dir(out, text, figures)
    if ui.json:
        ui.out.file.write(text)
        ui.out.file.flush()
    else:
        from ..render.tables import static_report

        ui.out.print(static_report(report))
    if written:
        ui.info(f"wrote {', '.join(str(p) for p in written)}")
