"""A report as the user sees it: the terminal view, the figures and the report folder.

One entry point per view, for every command's report (static and dynamic inspect, precise,
adapt, ghost, leakage), used by the CLI and by Python users alike:

- :func:`report_view` -> a rich renderable (what the command prints);
- :func:`report_figures` -> ``name -> (caption, Figure)`` (drawn from the report's records,
  never recomputed; each is the ``.figure`` of a :mod:`bnscope.render.figures` function's
  :class:`~bnscope.render.figures.Plot`, whose functions also draw into your own Axes);
- :func:`write_report` writes ``report.json`` (the ``--json`` document, listing the report's
  files), each figure as ``name.png`` and, for the dynamic inspect report, ``report.html``
  into a folder that holds one report (:mod:`bnscope.io.outputs`): exactly what
  ``--report-dir`` writes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from ..io.outputs import EarlierReport
    from ..records import InspectLayer, Report
    from ..session import DomainsResult, Result

#: every file bnscope writes into a report folder, for any report (``report_figures`` names
#: plus ``.png``); a folder holding one of them holds an earlier report
REPORT_FILES = (
    "report.json",
    "report.html",
    "running_stats.png",
    "staleness.png",
    "batch_means.png",
    "train_test.png",
    "precise_change.png",
    "domain_shift.png",
    "domain_divergence.png",
    "adapt_metrics.png",
    "online_priors.png",
    "ghost_noise.png",
    "nbs_curve.png",
    "leakage.png",
    "conversion.png",
)
#: dots per inch of the PNG files in a report folder
PNG_DPI = 120


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
        from .domains import domains_report, is_multi_domain

        if is_multi_domain(report):
            return domains_report(report)
        from .tables import adapt_report

        return adapt_report(report)
    if report.command == "ghost":
        from .ghost import ghost_report

        return ghost_report(report)
    if report.command == "leakage":
        from .leakage import leakage_report

        return leakage_report(report)
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
            metrics = report.extra.get("metrics")
            made["precise_change"] = (
                "How much each layer's statistics changed"
                + (", and the evaluation before and after." if metrics else "."),
                f.change_figure(report.layers, metrics=metrics).figure,
            )
    elif report.command == "adapt" and "domains" in report.extra:
        made["domain_divergence"] = (
            "Median symmetric KL between the source statistics and each domain's, median over "
            "layers, and the layers where two domains differ most (the threshold of "
            "domain-divergence marked on the colour bar).",
            f.domain_divergence_figure(
                report.extra["divergence_labels"], report.extra["divergence"], report.layers,
                threshold=report.extra.get("shift_threshold"),
            ).figure,
        )
    elif report.command == "adapt":
        if report.layers:
            threshold = report.extra.get("shift_threshold")
            made["domain_shift"] = (
                "Domain shift per layer"
                + (
                    f" (a domain-shift finding above a median KL of {threshold:g})."
                    if threshold is not None
                    else "."
                ),
                f.shift_figure(report.layers, shift_threshold=threshold).figure,
            )
        metrics = report.extra.get("metrics")
        if metrics:
            online = report.extra.get("online_prior")
            made["adapt_metrics"] = (
                "Source, adapted and test-batch statistics"
                + (" and the test-time prior" if "prior" in metrics["variants"] else "")
                + " on the evaluation data.",
                f.adapt_metrics_figure(metrics, online_prior=online).figure,
            )
        if metrics and report.extra.get("online_priors"):
            made["online_priors"] = (
                "Test-time BN adaptation: the evaluation against the prior N.",
                f.online_priors_figure(report.extra["online_priors"], metrics).figure,
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
    elif report.command == "leakage":
        extra = report.extra
        changes = report.arrays.get("leakage", {}).get("change")
        made["leakage"] = (
            "The same samples in i.i.d. batches and grouped: each sample's train-mode output "
            "change against the i.i.d. batches, the noise floor of a second i.i.d. "
            f"arrangement and {extra['ratio_threshold']:g} times it (a batch-leakage finding "
            "above it), and accuracy per arrangement.",
            f.leakage_figure(
                extra["arrangements"], changes, metric=extra["metric"],
                ratio_threshold=extra["ratio_threshold"],
            ).figure,
        )  # fmt: skip
    return made


def _dynamic_figures(report: Report) -> dict[str, tuple[str, Figure]]:
    from ..ops.inspect import MATERIAL_GAP, STALE_Z
    from .figures import (
        batch_means_figure,
        consistency_figure,
        conversion_figure,
        staleness_figure,
    )
    from .inspect import worst_first

    made: dict[str, tuple[str, Figure]] = {}
    if report.layers:
        made["staleness"] = (
            f"Running vs population statistics by depth: d_mu and d_var (a layer's gap is "
            f"material when a median exceeds {MATERIAL_GAP:g}) and the gap in units of EMA "
            f"noise (stale when z exceeds {STALE_Z:g}); stale layers, which meet both, are "
            "shaded.",
            staleness_figure(report.layers, STALE_Z, material_gap=MATERIAL_GAP).figure,
        )
    if any(r.var_convention is not None for r in report.layers):
        made["conversion"] = (
            "What running_var holds: per channel, log running_var against log var_pop, with "
            "the line of variances (slope 1), the fit, and the line the detected conversion "
            "predicts (var-convention), for the first converted layers and one layer that "
            "holds variances.",
            conversion_figure(report.layers, report.arrays).figure,
        )
    layer = _batch_means_layer(report, worst_first(report.layers))
    if layer is not None:
        stale = layer.status == "stale"
        made["batch_means"] = (
            f"Batch means of the channels of {layer.name} whose running mean is furthest from "
            "the population mean, with the population mean and the running mean (EMA)"
            + (
                f"; {layer.name} is the most stale layer."
                if stale
                else f"; no layer is stale, {layer.name} ({layer.status}) is first in the table."
            ),
            batch_means_figure(layer.name, report.arrays[layer.name], status=layer.status).figure,
        )
    made["train_test"] = (
        "The same batches with running, precise and batch statistics.",
        consistency_figure(report.extra["metrics"]).figure,
    )
    return made


def _batch_means_layer(report: Report, ordered: list[InspectLayer]) -> InspectLayer | None:
    """The layer whose batch means are drawn: the first stale layer in the table's order (the
    most stale one), or the table's first layer with batch means when none is stale."""
    drawable = [r for r in ordered if r.name in report.arrays]
    stale = [r for r in drawable if r.status == "stale"]
    chosen = stale or drawable
    return chosen[0] if chosen else None


