"""Option declarations shared by the commands (typer ``Annotated`` aliases).

Defaults are ``None`` where the project file may supply a value, so that flags can override it.
Every option that takes a value names it with a metavar (``PATH``, ``SPEC``, ``N``, ``DIR``);
switches show none (:class:`bnscope.cli.app.BnscopeCommand`).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Annotated

import typer

#: library parameter -> its flag: library messages write ``name=value``, the CLI shows the flag
FLAGS: dict[str, str] = {
    "batches": "--batches",
    "batch_size": "--batch-size",
    "workers": "--workers",
    "data": "--data",
    "eval_data": "--eval-data",
    "input_key": "--input-key",
    "call": "--call",
    "model": "--model",
    "model_kwargs": "--model-kwargs",
    "key": "--key",
    "trust": "--trust-checkpoint",
    "force": "--force",
    "report_dir": "--report-dir",
    "output": "-o",
    "prior": "--prior",
    "only": "--only",
    "first_layers": "--first-layers",
    "online_prior": "--online-prior",
    "online_priors": "--online-priors",
    "target": "--data",
    "domains": "--domain",
    "split": "--split",
    "sizes": "--sizes",
    "group_by": "--group-by",
    "samples": "--samples",
    "device": "--device",
    "amp": "--amp",
    "channels_last": "--channels-last",
    "include_frozen": "--include-frozen",
    "freeze": "--freeze",
    "drop_last": "--drop-last",
    "skip_unreadable": "--skip-unreadable",
    "image_size": "--image-size",
    "resize": "--resize",
    "channels": "--channels",
    "mean": "--mean",
    "std": "--std",
    "seed": "--seed",
    "severity": "--severity",
    "corruption": "--corruption",
}
_NAMES = "|".join(sorted(FLAGS, key=len, reverse=True))
_PARAM = re.compile(r"(?<![\w.-])(" + _NAMES + r")=([^\s,;)]*)")


def as_flags(text: str) -> str:
    """A library message with its ``name=value`` parameters spelled as command-line flags:
    ``batches=100`` -> ``--batches 100``, ``force=True`` -> ``--force``, ``drop_last=False``
    -> ``--no-drop-last``, ``key=`` -> ``--key``, ``data=:`` -> ``--data:``."""

    def flag(match: re.Match[str]) -> str:
        name, value = match.group(1), match.group(2)
        option = FLAGS[name]
        if value == "True" or value == "":
            return option
        if value == ":":  # "data=: ..." leads a message about that option
            return f"{option}:"
        if value == "False":
            return "--no-" + option[2:]
        return f"{option} {value}"

    return _PARAM.sub(flag, text)

def complete_from(*values: str) -> Callable[[str], list[str]]:
    """Shell completion of an option that takes one of ``values``."""

    def complete(incomplete: str) -> list[str]:
        return [value for value in values if value.startswith(incomplete)]

    return complete


P_INPUT = "Inputs"
P_DATA = "Data"
P_OUT = "Output"
P_RUN = "Run"

Checkpoint = Annotated[
    str | None,
    typer.Argument(
        metavar="CKPT",
        help="Checkpoint file (.pt/.pth/.ckpt, .safetensors, TorchScript); "
        "default: 'checkpoint' from the project file (bnscope.toml or pyproject.toml).",
        show_default=False,
    ),
]
Key = Annotated[
    str | None,
    typer.Option(
        "--key",
        metavar="KEY",
        help="Entry of the checkpoint dict that holds the state dict "
        "(default: found automatically: an EMA/SWA copy first, state_dict_ema, model_ema, "
        "ema_state_dict, ema; then state_dict, model, model_state_dict, net, module). "
        "PATH:PREFIX selects the entries under a key prefix of it, e.g. one of several "
        "networks: state_dict:ema_model.module (same as state_dict.ema_model.module); "
        "PATH: the entries under no EMA prefix (the raw network).",
        rich_help_panel=P_INPUT,
    ),
]
Trust = Annotated[
    bool,
    typer.Option(
        "--trust-checkpoint",
        help="Allow loading pickled Python objects (a whole "
        "nn.Module saved with torch.save(model)). This executes code from the file: "
        "only for files you trust.",
        rich_help_panel=P_INPUT,
    ),
]
Model = Annotated[
    str | None,
    typer.Option(
        "--model",
        metavar="SPEC",
        help="Model factory: pkg.module:factory or path/to/file.py:factory, or a model of "
        "torchvision or timm by name: torchvision:resnet50, timm:resnet50.",
        rich_help_panel=P_INPUT,
    ),
]
ModelKwargs = Annotated[
    str | None,
    typer.Option(
        "--model-kwargs",
        metavar="JSON",
        help="JSON object of keyword arguments for the model factory, e.g. "
        "'{\"num_classes\": 10}'.",
        rich_help_panel=P_INPUT,
    ),
]
Data = Annotated[
    str | None,
    typer.Option(
        "--data",
        metavar="SPEC",
        help="Data: image folder, tensor file/folder (.pt .npy .npz), or "
        "pkg.module:factory / file.py:factory returning batches.",
        rich_help_panel=P_DATA,
    ),
]
EvalData = Annotated[
    str | None,
    typer.Option(
        "--eval-data",
        metavar="SPEC",
        help="Data to evaluate on before and after (same forms as --data).",
        rich_help_panel=P_DATA,
    ),
]
BatchSize = Annotated[
    int | None,
    typer.Option(
        "--batch-size",
        metavar="N",
        help="Batch size for built-in data specs (default 32).",
        min=1,
        rich_help_panel=P_DATA,
    ),
]
Batches = Annotated[
    int | None,
    typer.Option(
        "--batches",
        metavar="N",
        help="Number of batches to use (default: all of the data); per rank under torchrun, "
        "where each rank reads its own share of --data.",
        min=1,
        rich_help_panel=P_DATA,
    ),
]
DropLast = Annotated[
    bool | None,
    typer.Option(
        "--drop-last/--no-drop-last",
        help="Image folders and tensor files: leave out an incomplete last batch (per rank "
        "under torchrun) and report the samples left out. Without it (or with --no-drop-last, "
        "which overrides drop_last in the project file) only a last batch of 1 sample is left "
        "out: BatchNorm cannot normalize a single sample.",
        rich_help_panel=P_DATA,
        show_default=False,
    ),
]
SkipUnreadable = Annotated[
    bool | None,
    typer.Option(
        "--skip-unreadable/--no-skip-unreadable",
        help="Image folders: leave out images that cannot be decoded (damaged, truncated, not "
        "an image) and name them in one warning. Without it (or with --no-skip-unreadable, "
        "which overrides skip_unreadable in the project file) the first such image stops the "
        "run with an error naming it, before anything is written.",
        rich_help_panel=P_DATA,
        show_default=False,
    ),
]
Workers = Annotated[
    int | None,
    typer.Option(
        "--workers",
        metavar="N",
        help="DataLoader worker processes (default 0: load in-process).",
        min=0,
        rich_help_panel=P_DATA,
    ),
]
CallSpec = Annotated[
    str | None,
    typer.Option(
        "--call",
        metavar="SPEC",
        help="How the model runs on a batch: pkg.module:fn or file.py:fn, a function "
        "fn(model, batch) returning the model's output (several inputs, unusual batches). "
        "Default: the batch's inputs in the order of the model's forward.",
        rich_help_panel=P_DATA,
    ),
]
IncludeFrozen = Annotated[
    bool,
    typer.Option(
        "--include-frozen",
        help="Also re-estimate frozen BN layers (FrozenBatchNorm2d): they normalize with batch "
        "statistics during collection, like BatchNorm in training. Without it they are "
        "measured and kept.",
        rich_help_panel=P_RUN,
    ),
]
Freeze = Annotated[
    bool,
    typer.Option(
        "--freeze",
        help="Write the checkpoint for a model with frozen BN layers (FrozenBatchNorm2d, "
        "bnscope.nn.freeze_bn): each BN layer's entries become weight, bias, running_mean, "
        "running_var (num_batches_tracked dropped; affine=False layers get weight 1, bias 0). "
        "Default output CKPT.frozen.pt.",
        rich_help_panel=P_OUT,
    ),
]
InputKey = Annotated[
    str | None,
    typer.Option(
        "--input-key",
        metavar="KEY",
        help="Key of the model input when batches are dicts.",
        rich_help_panel=P_DATA,
    ),
]
ImageSize = Annotated[
    int | None,
    typer.Option(
        "--image-size",
        metavar="N",
        help="Image folders: center-crop size (after resizing the "
        "shorter side). Default: keep the images' own size.",
        min=1,
        rich_help_panel=P_DATA,
    ),
]
Resize = Annotated[
    int | None,
    typer.Option(
        "--resize",
        metavar="N",
        help="Image folders: shorter side before the crop (default: image size * 8/7).",
        min=1,
        rich_help_panel=P_DATA,
    ),
]
Channels = Annotated[
    int | None,
    typer.Option(
        "--channels",
        metavar="N",
        help="Image folders: 3 (RGB, default) or 1 (grayscale).",
        min=1,
        max=3,
        rich_help_panel=P_DATA,
    ),
]
Mean = Annotated[
    str | None,
    typer.Option(
        "--mean",
        metavar="LIST",
        help="Image folders: per-channel mean to subtract, comma-separated "
        "(default ImageNet 0.485,0.456,0.406).",
        rich_help_panel=P_DATA,
    ),
]
Std = Annotated[
    str | None,
    typer.Option(
        "--std",
        metavar="LIST",
        help="Image folders: per-channel std to divide by, comma-separated "
        "(default ImageNet 0.229,0.224,0.225).",
        rich_help_panel=P_DATA,
    ),
]
Device = Annotated[
    str | None,
    typer.Option(
        "--device",
        metavar="DEVICE",
        help="auto, cpu, cuda or cuda:N (default auto).",
        rich_help_panel=P_RUN,
        autocompletion=complete_from("auto", "cpu", "cuda"),
    ),
]
Amp = Annotated[
    str | None,
    typer.Option(
        "--amp",
        metavar="bf16|fp16",
        autocompletion=complete_from("bf16", "fp16"),
        help="Run every forward bnscope makes (collection and evaluation) under autocast: "
        "bf16 or fp16. Statistics stay exact for the tensors that reach the BN layers.",
        rich_help_panel=P_RUN,
        show_default=False,
    ),
]
ChannelsLast = Annotated[
    bool,
    typer.Option(
        "--channels-last",
        help="Run the model and its 4-D/5-D inputs in channels-last memory format.",
        rich_help_panel=P_RUN,
    ),
]
Seed = Annotated[
    int,
    typer.Option(
        "--seed", metavar="N", help="Random seed (data order, sampling).", rich_help_panel=P_RUN
    ),
]
Output = Annotated[
    str | None,
    typer.Option(
        "-o",
        "--output",
        metavar="PATH",
        help="Path of the checkpoint to write (default: next to the "
        "input, with a tag before the suffix). Never the input itself. The report folder is "
        "--report-dir.",
        rich_help_panel=P_OUT,
    ),
]
Force = Annotated[
    bool,
    typer.Option(
        "--force",
        help="Overwrite existing outputs: the checkpoint file, and an earlier report in "
        "--report-dir.",
        rich_help_panel=P_OUT,
    ),
]
ReportForce = Annotated[
    bool,
    typer.Option(
        "--force",
        help="Replace an earlier report in --report-dir (its files are removed).",
        rich_help_panel=P_OUT,
    ),
]
ReportDir = Annotated[
    str | None,
    typer.Option(
        "--report-dir",
        metavar="DIR",
        help="Folder to write the report into: report.json and the figures (PNG). It holds one "
        "report: a folder with an earlier report is refused without --force.",
        rich_help_panel=P_OUT,
    ),
]
#: the old spelling of --report-dir, easy to mistake for -o/--output: hidden, and it warns
OutAlias = Annotated[
    str | None,
    typer.Option(
        "--out",
        metavar="DIR",
        help="Deprecated spelling of --report-dir.",
        hidden=True,
        rich_help_panel=P_OUT,
    ),
]
Json = Annotated[
    bool,
    typer.Option(
        "--json",
        help="Print exactly one JSON document on stdout instead of tables.",
        rich_help_panel=P_OUT,
    ),
]
Quiet = Annotated[
    bool,
    typer.Option(
        "--quiet", "-q", help="No progress or status lines on stderr.", rich_help_panel=P_OUT
    ),
]
FailOn = Annotated[
    str | None,
    typer.Option(
        "--fail-on",
        metavar="LEVEL",
        help="Exit 1 when a finding is at or above this severity: info, warning or error.",
        autocompletion=complete_from("info", "warning", "error"),
        rich_help_panel=P_OUT,
    ),
]
Debug = Annotated[
    bool, typer.Option("--debug", help="Show the traceback of an error.", rich_help_panel=P_RUN)
]
