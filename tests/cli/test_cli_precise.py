"""`bnscope precise` end to end: exact statistics written, structure kept, bad input refused."""

from __future__ import annotations

import json

import pytest
import torch

from bnscope.io.checkpoint import load_checkpoint

from ..clirun import one_error_line, run
from ..conftest import sha256, tiny_spec


def listing(folder):
    return sorted(p.name for p in folder.iterdir())


def test_precise_writes_exact_stats_and_keeps_structure(precise_env):
    tmp, ckpt, data, model, x = precise_env
    digest = sha256(ckpt)
    res = run(
        "precise", ckpt, "--model", tiny_spec(), "--data", data, "--batch-size", "16", "--json"
    )
    assert res.exit_code == 0, res.stderr
    doc = json.loads(res.stdout)
    assert doc["schema"] == "bnscope.precise/2" and doc["command"] == "precise"
    out = tmp / "ck.precise.pt"
    assert doc["output"] == str(out)
    assert doc["batches"] == 6 and doc["samples"] == 90
    assert [(lay["name"], lay["num_features"], lay["status"]) for lay in doc["layers"]] == [
        ("1", 4, "updated"),
        ("4", 4, "updated"),
    ]
    assert sha256(ckpt) == digest

    raw_in = torch.load(ckpt, weights_only=True)
    raw_out = torch.load(out, weights_only=True)
    assert raw_out.keys() == raw_in.keys() and raw_out["epoch"] == 7
    assert torch.equal(raw_out["optimizer"]["lr"], raw_in["optimizer"]["lr"])
    assert list(raw_out["model"]) == list(raw_in["model"])
    with torch.no_grad():
        h = model[0](x).double()
    torch.testing.assert_close(
        raw_out["model"]["module.1.running_mean"].double(), h.mean((0, 2, 3)), rtol=1e-5, atol=1e-6
    )
    torch.testing.assert_close(
        raw_out["model"]["module.1.running_var"].double(),
        h.var((0, 2, 3), unbiased=False),
        rtol=1e-5,
        atol=1e-7,
    )
    for k, v in raw_in["model"].items():
        if not (k.endswith("running_mean") or k.endswith("running_var")):
            assert torch.equal(v, raw_out["model"][k]), k
    assert int(raw_out["model"]["module.1.num_batches_tracked"]) == 5


def test_precise_eval_and_out_dir(precise_env):
    tmp, ckpt, data, _, _ = precise_env
    res = run(
        "precise",
        ckpt,
        "--model",
        tiny_spec(),
        "--data",
        data,
        "--eval-data",
        data,
        "-o",
        tmp / "new.pt",
        "--report-dir",
        tmp / "rep",
    )
    assert res.exit_code == 0, res.stderr
    assert "Evaluation on" in res.stdout and "accuracy" in res.stdout
    assert "Wrote" in res.stdout
    doc = json.loads((tmp / "rep" / "report.json").read_text())
    m = doc["metrics"]
    assert m["has_labels"] is True and m["reference"] == "running" and m["samples"] == 90
    before, after = m["variants"]["running"], m["variants"]["precise"]
    assert 0 <= before["accuracy"] <= 1 and 0 <= after["accuracy"] <= 1
    assert after["agreement"] is not None and after["kl"] >= 0 and after["rel_diff"] > 0
    assert (before["agreement"], before["kl"], before["rel_diff"]) == (1.0, 0.0, 0.0)
    assert (tmp / "rep" / "precise_change.png").read_bytes().startswith(b"\x89PNG")
    assert (tmp / "new.pt").exists()


def test_precise_eval_without_labels_reports_agreement(precise_env):
    tmp, ckpt, data, _, x = precise_env
    unl = tmp / "x.pt"
    torch.save(x, unl)
    res = run("precise", ckpt, "--model", tiny_spec(), "--data", unl, "--eval-data", unl, "--json")
    m = json.loads(res.stdout)["metrics"]
    assert m["has_labels"] is False and m["variants"]["running"]["accuracy"] is None
    assert 0 <= m["variants"]["precise"]["agreement"] <= 1


def test_precise_batches_limits(precise_env):
    tmp, ckpt, data, _, _ = precise_env
    res = run(
        "precise",
        ckpt,
        "--model",
        tiny_spec(),
        "--data",
        data,
        "--batches",
        "2",
        "--batch-size",
        "10",
        "--json",
    )
    assert json.loads(res.stdout)["samples"] == 20
    before = listing(tmp)
    one_error_line(
        run("precise", ckpt, "--model", tiny_spec(), "--data", data, "--batches", "50", "--force"),
        "ran out after 3 batches but 50 were asked for",
    )
    one_error_line(
        run("precise", ckpt, "--model", tiny_spec(), "--data", data, "--batches", "0"), "--batches"
    )
    assert listing(tmp) == before


