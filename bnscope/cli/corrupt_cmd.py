"""``bnscope corrupt``: write a corrupted copy of an image folder (CIFAR-10-C corruptions)."""

from __future__ import annotations

import json
import sys
from typing import Annotated

import typer

from ..records import document_header
from . import options as o
from .app import BnscopeCommand, app
from .runtime import Ui, progress_bar

HELP = (
    "Write a corrupted copy of an image folder (layout and class folders kept) with one of the "
    "CIFAR-10-C corruptions of Hendrycks & Dietterich (2019) at severity 1-5: gaussian_noise, "
    "shot_noise, impulse_noise, speckle_noise, contrast, brightness, gaussian_blur, "
    "defocus_blur, pixelate, jpeg_compression. Use it to test Adaptive BN on a shifted domain."
    "\n\nExample: bnscope corrupt data/val corrupted/val --corruption gaussian_noise "
    "--severity 3"
)


def complete_corruption(incomplete: str) -> list[str]:
    """Shell completion of --corruption (imports the corruptions only when asked)."""
    from ..ops.corruptions import CORRUPTIONS

    return [name for name in CORRUPTIONS if name.startswith(incomplete)]


@app.command("corrupt", help=HELP, cls=BnscopeCommand)
def corrupt_command(
    src: Annotated[
        str, typer.Argument(metavar="SRC", help="Image folder to read.", show_default=False)
    ],
    dst: Annotated[
        str, typer.Argument(metavar="DST", help="Folder to create.", show_default=False)
    ],
    corruption: Annotated[
        str,
        typer.Option(
            "--corruption",
            metavar="NAME",
            help="Corruption name (see above).",
            autocompletion=complete_corruption,
        ),
    ] = "gaussian_noise",
    severity: Annotated[
        int, typer.Option("--severity", metavar="N", help="Severity 1 (mild) to 5.")
    ] = 3,
    seed: o.Seed = 0,
    force: Annotated[
        bool, typer.Option("--force", help="Replace DST if it exists and is not empty.")
    ] = False,
    json_: o.Json = False,
    quiet: o.Quiet = False,
    debug: o.Debug = False,
) -> None:
    from ..ops.corruptions import corrupt_folder

    ui = Ui(json=json_, quiet=quiet)
    with progress_bar(ui, f"{corruption} {severity}", None) as progress:
        n = corrupt_folder(src, dst, corruption, severity, seed=seed, force=force,
                           progress=progress)  # fmt: skip
    doc = {
        **document_header("corrupt"),
        "source": src,
        "output": dst,
        "corruption": corruption,
        "severity": severity,
        "seed": seed,
        "images": n,
    }
    if json_:
        sys.stdout.write(json.dumps(doc, indent=2, allow_nan=False) + "\n")
    else:
        ui.out.print(
            f"Wrote {n} images to {dst} ({corruption}, severity {severity}, seed {seed}).",
            markup=False,
        )
