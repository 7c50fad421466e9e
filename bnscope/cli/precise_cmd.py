"""``bnscope precise``: Precise BN (exact population statistics of a fixed model)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

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
    merged,
    progress_bar,
    project_config,
    require_checkpoint,
)

HELP = (
    "Recompute every BN layer's statistics exactly on --data (Precise BN) and write "
    "CKPT.precise.pt: same structure as the input, only BN buffers changed.\n\n"
    "Statistics are pooled over every element of every batch in float64, so they do not depend "
    "on the batch split. --eval-data evaluates before and after.\n\n"
    "Under torchrun each rank reads its share of --data and the ranks pool exact statistics; "
    "rank 0 writes the checkpoint.\n\n"
    "Example: bnscope precise runs/ckpt.pt --model model.py:make_model --data data/train "
    "--batches 100 --eval-data data/val"
)


@app.command("precise", help=HELP)
def precise_command(
    checkpoint: o.Checkpoint = None,
    key: o.Key = None,
    trust_checkpoint: o.Trust = False,
    model: o.Model = None,
    model_kwargs: o.ModelKwargs = None,
    data: o.Data = None,
    eval_data: o.EvalData = None,
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
    report = run_precise(
        ui,
        config,
        path,
        source=ModelFlags(key, trust_checkpoint, model, model_kwargs),
        data=data,
        eval_data=eval_data,
        flags=flags,
        batches=batches,
        run_flags=RunFlags(device, amp, channels_last),
        output=output,
        force=force,
        include_frozen=include_frozen,
    )
    if is_main_process():
        render(ui, report, out)
    finish(exit_code_for(report, level))


def run_precise(
    ui: Ui,
    config: ProjectConfig,
    path: Path,
    *,
    source: ModelFlags,
    data: str | None,
    eval_data: str | None,
    flags: DataFlags,
    batches: int | None,
    run_flags: RunFlags,
    output: str | None,
    force: bool,
    include_frozen: bool = False,
) -> Report:
    """Everything ``bnscope precise`` does before rendering: load, collect, evaluate, write."""
    data_spec = merged(data, config, "data")
    if data_spec is None:
        raise UsageError("precise needs --data (the training data)", "pass --data SPEC")
    run = prepare_run(
        "precise", config, path, source=source,
        data_spec=data_spec, eval_spec=merged(eval_data, config, "eval_data"), flags=flags,
        run_flags=run_flags, output=output, force=force, tag="precise", ui=ui,
        include_frozen=include_frozen,
    )  # fmt: skip

    from ..engine.distributed import local_batchnorm
    from ..io.checkpoint import save_checkpoint
    from ..ops.precise import precise_bn

    original = copy.deepcopy(run.model) if run.evaluation is not None else None
    ui.info(f"Precise BN on {run.source.description} ({run.describe()})")
    with progress_bar(ui, "collecting statistics", batches) as progress:
        result = precise_bn(
            run.model, run.source, batches, **run.engine(), progress=progress,
            include_frozen=include_frozen,
        )
    extra: dict[str, Any] = {**run.base_extra(config), **result.extra}
    if run.evaluation is not None:
        from ..engine.evaluate import compare_models

        ui.info(f"evaluating before/after on {run.evaluation.description}")
        with local_batchnorm(original, run.model):
            comparison = compare_models(
                original, run.model, run.evaluation, **run.engine()
            )
        extra["metrics"] = {"data": run.evaluation.description, **comparison.to_dict()}

    updates = bn_updates(run.model, result.layers, run.prefix)
    extra["output"] = str(run.out_path)
    if begin_output():  # rank 0 writes, once every rank got here
        extra["output"] = str(save_checkpoint(run.ckpt, updates, run.out_path, force=force))
    return Report("precise", str(path), result.layers, result.findings, extra, result.arrays)


def render(ui: Ui, report: Any, out: str | None) -> None:
    def figures() -> dict[str, Any]:
        from ..render.figures import change_figure

        return {"precise_change": change_figure(report.layers)} if report.layers else {}

    def table() -> Any:
        from ..render.tables import precise_report

        return precise_report(report)

    emit_report(ui, report, out, table, figures)
