"""`bnscope inspect` on checkpoints ported with the wrong conventions, end to end: a std in
running_var (var-convention, an error: exit 1 under --fail-on error) and a TF momentum in the
model code (momentum-convention, also in the static report with --model); the same checkpoint
unconverted is clean (docs/statistics.md, section 11)."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
import torch

from ..clirun import run
from ..conftest import sha256, tiny_spec

WIDE = json.dumps({"width": 16})


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """Small models run faster on one thread (and a shared machine stays usable)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="module")
def ported(tmp_path_factory):
    """A make_tiny(width=16) checkpoint whose BN input variances span e^-3 .. e^3, its EMA run
    over the data; ``ok.pt`` as trained, ``std.pt`` with sqrt(running_var) stored, ``d.pt``
    the data (with labels)."""
    from ..models import make_tiny

    tmp = tmp_path_factory.mktemp("ported")
    torch.manual_seed(0)
    model = make_tiny(width=16)
    scales = torch.exp(torch.linspace(-1.5, 1.5, 16))
    with torch.no_grad():
        for conv in (model[0], model[3]):
            conv.weight.mul_(scales[torch.randperm(16)].view(-1, 1, 1, 1))
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 3, (256,), generator=g)
    x = torch.randn(256, 3, 8, 8, generator=g) * 2 + 1 + y.view(-1, 1, 1, 1) * 0.3
    torch.save({"x": x, "y": y}, tmp / "d.pt")
    model.train()
    with torch.no_grad():
        for _ in range(3):
            for xb in x.split(32):
                model(xb)
    torch.save({"model": model.state_dict(), "epoch": 3}, tmp / "ok.pt")
    state = {k: v.sqrt() if k.endswith("running_var") else v for k, v in model.state_dict().items()}
    torch.save({"model": state, "epoch": 3}, tmp / "std.pt")
    return tmp


def test_std_in_running_var_is_an_error_in_the_json_document(ported):
    ckpt = ported / "std.pt"
    digest = sha256(ckpt)
    args = ("inspect", ckpt, "--model", tiny_spec(), "--model-kwargs", WIDE,
            "--data", ported / "d.pt", "--json")  # fmt: skip
    res = run(*args)
    assert res.exit_code == 0, res.stderr
    doc = json.loads(res.stdout)  # validated against the schema by run()
    found = [f for f in doc["findings"] if f["code"] == "var-convention"]
    assert [(f["layer"], f["severity"]) for f in found] == [("1", "error"), ("4", "error")]
    assert "running_var holds standard deviations" in found[0]["message"]
    assert "running_var = running_var ** 2" in found[0]["fix"]
    assert [lay["var_convention"] for lay in doc["layers"]] == ["std", "std"]
    assert all(abs(lay["var_slope"] - 0.5) < 0.1 for lay in doc["layers"])
    assert doc["verdict_text"].startswith("Converted checkpoint: running_var holds standard")
    assert set(doc["eps_check"]) >= {"eps", "other_eps", "evaluated", "variant"}
    res = run(*args, "--fail-on", "error")
    assert res.exit_code == 1 and json.loads(res.stdout)["findings"]  # the document, then 1
    assert sha256(ckpt) == digest and sorted(p.name for p in ported.iterdir()) == [
        "d.pt", "ok.pt", "std.pt",
    ]  # fmt: skip


def test_the_unconverted_checkpoint_is_clean(ported):
    res = run("inspect", ported / "ok.pt", "--model", tiny_spec(), "--model-kwargs", WIDE,
              "--data", ported / "d.pt", "--json", "--fail-on", "error")  # fmt: skip
    assert res.exit_code == 0, res.stdout
    doc = json.loads(res.stdout)
    codes = {f["code"] for f in doc["findings"]}
    assert not codes & {"var-convention", "momentum-convention", "eps-mismatch"}
    assert [lay["var_convention"] for lay in doc["layers"]] == [None, None]


def test_table_shows_the_conversion(ported):
    res = run("inspect", ported / "std.pt", "--model", tiny_spec(), "--model-kwargs", WIDE,
              "--data", ported / "d.pt")  # fmt: skip
    assert res.exit_code == 0, res.stderr
    assert res.stdout.startswith("Converted checkpoint: running_var holds standard deviations")
    assert "var-convention" in res.stdout


def test_tf_momentum_in_the_model_code(ported):
    kwargs = json.dumps({"width": 16, "momentum": 0.9})
    base = ("inspect", ported / "ok.pt", "--model", tiny_spec(), "--model-kwargs", kwargs)
    res = run(*base, "--static", "--json", "--fail-on", "warning")  # the model's real momentum
    assert res.exit_code == 1
    found = [f for f in json.loads(res.stdout)["findings"] if f["code"] == "momentum-convention"]
    assert [f["layer"] for f in found] == ["1", "4"]
    assert found[0]["fix"].startswith("set momentum=0.1 on this layer")
    res = run(*base, "--data", ported / "d.pt", "--json")
    assert res.exit_code == 0, res.stderr
    found = [f for f in json.loads(res.stdout)["findings"] if f["code"] == "momentum-convention"]
    assert [f["layer"] for f in found] == ["1", "4"] and "measured" in found[0]["message"]
    # without model code PyTorch's default is assumed: no momentum to judge
    res = run("inspect", ported / "ok.pt", "--json")
    assert "momentum-convention" not in res.stdout


def test_report_dir_has_the_conversion_figure_only_for_the_converted_checkpoint(ported, tmp_path):
    for name, expected in (("std", True), ("ok", False)):
        out = tmp_path / name
        res = run("inspect", ported / f"{name}.pt", "--model", tiny_spec(), "--model-kwargs",
                  WIDE, "--data", ported / "d.pt", "--report-dir", out)  # fmt: skip
        assert res.exit_code == 0, res.stderr
        files = sorted(p.name for p in out.iterdir())
        assert ("conversion.png" in files) == expected, files
        doc = json.loads((out / "report.json").read_text())
        assert ("conversion.png" in doc["report_files"]) == expected
        html = (out / "report.html").read_text()
        assert ("What running_var holds" in html) == expected
