"""Every command's terminal view at 80, 100 and 160 columns (and any width between): tables fit
the console, a layer name or a number is never broken or cut, hidden columns are named, and
identical findings of several layers are one row. Reports are built by hand (deterministic)."""

from __future__ import annotations

import io
import json
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from rich.console import Console

from bnscope.records import (
    AdaptLayer,
    Finding,
    GhostLayer,
    GhostLayerSize,
    InspectLayer,
    LeakageLayer,
    LeakageLayerArrangement,
    PreciseLayer,
    Report,
    StaticLayer,
)
from bnscope.render.jsonout import report_json
from bnscope.render.reports import report_view

#: densenet- and timm-like layer names, long and short
NAMES = (
    "features.denseblock4.denselayer16.norm2",
    "blocks.5.2.conv_pw.bn1",
    "features.denseblock1.denselayer1.norm1",
    "stem.bn1",
    "head.norm",
)
WARMUP_MESSAGE = (
    "EMA has only 400 updates: (1-m)^n = 0.018 of the running stats is still the initial "
    "mean 0 / var 1 (momentum 0.01)"
)
WARMUP_FIX = "recompute the statistics: bnscope precise CKPT --model SPEC --data DATA"
BASE = {"format": "torch", "key": "state_dict", "model": "model.py:make_model"}
RUN = {**BASE, "device": "cpu", "data": "image folder data/train (4 classes, 1600 images)"}


def report(command: str, layers, findings, extra) -> Report:
    return Report(command=command, checkpoint="runs/ckpt.pt", layers=tuple(layers),
                  findings=tuple(findings), extra=extra)  # fmt: skip


def warmup(names=NAMES) -> tuple[Finding, ...]:
    """The same ema-warmup finding on every layer (one row in the table)."""
    return tuple(
        Finding(code="ema-warmup", severity="warning", layer=n, message=WARMUP_MESSAGE,
                fix=WARMUP_FIX)
        for n in names
    )  # fmt: skip


def static_report(names=NAMES) -> Report:
    layers = tuple(
        StaticLayer(
            name=n, num_features=16 * (i + 1), num_batches_tracked=400, momentum=0.01,
            momentum_assumed=False, eps=1e-5, eps_assumed=False, ema_init_weight=0.99**400,
            affine=True, mean_min=-0.703 - i, mean_max=0.763 + i, var_min=0.000405 * (i + 1),
            var_max=5.52 + i, gain_min=0.29, gain_max=1.47 + 100 * i, dead_channels=i % 2,
            tiny_var_channels=0, nonfinite_values=0, negative_var_channels=0,
        )
        for i, n in enumerate(names)
    )  # fmt: skip
    findings = (
        *warmup(names),
        Finding(code="tiny-variance", severity="error", layer=names[1],
                message="3 of 32 channels have running_var < 1e-4: gains up to 401",
                fix="check the data the statistics came from; bnscope precise recomputes them"),
    )  # fmt: skip
    return report("inspect", layers, findings, dict(BASE))


def inspect_layers(names=NAMES) -> tuple[InspectLayer, ...]:
    out = []
    for i, n in enumerate(names):
        if i == 3:
            out.append(InspectLayer(name=n, num_features=8, status="not-called",
                                    reason="never ran on the data", momentum=0.01))  # fmt: skip
            continue
        out.append(
            InspectLayer(
                name=n, num_features=16 * (i + 1), status="stale" if i < 2 else "ok",
                momentum=0.01, calls_per_forward=1, batch_calls=50, d_mu_max=0.33 / (i + 1),
                d_mu_median=0.0627 / (i + 1), d_var_max=0.543, d_var_median=0.00432,
                z_mu=63.3 / (i + 1), z_var=9.12, ema_noise_mu=0.00118, batch_spread_mu=0.0171,
                batch_spread_var=0.0311,
            )
        )  # fmt: skip
    return tuple(out)


def variant(accuracy: float, loss: float, agreement: float, kl: float, rel_diff: float) -> dict:
    """One variant of a report's ``metrics`` (docs/cli.md, section 5)."""
    return {"accuracy": accuracy, "loss": loss, "agreement": agreement, "kl": kl,
            "rel_diff": rel_diff}  # fmt: skip


