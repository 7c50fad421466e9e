"""``bnscope inspect``: static report from a checkpoint; with the model and data, the dynamic
report (EMA staleness, train/test consistency, layer usage)."""

from __future__ import annotations

from typing import Annotated

import typer

from ..errors import UsageError
from ..render.reports import is_dynamic
from . import options as o
from .app import BnscopeCommand, app
from .inputs import JobFlags, open_job
from .runtime import (
    Ui,
    begin_output,
    check_fail_on,
    emit_report,
    exit_code_for,
    finish,
    progress_bar,
    project_config,
    report_folder,
)

HELP = (
    "Report every BN layer of a checkpoint and what is wrong with its statistics.\n\nWith "
    "the checkpoint alone (no model code): running-stat ranges, EMA warm-up, tiny "
    "variances, dead channels, never-updated layers, non-finite values. With --model, "
    "momentum and eps come from the model.\n\nWith --model and --data (the training data; "
    "also from bnscope.toml): the dynamic report. Per layer, how far the running statistics "
    "are from this model's population statistics and whether that is beyond the EMA's own "
    "noise (stale) or not (noisy); outputs with batch, running and precise statistics on the "
    "same batches (the train/test gap); layers never called or called twice. --report-dir "
    "writes report.json, figures and a self-contained report.html.\n\nExamples: bnscope inspect "
    "runs/ckpt.pt --json; bnscope inspect runs/ckpt.pt --model model.py:make_model --data "
    "data/train --batches 50 --report-dir report/"
)


@app.command("inspect", help=HELP, cls=BnscopeCommand)
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
    skip_unreadable: o.SkipUnreadable = None,
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
    force: o.ReportForce = False,
    report_dir: o.ReportDir = None,
    out: o.OutAlias = None,
    json_: o.Json = False,
    quiet: o.Quiet = False,
    fail_on: o.FailOn = None,
    debug: o.Debug = False,
) -> None:
    ui = Ui(json=json_, quiet=quiet)
    report_dir = report_folder(ui, report_dir, out, force=force)  # before anything runs
    level = check_fail_on(fail_on)
    if eval_data is not None:
        raise UsageError(
            "inspect compares statistics on --data (the training data); it takes no --eval-data",
            "use --data, or bnscope precise --eval-data to evaluate before/after",
        )
    flags = JobFlags(
        key=key, trust=trust_checkpoint, model=model, model_kwargs=model_kwargs,
        data=None if static else data, batch_size=batch_size, workers=workers,
        input_key=input_key, call=call, image_size=image_size, resize=resize,
        channels=channels, mean=mean, std=std, seed=seed, drop_last=drop_last,
        skip_unreadable=skip_unreadable, device=device, amp=amp, channels_last=channels_last,
    )  # fmt: skip
    # --static: the project file's data does not apply either
    job = open_job(ui, project_config(), checkpoint, flags, literal=("data",) if static else ())
    if job.options.data is None:
        report = job.inspect().report
    else:
        total = None if batches is None else 2 * batches
        with progress_bar(ui, "inspecting", total) as progress:
            report = job.inspect(batches, progress=progress).report
    if begin_output():  # under torchrun: rank 0, once every rank is done
        emit_report(ui, report, report_dir, force=force)
    if data is not None and not static and not is_dynamic(report):
        raise UsageError(  # no model code for the dynamic report asked for
            "--data needs --model for a state-dict checkpoint: the dynamic report runs "
            "the model; the static report above comes from the buffers alone",
            "pass --model pkg.module:factory or file.py:factory (or drop --data)",
        )
    finish(exit_code_for(report, level))
