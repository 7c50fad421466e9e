"""`bnscope adapt --domain NAME=SPEC ...`: one checkpoint per domain (and --split's one), the
report comparing the domains, and bad input refused with nothing written."""

from __future__ import annotations

import json

import pytest
import torch

from bnscope.nn import convert_to_split_bn, use_domain

from ..clirun import one_error_line, run
from ..conftest import sha256, tiny_spec
from ..models import make_tiny
from .test_cli_precise import listing


def domains_env(tmp):
    """Two target domains made from the same images: brighter and darker, lower contrast."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(64, 3, 8, 8, generator=g) * 2 + 1
    torch.save(x + 3.0, tmp / "bright.pt")
    torch.save(x * 0.25 - 2.0, tmp / "dark.pt")
    return {"bright": x + 3.0, "dark": x * 0.25 - 2.0}


def strip(state, prefix="module."):
    return {k[len(prefix) :]: v for k, v in state.items()}


def test_one_checkpoint_per_domain_split_checkpoint_and_report(precise_env):
    tmp, ckpt, _, _, _ = precise_env
    data = domains_env(tmp)
    digest = sha256(ckpt)
    res = run(
        "adapt", ckpt, "--model", tiny_spec(), "--domain", f"bright={tmp / 'bright.pt'}",
        "--domain", str(tmp / "dark.pt"), "--split", "--json", "--report-dir", tmp / "rep",
    )  # fmt: skip
    assert res.exit_code == 0, res.stderr
    doc = json.loads(res.stdout)  # validated against adapt.schema.json by run()
    assert doc["schema"] == "bnscope.adapt/2" and doc["divergence_labels"] == [
        "source", "bright", "dark"
    ]  # fmt: skip
    assert [d["name"] for d in doc["domains"]] == ["bright", "dark"]
    assert [d["output"] for d in doc["domains"]] == [
        str(tmp / "ck.adapted.bright.pt"), str(tmp / "ck.adapted.dark.pt")
    ]  # fmt: skip
    assert doc["split_output"] == str(tmp / "ck.adapted.split.pt")
    assert (
        doc["domains"][1]["data"].startswith("tensor file") and doc["domains"][1]["samples"] == 64
    )
    assert {lay["name"] for lay in doc["layers"]} == {"1", "4"}
    first = next(lay for lay in doc["layers"] if lay["name"] == "1")
    assert first["pair"] == ["bright", "dark"] and first["pair_kl"] > 1
    assert first["divergence"][1][2] == first["divergence"][2][1] == first["pair_kl"]
    assert "domain-divergence" in {f["code"] for f in doc["findings"]}
    assert sorted(p.name for p in (tmp / "rep").iterdir()) == [
        "domain_divergence.png", "report.json"
    ]  # fmt: skip
    assert sha256(ckpt) == digest
    # each domain's checkpoint keeps the input's structure and loads strictly into the model
    split_model = convert_to_split_bn(make_tiny(), 2).eval()
    split = torch.load(tmp / "ck.adapted.split.pt", weights_only=True)
    assert split["epoch"] == 7 and list(split) == ["model", "epoch", "optimizer"]
    assert split["model"]["module.1.running_mean"].shape == (2, 4)
    assert split["model"]["module.1.num_batches_tracked"].shape == (2,)
    split_model.load_state_dict(strip(split["model"]))  # strict
    for d, (name, x) in enumerate(data.items()):
        out = torch.load(tmp / f"ck.adapted.{name}.pt", weights_only=True)
        assert out["epoch"] == 7 and list(out) == ["model", "epoch", "optimizer"]
        model = make_tiny()
        model.load_state_dict(strip(out["model"]))  # strict
        with torch.no_grad():
            h = model[0](x).double()
        torch.testing.assert_close(
            model[1].running_mean.double(), h.mean((0, 2, 3)), rtol=1e-5, atol=1e-6
        )
        torch.testing.assert_close(
            model[1].running_var.double(), h.var((0, 2, 3), unbiased=False), rtol=1e-5, atol=0
        )
        model.eval()
        with use_domain(split_model, d), torch.no_grad():
            torch.testing.assert_close(split_model(x), model(x), rtol=0, atol=0)


def test_table_output_and_output_template(precise_env):
    tmp, ckpt, _, _, _ = precise_env
    domains_env(tmp)
    (tmp / "out").mkdir()
    res = run(
        "adapt", ckpt, "--model", tiny_spec(), "--domain", f"b={tmp / 'bright.pt'}",
        "--domain", f"d={tmp / 'dark.pt'}", "-o", tmp / "out" / "m.pt",
    )  # fmt: skip
    assert res.exit_code == 0, res.stderr
    assert listing(tmp / "out") == ["m.b.pt", "m.d.pt"]
    for text in ("Target domains", "Divergence between domains per layer", "most divergent",
                 "domain-divergence", f"Wrote {tmp / 'out' / 'm.b.pt'}"):  # fmt: skip
        assert text in res.stdout, text


@pytest.mark.parametrize(
    "args, fragment",
    [
        (
            ["--domain", "a=BRIGHT", "--domain", "a=DARK"],
            "--domain: the domain name 'a' is given twice",
        ),
        (["--domain", "A=BRIGHT", "--domain", "a=DARK"], "differ only in case"),
        (["--domain", "a b=BRIGHT"], "--domain: 'a b' is not a usable domain name"),
        (["--domain", "../up=BRIGHT"], "is not a usable domain name"),
        (["--domain", "split=BRIGHT"], "a domain cannot be named 'split'"),
        (["--domain", "a=BRIGHT", "--data", "DARK"], "--data and --domain both name"),
        (["--domain", "a=BRIGHT", "--eval-data", "DARK"], "--eval-data evaluates one adapted"),
        (["--split", "--data", "DARK"], "--split writes one checkpoint for several domains"),
        (
            ["--domain", "a=BRIGHT", "--domain", "z=BADCH"],
            "--domain z: the model failed on batch 0",
        ),
        (["--domain", "a=BRIGHT", "--domain", "z=MISSING"], "--domain z: data not found"),
        (["--domain", "a=BRIGHT", "--domain", "b=DARK", "--prior", "-1"], "--prior"),
        (["--domain", "a=BRIGHT", "-o", "FOLDER"], "is a folder: with --domain it is the path"),
    ],
)
def test_bad_domains_write_nothing(precise_env, args, fragment):
    tmp, ckpt, _, _, _ = precise_env
    domains_env(tmp)
    torch.save(torch.randn(6, 1, 8, 8), tmp / "badch.pt")
    (tmp / "folder").mkdir()
    subst = {"BRIGHT": tmp / "bright.pt", "DARK": tmp / "dark.pt", "BADCH": tmp / "badch.pt",
             "MISSING": tmp / "missing.pt", "FOLDER": tmp / "folder"}  # fmt: skip

    def fill(arg: str) -> str:
        for key, value in subst.items():
            arg = arg.replace(key, str(value))
        return arg

    before = listing(tmp)
    res = run("adapt", ckpt, "--model", tiny_spec(), "--split", *[fill(a) for a in args])
    one_error_line(res, fragment)
    assert listing(tmp) == before


def test_an_existing_output_is_refused_before_anything_runs(precise_env):
    tmp, ckpt, _, _, _ = precise_env
    domains_env(tmp)
    (tmp / "ck.adapted.dark.pt").write_bytes(b"old")
    args = ("adapt", ckpt, "--model", tiny_spec(), "--domain", f"bright={tmp / 'bright.pt'}",
            "--domain", f"dark={tmp / 'dark.pt'}")  # fmt: skip
    before = listing(tmp)
    one_error_line(run(*args), "ck.adapted.dark.pt already exists")
    assert listing(tmp) == before and (tmp / "ck.adapted.dark.pt").read_bytes() == b"old"
    res = run(*args, "--force")
    assert res.exit_code == 0, res.stderr
    assert (tmp / "ck.adapted.dark.pt").read_bytes() != b"old"
    assert (tmp / "ck.adapted.bright.pt").exists()