def dynamic_report(names=NAMES) -> Report:
    metrics = {
        "samples": 1600, "has_labels": True, "reference": "running",
        "variants": {
            "running": variant(0.926, 0.1802, 1.0, 0.0, 0.0),
            "precise": variant(0.997, 0.04996, 0.929, 0.175, 0.3),
            "batch": variant(0.981, 0.09019, 0.914, 0.202, 0.3),
        },
    }  # fmt: skip
    stale = tuple(
        Finding(code="stale-ema", severity="warning", layer=n,
                message=f"running statistics are {0.0627 / (i + 1):.3g} sigma from the "
                "population statistics of this model",
                fix="bnscope precise CKPT --data TRAIN_DATA would change accuracy from 92.6% "
                "to 99.7% on this data")
        for i, n in enumerate(names[:2])
    )  # fmt: skip
    gap = Finding(code="train-test-gap", severity="warning", layer=None,
                  message="outputs with batch statistics and with running statistics disagree",
                  fix=stale[0].fix)  # fmt: skip
    extra = {
        **RUN, "verdict": "stale", "batches": 50, "samples": 1600, "metrics": metrics,
        "verdict_text": f"Stale running statistics: 2 of 5 BN layers ({names[0]}, {names[1]}) "
        "are further from this model's population statistics than EMA noise explains; run "
        "bnscope precise.",
    }  # fmt: skip
    return report("inspect", inspect_layers(names), (*warmup(names), *stale, gap), extra)


def precise_report(names=NAMES) -> Report:
    layers = tuple(
        PreciseLayer(name=n, num_features=32, status="updated", calls=50, calls_per_forward=1,
                     samples=1600, d_mu_max=0.176 / (i + 1), d_mu_median=0.0349 / (i + 1),
                     d_var_max=0.543 / (i + 1), d_var_median=0.000139 * (i + 1))
        if i != 2
        else PreciseLayer(name=n, num_features=32, status="not-called",
                          reason="never ran on the data: statistics kept")
        for i, n in enumerate(names)
    )  # fmt: skip
    metrics = {
        "data": "image folder data/val (4 classes, 400 images)", "samples": 400,
        "has_labels": True, "reference": "running",
        "variants": {
            "running": variant(0.885, 0.2836, 1.0, 0.0, 0.0),
            "precise": variant(0.965, 0.1082, 0.915, 0.184, 0.319),
        },
    }  # fmt: skip
    finding = Finding(code="not-called", severity="warning", layer=names[2],
                      message="the layer never ran on the data",
                      fix="check the model's forward")  # fmt: skip
    extra = {**RUN, "batches": 50, "samples": 1600, "metrics": metrics, "output": "ckpt.precise.pt"}
    return report("precise", layers, (finding,), extra)


def adapt_report(names=NAMES) -> Report:
    layers = tuple(
        AdaptLayer(name=n, num_features=64, status="updated", calls=50, calls_per_forward=1,
                   samples=1600, weight_source=0.0, d_mu_max=0.5, d_mu_median=0.178 / (i + 1),
                   d_var_max=0.9, d_var_median=0.262 / (i + 1), kl_max=0.332,
                   kl_median=0.0627 / (i + 1) ** 2)
        for i, n in enumerate(names)
    )  # fmt: skip
    metrics = {
        "data": "image folder corrupted/val (4 classes, 400 images)", "samples": 400,
        "has_labels": True, "reference": "running",
        "variants": {
            "running": variant(0.3425, 3.725, 1.0, 0.0, 0.0),
            "adapted": variant(0.9275, 0.2118, 0.3325, 4.24, 1.03),
            "batch": variant(0.9, 0.2876, 0.3425, 4.08, 1.02),
        },
    }  # fmt: skip
    extra = {**RUN, "batches": 50, "samples": 1600, "prior": 0.0, "metrics": metrics,
             "output": "ckpt.adapted.pt"}  # fmt: skip
    return report("adapt", layers, (), extra)


SIZES = (2, 4, 8, 16, 32)


