"""`bnscope inspect` through the CLI: exit codes, stdout/stderr split, JSON, --report-dir, bad
input."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from ..clirun import one_error_line, run
from ..conftest import sha256, tiny_spec, trained_tiny


def test_static_table(tiny_ckpt):
    res = run("inspect", tiny_ckpt)
    assert res.exit_code == 0, res.stderr
    assert "BatchNorm layers" in res.stdout
    assert "2 BatchNorm layers, no findings." in res.stdout
    assert "momentum 0.1 and eps 1e-5 assumed" in res.stdout
    assert res.stderr == ""


def test_json_is_one_document(tiny_ckpt):
    res = run("inspect", tiny_ckpt, "--json")
    assert res.exit_code == 0
    doc = json.loads(res.stdout)
    assert doc["schema"] == "bnscope.inspect/2"
    assert doc["command"] == "inspect"
    assert doc["checkpoint"] == str(tiny_ckpt)
    assert [lay["name"] for lay in doc["layers"]] == ["1", "4"]
    assert doc["layers"][0]["num_features"] == 4
    assert doc["findings"] == []
    assert doc["format"] == "torch"
    assert res.stderr == ""


def test_json_findings_and_fail_on(tmp_path):
    model = trained_tiny(steps=60)
    model[4].reset_running_stats()
    model[1].weight.data[0] = 0
    path = tmp_path / "bad.pt"
    torch.save({"state_dict": model.state_dict(), "epoch": 3}, path)
    res = run("inspect", path, "--json")
    doc = json.loads(res.stdout)
    assert res.exit_code == 0
    assert doc["key"] == "state_dict"
    got = {(f["code"], f["layer"], f["severity"]) for f in doc["findings"]}
    assert got == {("never-updated", "4", "error"), ("dead-channel", "1", "info")}
    for f in doc["findings"]:
        assert f["fix"]
    assert run("inspect", path, "--fail-on", "error").exit_code == 1
    assert run("inspect", path, "--fail-on", "info", "--json").exit_code == 1
    model[4].num_batches_tracked.fill_(1000)
    model[4].running_var.fill_(2)
    torch.save(model.state_dict(), path)
    assert run("inspect", path, "--fail-on", "warning").exit_code == 0
    assert run("inspect", path, "--fail-on", "info").exit_code == 1


def test_fail_on_bad_level(tiny_ckpt):
    one_error_line(run("inspect", tiny_ckpt, "--fail-on", "loud"), "--fail-on 'loud'")


def test_prefix_reported_and_stripped(tmp_path):
    sd = {f"module._orig_mod.{k}": v for k, v in trained_tiny(steps=60).state_dict().items()}
    path = tmp_path / "ddp.pt"
    torch.save({"model": sd}, path)
    doc = json.loads(run("inspect", path, "--json").stdout)
    assert doc["prefix"] == "module._orig_mod."
    assert doc["key"] == "model"
    assert [lay["name"] for lay in doc["layers"]] == ["1", "4"]


def test_with_model_uses_real_momentum(tmp_path):
    model = trained_tiny(steps=10)
    path = tmp_path / "m.pt"
    torch.save(model.state_dict(), path)
    doc = json.loads(run("inspect", path, "--model", tiny_spec(), "--json").stdout)
    assert doc["momentum_assumed"] is False
    assert doc["model"] == tiny_spec()
    # 10 updates at momentum 0.1: warm-up weight 0.9**10 = 0.35
    assert {f["code"] for f in doc["findings"]} == {"ema-warmup"}
    assert doc["layers"][0]["ema_init_weight"] == pytest.approx(0.9**10)


def test_out_dir_writes_report_and_figure(tiny_ckpt, tmp_path):
    out = tmp_path / "report"
    res = run("inspect", tiny_ckpt, "--report-dir", out, "--json")
    assert res.exit_code == 0, res.stderr
    assert json.loads((out / "report.json").read_text()) == json.loads(res.stdout)
    png = (out / "running_stats.png").read_bytes()
    assert png.startswith(b"\x89PNG")
    assert sorted(p.name for p in out.iterdir()) == ["report.json", "running_stats.png"]


def test_no_status_lines_when_not_a_terminal(tiny_ckpt, tmp_path):
    for i, extra in enumerate(([], ["--quiet"], ["--json"])):
        res = run("inspect", tiny_ckpt, "--report-dir", tmp_path / f"o{i}", *extra)
        assert res.exit_code == 0 and res.stderr == ""


def test_project_file_supplies_checkpoint(tmp_path, tiny_ckpt):
    (tmp_path / "bnscope.toml").write_text(f'checkpoint = "{tiny_ckpt.name}"\n')
    (tmp_path / tiny_ckpt.name).write_bytes(tiny_ckpt.read_bytes())
    res = run("inspect", "--json", cwd=tmp_path)
    assert res.exit_code == 0, res.stderr
    doc = json.loads(res.stdout)
    assert doc["project_file"] == str(tmp_path / "bnscope.toml")
    assert doc["checkpoint"] == str(tmp_path / tiny_ckpt.name)


def test_no_checkpoint_anywhere(tmp_path):
    one_error_line(run("inspect", cwd=tmp_path), "no checkpoint given")


def test_safetensors(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in trained_tiny(steps=60).state_dict().items()}, path)
    doc = json.loads(run("inspect", path, "--json").stdout)
    assert doc["format"] == "safetensors"
    assert len(doc["layers"]) == 2


def test_torchscript_static(tmp_path):
    model = trained_tiny(steps=60).eval()
    path = tmp_path / "ts.pt"
    torch.jit.save(torch.jit.trace(model, torch.randn(2, 3, 8, 8)), path)
    doc = json.loads(run("inspect", path, "--json").stdout)
    assert doc["format"] == "torchscript"
    assert [lay["name"] for lay in doc["layers"]] == ["1", "4"]
    one_error_line(run("inspect", path, "--model", tiny_spec()), "TorchScript")


def test_whole_module_needs_trust(tmp_path):
    path = tmp_path / "whole.pt"
    torch.save(trained_tiny(steps=60), path)
    one_error_line(run("inspect", path), "--trust-checkpoint")
    res = run("inspect", path, "--trust-checkpoint", "--json")
    assert res.exit_code == 0, res.stderr
    doc = json.loads(res.stdout)
    assert doc["format"] == "module"
    assert doc["momentum_assumed"] is False


def test_no_batchnorm_is_a_finding(tmp_path):
    path = tmp_path / "lin.pt"
    torch.save(torch.nn.Linear(3, 3).state_dict(), path)
    res = run("inspect", path, "--json")
    assert res.exit_code == 0
    assert [f["code"] for f in json.loads(res.stdout)["findings"]] == ["no-batchnorm"]
    assert run("inspect", path, "--fail-on", "warning").exit_code == 1


def _truncated(tmp_path: Path) -> Path:
    good = tmp_path / "good.pt"
    torch.save(trained_tiny(steps=1).state_dict(), good)
    data = good.read_bytes()
    bad = tmp_path / "trunc.pt"
    bad.write_bytes(data[: len(data) // 2])
    return bad


@pytest.mark.parametrize(
    "make, fragment",
    [
        (lambda p: p / "missing.pt", "not found"),
        (lambda p: p, "directory"),
        (lambda p: (p / "rand.pt").write_bytes(os.urandom(2048)) and p / "rand.pt", "cannot read"),
        (lambda p: (p / "t.txt").write_text("hello world\n") and p / "t.txt", "cannot read"),
        (lambda p: (p / "e.pt").write_bytes(b"") or p / "e.pt", "empty"),
        (_truncated, "cannot read"),
    ],
    ids=["missing", "directory", "random", "text", "empty", "truncated"],
)
def test_bad_checkpoints(tmp_path, make, fragment):
    path = make(tmp_path)
    before = sorted(tmp_path.iterdir())
    one_error_line(run("inspect", path, "--report-dir", tmp_path / "out"), fragment)
    assert sorted(tmp_path.iterdir()) == before  # nothing written


def test_model_errors(tiny_ckpt, tmp_path):
    one_error_line(run("inspect", tiny_ckpt, "--model", "nopkg_zz.mod:f"), "not found")
    one_error_line(run("inspect", tiny_ckpt, "--model", "/nope/m.py:f"), "not found")
    one_error_line(run("inspect", tiny_ckpt, "--model", tiny_spec("nope")), "no attribute")
    one_error_line(run("inspect", tiny_ckpt, "--model", tiny_spec("make_raises")), "exploded")
    one_error_line(
        run("inspect", tiny_ckpt, "--model", tiny_spec(), "--model-kwargs", "{bad"), "JSON"
    )
    one_error_line(
        run("inspect", tiny_ckpt, "--model", tiny_spec(), "--model-kwargs", '{"width": 8}'),
        "does not fit the model",
    )
    one_error_line(run("inspect", tiny_ckpt, "--model-kwargs", "{}"), "without --model")


def test_input_is_never_modified(tiny_ckpt, tmp_path):
    digest = sha256(tiny_ckpt)
    run("inspect", tiny_ckpt, "--report-dir", tmp_path / "o", "--json")
    assert sha256(tiny_ckpt) == digest


def test_usage_errors_are_one_line(tiny_ckpt):
    res = run("inspect", tiny_ckpt, "--no-such-flag")
    one_error_line(res, "No such option")
    assert "bnscope inspect --help" in res.stderr


def test_debug_shows_traceback(tmp_path):
    res = run("inspect", tmp_path / "missing.pt", "--debug")
    assert res.exit_code == 2
    assert "Traceback" in res.stderr
    assert res.stderr.strip().splitlines()[-1].startswith("bnscope: error:")
