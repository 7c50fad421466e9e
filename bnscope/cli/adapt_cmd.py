"""``bnscope adapt``: Adaptive BN (population statistics on target-domain data)."""

from __future__ import annotations

from typing import Annotated

import typer

from ..errors import NotAvailableError
from . import options as o
from .app import app

HELP = (
    "Re-estimate BN statistics on target-domain --data and write CKPT.adapted.pt (not "
    "available yet).\n\nExample: bnscope adapt runs/ckpt.pt --model model.py:make_model "
    "--data corrupted/"
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
            help="Pseudo sample count N of the source statistics "
            "(lambda = N/(N+n)); 0 = pure target statistics.",
            min=0.0,
        ),
    ] = 0.0,
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
    output: o.Output = None,
    force: o.Force = False,
    out: o.OutDir = None,
    json_: o.Json = False,
    quiet: o.Quiet = False,
    fail_on: o.FailOn = None,
    debug: o.Debug = False,
) -> None:
    raise NotAvailableError(
        "bnscope adapt is not available in this version (it builds on the Precise BN engine)",
        "use bnscope inspect for a static report meanwhile",
    )
