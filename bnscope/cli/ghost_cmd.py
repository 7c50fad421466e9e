"""``bnscope ghost``: normalization-batch-size (ghost batch) analysis."""

from __future__ import annotations

from typing import Annotated

import typer

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
    "Measure how batch statistics and the model's outputs depend on the normalization batch "
    "size (NBS): every batch is split into chunks of g samples, each normalized with its own "
    "statistics, and compared with population statistics.\n\n"
    "Reports per size the noise of chunk statistics (with the i.i.d. expectation), the "
    "effective sample size, and agreement/KL/accuracy against population statistics (the NBS "
    "curve). Built-in data specs are read shuffled; a factory's batches are used as they come, "
    "so non-i.i.d. batches of your own loader show up as a low effective size.\n\n"
    "Example: bnscope ghost runs/ckpt.pt --model model.py:make_model --data data/val "
    "--sizes 2,4,8,16,32"
)


@app.command("ghost", help=HELP, cls=BnscopeCommand)
def ghost_command(
    checkpoint: o.Checkpoint = None,
    key: o.Key = None,
    trust_checkpoint: o.Trust = False,
    model: o.Model = None,
    model_kwargs: o.ModelKwargs = None,
    data: o.Data = None,
    sizes: Annotated[
        str,
        typer.Option(
            "--sizes",
            metavar="LIST",
            help="Comma-separated ghost sizes g (samples per normalization batch, each >= 2). "
            "Sizes above --batch-size are reported as skipped.",
        ),
    ] = "2,4,8,16,32",
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
    from ..ops.ghost import parse_sizes

    ui = Ui(json=json_, quiet=quiet)
    report_dir = report_folder(ui, report_dir, out, force=force)  # before anything runs
    level = check_fail_on(fail_on)
    wanted = parse_sizes(sizes)
    flags = JobFlags(
        key=key, trust=trust_checkpoint, model=model, model_kwargs=model_kwargs, data=data,
        batch_size=batch_size, workers=workers, input_key=input_key, call=call,
        image_size=image_size, resize=resize, channels=channels, mean=mean, std=std, seed=seed,
        drop_last=drop_last, skip_unreadable=skip_unreadable, device=device, amp=amp,
        channels_last=channels_last,
    )  # fmt: skip
    job = open_job(ui, project_config(), checkpoint, flags)
    total = None if batches is None else 2 * batches
    with progress_bar(ui, "analysing", total) as progress:
        report = job.ghost(wanted, batches, progress=progress).report
    if begin_output():  # under torchrun: rank 0, once every rank is done
        emit_report(ui, report, report_dir, force=force)
    finish(exit_code_for(report, level))
