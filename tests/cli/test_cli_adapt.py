"""`bnscope adapt` through the CLI: checkpoint written, three-way evaluation, bad input."""

from __future__ import annotations

import json

import pytest
import torch

from ..clirun import one_error_line, run
from ..conftest import sha256, tiny_spec
from .test_cli_precise import listing


def test_adapt_writes_target_stats_and_reports(precise_env):
    tmp, ckpt, data, model, _ = precise_env
    g = torch.Generator().manual_seed(3)
    target = torch.randn(64, 3, 8, 8, generator=g) * 4 - 2
    torch.save(target, tmp / "target.pt")
    digest = sha256(ckpt)
    res = run(
        "adapt",
        ckpt,
        "--model",
        tiny_spec(),
        "--data",
        tmp / "target.pt",
        "--eval-data",
        data,
        "--json",
        "--report-dir",
        tmp / "rep",
    )
    assert res.exit_code == 0, res.stderr
    doc = json.loads(res.stdout)
    assert doc["schema"] == "bnscope.adapt/2" and doc["output"] == str(tmp / "ck.adapted.pt")
    assert doc["prior"] == 0 and doc["samples"] == 64
    assert {lay["name"] for lay in doc["layers"]} == {"1", "4"}
    assert any(f["code"] == "domain-shift" for f in doc["findings"])
    m = doc["metrics"]
    assert list(m["variants"]) == ["running", "adapted", "batch", "prior"]
    assert doc["online_prior"] == 16 and "online_priors" not in doc
    assert m["has_labels"] is True and m["variants"]["running"]["agreement"] == 1.0
    assert m["reference"] == "running" and m["data"].startswith("tensor file")
    out = torch.load(tmp / "ck.adapted.pt", weights_only=True)["model"]
    with torch.no_grad():
        h = model[0](target).double()
    torch.testing.assert_close(
        out["module.1.running_mean"].double(), h.mean((0, 2, 3)), rtol=1e-5, atol=1e-6
    )
    assert sha256(ckpt) == digest
    assert sorted(p.name for p in (tmp / "rep").iterdir()) == [
        "adapt_metrics.png",
        "domain_shift.png",
        "report.json",
    ]


def test_adapt_prior_and_unlabelled_eval(precise_env):
    tmp, ckpt, _, _, x = precise_env
    torch.save(x, tmp / "unl.pt")
    res = run(
        "adapt",
        ckpt,
        "--model",
        tiny_spec(),
        "--data",
        tmp / "unl.pt",
        "--prior",
        "90",
        "--eval-data",
        tmp / "unl.pt",
        "--json",
    )
    assert res.exit_code == 0
    doc = json.loads(res.stdout)
    assert doc["layers"][0]["weight_source"] == pytest.approx(0.5)
    assert doc["metrics"]["has_labels"] is False
    assert "agreement with the source model instead of accuracy" in res.stderr


@pytest.mark.parametrize(
    "args, fragment",
    [
        ([], "adapt needs --data"),
        (["--data", "DATA", "--prior", "-1"], "--prior"),
        (["--data", "EMPTY"], "no images or tensor files"),
        (["--data", "BADCH"], "the model failed on batch 0"),
        (["--data", "DATA", "-o", "CKPT"], "refusing to overwrite the input"),
    ],
)
def test_adapt_bad_input(precise_env, args, fragment):
    tmp, ckpt, data, _, _ = precise_env
    (tmp / "empty").mkdir()
    torch.save(torch.randn(6, 1, 8, 8), tmp / "badch.pt")
    subst = {"DATA": data, "EMPTY": tmp / "empty", "BADCH": tmp / "badch.pt", "CKPT": ckpt}
    before = listing(tmp)
    res = run("adapt", ckpt, "--model", tiny_spec(), *[str(subst.get(a, a)) for a in args])
    one_error_line(res, fragment)
    assert listing(tmp) == before


def test_corrupt_command(tmp_path):
    from PIL import Image

    src = tmp_path / "src" / "cls"
    src.mkdir(parents=True)
    for i in range(3):
        Image.new("RGB", (6, 6), (100, 120, 140)).save(src / f"{i}.png")
    res = run(
        "corrupt",
        tmp_path / "src",
        tmp_path / "dst",
        "--corruption",
        "contrast",
        "--severity",
        "5",
        "--json",
    )
    assert res.exit_code == 0, res.stderr
    doc = json.loads(res.stdout)
    assert doc["images"] == 3 and doc["schema"] == "bnscope.corrupt/2"
    assert sorted(p.name for p in (tmp_path / "dst" / "cls").iterdir()) == [
        "0.png",
        "1.png",
        "2.png",
    ]
    one_error_line(run("corrupt", tmp_path / "src", tmp_path / "dst"), "not empty")
    one_error_line(run("corrupt", tmp_path / "src", tmp_path / "d2", "--corruption", "fog"), "fog")
    one_error_line(run("corrupt", tmp_path / "src", tmp_path / "d3", "--severity", "6"), "severity")
    assert not (tmp_path / "d2").exists() and not (tmp_path / "d3").exists()
