"""``bnscope ghost``: normalization-batch-size (ghost batch) analysis."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from ..errors import UsageError
from ..io.config import ProjectConfig
from ..records import Report
from . import options as o
from .app import app
from .inputs import DataFlags, ModelFlags, RunFlags, prepare_run
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


@app.command("ghost", help=HELP)
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
            help="Comma-separated ghost sizes g (samples per normalization batch, each >= 2). "
            "Sizes above --batch-size are reported as skipped.",
        ),
    ] = "2,4,8,16,32",
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
    from ..ops.ghost import parse_sizes

    ui = Ui(json=json_, quiet=quiet)
    from ..io.outputs import check_out_dir

    check_out_dir(out)  # before anything runs
    level = check_fail_on(fail_on)
    wanted = parse_sizes(sizes)
    config = project_config()
    path = require_checkpoint(checkpoint, config)
    flags = DataFlags(batch_size, workers, input_key, image_size, resize, channels, mean, std, seed)
    flags.drop_last = drop_last
    flags.call = call
    report = run_ghost(
        ui, config, path, source=ModelFlags(key, trust_checkpoint, model, model_kwargs),
        data=data, flags=flags, sizes=wanted, batches=batches,
        run_flags=RunFlags(device, amp, channels_last),
    )  # fmt: skip
    if begin_output():  # under torchrun: rank 0, once every rank is done
        render(ui, report, out)
    finish(exit_code_for(report, level))


def run_ghost(
    ui: Ui,
    config: ProjectConfig,
    path: Path,
    *,
    source: ModelFlags,
    data: str | None,
    flags: DataFlags,
    sizes: list[int],
    batches: int | None,
    run_flags: RunFlags,
) -> Report:
    """Everything ``bnscope ghost`` does before rendering: load, collect, analyse."""
    data_spec = merged(data, config, "data")
    if data_spec is None:
        raise UsageError("ghost needs --data (batches to split into ghost batches)",
                         "pass --data SPEC")  # fmt: skip
    from ..ops.ghost import ghost_analysis

    run = prepare_run(
        "ghost", config, path, source=source,
        data_spec=data_spec, flags=flags, run_flags=run_flags, ui=ui,
    )  # fmt: skip
    source = run.source
    ui.info(f"ghost-size analysis on {source.description} ({run.describe()}), sizes {sizes}")
    total = None if batches is None else 2 * batches
    with progress_bar(ui, "analysing", total) as progress:
        result = ghost_analysis(
            run.model, source, sizes, batches, **run.engine(),
            progress=progress,
        )  # fmt: skip
    extra: dict[str, Any] = {**run.base_extra(config), **result.extra}
    return Report("ghost", str(path), result.layers, result.findings, extra, result.arrays)


def render(ui: Ui, report: Report, out: str | None) -> None:
    def figures() -> dict[str, Any]:
        from ..render.figures import ghost_noise_figure, nbs_curve_figure

        return {
            "ghost_noise": ghost_noise_figure(report.layers),
            "nbs_curve": nbs_curve_figure(report.extra["sizes"], report.extra["population"]),
        }

    def table() -> Any:
        from ..render.ghost import ghost_report

        return ghost_report(report)

    emit_report(ui, report, out, table, figures)
