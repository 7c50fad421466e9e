"""``bnscope leakage``: information leakage within a batch (batch composition)."""

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
    "Measure how much a sample's train-mode output depends on which samples share its batch: "
    "the same samples in i.i.d. batches and in batches grouped by label or by a group key "
    "(all RoIs of one image, one class per batch), each batch normalized with its own "
    "statistics.\n\n"
    "Each sample's output under a grouping is compared with its output in i.i.d. batches; "
    "two i.i.d. arrangements give the noise floor. A grouping that changes the outputs well "
    "beyond it is a batch-leakage finding: batch statistics carry information between "
    "samples, which a model trained on such batches can exploit and loses in eval mode.\n\n"
    "Example: bnscope leakage runs/ckpt.pt --model model.py:make_model --data data/train "
    "--group-by label,image_id"
)


@app.command("leakage", help=HELP, cls=BnscopeCommand)
def leakage_command(
    checkpoint: o.Checkpoint = None,
    key: o.Key = None,
    trust_checkpoint: o.Trust = False,
    model: o.Model = None,
    model_kwargs: o.ModelKwargs = None,
    data: o.Data = None,
    group_by: Annotated[
        str,
        typer.Option(
            "--group-by",
            metavar="LIST",
            help="Comma-separated groupings to compare with i.i.d. batches: 'label' (the "
            "labels), or the name of a per-sample entry: a key of a data factory's dict "
            "batches, or an entry of a tensor file (torch.save({'x': x, 'y': y, "
            "'image_id': ids}, path)).",
        ),
    ] = "label",
    samples: Annotated[
        int,
        typer.Option(
            "--samples",
            metavar="N",
            help="Samples read from --data and put into batches in every arrangement (held "
            "in memory), cut to whole batches of --batch-size.",
        ),
    ] = 2048,
    batch_size: o.BatchSize = None,
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
    from ..ops.leakage import check_samples, parse_group_by

    ui = Ui(json=json_, quiet=quiet)
    report_dir = report_folder(ui, report_dir, out, force=force)  # before anything runs
    level = check_fail_on(fail_on)
    specs = parse_group_by(group_by)
    check_samples(samples)
    flags = JobFlags(
        key=key, trust=trust_checkpoint, model=model, model_kwargs=model_kwargs, data=data,
        batch_size=batch_size, workers=workers, input_key=input_key, call=call,
        image_size=image_size, resize=resize, channels=channels, mean=mean, std=std, seed=seed,
        drop_last=drop_last, skip_unreadable=skip_unreadable, device=device, amp=amp,
        channels_last=channels_last,
    )  # fmt: skip
    job = open_job(ui, project_config(), checkpoint, flags)
    with progress_bar(ui, "analysing", None) as progress:
        report = job.leakage(specs, samples, progress=progress).report
    if begin_output():  # under torchrun: rank 0, once every rank is done
        emit_report(ui, report, report_dir, force=force)
    finish(exit_code_for(report, level))