def ghost_report(names=NAMES) -> Report:
    layers = tuple(
        GhostLayer(
            name=n, num_features=16, status="analysed", calls_per_forward=1,
            sizes=tuple(GhostLayerSize(size=g, chunks=400 // g, noise_mu=0.28 / (i + 1) / g**0.5,
                                       noise_var=0.9 / g**0.5, iid_mu=0.27 / g**0.5,
                                       iid_var=0.8 / g**0.5, effective_size=29.1 * (i + 1))
                        for g in SIZES),
        )
        for i, n in enumerate(names)
    )  # fmt: skip
    rows = [
        {"size": g, "status": "ok", "note": "the data's batch size" if g == 32 else None,
         "chunks": 400 // g, "remainder_chunks": 1 if g == 32 else 0,
         "remainder_samples": 16 if g == 32 else 0, "noise_mu": 0.0998 / g**0.5,
         "noise_var": 0.363 / g**0.5, "effective_ratio": 0.96, "agreement": 1 - 0.5 / g,
         "kl": 1.69 / g, "accuracy": 0.968 - 0.4 / g, "loss": 0.1065 + 1.5 / g}
        for g in SIZES
    ]  # fmt: skip
    finding = Finding(code="small-nbs", severity="warning", layer=names[0],
                      message="normalization batches of 32 or fewer samples are too noisy",
                      fix="normalize over more samples while training")  # fmt: skip
    extra = {
        **RUN, "verdict": "noisy", "verdict_text": "Batch statistics of 32 or fewer samples "
        "change this model's outputs.", "sizes": rows, "batch_size": 32, "batches": 13,
        "samples": 400,
        "metrics": {
            "samples": 400, "has_labels": True, "reference": "precise",
            "variants": {"precise": variant(0.968, 0.1065, 1.0, 0.0, 0.0)},
        },
    }  # fmt: skip
    return report("ghost", layers, (finding,), extra)


ARRANGEMENTS = ("iid", "iid-2", "label", "image_id")


def leakage_report(names=NAMES) -> Report:
    layers = tuple(
        LeakageLayer(
            name=n, num_features=16, status="analysed", calls_per_forward=1,
            arrangements=tuple(
                LeakageLayerArrangement(arrangement=a, noise_mu=0.12 * (j + 1),
                                        effective_size=31.7 / (1 + 9 * (a == "label")) + i)
                for j, a in enumerate(ARRANGEMENTS)
            ),
        )
        for i, n in enumerate(names)
    )  # fmt: skip

    def row(name, role, **kw):
        base = dict(name=name, role=role, group_by=None, groups=None, largest_group=None,
                    single_group_batches=None, accuracy=0.984, loss=0.0791, agreement=1.0,
                    kl_mean=0.0, kl_median=0.0, l2_mean=0.0, l2_median=0.0, ratio=None,
                    excess=None, greater_fraction=None, leak=None)  # fmt: skip
        return {**base, **kw}

    rows = [
        row("iid", "reference"),
        row("iid-2", "noise", accuracy=0.977, loss=0.0784, agreement=0.971, kl_mean=0.0482,
            kl_median=0.00881, l2_mean=0.208, l2_median=0.155),
        row("label", "grouped", group_by="label", groups=4, largest_group=143,
            single_group_batches=13, accuracy=0.283, loss=1.713, agreement=0.299, kl_mean=5.12,
            kl_median=4.72, l2_mean=0.858, l2_median=0.879, ratio=106.3, excess=0.672,
            greater_fraction=0.994, leak=True),
        row("image_id", "grouped", group_by="image_id", groups=64, largest_group=14,
            single_group_batches=0, accuracy=0.982, loss=0.0755, agreement=0.973,
            kl_mean=0.0421, kl_median=0.0079, l2_mean=0.198, l2_median=0.149, ratio=0.874,
            excess=-0.002, greater_fraction=0.48, leak=False),
    ]  # fmt: skip
    finding = Finding(code="batch-leakage", severity="warning", layer=names[0],
                      message="batches grouped by label change the model's train-mode outputs "
                      "106x more than re-shuffled i.i.d. batches of the same samples do",
                      fix="train with batches that mix labels")  # fmt: skip
    extra = {
        **RUN, "verdict": "leak", "verdict_text": "Batch statistics leak information between "
        "samples: batches of 32 grouped by label (106x) change train-mode outputs beyond "
        "i.i.d. noise; grouping by image_id (0.874x) does not.", "group_by": ["label", "image_id"],
        "batch_size": 32, "samples": 512, "left_out": 0, "batches": 16, "seed": 0,
        "metric": "kl", "ratio_threshold": 2.0, "excess_threshold": 0.01, "has_labels": True,
        "forwards": 80, "arrangements": rows,
    }  # fmt: skip
    return report("leakage", layers, (finding,), extra)


