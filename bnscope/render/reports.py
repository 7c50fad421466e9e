"""A report as the user sees it: the terminal view, the figures and the ``--out`` folder.

One entry point per view, for every command's report (static and dynamic inspect, precise,
adapt, ghost), used by the CLI and by Python users alike:

- :func:`report_view` -> a rich renderable (what the command prints);
- :func:`report_figures` -> ``name -> (caption, Figure)`` (drawn from the report's records,
  never recomputed; each is the ``.figure`` of a :mod:`bnscope.render.figures` function's
  :class:`~bnscope.render.figures.Plot`, whose functions also draw into your own Axes);
- :func:`write_report` writes ``report.json`` (the ``--json`` document), each figure as
  ``name.png`` and, for the dynamic inspect report, ``report.html`` into a folder, each file
  atomically: exactly what ``--out`` writes.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from ..records import Report
    from ..session import Result


def is_dynamic(report: Report) -> bool:
    """Whether an inspect report is the dynamic one (the model ran on data)."""
    return report.command == "inspect" and "metrics" in report.extra


def report_view(report: Report) -> Any:
    """The rich renderable a command prints for ``report``."""
    if report.command == "inspect":
        if is_dynamic(report):
            from .inspect import inspect_report

            return inspect_report(report)
        from .tables import static_report

        return static_report(report)
    if report.command == "precise":
        from .tables import precise_report

        return precise_report(report)
    if report.command == "adapt":
        from .tables import adapt_report

        return adapt_report(report)
    if report.command == "ghost":
        from .ghost import ghost_report

        return ghost_report(report)
    raise ValueError(f"no view for a {report.command!r} report")


def report_figures(report: Report) -> dict[str, tuple[str, Figure]]:
    """The figures of ``report``: name -> (caption, Figure), in the order they are written."""
    from . import figures as f

    made: dict[str, tuple[str, Figure]] = {}
    if report.command == "inspect" and not is_dynamic(report):
        if report.layers:
            from ..ops.static import TINY_GAIN, TINY_VAR_FACTOR

            eps = report.layers[0].eps
            made["running_stats"] = (
                "Running statistics per layer, with tiny variances and gains marked.",
                f.static_ranges_figure(
                    report.layers, tiny_var=TINY_VAR_FACTOR * eps, tiny_gain=TINY_GAIN
                ).figure,
            )
    elif report.command == "inspect":
        made.update(_dynamic_figures(report))
    elif report.command == "precise":
        if report.layers:
            made["precise_change"] = (
                "How much each layer's statistics changed.",
                f.change_figure(report.layers).figure,
            )
    elif report.command == "adapt":
        if report.layers:
            made["domain_shift"] = ("Domain shift per layer.", f.shift_figure(report.layers).figure)
        if report.extra.get("metrics"):
            made["adapt_metrics"] = (
                "Source, adapted and test-batch statistics on the evaluation data.",
                f.adapt_metrics_figure(report.extra["metrics"]).figure,
            )
    elif report.command == "ghost":
        made["ghost_noise"] = (
            "Ghost-batch noise per layer and size.",
            f.ghost_noise_figure(report.layers).figure,
        )
        made["nbs_curve"] = (
            "Accuracy and agreement against the normalization batch size.",
            f.nbs_curve_figure(
                report.extra["sizes"], report.extra["metrics"]["variants"]["precise"]
            ).figure,
        )
    return made


def _dynamic_figures(report: Report) -> dict[str, tuple[str, Figure]]:
    from ..ops.inspect import STALE_Z
    from .figures import batch_means_figure, consistency_figure, staleness_figure

    made: dict[str, tuple[str, Figure]] = {}
    if report.layers:
        made["staleness"] = (
            "Running vs population statistics by depth: d_mu, d_var and the gap in units of "
            "EMA noise (stale layers shaded).",
            staleness_figure(report.layers, STALE_Z).figure,
        )
    ranked = sorted(
        (r for r in report.layers if r.name in report.arrays and r.d_mu_max is not None),
        key=lambda r: r.d_mu_max,
        reverse=True,
    )
    if ranked:
        worst = ranked[0].name
        made["batch_means"] = (
            f"Batch means of the most stale channels of {worst}, with the population mean and "
            "the running mean (EMA).",
            batch_means_figure(worst, report.arrays[worst]).figure,
        )
    made["train_test"] = (
        "The same batches with running, precise and batch statistics.",
        consistency_figure(report.extra["metrics"]).figure,
    )
    return made


def write_report(report: Report | Result, out: str | Path) -> list[Path]:
    """Write ``report`` (or a job's result) into the folder ``out`` as ``--out`` does
    (created if needed): ``report.json``, the figures as PNG and, for a dynamic inspect
    report, ``report.html``. Returns the paths written, each written atomically."""
    from ..io.outputs import write_report_dir
    from ..session import Result
    from .jsonout import report_json

    if isinstance(report, Result):
        report = report.report

    made = report_figures(report)
    figures = {name: fig for name, (_, fig) in made.items()}
    texts: dict[str, str] = {}
    if is_dynamic(report):
        from .html import figure_png, inspect_html

        pngs = {name: (caption, figure_png(fig)) for name, (caption, fig) in made.items()}
        texts["report.html"] = inspect_html(report, pngs)
    return write_report_dir(out, report_json(report), figures, texts)