def test_precise_safetensors_round_trip(precise_env, tmp_path):
    from safetensors.torch import load_file, save_file

    _, _, data, model, _ = precise_env
    st = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, st, metadata={"a": "b"})
    res = run("precise", st, "--model", tiny_spec(), "--data", data)
    assert res.exit_code == 0, res.stderr
    out = load_file(tmp_path / "w.precise.safetensors")
    assert set(out) == set(model.state_dict())
    assert load_checkpoint(tmp_path / "w.precise.safetensors").metadata == {"a": "b"}


@pytest.mark.parametrize(
    "extra, fragment",
    [
        ([], "needs --data"),
        (["--data", "DATA", "-o", "CKPT"], "refusing to overwrite the input"),
        (["--data", "DATA", "-o", "EXISTING"], "already exists"),
        (["--data", "BADSHAPE"], "the model failed on batch 0"),
        (["--data", "NAN"], "NaN or Inf reached BN layer 1 in batch 0"),
        (["--data", "DATA", "--device", "tpu"], "--device 'tpu'"),
    ],
)
def test_precise_bad_input(precise_env, extra, fragment):
    tmp, ckpt, data, _, _ = precise_env
    torch.save(torch.randn(8, 5, 8, 8), tmp / "bad.pt")
    torch.save(torch.full((8, 3, 8, 8), float("nan")), tmp / "nan.pt")
    (tmp / "existing.pt").write_bytes(b"keep me")
    subst = {
        "DATA": data,
        "CKPT": ckpt,
        "EXISTING": tmp / "existing.pt",
        "BADSHAPE": tmp / "bad.pt",
        "NAN": tmp / "nan.pt",
    }
    args = [str(subst.get(a, a)) for a in extra]
    before = listing(tmp)
    one_error_line(run("precise", ckpt, "--model", tiny_spec(), *args), fragment)
    assert listing(tmp) == before
    assert (tmp / "existing.pt").read_bytes() == b"keep me"


def test_precise_needs_model(precise_env):
    _, ckpt, data, _, _ = precise_env
    one_error_line(run("precise", ckpt, "--data", data), "needs --model")


def test_batch_of_one_with_bn1d(tmp_path):
    import importlib.util

    from ..conftest import MODELS

    spec = importlib.util.spec_from_file_location("_m", MODELS)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    ckpt = tmp_path / "mlp.pt"
    torch.save(mod.make_mlp().state_dict(), ckpt)
    torch.save(torch.randn(5, 6), tmp_path / "x.pt")
    before = listing(tmp_path)
    res = run(
        "precise",
        ckpt,
        "--model",
        tiny_spec("make_mlp"),
        "--data",
        tmp_path / "x.pt",
        "--batch-size",
        "1",
    )
    one_error_line(res, "got 1 value per channel in batch 0")
    assert "--batch-size 2" in res.stderr
    assert listing(tmp_path) == before


def _write_images(folder, n=3, size=(8, 8), corrupt=False):
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.new("RGB", size, (i * 40, 10, 200)).save(folder / f"{i}.png")
    if corrupt:
        (folder / "broken.png").write_bytes(b"\x89PNG not really")


@pytest.mark.parametrize(
    "make, fragment",
    [
        (lambda p: p / "nothing_here", "data not found"),
        (lambda p: (p / "empty").mkdir() or p / "empty", "no images or tensor files"),
        # a damaged image among others is left out with a warning (test_cli_data_mistakes.py);
        # a folder without any readable image is an error
        (lambda p: _write_images(p / "bad", n=0, corrupt=True) or p / "bad", "broken.png"),
        (lambda p: (p / "notes.txt").write_text("hi") and p / "notes.txt", "notes.txt"),
        (lambda p: _write_images(p / "gray", size=(8, 8)) or p / "gray", None),
    ],
    ids=["missing", "empty-folder", "no-readable-image", "text-file", "ok-images"],
)
def test_precise_data_errors(precise_env, make, fragment):
    tmp, ckpt, _, _, _ = precise_env
    spec = make(tmp)
    before = listing(tmp)
    res = run("precise", ckpt, "--model", tiny_spec(), "--data", spec, "-o", tmp / "out.pt")
    if fragment is None:  # a readable image folder works end to end
        assert res.exit_code == 0, res.stderr
        return
    one_error_line(res, fragment)
    assert listing(tmp) == before


def test_precise_image_channels_mismatch(precise_env):
    tmp, ckpt, _, _, _ = precise_env
    _write_images(tmp / "imgs")
    res = run("precise", ckpt, "--model", tiny_spec(), "--data", tmp / "imgs", "--channels", "1")
    one_error_line(res, "the model failed on batch 0 (input 3x1x8x8)")
