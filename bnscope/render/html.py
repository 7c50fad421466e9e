"""One self-contained HTML page for a report: verdict, tables, findings and the figures
embedded as PNG data URIs, so the file opens from disk with nothing beside it."""

from __future__ import annotations

import base64
import io
from html import escape
from typing import Any

from ..records import Report
from .inspect import variant_columns
from .text import momentum_cell, num, pct

_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.15em; margin-top: 1.6em; }
.verdict { padding: .8em 1em; border-radius: 6px; font-size: 1.05em; }
.verdict.stale, .verdict.gap { background: #fff4d6; border: 1px solid #e0b040; }
.verdict.noisy { background: #e6f4fb; border: 1px solid #70b0d0; }
.verdict.healthy { background: #e8f6e8; border: 1px solid #70b070; }
table { border-collapse: collapse; font-size: .88em; margin: .5em 0; }
th, td { border: 1px solid #ccc; padding: .25em .5em; text-align: right; }
th { background: #f3f3f3; } td.l, th.l { text-align: left; }
.warning { color: #a06000; font-weight: 600; } .error { color: #b00000; font-weight: 600; }
.info { color: #206090; } .meta { color: #666; font-size: .88em; }
figure { margin: 1em 0; } figure img { max-width: 100%; border: 1px solid #ddd; }
figcaption { color: #555; font-size: .85em; }
"""


def figure_png(fig: Any, dpi: int = 110) -> bytes:
    """A matplotlib figure (or a :class:`~bnscope.render.figures.Plot`) as PNG bytes."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()


def _table(head: list[str], rows: list[list[Any]], left: int = 1) -> str:
    def cell(tag: str, i: int, v: Any) -> str:
        cls = ' class="l"' if i < left else ""
        return f"<{tag}{cls}>{escape(str(v))}</{tag}>"

    out = ["<table><tr>", *[cell("th", i, h) for i, h in enumerate(head)], "</tr>"]
    for row in rows:
        out.append("<tr>" + "".join(cell("td", i, v) for i, v in enumerate(row)) + "</tr>")
    out.append("</table>")
    return "".join(out)


def inspect_html(report: Report, figures: dict[str, tuple[str, bytes]]) -> str:
    """The dynamic ``inspect`` report as one HTML page. ``figures`` maps a name to
    (caption, PNG bytes)."""
    extra = report.extra
    doc = report.to_dict()
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>bnscope inspect: {escape(str(report.checkpoint or 'model'))}</title>",
        f"<style>{_CSS}</style></head><body>",
        "<h1>bnscope inspect</h1>",
        f"<p id='verdict' class='verdict {escape(extra['verdict'])}'>"
        f"{escape(extra['verdict_text'])}</p>",
    ]
    meta = [
        ("checkpoint", report.checkpoint),
        ("model", extra.get("model")),
        ("data", extra.get("data")),
        ("batches / samples", f"{extra.get('batches')} / {extra.get('samples')}"),
        ("project file", extra.get("project_file")),
        ("written by", f"bnscope {doc['bnscope_version']} ({doc['schema']})"),
    ]
    parts.append(
        "<p class='meta'>"
        + "<br>".join(f"{escape(k)}: {escape(str(v))}" for k, v in meta if v)
        + "</p>"
    )
    c = extra["metrics"]
    columns = variant_columns(c, extra.get("eps_check"))
    variants = [v for _, v in columns]
    rows = []
    if c.get("has_labels"):
        rows.append(["accuracy", *[pct(v["accuracy"]) for v in variants]])
        rows.append(["loss", *[num(v["loss"], 4) for v in variants]])
    rows.append(["top-1 agreement with eval", "100.0%",
                 *[pct(v["agreement"]) for v in variants[1:]]])  # fmt: skip
    rows.append(["KL(eval || variant)", "0", *[num(v["kl"]) for v in variants[1:]]])
    parts.append("<h2>Train/test consistency</h2>")
    parts.append(_table(["metric", *[label for label, _ in columns]], rows))
    parts.append("<h2>Findings</h2>")
    if doc["findings"]:
        parts.append("<table><tr><th class='l'>severity</th><th class='l'>code</th>"
                     "<th class='l'>layer</th><th class='l'>message</th><th class='l'>fix</th>"
                     "</tr>")  # fmt: skip
        for f in doc["findings"]:
            parts.append(
                f"<tr><td class='l {escape(f['severity'])}'>{escape(f['severity'])}</td>"
                f"<td class='l'>{escape(f['code'])}</td>"
                f"<td class='l'>{escape(str(f['layer'] or '-'))}</td>"
                f"<td class='l'>{escape(f['message'])}</td><td class='l'>{escape(f['fix'])}</td>"
                "</tr>"
            )
        parts.append("</table>")
    else:
        parts.append("<p>No findings.</p>")
    parts.append("<h2>BN layers (module order)</h2>")
    layer_rows = [
        [
            r.name, r.status, r.num_features,
            momentum_cell(r),
            num(r.d_mu_median), num(r.d_mu_max), num(r.d_var_median), num(r.d_var_max),
            num(r.z_mu), num(r.z_var), num(r.batch_spread_mu), r.calls_per_forward,
        ]
        for r in report.layers
    ]  # fmt: skip
    parts.append(
        _table(
            [
                "layer",
                "status",
                "C",
                "m",
                "d_mu med",
                "d_mu max",
                "d_var med",
                "d_var max",
                "z μ",
                "z var",
                "batch spread",
                "calls/fwd",
            ],
            layer_rows,
            left=2,
        )  # fmt: skip
    )
    parts.append("<h2>Figures</h2>")
    for name, (caption, png) in figures.items():
        data = base64.b64encode(png).decode("ascii")
        parts.append(
            f"<figure id='fig-{escape(name)}'><img alt='{escape(name)}' "
            f"src='data:image/png;base64,{data}'><figcaption>{escape(caption)}</figcaption>"
            "</figure>"
        )
    parts.append(
        "<p class='meta'>d_mu = |mu_EMA − mu_pop| / sigma; d_var = |log((var_EMA + eps) / "
        "(var_pop + eps))|; z = the gap in units of the EMA's own noise sqrt(m/(2−m) Var(mu_B)) "
        "(RMS over channels: about 1 for a merely noisy EMA); batch spread = sd of batch means "
        "/ sigma at the data's batch size.</p>"
    )
    parts.append(
        f"<p class='meta' id='version'>Written by bnscope {escape(doc['bnscope_version'])}."
        "</p></body></html>"
    )
    return "\n".join(parts)
