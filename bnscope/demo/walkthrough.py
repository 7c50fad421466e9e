"""The demo's runs: build the demo folder, then inspect, precise, adapt and ghost on it through
:mod:`bnscope.session`, as the commands printed by ``bnscope demo`` would run them.

Computation only: progress goes to ``say`` (the command lines it stands for), notices to
``notify`` and status lines to ``info``; :class:`Walkthrough` holds the reports.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..records import document_header
from .run import (
    DEMO_CORRUPTION,
    DEMO_GHOST_SIZES,
    DEMO_ONLINE_PRIORS,
    DemoBuild,
    build_demo,
    demo_threads,
    write_corrupted,
)

if TYPE_CHECKING:
    from ..records import Report

Say = Callable[[str], None]


@dataclass
class Walkthrough:
    """The demo folder and the four reports."""

    built: DemoBuild
    inspect: Report
    precise: Report
    adapt: Report
    ghost: Report

    def to_dict(self) -> dict[str, Any]:
        """The ``bnscope demo --json`` document: the dynamic inspect report's layers, every
        report's findings, the demo build and the four reports."""
        reports = {
            "inspect": self.inspect.to_dict(),
            "precise": self.precise.to_dict(),
            "adapt": self.adapt.to_dict(),
            "ghost": self.ghost.to_dict(),
        }
        return {
            **document_header("demo"),
            "checkpoint": str(self.built.checkpoint),
            "layers": reports["inspect"]["layers"],
            "findings": [f for doc in reports.values() for f in doc["findings"]],
            "demo": self.built.to_dict(),
            **reports,
        }


def run_walkthrough(
    folder: Path,
    *,
    seed: int = 0,
    run: dict[str, Any] | None = None,
    say: Say | None = None,
    notify: Say | None = None,
    info: Say | None = None,
) -> Walkthrough:
    """Build the demo in ``folder`` (which :func:`~bnscope.demo.run.prepare_folder` made),
    then run the four operations with the model and data of its ``bnscope.toml``, every
    sample, the demo's ``seed`` and ``run`` (``device``, ``amp``, ``channels_last``), on
    :data:`~bnscope.demo.run.DEMO_THREADS` CPU threads."""
    with demo_threads():  # the same numbers on every machine (see DEMO_THREADS)
        return _walk(folder, seed=seed, run=run, say=say, notify=notify, info=info)


def _walk(
    folder: Path,
    *,
    seed: int,
    run: dict[str, Any] | None,
    say: Say | None,
    notify: Say | None,
    info: Say | None,
) -> Walkthrough:
    from ..io.config import load_project_config
    from ..session import Job, resolve_options

    say = say or (lambda message: None)
    given = {"seed": seed, **(run or {})}
    built = build_demo(folder, seed=seed, progress=say)
    config = load_project_config(built.folder)

    def job(checkpoint: Path, **override: Any) -> Job:
        options = resolve_options(config, {**given, **override})
        return Job(checkpoint, options, notify=notify, info=info)

    say("bnscope inspect ckpt.pt (model and data/train from bnscope.toml)")
    inspected = job(built.checkpoint, data=str(built.folder / "data" / "train")).inspect()
    say("bnscope precise ckpt.pt (statistics on data/train, evaluated on data/val)")
    precise = job(built.checkpoint).precise(force=True)
    precise.save()
    name, severity = DEMO_CORRUPTION
    say(f"bnscope corrupt data/ corrupted/ --corruption {name} --severity {severity}")
    corrupted = write_corrupted(built.folder, seed)
    priors = ",".join(map(str, DEMO_ONLINE_PRIORS))
    say(
        "bnscope adapt ckpt.precise.pt --data corrupted/train --eval-data corrupted/val "
        f"--online-priors {priors}"
    )
    tuned = built.folder / "ckpt.precise.pt"
    adapted = job(tuned).adapt(
        str(corrupted["train"]), eval_data=str(corrupted["val"]), force=True,
        online_priors=DEMO_ONLINE_PRIORS,
    )  # fmt: skip
    adapted.save()
    sizes = ",".join(map(str, DEMO_GHOST_SIZES))
    say(f"bnscope ghost ckpt.precise.pt --data data/val --sizes {sizes}")
    ghost = job(tuned, data=str(built.folder / "data" / "val")).ghost(DEMO_GHOST_SIZES)
    return Walkthrough(built, inspected.report, precise.report, adapted.report, ghost.report)