def report_document(report: Report, files: Sequence[str] | None = None) -> dict[str, Any]:
    """The ``--json`` document of ``report``; with the files of its report folder (``files``),
    the same document ends with ``report_files``, as ``report.json`` does."""
    doc = report.to_dict()
    if files is not None:
        doc["report_files"] = list(files)
    return doc


def check_report_dir(report_dir: str | Path, *, force: bool = False) -> EarlierReport | None:
    """Refuse ``report_dir`` before anything runs, as :func:`write_report` would: a name like
    a checkpoint file, a file in its place, an earlier report without ``force=True`` (see
    :func:`bnscope.io.outputs.check_report_dir`). Returns the earlier report, or None."""
    from ..io.outputs import check_report_dir as check

    return check(report_dir, force=force, known=REPORT_FILES)


def write_report(
    report: Report | Result | DomainsResult,
    report_dir: str | Path,
    *,
    force: bool = False,
    notify: Callable[[str], None] | None = None,
) -> list[Path]:
    """Write ``report`` (or a job's result) into the folder ``report_dir`` as
    ``--report-dir`` does (created if needed): ``report.json`` (listing the report's files
    under ``report_files``), the figures as PNG and, for a dynamic inspect report,
    ``report.html``. Returns the paths written.

    A report folder holds one report: a folder that already holds one is refused unless
    ``force=True``, which replaces it (its files that this report does not write are
    removed, and ``notify`` is told). Every file is written before the earlier report is
    touched (:func:`bnscope.io.outputs.write_report_dir`)."""
    from ..io.outputs import MANIFEST, write_report_dir
    from ..session import DomainsResult, Result
    from .html import figure_png
    from .jsonout import report_json

    if isinstance(report, (Result, DomainsResult)):
        report = report.report

    made = report_figures(report)
    files: dict[str, bytes] = {MANIFEST: b""}
    for name, (_, fig) in made.items():
        files[f"{name}.png"] = figure_png(fig, dpi=PNG_DPI)
    if is_dynamic(report):
        from .html import inspect_html

        pngs = {name: (caption, figure_png(fig)) for name, (caption, fig) in made.items()}
        files["report.html"] = inspect_html(report, pngs).encode("utf-8")
    files[MANIFEST] = report_json(report_document(report, list(files))).encode("utf-8")
    done = write_report_dir(report_dir, files, force=force, known=REPORT_FILES)
    if done.earlier is not None and notify is not None:
        removed = ", ".join(p.name for p in done.removed)
        notify(
            f"report_dir={Path(report_dir)}: replaced {done.earlier.describe()}"
            + (f"; removed {removed}, which this report does not have" if removed else "")
        )
    return done.written
