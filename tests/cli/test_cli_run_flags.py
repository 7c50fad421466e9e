"""--device, --amp and --channels-last through the CLI: every model-running command takes them,
reports them, the project file may set amp/channels_last, and bad values are one line."""

from __future__ import annotations

import json

import pytest
import torch

from ..clirun import one_error_line, run
from ..conftest import tiny_spec


def bn_inputs_under_autocast(model, x: torch.Tensor) -> torch.Tensor:
    """The first BN layer's input as autocast to bf16 produces it (conv in bf16)."""
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        return model[0](x).double()


def test_precise_with_amp_and_channels_last(precise_env):
    tmp, ckpt, data, model, x = precise_env
    res = run(
        "precise", ckpt, "--model", tiny_spec(), "--data", data, "--batch-size", "16",
        "--amp", "bf16", "--channels-last", "--json",
    )  # fmt: skip
    assert res.exit_code == 0, res.stderr
    doc = json.loads(res.stdout)
    assert (doc["device"], doc["amp"], doc["channels_last"]) == ("cpu", "bf16", True)
    written = torch.load(tmp / "ck.precise.pt", weights_only=True)["model"]
    h = bn_inputs_under_autocast(model, x)
    torch.testing.assert_close(
        written["module.1.running_mean"].double(), h.mean((0, 2, 3)), rtol=1e-5, atol=1e-6
    )
    var = h.var((0, 2, 3), unbiased=False)
    assert float((written["module.1.running_var"].double() / var).log().abs().max()) < 1e-6
    for t in written.values():
        assert t.device.type == "cpu" and t.is_contiguous()

    res = run("precise", ckpt, "--model", tiny_spec(), "--data", data, "--batch-size", "16",
              "--amp", "fp16", "-o", tmp / "fp16.pt")  # fmt: skip
    assert res.exit_code == 0, res.stderr
    assert "ran on: cpu, fp16 autocast" in res.stdout


@pytest.mark.parametrize("command", ["inspect", "ghost", "adapt"])
def test_every_model_running_command_takes_amp_and_channels_last(precise_env, command):
    tmp, ckpt, data, _, _ = precise_env
    extra = {"ghost": ["--sizes", "2,4"], "adapt": ["-o", str(tmp / "ad.pt")]}.get(command, [])
    res = run(
        command, ckpt, "--model", tiny_spec(), "--data", data, "--batch-size", "16",
        "--amp", "bf16", "--channels-last", "--json", *extra,
    )  # fmt: skip
    assert res.exit_code == 0, res.stderr
    doc = json.loads(res.stdout)
    assert (doc["amp"], doc["channels_last"]) == ("bf16", True)
    if command == "inspect":
        assert doc["forwards"] == 3 * doc["batches"]  # the loader repeats its order
    if command == "ghost":
        assert doc["forwards"] == 4 * doc["batches"]


def test_project_file_sets_amp_and_flags_override_it(precise_env):
    tmp, ckpt, data, _, _ = precise_env
    (tmp / "bnscope.toml").write_text(
        f'checkpoint = "ck.pt"\nmodel = "{tiny_spec()}"\ndata = "d.pt"\n'
        'amp = "bf16"\nchannels_last = true\nbatch_size = 16\n'
    )
    res = run("precise", "--json", "-o", tmp / "a.pt", cwd=tmp)
    assert res.exit_code == 0, res.stderr
    doc = json.loads(res.stdout)
    assert (doc["amp"], doc["channels_last"]) == ("bf16", True)
    res = run("precise", "--json", "--amp", "fp16", "-o", tmp / "b.pt", cwd=tmp)
    assert json.loads(res.stdout)["amp"] == "fp16"
    (tmp / "bnscope.toml").write_text('checkpoint = "ck.pt"\namp = "fp8"\n')
    one_error_line(run("precise", cwd=tmp), "key 'amp' must be \"bf16\" or \"fp16\", got 'fp8'")


def test_a_gpu_without_bfloat16_is_one_line(precise_env, monkeypatch: pytest.MonkeyPatch):
    """An older GPU (simulated: no CUDA here is touched before the check) refuses --amp bf16
    before anything is loaded or written."""
    tmp, ckpt, data, _, _ = precise_env
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: "Old GPU")
    res = run("precise", ckpt, "--model", tiny_spec(), "--data", data, "--device", "cuda",
              "--amp", "bf16")  # fmt: skip
    one_error_line(
        res, "--amp bf16: this GPU (Old GPU) cannot autocast to bfloat16; use --amp fp16"
    )
    assert not (tmp / "ck.precise.pt").exists()
    res = run("precise", ckpt, "--model", tiny_spec(), "--data", data, "--device", "cuda:1")
    one_error_line(res, "--device cuda:1: only 1 CUDA devices")
