"""`bnscope adapt` with the test-time prior (--online-prior, --online-priors) and partial
adaptation (--only, --first-layers): JSON, table, figures and bad input."""

from __future__ import annotations

import json

import pytest
import torch

from ..clirun import one_error_line, run
from ..conftest import tiny_spec
from .test_cli_precise import listing


def target_file(tmp):
    g = torch.Generator().manual_seed(3)
    torch.save(torch.randn(64, 3, 8, 8, generator=g) * 4 - 2, tmp / "target.pt")
    return tmp / "target.pt"


def test_prior_variant_sweep_and_partial_adaptation_in_json(precise_env):
    tmp, ckpt, data, _, _ = precise_env
    res = run(
        "adapt", ckpt, "--model", tiny_spec(), "--data", target_file(tmp), "--eval-data", data,
        "--online-prior", "64", "--online-priors", "inf,0,16, 64", "--only", "mean",
        "--first-layers", "1", "--json", "--report-dir", tmp / "rep",
    )  # fmt: skip
    assert res.exit_code == 0, res.stderr
    doc = json.loads(res.stdout)  # run() validated it against adapt.schema.json
    assert doc["only"] == "mean" and doc["first_layers"] == 1
    assert [(x["name"], x["status"], x["adapted"]) for x in doc["layers"]] == [
        ("1", "updated", "mean"),
        ("4", "kept", None),
    ]
    m = doc["metrics"]
    v = m["variants"]
    assert list(v) == ["running", "adapted", "batch", "prior"] and doc["online_prior"] == 64
    rows = doc["online_priors"]
    assert [r["prior"] for r in rows] == [0, 16, 64, "inf"]  # sorted, inf last
    by_n = {r["prior"]: r for r in rows}
    # the ends of the sweep are test-batch statistics and the source model
    for key in ("accuracy", "loss", "agreement", "kl", "rel_diff"):
        assert by_n[0][key] == pytest.approx(v["batch"][key], abs=1e-6), key
        assert by_n["inf"][key] == pytest.approx(v["running"][key], abs=1e-12), key
        assert by_n[64][key] == v["prior"][key], key
    assert by_n["inf"]["agreement"] == 1.0 and by_n["inf"]["rel_diff"] == 0.0
    # between the ends, the outputs move towards the source model as N grows
    assert by_n[0]["rel_diff"] > by_n[16]["rel_diff"] > by_n[64]["rel_diff"] > 0
    assert sorted(p.name for p in (tmp / "rep").iterdir()) == [
        "adapt_metrics.png",
        "domain_shift.png",
        "online_priors.png",
        "report.json",
    ]
    out = torch.load(tmp / "ck.adapted.pt", weights_only=True)["model"]
    src = torch.load(ckpt, weights_only=True)["model"]
    for key in ("module.1.running_var", "module.1.num_batches_tracked", "module.4.running_mean",
                "module.4.running_var", "module.4.num_batches_tracked"):  # fmt: skip
        assert torch.equal(out[key], src[key]), key
    assert not torch.equal(out["module.1.running_mean"], src["module.1.running_mean"])


def test_prior_sweep_table_and_partial_column(precise_env):
    tmp, ckpt, data, _, _ = precise_env
    res = run(
        "adapt", ckpt, "--model", tiny_spec(), "--data", target_file(tmp), "--eval-data", data,
        "--online-priors", "0,16", "--only", "var", "-o", tmp / "out.pt",
    )  # fmt: skip
    assert res.exit_code == 0, res.stderr
    text = " ".join(res.stdout.split())
    assert "prior N=16" in text and "Test-time prior sweep (each test batch" in text
    assert "adapted" in text and "Partial: variances only." in text


def test_no_eval_data_no_prior_variant(precise_env):
    tmp, ckpt, _, _, _ = precise_env
    res = run(
        "adapt", ckpt, "--model", tiny_spec(), "--data", target_file(tmp), "--json",
        "--online-prior", "0",
    )  # fmt: skip
    assert res.exit_code == 0, res.stderr
    doc = json.loads(res.stdout)
    assert "metrics" not in doc and "online_prior" not in doc
    assert [x["adapted"] for x in doc["layers"]] == ["mean+var", "mean+var"]


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--online-priors", "0,-1", "--eval-data", "DATA"], "--online-priors must be comma"),
        (["--online-priors", "0,x", "--eval-data", "DATA"], "--online-priors must be comma"),
        (["--online-priors", ",", "--eval-data", "DATA"], "--online-priors is empty"),
        (["--online-priors", "0,16"], "--online-priors evaluates on labelled target data"),
        (["--online-prior", "-1", "--eval-data", "DATA"], "--online-prior must be a number"),
        (["--online-prior", "nan", "--eval-data", "DATA"], "--online-prior must be a number"),
        (["--first-layers", "0"], "--first-layers must be an integer >= 1"),
        (["--first-layers", "two"], "'--first-layers'"),
        (["--only", "other"], "--only must be mean or var"),
    ],
)
def test_bad_prior_and_partial_options(precise_env, args, fragment):
    tmp, ckpt, data, _, _ = precise_env
    target = target_file(tmp)
    before = listing(tmp)
    subst = {"DATA": str(data)}
    res = run(
        "adapt", ckpt, "--model", tiny_spec(), "--data", target, "--report-dir", tmp / "rep",
        *[subst.get(a, a) for a in args],
    )  # fmt: skip
    one_error_line(res, fragment)
    assert listing(tmp) == before
