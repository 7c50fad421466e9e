"""`bnscope leakage` end to end: table, JSON, report folder, --fail-on, bad input."""

from __future__ import annotations

import json

import pytest
import torch
from torch.nn import functional as F

import bnscope
from bnscope.records import LeakageArrangement
from bnscope.render.figures import leakage_figure

from ..clirun import one_error_line, run
from ..conftest import color_folder, sha256, tiny_spec
from ..models import make_tiny


def class_mean_data(n: int, seed: int = 0):
    """3x8x8 inputs whose 3 classes differ in their channel means."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (n,), generator=g)
    means = torch.tensor([[2.0, 0.0, -1.0], [-1.0, 2.0, 0.0], [0.0, -1.0, 2.0]])
    return torch.randn(n, 3, 8, 8, generator=g) + means[y][:, :, None, None], y


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """make_tiny trained with i.i.d. batches on such data; data with labels and a random
    ``image_id`` (unrelated to the inputs), and without labels."""
    tmp = tmp_path_factory.mktemp("leakage")
    x, y = class_mean_data(320)
    torch.manual_seed(0)
    model = make_tiny()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    g = torch.Generator().manual_seed(1)
    for _ in range(30):
        idx = torch.randint(0, len(x), (32,), generator=g)
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    torch.save(model.state_dict(), tmp / "ck.pt")
    image_id = torch.randint(0, 40, (len(x),), generator=g)
    torch.save({"x": x, "y": y, "image_id": image_id}, tmp / "d.pt")
    torch.save({"x": x}, tmp / "unlabelled.pt")
    return tmp


def test_leakage_json_report_folder_and_fail_on(env):
    digest = sha256(env / "ck.pt")
    base = ("leakage", env / "ck.pt", "--model", tiny_spec(), "--data", env / "d.pt")
    res = run(*base, "--group-by", "label,image_id", "--json", "--report-dir", env / "rep")
    assert res.exit_code == 0, res.stderr
    doc = json.loads(res.stdout)  # run() validated it against the leakage schema
    assert doc["schema"] == "bnscope.leakage/2" and doc["command"] == "leakage"
    assert doc["data"] == f"tensor file {env / 'd.pt'} (320 samples)"
    assert (doc["batch_size"], doc["samples"], doc["batches"], doc["seed"]) == (32, 320, 10, 0)
    assert doc["group_by"] == ["label", "image_id"] and doc["verdict"] == "leak"
    rows = {r["name"]: r for r in doc["arrangements"]}
    assert list(rows) == ["iid", "iid-2", "label", "image_id"]
    assert rows["label"]["leak"] is True and rows["image_id"]["leak"] is False
    assert rows["image_id"]["groups"] == 40
    assert [(f["code"], f["severity"]) for f in doc["findings"]] == [("batch-leakage", "warning")]
    assert [lay["name"] for lay in doc["layers"]] == ["1", "4"]
    assert [a["arrangement"] for a in doc["layers"][0]["arrangements"]] == list(rows)
    assert sorted(p.name for p in (env / "rep").iterdir()) == ["leakage.png", "report.json"]
    saved = json.loads((env / "rep" / "report.json").read_text())
    assert saved == {**doc, "report_files": ["report.json", "leakage.png"]}
    assert sha256(env / "ck.pt") == digest and not list(env.glob("ck.*.pt"))

    res = run(*base, "--fail-on", "warning", "--json")
    assert res.exit_code == 1 and json.loads(res.stdout)["samples"] == 320
    res = run(*base, "--fail-on", "warning", "--samples", "128", "--json")  # 4 batches
    assert res.exit_code == 0 and "Not judged" in json.loads(res.stdout)["verdict_text"]
    res = run(*base, "--group-by", "image_id", "--fail-on", "warning", "--json")
    assert res.exit_code == 0 and json.loads(res.stdout)["findings"] == []


def test_a_job_writes_the_document_the_cli_prints(env):
    job = bnscope.open(env / "ck.pt", model=tiny_spec(), data=str(env / "d.pt"))
    doc = job.leakage("label,image_id", samples=256).report.to_dict()
    res = run("leakage", env / "ck.pt", "--model", tiny_spec(), "--data", env / "d.pt",
              "--group-by", "label,image_id", "--samples", "256", "--json")  # fmt: skip
    assert res.exit_code == 0, res.stderr
    assert doc == json.loads(res.stdout)


@pytest.mark.parametrize("width", [80, 100])
def test_leakage_table_fits_the_console(env, monkeypatch, width):
    monkeypatch.setenv("COLUMNS", str(width))
    res = run("leakage", env / "ck.pt", "--model", tiny_spec(), "--data", env / "d.pt",
              "--samples", "256")  # fmt: skip
    assert res.exit_code == 0, res.stderr
    lines = res.stdout.splitlines()
    assert max(len(line) for line in lines) <= width
    text = " ".join(res.stdout.split())
    assert "Train-mode outputs per arrangement" in text and "LEAK" in text
    assert "batch-leakage" in text and "256 samples in 8 batches of 32" in text


def test_leakage_bad_input(env, tmp_path):
    base = ("leakage", env / "ck.pt", "--model", tiny_spec())
    data = ("--data", env / "d.pt")
    one_error_line(
        run(*base, *data, "--group-by", "label,frame"),
        f"{env / 'd.pt'} has no per-sample entry 'frame' (entries: 'x', 'y', 'image_id')",
    )
    one_error_line(
        run(*base, "--data", env / "unlabelled.pt"),
        "--group-by label needs labels, but batch 0 carries none",
    )
    one_error_line(run(*base, *data, "--group-by", "label,label"), "names 'label' twice")
    one_error_line(run(*base, *data, "--group-by", "iid"), "the name of an i.i.d. arrangement")
    one_error_line(run(*base, *data, "--samples", "3"), "--samples 3 is not an integer >= 4")
    one_error_line(
        run(*base, *data, "--samples", "40"), "40 samples make fewer than 2 batches of 32"
    )
    one_error_line(run("leakage", env / "ck.pt", *data), "leakage runs the model")
    one_error_line(run(*base), "leakage needs --data")
    folder = color_folder(tmp_path / "img")
    one_error_line(
        run(*base, "--data", folder, "--group-by", "image_id", "--image-size", "8"),
        "--group-by image_id: the samples of an image folder carry no entry 'image_id'",
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["img"]


def _row(name: str, role: str, kl: float, accuracy: float, ratio=None, leak=None) -> dict:
    return LeakageArrangement(
        name=name, role=role, group_by=None if role != "grouped" else name, groups=None,
        largest_group=None, single_group_batches=None, accuracy=accuracy, loss=0.1,
        agreement=1.0, kl_mean=kl, kl_median=kl / 2, l2_mean=kl, l2_median=kl, ratio=ratio,
        excess=None, greater_fraction=None, leak=leak,
    ).to_dict()  # fmt: skip


def test_leakage_figure_artists():
    rows = [
        _row("iid", "reference", 0.0, 0.98),
        _row("iid-2", "noise", 0.05, 0.97),
        _row("label", "grouped", 5.0, 0.28, ratio=100.0, leak=True),
        _row("key", "grouped", 0.04, 0.98, ratio=0.8, leak=False),
    ]
    changes = {"iid-2": torch.tensor([0.0, 0.01, 0.1]), "label": torch.tensor([4.0, 5.0, 6.0]),
               "key": torch.tensor([0.02, 0.04, 0.06])}  # fmt: skip
    plot = leakage_figure(rows, changes, ratio_threshold=2.0)
    a = plot.artists
    assert [b.get_height() for b in a["bars"]] == pytest.approx([0.05, 5.0, 0.04])
    assert [t.get_text() for t in a["ratios"]] == ["100x", "0.8x"]
    assert a["noise"].get_ydata()[0] == pytest.approx(0.05)
    assert a["threshold"].get_ydata()[0] == pytest.approx(0.1)
    assert [b.get_height() for b in a["score_bars"]] == pytest.approx([0.98, 0.97, 0.28, 0.98])
    assert [t.get_text() for t in a["score_labels"]][2] == "28.0%"
    assert [line.get_label() for line in a["cdfs"]] == ["iid-2", "label", "key"]
    x, y = a["cdfs"][1].get_data()
    assert list(x) == pytest.approx([4.0, 5.0, 6.0]) and list(y) == pytest.approx([1 / 3, 2 / 3, 1])
    assert a["bars"][1].get_facecolor() != a["bars"][2].get_facecolor()  # a leak stands out
    assert len(plot.axes) == 3 and plot.axes[0].get_yscale() == "log"
    # without per-sample changes (a report read back from JSON): two panels
    assert len(leakage_figure(rows).axes) == 2
