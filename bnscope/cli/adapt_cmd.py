"""``bnscope adapt``: Adaptive BN (population statistics on target-domain data)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Annotated, Any

import typer

from ..errors import UsageError
from ..io.config import ProjectConfig
from ..records import Report
from . import options as o
from .app import app
from .inputs import DataFlags, ModelFlags, RunFlags, bn_updates, prepare_run
from .runtime import (
    Ui,
    begin_output,
    check_fail_on,
    emit_report,
    exit_code_for,
    finish,
    is_main_process,
    progress_bar,
    project_config,
    require_checkpoint,
)

HELP = (
    "Re-estimate BN statistics on unlabeled target-domain --data (Adaptive BN) and write "
    "CKPT.adapted.pt; report where in the network the domain differs.\n\n"
    "--prior N mixes in the source statistics as N pseudo samples (Schneider et al. 2020). "
    "--eval-data (labelled target data) compares source statistics, adapted statistics and "
    "test-time batch statistics.\n\n"
    "Under torchrun each rank reads its share of --data and the ranks pool exact statistics; "
    "rank 0 writes the checkpoint.\n\n"
    "Example: bnscope adapt runs/ckpt.pt --model model.py:make_model --data corrupted/train "
    "--eval-data corrupted/val"
)


@app.command("adapt", help=HELP)
def adapt_command(
    checkpoint: o.Checkpoint = None,
    key: o.Key = None,
    trust_checkpoint: o.Trust = False,
    model: o.Model = None,
    model_kwargs: o.ModelKwargs = None,
    data: o.Data = None,
    eval_data: o.EvalData = None,
    prior: Annotated[
        float,
        typer.Option(
            "--prior",
            help="Pseudo sample count N of the source statistics (lambda = N/(N+n), n = target "
            "samples); 0 = pure target statistics.",
            min=0.0,
        ),
    ] = 0.0,
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
    include_frozen: o.IncludeFrozen = False,
    seed: o.Seed = 0,
    output: o.Output = None,
    force: o.Force = False,
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
    path = require_checkpoint(checkpoint, config)
    flags = DataFlags(batch_size, workers, input_key, image_size, resize, channels, mean, std, seed)
    flags.drop_last = drop_last
    flags.call = call
    report = run_adapt(
        ui, config, path, source=ModelFlags(key, trust_checkpoint, model, model_kwargs),
        data=data, eval_data=eval_data, prior=prior, flags=flags,
        batches=batches, run_flags=RunFlags(device, amp, channels_last), output=output,
        force=force, include_frozen=include_frozen,
    )  # fmt: skip
    if is_main_process():
        render(ui, report, out)
    finish(exit_code_for(report, level))


def run_adapt(
    ui: Ui,
    config: ProjectConfig,
    path: Path,
    *,
    source: ModelFlags,
    data: str | None,
    eval_data: str | None,
    prior: float,
    flags: DataFlags,
    batches: int | None,
    run_flags: RunFlags,
    output: str | None,
    force: bool,
    include_frozen: bool = False,
) -> Report:
    """Everything ``bnscope adapt`` does before rendering. ``--data`` is taken literally (the
    project file's ``data`` is the *source* training data, not the target)."""
    if data is None:
        raise UsageError("adapt needs --data (unlabeled target-domain data)", "pass --data SPEC")
    if prior < 0:
        raise UsageError(f"--prior must be >= 0, got {prior}", "e.g. --prior 16")
    run = prepare_run(
        "adapt", config, path, source=source,
        data_spec=data, eval_spec=eval_data, flags=flags, run_flags=run_flags, output=output,
        force=force, tag="adapted", ui=ui, include_frozen=include_frozen,
    )  # fmt: skip

    from ..engine.distributed import local_batchnorm
    from ..io.checkpoint import save_checkpoint
    from ..ops.adapt import adapt_bn

    original = copy.deepcopy(run.model) if run.evaluation is not None else None
    ui.info(f"Adaptive BN on {run.source.description} (prior {prior:g}, {run.describe()})")
    with progress_bar(ui, "collecting target statistics", batches) as progress:
        result = adapt_bn(
            run.model, run.source, prior, batches, **run.engine(),
            include_frozen=include_frozen,
            progress=progress,
        )  # fmt: skip
    extra: dict[str, Any] = {**run.base_extra(config), **result.extra}
    if run.evaluation is not None:
        from ..engine.evaluate import evaluate_models

        ui.info(f"evaluating on {run.evaluation.description}")
        models = {"source": original, "adapted": run.model, "batch_stats": copy.deepcopy(original)}
        with local_batchnorm(*models.values()):
            ev = evaluate_models(
                models,
                run.evaluation,
                modes={"batch_stats": "batch"},
                **run.engine(),
            )
        extra["metrics"] = {"data": run.evaluation.description, **ev.to_dict()}
        if not ev.has_labels:
            ui.warn(
                f"{run.evaluation.description} has no usable labels: reporting agreement with "
                "the source model instead of accuracy"
            )

    updates = bn_updates(run.model, result.layers, run.prefix)
    extra["output"] = str(run.out_path)
    if begin_output():  # rank 0 writes, once every rank got here
        extra["output"] = str(save_checkpoint(run.ckpt, updates, run.out_path, force=force))
    return Report("adapt", str(path), result.layers, result.findings, extra, result.arrays)


def render(ui: Ui, report: Report, out: str | None) -> None:
    def figures() -> dict[str, Any]:
        from ..render.figures import adapt_metrics_figure, shift_figure

        figs: dict[str, Any] = {}
        if report.layers:
            figs["domain_shift"] = shift_figure(report.layers)
        if report.extra.get("metrics"):
            figs["adapt_metrics"] = adapt_metrics_figure(report.extra["metrics"])
        return figs

    def table() -> Any:
        from ..render.tables import adapt_report

        return adapt_report(report)

    emit_report(ui, report, out, table, figures)
