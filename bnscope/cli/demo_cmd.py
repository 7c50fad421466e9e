"""``bnscope demo``: build a small BN model, data and checkpoint, then run bnscope on it."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from . import options as o
from .app import BnscopeCommand, app
from .options import as_flags
from .runtime import Ui

HELP = (
    "Build a small BatchNorm CNN, a labelled synthetic image dataset and a briefly trained "
    "checkpoint in DIR, then run bnscope inspect and bnscope precise on it, make a corrupted copy "
    "of the data and run bnscope adapt (with a test-time prior sweep), run bnscope ghost (the "
    "NBS curve), and show what "
    "to try next. Runs in well under 2 "
    "minutes on 2 CPU cores.\n\n"
    "Example: bnscope demo /tmp/bnscope-demo"
)


@app.command("demo", help=HELP, cls=BnscopeCommand)
def demo_command(
    folder: Annotated[
        str | None,
        typer.Argument(
            metavar="DIR",
            help="Folder to create (default: a new ./bnscope-demo, ./bnscope-demo-2, ...).",
            show_default=False,
        ),
    ] = None,
    force: Annotated[
        bool, typer.Option("--force", help="Reuse DIR even if it is not empty.")
    ] = False,
    seed: o.Seed = 0,
    device: o.Device = None,
    amp: o.Amp = None,
    channels_last: o.ChannelsLast = False,
    json_: o.Json = False,
    quiet: o.Quiet = False,
    debug: o.Debug = False,
) -> None:
    ui = Ui(json=json_, quiet=quiet)
    from ..demo.run import (
        DEMO_CORRUPTION,
        DEMO_GHOST_SIZES,
        DEMO_ONLINE_PRIORS,
        default_folder,
        prepare_folder,
    )
    from ..demo.walkthrough import run_walkthrough
    from ..session import Job, Options

    run = {"device": device, "amp": amp, "channels_last": channels_last}
    Job(None, Options(device=device or "auto", amp=amp)).check_run()  # before any work
    target = Path(folder) if folder else default_folder(Path.cwd())
    prepare_folder(target, force)

    def say(msg: str) -> None:
        if not (quiet or json_):
            ui.line(f"[demo] {msg}")

    done = run_walkthrough(
        target,
        seed=seed,
        run=run,
        say=say,
        notify=ui.warn,
        info=lambda message: ui.info(as_flags(message)),
    )
    if json_:
        sys.stdout.write(json.dumps(done.to_dict(), indent=2, allow_nan=False) + "\n")
        return
    from ..render.reports import report_view

    name, severity = DEMO_CORRUPTION
    sizes_text = ",".join(map(str, DEMO_GHOST_SIZES))
    ui.out.rule("bnscope inspect ckpt.pt (model and data from bnscope.toml)")
    ui.out.print(report_view(done.inspect))
    ui.out.rule("bnscope precise ckpt.pt")
    ui.out.print(report_view(done.precise))
    priors = ",".join(map(str, DEMO_ONLINE_PRIORS))
    ui.out.rule(
        f"bnscope adapt ckpt.precise.pt --data corrupted/train ({name} {severity}) "
        f"--online-priors {priors}"
    )
    ui.out.print(report_view(done.adapt))
    ui.out.rule(f"bnscope ghost ckpt.precise.pt --data data/val --sizes {sizes_text}")
    ui.out.print(report_view(done.ghost))
    ui.out.rule("next")
    text = next_steps(
        done.built.folder,
        done.precise.to_dict(),
        done.adapt.to_dict(),
        done.ghost.to_dict(),
        done.inspect.to_dict(),
    )
    ui.out.print(text, markup=False, highlight=False)


def next_steps(
    folder: Path,
    precise: dict[str, Any],
    adapted: dict[str, Any],
    ghost: dict[str, Any] | None = None,
    inspected: dict[str, Any] | None = None,
) -> str:
    """What the demo found and what to try next (plain text)."""
    from ..render.text import prior_text

    lines = [f"Demo folder: {folder} (model.py, data/, corrupted/, ckpt.pt, bnscope.toml)."]
    if inspected and inspected.get("metrics"):
        stale = [x["name"] for x in inspected["layers"] if x["status"] == "stale"]
        acc = {k: v["accuracy"] for k, v in inspected["metrics"]["variants"].items()}
        if stale and acc["running"] is not None:
            lines.append(
                f"bnscope inspect found {len(stale)} stale BN layers ({', '.join(stale)}) and "
                f"predicted that Precise BN lifts accuracy on data/train from "
                f"{100 * acc['running']:.1f}% to {100 * acc['precise']:.1f}%."
            )
    m = precise.get("metrics")
    if m and m.get("has_labels"):
        a, b = m["variants"]["running"]["accuracy"], m["variants"]["precise"]["accuracy"]
        lines.append(
            f"Validation accuracy with the checkpoint's running statistics: {100 * a:.1f}%; "
            f"with Precise BN statistics: {100 * b:.1f}%."
        )
    m = adapted.get("metrics")
    if m and m.get("has_labels"):
        acc = {k: v["accuracy"] for k, v in m["variants"].items()}
        lines.append(
            f"On noisy images (corrupted/val): {100 * acc['running']:.1f}% with the source "
            f"statistics, {100 * acc['adapted']:.1f}% after bnscope adapt, "
            f"{100 * acc['batch']:.1f}% with test-batch statistics."
        )
        rows = adapted.get("online_priors") or []
        if rows and all(r["accuracy"] is not None for r in rows):
            sweep = ", ".join(
                f"N={prior_text(r['prior'])} {100 * r['accuracy']:.1f}%" for r in rows
            )
            lines.append(
                "Test-time adaptation you can ship (bnscope.nn.convert_to_prior_bn: each "
                f"batch's statistics mixed with the source statistics as N samples): {sweep}."
            )
    if ghost and ghost["metrics"]["has_labels"]:
        rows = [r for r in ghost["sizes"] if r["status"] == "ok"]
        curve = ", ".join(f"g={r['size']} {100 * r['accuracy']:.1f}%" for r in rows)
        pop = ghost["metrics"]["variants"]["precise"]["accuracy"]
        lines.append(
            f"NBS curve on data/val (batch statistics of g samples): {curve}; population "
            f"statistics {100 * pop:.1f}%."
        )
    lines += [
        "The demo model uses BN momentum 0.01 (a TensorFlow/Keras-style checkpoint), so its",
        "running averages lag the final weights; Precise BN recomputes them exactly.",
        "Try next (bnscope.toml in the folder supplies checkpoint, model and data):",
        f"  cd {folder}",
        "  bnscope inspect --report-dir report/             # report.html with the figures",
        "  bnscope precise --batches 20 --force --json      # machine-readable result",
        "  bnscope inspect ckpt.precise.pt                  # no stale layers any more",
        "  bnscope inspect --static                         # buffers only, no model run",
        "  bnscope adapt ckpt.precise.pt --data corrupted/train --prior 100 --force",
        "  bnscope adapt ckpt.precise.pt --data corrupted/train --only mean --force",
        "  bnscope corrupt data/val blurred/ --corruption defocus_blur --severity 4",
        "  bnscope ghost ckpt.precise.pt --data data/val --sizes 2,4,8,16,32 --report-dir nbs/",
    ]
    return "\n".join(lines)
