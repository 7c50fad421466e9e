"""``bnscope ghost``: normalization-batch-size (ghost batch) analysis."""

from __future__ import annotations

from typing import Annotated

import typer

from ..errors import NotAvailableError
from . import options as o
from .app import app

HELP = (
    "Measure how batch statistics and outputs depend on the normalization batch size (not "
    "available yet).\n\nExample: bnscope ghost runs/ckpt.pt --model model.py:make_model "
    "--data data/val --sizes 2,4,8,16,32"
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
        typer.Option("--sizes", help="Comma-separated ghost batch sizes to analyse."),
    ] = "2,4,8,16,32",
    batch_size: o.BatchSize = None,
    batches: o.Batches = None,
    workers: o.Workers = None,
    input_key: o.InputKey = None,
    image_size: o.ImageSize = None,
    resize: o.Resize = None,
    channels: o.Channels = None,
    mean: o.Mean = None,
    std: o.Std = None,
    device: o.Device = None,
    seed: o.Seed = 0,
    out: o.OutDir = None,
    json_: o.Json = False,
    quiet: o.Quiet = False,
    fail_on: o.FailOn = None,
    debug: o.Debug = False,
) -> None:
    raise NotAvailableError(
        "bnscope ghost is not available in this version (it builds on the Precise BN engine)",
        "use bnscope inspect for a static report meanwhile",
    )