BUILDERS = {
    "static": static_report,
    "inspect": dynamic_report,
    "precise": precise_report,
    "adapt": adapt_report,
    "ghost": ghost_report,
    "leakage": leakage_report,
}


def render(report: Report, width: int) -> str:
    buf = io.StringIO()
    Console(file=buf, width=width, color_system=None, force_terminal=False).print(
        report_view(report)
    )
    return buf.getvalue()


def words(text: str) -> str:
    """The text of table cells as one line of words (box drawing and line breaks dropped)."""
    return " ".join(re.sub("[\u2500-\u257f]", " ", text).split())


def fit_tables(renderable) -> list:
    """The FitTables of a view (walking rich Groups)."""
    from rich.console import Group

    from bnscope.render.fit import FitTable

    if isinstance(renderable, FitTable):
        return [renderable]
    if isinstance(renderable, Group):
        return [t for part in renderable.renderables for t in fit_tables(part)]
    return []


def row_cells(table, width: int) -> list[list[str]]:
    """Per row, the cells of the layer-name and number columns shown at ``width``: they never
    wrap, so each row's first line holds all of them whole."""
    layout = table.layout(width)
    keep = [i for i in layout.shown if table.columns[i].kind in ("name", "num")]
    return [[row[i].plain for i in keep] for row in table.rows]


@pytest.mark.parametrize("width", [80, 100, 160])
@pytest.mark.parametrize("kind", list(BUILDERS))
def test_golden_at_width(golden, kind, width):
    golden(f"widths/{kind}_{width}.txt", render(BUILDERS[kind](), width))


@pytest.mark.parametrize("width", [72, 80, 90, 100, 120, 160, 200])
@pytest.mark.parametrize("kind", list(BUILDERS))
def test_names_and_numbers_are_never_broken(kind, width):
    report = BUILDERS[kind]()
    text = render(report, width)
    lines = text.splitlines()
    assert max(len(line) for line in lines) <= width
    assert "…" not in text  # nothing cut: the longest name fits from 72 columns up
    for layer in report.layers:  # every name whole, on a line of its own table row
        assert any(f"│ {layer.name} " in line for line in lines), (layer.name, text)
    tables = fit_tables(report_view(report))
    assert tables
    for table in tables:
        for cells in row_cells(table, width):
            assert any(all(c in line for c in cells) for line in lines), (cells, text)


@pytest.mark.parametrize("kind", list(BUILDERS))
def test_hidden_columns_are_named(kind):
    wide, narrow = render(BUILDERS[kind](), 200), render(BUILDERS[kind](), 80)
    assert "hidden at this width" not in wide
    caption = re.search(r"(\d+) columns? hidden at this width: ([^(]*)\(", " ".join(narrow.split()))
    if kind != "adapt":  # adapt's 5 layers and 5 shift columns fit 80 columns once # is gone
        assert caption is not None, narrow
    if caption is not None:
        hidden = [h.strip() for h in caption.group(2).split(",")]
        assert len(hidden) == int(caption.group(1))
        assert "--json and report.json hold every value" in " ".join(narrow.split())


def test_static_columns_hide_in_order():
    """#, dead, tracked, C, gain, running_mean go first; layer, EMA init wt, running_var stay."""
    from bnscope.render.tables import static_layers_table

    table = static_layers_table(static_report().layers)
    headers = [c.header for c in table.columns]
    shown_at = {w: [headers[i] for i in table.layout(w).shown] for w in (200, 100, 80, 60)}
    assert shown_at[200] == headers
    assert "gain" not in shown_at[100] and "running_mean" in shown_at[100]
    assert shown_at[60][:2] == ["layer", "C"] and "EMA init wt" in shown_at[60]
    assert "running_mean" not in shown_at[60] and "gain" not in shown_at[60]


