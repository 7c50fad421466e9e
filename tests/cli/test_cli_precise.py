"""`bnscope precise` end to end: exact statistics written, structure kept, bad input refused."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from bnscope.io.checkpoint import load_checkpoint

from ..clirun import one_error_line, run
from ..conftest import sha256, tiny_spec, trained_tiny


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
        if not k.endswith(("running_mean", "running_var", "num_batches_tracked")):
            assert torch.equal(v, raw_out["model"][k]), k
    # counted (docs/statistics.md, section 3.1): 5 updates, then 349 more put 0.9^T below 2^-53
    assert int(raw_in["model"]["module.1.num_batches_tracked"]) == 5
    assert int(raw_out["model"]["module.1.num_batches_tracked"]) == 5 + 349
    assert raw_out["model"]["module.1.num_batches_tracked"].dtype == torch.long


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
        "--batches 50, but the data holds 3 batches (tensor file",
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
        # a damaged image among others stops the run (test_bad_data_midrun.py), unless
        # --skip-unreadable leaves it out (test_cli_data_mistakes.py); a folder without any
        # readable image is an error either way
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


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("command", ["precise", "adapt"])
def test_recomputed_checkpoint_passes_the_warmup_check(tmp_path, command, momentum):
    """The issue: after bnscope precise, inspect --fail-on warning still exited 1 with an
    ema-warmup warning per layer. A checkpoint bnscope did not fix is still reported."""
    from ..models import make_tiny

    torch.manual_seed(0)
    model = make_tiny(momentum=momentum)
    model.train()
    with torch.no_grad():
        for _ in range(5):  # 0.9^5 = 0.59 of the EMA is still its initial value
            model(torch.randn(8, 3, 8, 8) * 2 + 1)
    ckpt = tmp_path / "ck.pt"
    torch.save({"model": model.state_dict(), "epoch": 3}, ckpt)
    g = torch.Generator().manual_seed(1)
    data = tmp_path / "d.pt"
    torch.save({"x": torch.randn(64, 3, 8, 8, generator=g) * 2 + 1,
                "y": torch.randint(0, 3, (64,), generator=g)}, data)  # fmt: skip
    spec = ("--model", tiny_spec(), "--model-kwargs", json.dumps({"momentum": momentum}))

    def warmup(path, *extra):
        res = run("inspect", path, *spec, *extra, "--fail-on", "warning", "--json")
        doc = json.loads(res.stdout)
        return res.exit_code, {f["layer"] for f in doc["findings"] if f["code"] == "ema-warmup"}

    if momentum is not None:  # an EMA 5 updates old: reported, statically and dynamically
        assert warmup(ckpt) == (1, {"1", "4"})
        assert warmup(ckpt, "--data", data)[1] == {"1", "4"}
    res = run(command, ckpt, *spec, "--data", data, "--batch-size", "16", "-q")
    assert res.exit_code == 0, res.stderr
    out = tmp_path / ("ck.precise.pt" if command == "precise" else "ck.adapted.pt")
    assert warmup(out) == (0, set())
    code, found = warmup(out, "--data", data)
    assert found == set() and code == 0
    saved = torch.load(out, weights_only=True)["model"]
    expected = 4 if momentum is None else 5 + 349  # 4 batches averaged; 0.9^354 < 2^-53
    assert int(saved["1.num_batches_tracked"]) == int(saved["4.num_batches_tracked"]) == expected


def test_class_sorted_factory_batches_are_reported(precise_env):
    """A data factory batches itself: one yielding class-sorted batches gets a
    non-iid-batches warning; the same samples as a tensor file are read shuffled."""
    tmp, ckpt, _, _, _ = precise_env
    g = torch.Generator().manual_seed(4)
    y = (torch.arange(96) % 3).sort().values
    x = torch.randn(96, 3, 8, 8, generator=g) + y.view(-1, 1, 1, 1)
    torch.save({"x": x, "y": y}, tmp / "sorted.pt")
    (tmp / "sorted_factory.py").write_text(
        "import torch\n\n\n"
        "def make(batch_size):\n"
        f"    d = torch.load({str(tmp / 'sorted.pt')!r})\n"
        "    return list(zip(d['x'].split(batch_size), d['y'].split(batch_size)))\n"
    )
    common = ("--model", tiny_spec(), "--batch-size", "16", "-o", tmp / "o.pt", "--force")
    res = run("precise", ckpt, *common, "--data", f"{tmp / 'sorted_factory.py'}:make", "--json",
              "--fail-on", "warning")  # fmt: skip
    doc = json.loads(res.stdout)
    found = [f for f in doc["findings"] if f["code"] == "non-iid-batches"]
    assert res.exit_code == 1 and len(found) == 1 and found[0]["layer"] is None
    assert "6 of 6 batches hold a single class" in found[0]["message"]
    assert doc["label_mix"]["batches"] == 6 and doc["label_mix"]["classes"] == 3
    res = run("precise", ckpt, *common, "--data", tmp / "sorted.pt", "--json")
    doc = json.loads(res.stdout)
    assert res.exit_code == 0 and not [f for f in doc["findings"] if f["code"] == "non-iid-batches"]
    assert doc["label_mix"]["ratio"] < 2
    res = run("precise", ckpt, *common, "--data", f"{tmp / 'sorted_factory.py'}:make")
    assert res.exit_code == 0 and "non-iid-batches" in res.stdout  # the table shows it


def test_checkpoint_without_num_batches_tracked_is_written_without_one(precise_env):
    """An old (torch < 0.4.1) state dict: torch fills the count in when loading, precise
    counts its statistics there, and the checkpoint written keeps the input's keys."""
    tmp, _, data, model, _ = precise_env
    sd = {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save(sd, tmp / "old.pt")
    res = run("precise", tmp / "old.pt", "--model", tiny_spec(), "--data", data, "-q")
    assert res.exit_code == 0, res.stderr
    out = torch.load(tmp / "old.precise.pt", weights_only=True)
    assert list(out) == list(sd)


def test_batches_beyond_the_data_refused_before_reading_it(tmp_path):
    """``--batches`` larger than data of known length: one line, exit 2, before any batch is
    read (a factory's DataLoader whose samples fail when read) and nothing written."""
    ckpt = tmp_path / "ck.pt"
    torch.save(trained_tiny(steps=3).state_dict(), ckpt)
    factory = tmp_path / "fac.py"
    factory.write_text(
        "import torch\n"
        "class Unreadable(torch.utils.data.Dataset):\n"
        "    def __len__(self):\n"
        "        return 40\n"
        "    def __getitem__(self, i):\n"
        "        raise RuntimeError('sample read')\n"
        "def make(batch_size=8):\n"
        "    return torch.utils.data.DataLoader(Unreadable(), batch_size=batch_size)\n"
    )
    for command in ("precise", "adapt", "inspect", "ghost"):
        res = run(command, ckpt, "--model", tiny_spec(), "--data", f"{factory}:make",
                  "--batch-size", "8", "--batches", "6", cwd=tmp_path)  # fmt: skip
        one_error_line(res, "--batches 6, but the data holds 5 batches (factory ")
        assert ", in batches of 8); pass --batches 5 or less" in res.stderr
        assert "sample read" not in res.stderr
    # an image folder: its description and batch size in the line
    data = tmp_path / "images" / "a"
    data.mkdir(parents=True)
    for i in range(6):  # 3 batches of 2
        Image.fromarray(np.full((8, 8, 3), 10 * i, dtype=np.uint8)).save(data / f"{i}.png")
    res = run("precise", ckpt, "--model", tiny_spec(), "--data", data.parent, "--batch-size",
              "2", "--batches", "4", cwd=tmp_path)  # fmt: skip
    one_error_line(res, "--batches 4, but the data holds 3 batches (image folder ")
    assert "6 images), in batches of 2)" in res.stderr
    written = {p.name for p in tmp_path.iterdir()} - {"__pycache__"}
    assert written == {"ck.pt", "fac.py", "images"}
