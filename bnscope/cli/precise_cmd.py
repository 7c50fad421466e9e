"""``bnscope precise``: Precise BN (exact population statistics of a fixed model)."""

from __future__ import annotations

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
    "Recompute every BN layer's statistics exactly on --data (Precise BN) and write "
    "CKPT.precise.pt: same structure as the input, only BN buffers changed.\n\n"
    "Statistics are pooled over every element of every batch in float64, so they do not depend "
    "on the batch split. --eval-data evaluates before and after.\n\n"
    "--freeze writes CKPT.frozen.pt for fine-tuning with frozen BN (Wu & Johnson 2021): the "
    "exact statistics, each BN layer in the layout of torchvision's FrozenBatchNorm2d.\n\n"
    "Under torchrun each rank reads its share of --data and the ranks pool exact statistics; "
    "rank 0 writes the checkpoint.\n\n"
    "Example: bnscope precise runs/ckpt.pt --model model.py:make_model --data data/train "
    "--batches 100 --eval-data data/val"
)


@app.command("precise", help=HELP, cls=BnscopeCommand)
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
    include_frozen: o.IncludeFrozen = False,
    seed: o.Seed = 0,
    output: o.Output = None,
    freeze: o.Freeze = False,
    force: o.Force = False,
    report_dir: o.ReportDir = None,
    out: o.OutAlias = None,
    json_: o.Json = False,
    quiet: o.Quiet = False,
    fail_on: o.FailOn = None,
    debug: o.Debug = False,
) -> None:
    ui = Ui(json=json_, quiet=quiet)
    report_dir = report_folder(ui, report_dir, out, force=force, output=output)
    level = check_fail_on(fail_on)
    flags = JobFlags(
        key=key, trust=trust_checkpoint, model=model, model_kwargs=model_kwargs, data=data,
        eval_data=eval_data, batch_size=batch_size, workers=workers, input_key=input_key,
        call=call, image_size=image_size, resize=resize, channels=channels, mean=mean, std=std,
        seed=seed, drop_last=drop_last, skip_unreadable=skip_unreadable, device=device, amp=amp,
        channels_last=channels_last,
    )  # fmt: skip
    job = open_job(ui, project_config(), checkpoint, flags)
    with progress_bar(ui, "collecting statistics", batches) as progress:
        result = job.precise(
            batches, output=output, force=force, include_frozen=include_frozen, freeze=freeze,
            progress=progress,
        )  # fmt: skip
    if begin_output():  # rank 0 writes and shows, once every rank got here
        result.save()
        emit_report(ui, result.report, report_dir, force=force)
    finish(exit_code_for(result.report, level))
