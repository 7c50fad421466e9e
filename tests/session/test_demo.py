"""`bnscope demo` end to end (the same run a newcomer gets)."""

from __future__ import annotations

import json

from bnscope.demo.run import default_folder
from bnscope.demo.train import DEMO_EPOCHS
from bnscope.io.checkpoint import load_checkpoint

from ..clirun import one_error_line, run


def test_demo_end_to_end(tmp_path):
    folder = tmp_path / "demo"
    res = run("demo", folder, "--json")
    assert res.exit_code == 0, res.stderr
    doc = json.loads(res.stdout)
    assert doc["schema"] == "bnscope.demo/2" and doc["command"] == "demo"
    # run() checked the whole document against demo.schema.json: the four reports included
    for name in ("model.py", "ckpt.pt", "ckpt.precise.pt", "bnscope.toml"):
        assert (folder / name).is_file(), name
    classes = sorted(p.name for p in (folder / "data" / "train").iterdir())
    assert classes == ["circle", "cross", "stripes", "triangle"]
    assert len(list((folder / "data" / "val" / "circle").glob("*.png"))) == 100
    assert [lay["name"] for lay in doc["layers"]][-1] == "head.1"
    assert len(doc["layers"]) == 5
    ckpt = load_checkpoint(folder / "ckpt.pt")
    assert ckpt.key == "state_dict" and ckpt.raw["epoch"] == DEMO_EPOCHS
    assert ckpt.class_names == classes  # evaluation folders are matched to them by name
    assert len(list((folder / "data" / "train" / "circle").glob("*.png"))) == 800
    # inspect (dynamic, on data/train) names the stale layers and predicts the gain ...
    ins = doc["inspect"]
    assert ins["verdict"] == "stale"
    stale = {f["layer"] for f in ins["findings"] if f["code"] == "stale-ema"}
    assert len(stale) >= 2 and stale <= {lay["name"] for lay in ins["layers"]}
    acc = {k: v["accuracy"] for k, v in ins["metrics"]["variants"].items()}
    assert acc["precise"] > acc["running"] + 0.03
    # ... that precise then delivers on data/val
    m = doc["precise"]["metrics"]
    assert m["has_labels"] is True
    # the demo checkpoint's EMA lags the weights; Precise BN must recover accuracy
    before, after = m["variants"]["running"]["accuracy"], m["variants"]["precise"]["accuracy"]
    assert after > before
    assert after > 0.85

    # Adaptive BN on the Gaussian-noise copy: a model trained here on synthetic data, adapted
    # to corrupted/train, must gain clearly on corrupted/val (measured: 34% -> 93%; margin 20)
    a = doc["adapt"]["metrics"]
    assert a["has_labels"] is True
    acc = {k: v["accuracy"] for k, v in a["variants"].items()}
    assert acc["adapted"] > acc["running"] + 0.20, acc
    assert (folder / "ckpt.precise.adapted.pt").is_file()
    # the test-time prior sweep on the same noisy images (measured: N=0 85%, 16 86%, 64 68%,
    # 256 41%, source 29%): small N gains like test-batch statistics, large N tends to source
    rows = doc["adapt"]["online_priors"]
    assert [r["prior"] for r in rows] == [0, 16, 64, 256]
    # N=0 is test-batch statistics (computed another way: a sample may flip) and N=16 is the
    # prior variant (the same computation)
    assert abs(rows[0]["accuracy"] - acc["batch"]) <= 0.01 and rows[1]["accuracy"] == acc["prior"]
    assert rows[0]["accuracy"] > acc["running"] + 0.20, rows
    assert rows[-1]["accuracy"] < rows[0]["accuracy"] and rows[-1]["agreement"] > 0.5
    assert len(list((folder / "corrupted" / "val" / "circle").glob("*.png"))) == 100

    # the NBS curve of the precise checkpoint on data/val: every size analysed, labels used,
    # the smallest size clearly worse than population statistics (measured: 49% vs 96%)
    g = doc["ghost"]
    assert [r["size"] for r in g["sizes"]] == [2, 4, 8, 16, 32]
    assert all(r["status"] == "ok" for r in g["sizes"]) and g["metrics"]["has_labels"] is True
    assert g["sizes"][0]["accuracy"] < g["metrics"]["variants"]["precise"]["accuracy"] - 0.2
    assert g["sizes"][0]["accuracy"] < g["sizes"][-1]["accuracy"]
    assert any(f["code"] == "small-nbs" for f in g["findings"])

    # the project file written into the folder makes the commands work with no arguments;
    # the training data holds 100 batches, so the README's `bnscope precise --batches 100`
    # works (--force: the demo wrote ckpt.precise.pt), and one more is refused before reading
    res = run("inspect", "--json", cwd=folder)
    assert res.exit_code == 0, res.stderr
    assert json.loads(res.stdout)["project_file"] == str(folder / "bnscope.toml")
    res = run("precise", "--batches", "100", "--force", "--json", cwd=folder)
    assert res.exit_code == 0, res.stderr
    doc = json.loads(res.stdout)
    assert (doc["batches"], doc["samples"]) == (100, 3200)
    res = run("precise", "--batches", "101", "--force", cwd=folder)
    one_error_line(res, "--batches 101, but the data holds 100 batches (image folder ")
    assert "data/train (4 classes, 3200 images), in batches of 32)" in res.stderr

    # a non-empty folder is refused without --force
    one_error_line(run("demo", folder), "is not empty")


def test_default_folder_is_new(tmp_path):
    assert default_folder(tmp_path) == tmp_path / "bnscope-demo"
    (tmp_path / "bnscope-demo").mkdir()
    assert default_folder(tmp_path) == tmp_path / "bnscope-demo-2"
