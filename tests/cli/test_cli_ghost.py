"""`bnscope ghost` end to end: table, JSON, figures, bad input."""

from __future__ import annotations

import json

from bnscope.records import GhostLayer, GhostLayerSize
from bnscope.render.figures import ghost_noise_figure, nbs_curve_figure

from ..clirun import one_error_line, run
from ..conftest import sha256, tiny_spec


def test_ghost_table_json_and_figures(precise_env):
    tmp, ckpt, data, _, _ = precise_env
    digest = sha256(ckpt)
    args = ("ghost", ckpt, "--model", tiny_spec(), "--data", data, "--batch-size", "16")
    res = run(*args, "--sizes", "2,3,8,32")
    assert res.exit_code == 0, res.stderr
    out = res.stdout
    assert "Normalization batch size (NBS curve)" in out and "Noisiest layers" in out
    assert "g=3: 16 = 5 x 3 + 1" in out  # the remainder is explained
    assert "g=32: larger than the batch size (16)" in out
    assert res.stderr == ""

    res = run(*args, "--sizes", "2,4,8,32", "--json", "--report-dir", tmp / "rep")
    assert res.exit_code == 0, res.stderr
    doc = json.loads(res.stdout)
    assert doc["schema"] == "bnscope.ghost/2" and doc["checkpoint"] == str(ckpt)
    assert [r["size"] for r in doc["sizes"]] == [2, 4, 8, 32]
    assert [r["status"] for r in doc["sizes"]] == ["ok", "ok", "ok", "skipped"]
    assert doc["batch_size"] == 16 and doc["samples"] == 90 and doc["metrics"]["has_labels"]
    assert doc["metrics"]["reference"] == "precise" and list(doc["metrics"]["variants"]) == [
        "precise"
    ]
    # 90 samples in batches of 16: five full batches and one of 10
    assert doc["sizes"][2]["chunks"] == 5 * 2 + 2 and doc["sizes"][2]["remainder_samples"] == 2
    assert [lay["name"] for lay in doc["layers"]] == ["1", "4"]
    assert all(len(lay["sizes"]) == 3 for lay in doc["layers"])
    files = sorted(p.name for p in (tmp / "rep").iterdir())
    assert files == ["ghost_noise.png", "nbs_curve.png", "report.json"]
    assert json.loads((tmp / "rep" / "report.json").read_text()) == doc
    assert sha256(ckpt) == digest
    assert not list(tmp.glob("ck.*.pt"))  # ghost writes no checkpoint


def test_ghost_bad_input(precise_env):
    tmp, ckpt, data, _, _ = precise_env
    base = ("ghost", ckpt, "--model", tiny_spec(), "--data", data)
    one_error_line(run(*base, "--sizes", "1,4"), "ghost size 1 is too small")
    one_error_line(run(*base, "--sizes", "2,x"), "comma-separated integers")
    one_error_line(run(*base, "--sizes", "2.5"), "comma-separated integers")
    one_error_line(
        run(*base, "--sizes", "8,16", "--batch-size", "4"), "fewer than every ghost size"
    )
    one_error_line(run("ghost", ckpt, "--data", data), "needs --model")
    one_error_line(run("ghost", ckpt, "--model", tiny_spec(), "--sizes", "2"), "needs --data")
    assert sorted(p.name for p in tmp.iterdir()) == ["ck.pt", "d.pt"]


def _layer(name: str, noise: list[float]) -> GhostLayer:
    sizes = tuple(
        GhostLayerSize(
            size=g,
            chunks=10,
            noise_mu=v,
            noise_var=2 * v,
            iid_mu=v * 1.1,
            iid_var=2.2 * v,
            effective_size=g * 0.9,
        )
        for g, v in zip([2, 4, 8], noise, strict=True)
    )
    return GhostLayer(
        name=name, num_features=4, status="analysed", reason=None, calls_per_forward=1, sizes=sizes
    )


def test_ghost_noise_figure_artists():
    layers = [_layer("a", [0.4, 0.28, 0.2]), _layer("b", [0.2, 0.14, 0.1])]
    layers.append(
        GhostLayer(
            name="c",
            num_features=4,
            status="not-called",
            reason="never ran",
            calls_per_forward=0,
            sizes=(),
        )
    )
    plot = ghost_noise_figure(layers)
    left, right = plot.figure.axes
    # per analysed layer: its measured line and its i.i.d. expectation; then the -1/2 guide
    assert len(left.lines) == 5
    assert list(left.lines[0].get_xdata()) == [2, 4, 8]
    assert list(left.lines[0].get_ydata()) == [0.4, 0.28, 0.2]
    assert [line.get_label() for line in plot.artists["noise_mu"]] == ["a", "b"]
    assert len(plot.artists["iid_mu"]) == 2 and plot.artists["slope_mu"] is left.lines[-1]
    assert list(plot.artists["noise_var"][1].get_ydata()) == [0.4, 0.28, 0.2]  # layer b
    assert plot.artists["noise_var"][1].axes is right
    assert left.get_xscale() == "log" and left.get_yscale() == "log"


def test_nbs_curve_figure_with_and_without_labels():
    rows = [
        {"size": 2, "status": "ok", "accuracy": 0.5, "agreement": 0.6, "kl": 1.0},
        {"size": 8, "status": "ok", "accuracy": 0.9, "agreement": 0.97, "kl": 0.1},
        {"size": 64, "status": "skipped", "accuracy": None, "agreement": None, "kl": None},
    ]
    fig = nbs_curve_figure(rows, {"accuracy": 0.95}).figure
    ax = fig.axes[0]
    assert list(ax.lines[0].get_xdata()) == [2, 8]
    assert list(ax.lines[0].get_ydata()) == [0.5, 0.9]
    assert list(ax.lines[1].get_ydata()) == [0.95, 0.95]
    assert ax.get_ylabel() == "accuracy"
    nolabel = [{**r, "accuracy": None} for r in rows]
    fig = nbs_curve_figure(nolabel, {"accuracy": None}).figure
    assert fig.axes[0].get_ylabel() == "top-1 agreement"
    assert list(fig.axes[0].lines[0].get_ydata()) == [0.6, 0.97]


def test_ghost_help_mentions_sizes():
    res = run("ghost", "--help")
    assert res.exit_code == 0 and "--sizes" in res.stdout
