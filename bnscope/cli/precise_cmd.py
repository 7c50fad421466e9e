"""``bnscope precise``: Precise BN (exact population statistics of a fixed model)."""

from __future__ import annotations

from ..errors import NotAvailableError
from . import options as o
from .app import app

HELP = (
    "Recompute every BN layer's statistics exactly on --data and write CKPT.precise.pt "
    "(not available yet).\n\nExample: bnscope precise runs/ckpt.pt --model "
    "model.py:make_model --data data/train --batches 100"
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
        "bnscope precise is not available in this version (the Precise BN engine is next)",
        "use bnscope inspect for a static report meanwhile",
    )
