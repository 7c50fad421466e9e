"""``bnscope inspect``: static report from a checkpoint; with the model and data, the dynamic
report (EMA staleness, train/test consistency, layer usage)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from ..errors import UsageError
from ..io.config import ProjectConfig
from ..records import Report
from . import options as o
from .app import app
from .inputs import (
    DataFlags,
    ModelFlags,
    RunFlags,
    build_model_for,
    open_checkpoint,
    prepare_run,
    resolve_run_flags,
)
from .runtime import (
    Ui,
    begin_output,
    check_fail_on,
    emit_report,
    exit_code_for,
    finish,
    merged,
    progress_bar,
    project_config,
    require_checkpoint,
)

HELP = (
    "Report every BN layer of a checkpoint and what is wrong with its statistics.\n\nWith "
    "the checkpoint alone (no model code): running-stat ranges, EMA warm-up, tiny "
    "variances, dead channels, never-updated layers, non-finite values. With --model, "
    "momentum and eps come from the model.\n\nWith --model and --data (the training data; "
    "also from bnscope.toml): the dynamic report. Per layer, how far the running statistics "
    "are from this model's population statistics and whether that is beyond the EMA's own "
    "noise (stale) or not (noisy); outputs with batch, running and precise statistics on the "
    "same batches (the train/test gap); layers never called or called twice. --out writes "
    "report.json, figures and a self-contained report.html.\n\nExamples: bnscope inspect "
    "runs/ckpt.pt --json; bnscope inspect runs/ckpt.pt --model model.py:make_model --data "
    "data/train --batches 50 --out report/"
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
    static: Annotated[
        bool,
        typer.Option(
            "--static",
            help="Only the static report from the checkpoint's buffers, even when a model and "
            "data are given (or set in bnscope.toml).",
        ),
    ] = False,
    batch_size: o.BatchSize = None,
    batches: o.Batches = None,
    workers: o.Workers = None,
    drop_last: o.DropLast = None,
    input_key: o.InputKey = None,
    call: o.CallSpec = None,
    image_size: o.ImageSize = None,
    resize: o.Resize = None,
    channels: o.Channels = None,
    mean: o.Mean = None,
    std: o.Std = None,
    device: o.Device = None,
    amp: o.Amp = None,
    channels_last: o.ChannelsLast = False,
    seed: o.Seed = 0,
    out: o.OutDir = None,
    json_: o.Json = False,
    quiet: o.Quiet = False,
    fail_on: o.FailOn = None,
    debug: o.Debug = False,
) -> None:
    ui = Ui(json=json_, quiet=quiet)
    from ..io.outputs import check_out_dir

    check_out_dir(out)  # before anything runs
    level = check_fail_on(fail_on)
    config = project_config()
    resolve_run_flags(RunFlags(device, amp, channels_last), config)  # also on the static path
    path = require_checkpoint(checkpoint, config)
    if eval_data is not None:
        raise UsageError(
            "inspect compares statistics on --data (the training data); it takes no --eval-data",
            "use --data, or bnscope precise --eval-data to evaluate before/after",
        )
    source = ModelFlags(key, trust_checkpoint, model, model_kwargs)
    data_spec = None if static else merged(data, config, "data")
    report = None
    if data_spec is not None:
        flags = DataFlags(
            batch_size, workers, input_key, image_size, resize, channels, mean, std, seed
        )
        flags.drop_last = drop_last
        flags.call = call
        report = run_dynamic(
            ui, config, path, source=source, data_spec=data_spec, flags=flags, batches=batches,
            run_flags=RunFlags(device, amp, channels_last),
        )  # fmt: skip
    if report is not None:
        if begin_output():  # under torchrun: rank 0, once every rank is done
            render_dynamic(ui, report, out)
        finish(exit_code_for(report, level))
        return
    report = static_report_for(path, source, config, ui)
    if begin_output():
        render_static(ui, report, out)
    if data is not None and not static:  # no model code for the dynamic report asked for
        raise UsageError(
            "--data needs --model for a state-dict checkpoint: the dynamic report runs "
            "the model; the static report above comes from the buffers alone",
            "pass --model pkg.module:factory or file.py:factory (or drop --data)",
        )
    finish(exit_code_for(report, level))


def run_dynamic(
    ui: Ui,
    config: ProjectConfig,
    path: Path,
    *,
    source: ModelFlags,
    data_spec: str,
    flags: DataFlags,
    batches: int | None,
    run_flags: RunFlags,
) -> Report | None:
    """Load, then the dynamic report; None without model code (the caller falls back to the
    static report)."""
    from ..ops.inspect import inspect

    run = prepare_run(
        "inspect", config, path, source=source,
        data_spec=data_spec, flags=flags, run_flags=run_flags, ui=ui, require_model=False,
    )  # fmt: skip
    if run is None:
        return None
    source = run.source
    ui.info(f"dynamic inspection on {source.description} ({run.describe()})")
    total = None if batches is None else 2 * batches
    with progress_bar(ui, "inspecting", total) as progress:
        result = inspect(
            run.model, source, batches, **run.engine(), progress=progress
        )
    extra: dict[str, Any] = {**run.base_extra(config), **result.extra}
    return Report("inspect", str(path), result.layers, result.findings, extra, result.arrays)


def static_report_for(
    path: Path, source: ModelFlags, config: ProjectConfig, ui: Ui | None = None
) -> Report:
    """Load the checkpoint (and the model when given) and build the static report.

    A checkpoint holding several networks (a network and its EMA copy): the report is on
    the one the model fits, without a model on the raw network; the report's ``networks``
    lists them all (``used`` marks the one reported on), and ``ui`` warns about an EMA copy
    not reported on, with the ``--key`` that selects it (also ``ema_key`` in the report)."""
    from ..io.checkpoint import common_prefix, strip_prefix
    from ..ops.static import static_inspect

    ckpt = open_checkpoint(path, source.key, source.trust, config)
    net, prefix, spec = build_model_for(ckpt, source.model, source.model_kwargs, config, ui)
    extra: dict[str, Any] = {
        "format": ckpt.format,
        "key": ckpt.key,
        "prefix": prefix,
        "model": spec,
        "project_file": str(config.path) if config.path else None,
    }
    fix = _recompute_fix(str(path), spec)
    if net is not None:
        extra.update(ckpt.network_info(prefix))
        return static_inspect(net, checkpoint=str(path), recompute_fix=fix, extra=extra)
    state = ckpt.state_dict
    chosen = ckpt.default_network()  # several networks: the raw one
    base = chosen.prefix if chosen is not None else ""
    if chosen is not None:
        state = ckpt.network_state(chosen)
    prefix = common_prefix(state.keys())
    extra["prefix"] = base + prefix
    extra.update(ckpt.network_info(base + prefix))
    notice = ckpt.ema_notice(base + prefix)
    if ui is not None and notice:
        ui.warn(notice)
    state = strip_prefix(state, prefix) if prefix else state
    return static_inspect(state, checkpoint=str(path), recompute_fix=fix, extra=extra)


def _recompute_fix(path: str, spec: str | None) -> str:
    model = spec if spec and not spec.startswith("(") else "SPEC"
    return f"recompute the statistics: bnscope precise {path} --model {model} --data TRAIN_DATA"


def render_static(ui: Ui, report: Any, out: str | None) -> None:
    def figures() -> dict[str, Any]:
        from ..ops.static import TINY_GAIN, TINY_VAR_FACTOR
        from ..render.figures import static_ranges_figure

        if not report.layers:
            return {}
        eps = report.layers[0].eps
        return {
            "running_stats": static_ranges_figure(
                report.layers, tiny_var=TINY_VAR_FACTOR * eps, tiny_gain=TINY_GAIN
            )
        }

    def table() -> Any:
        from ..render.tables import static_report

        return static_report(report)

    emit_report(ui, report, out, table, figures)


def dynamic_figures(report: Report) -> dict[str, tuple[str, Any]]:
    """The dynamic report's figures: name -> (caption, Figure)."""
    from ..ops.inspect import STALE_Z
    from ..render.figures import batch_means_figure, consistency_figure, staleness_figure

    figures: dict[str, tuple[str, Any]] = {}
    if report.layers:
        figures["staleness"] = (
            "Running vs population statistics by depth: d_mu, d_var and the gap in units of "
            "EMA noise (stale layers shaded).",
            staleness_figure(report.layers, STALE_Z),
        )
    ranked = sorted(
        (r for r in report.layers if r.name in report.arrays and r.d_mu_max is not None),
        key=lambda r: r.d_mu_max,
        reverse=True,
    )
    if ranked:
        worst = ranked[0].name
        figures["batch_means"] = (
            f"Batch means of the most stale channels of {worst}, with the population mean and "
            "the running mean (EMA).",
            batch_means_figure(worst, report.arrays[worst]),
        )
    figures["train_test"] = (
        "The same batches with running, precise and batch statistics.",
        consistency_figure(report.extra["consistency"]),
    )
    return figures


def render_dynamic(ui: Ui, report: Report, out: str | None) -> None:
    captions: dict[str, str] = {}

    def figures() -> dict[str, Any]:
        made = dynamic_figures(report)
        captions.update({name: caption for name, (caption, _) in made.items()})
        return {name: fig for name, (_, fig) in made.items()}

    def texts(figs: dict[str, Any]) -> dict[str, str]:
        from ..render.html import figure_png, inspect_html

        pngs = {name: (captions[name], figure_png(fig)) for name, fig in figs.items()}
        return {"report.html": inspect_html(report, pngs)}

    def table() -> Any:
        from ..render.inspect import inspect_report

        return inspect_report(report)

    emit_report(ui, report, out, table, figures, texts)