def test_very_narrow_console_shortens_names_from_the_left():
    text = render(dynamic_report(), 52)
    assert max(len(line) for line in text.splitlines()) <= 52
    assert "…denselayer16.norm2" in text  # the end of the name, which tells layers apart
    table = text.split("BN layers, worst first")[1].split("Findings")[0]
    assert "features.denseblock4.denselayer16.norm2" not in table


def test_identical_findings_are_one_row_and_json_stays_per_layer():
    report = static_report()
    for width in (80, 100, 160):
        text = render(report, width)
        findings = text[text.index("Findings") :]
        assert findings.count("ema-warmup") == 1, findings
        assert " ".join(findings.split()).count("EMA has only 400 updates") == 1
        assert "5 layers:" in findings
    doc = json.loads(report_json(report))
    assert [f["layer"] for f in doc["findings"] if f["code"] == "ema-warmup"] == list(NAMES)


def test_many_layers_are_counted_with_the_rest_elided():
    names = tuple(f"features.{i}.bn" for i in range(9))
    for width, column in ((80, 2), (200, 3)):  # stacked rows, then the wide layout
        text = render(static_report(names), width)
        lines = text[text.index("Findings") :].splitlines()
        cells = " ".join(line.split("│")[column] for line in lines if line.startswith("│"))
        row = " ".join(cells.split())  # the layer cells, as one line
        match = re.search(r"9 layers: ((?:features\.\d\.bn, )+)\+(\d+)", row)
        assert match is not None, text
        listed = match.group(1).rstrip(", ").split(", ")
        assert listed == list(names[: len(listed)]) and len(listed) + int(match.group(2)) == 9


def test_findings_worst_first_and_merged_only_when_identical():
    from bnscope.render.tables import group_findings

    report = dynamic_report()
    groups = group_findings(report.findings)
    assert [(g.code, len(g.layers)) for g in groups] == [
        ("ema-warmup", 5), ("stale-ema", 1), ("stale-ema", 1), ("train-test-gap", 0)
    ]  # fmt: skip
    err = Finding(code="ema-warmup", severity="error", layer="x", message=WARMUP_MESSAGE,
                  fix=WARMUP_FIX)  # fmt: skip
    merged = group_findings((*warmup(NAMES[:2]), err))
    assert [(g.severity, g.layers) for g in merged] == [("error", ("x",)), ("warning", NAMES[:2])]


NAME = st.from_regex(r"[a-z][a-z0-9_]{0,11}(\.[a-z0-9_]{1,12}){0,5}", fullmatch=True)


@settings(max_examples=25, deadline=None, derandomize=True)
@given(names=st.lists(NAME, min_size=1, max_size=5, unique=True), width=st.integers(40, 200))
def test_any_names_any_width(names, width):
    """Whatever the names and the width: no line is wider than the console, the name and
    number cells shown are whole, and every name is whole wherever the width has room."""
    names = (names * 5)[:5]
    for build in (static_report, dynamic_report, ghost_report):
        report = build(tuple(names))
        text = render(report, width)
        lines = text.splitlines()
        assert max(len(line) for line in lines) <= width, text
        for table in fit_tables(report_view(report)):
            if not table.layout(width).shortened:
                for cells in row_cells(table, width):
                    assert any(all(c in line for c in cells) for line in lines), (cells, text)
        if max(len(n) for n in names) + 20 <= width:  # room for the status column
            for name in names:
                assert f"│ {name} " in text, text


def test_shorten_left():
    from bnscope.render.fit import shorten_left

    name = "features.denseblock4.denselayer16.norm2"
    assert shorten_left(name, 60) == name
    assert shorten_left(name, 20) == "…denselayer16.norm2"
    assert shorten_left("blocks.5.2.conv_pw.bn1", 21) == "…5.2.conv_pw.bn1"
    assert shorten_left("abcdefghijklmnop", 6) == "…lmnop"  # no dot: the last characters
