"""EMA and SWA checkpoints: an EMA state under each of ``state_dict_ema``, ``model_ema``,
``ema_state_dict`` and ``ema``, alone or next to the model's state; an ``AveragedModel``'s own
state dict (``module.*`` and ``n_averaged``), as the whole file or under an EMA key; timm's
``ModelEmaV2`` layout (``module.*``); mmengine's swapped layout. By default the EMA state is
used and the report says so and names the other (``key`` picks it); written checkpoints keep
their structure and change only the BN statistics of the state that was used."""

from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel

from bnscope.io.checkpoint import load_checkpoint
from bnscope.io.fitting import load_into_model
from bnscope.io.statedict import EMA_KEYS

from ..clirun import run
from ..conftest import tiny_spec, trained_tiny

#: what precise writes in a BN layer of the tiny model (layers 1 and 4)
BN_STATS = ("running_mean", "running_var", "num_batches_tracked")
BN_KEYS = [f"{layer}.{stat}" for layer in ("1", "4") for stat in BN_STATS]


def make_tiny() -> nn.Module:
    from ..models import make_tiny as factory

    return factory()


@pytest.fixture
def nets() -> tuple[nn.Module, nn.Module]:
    """The raw network and its EMA copy: same architecture, different weights and stats."""
    return trained_tiny(seed=0, steps=5), trained_tiny(seed=1, steps=9)


@pytest.fixture
def data(tmp_path: Path) -> Path:
    g = torch.Generator().manual_seed(0)
    path = tmp_path / "d.pt"
    torch.save({"x": torch.randn(48, 3, 8, 8, generator=g) * 2 + 1}, path)
    return path


def prefixed(state: dict[str, torch.Tensor], prefix: str) -> OrderedDict:
    return OrderedDict((prefix + k, v) for k, v in state.items())


def assert_loaded(model: nn.Module, source: dict[str, torch.Tensor]) -> None:
    mine = model.state_dict()
    assert list(mine) == list(source)
    for k in mine:
        assert torch.equal(mine[k], source[k]), k


def assert_same(a: Any, b: Any, where: str = "") -> None:
    """Equal structure; tensors bit-identical (torch.equal and dtype)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and list(a) == list(b), where
        for k in a:
            assert_same(a[k], b[k], f"{where}.{k}")
    else:
        assert a == b, where


def assert_only_stats_changed(before: dict, after: dict, path: str, prefix: str = "") -> None:
    """Everything bit-identical except the BN statistics ``prefix + 1.running_mean`` ... of the
    state dict under ``path``, which all changed."""
    assert list(after) == list(before)
    for name in before:
        if name != path:
            assert_same(before[name], after[name], name)
    sd_in, sd_out = before[path], after[path]
    assert list(sd_out) == list(sd_in)
    changed = [k for k, v in sd_in.items() if not torch.equal(v, sd_out[k])]
    assert sorted(changed) == sorted(prefix + k for k in BN_KEYS), changed
    for k, v in sd_in.items():
        assert sd_out[k].dtype == v.dtype, k


def warnings_in(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("bnscope: warning")]


def precise(path: Path, data: Path, *args: str) -> tuple[dict, Any]:
    res = run("precise", path, "--model", tiny_spec(), "--data", data, "--json", *args)
    assert res.exit_code == 0, res.stderr
    return json.loads(res.stdout), res


# --------------------------------------------------------------------------------------------
# An EMA state alone, under each key


@pytest.mark.parametrize("key", EMA_KEYS)
def test_only_an_ema_state(tmp_path: Path, nets, data, key: str) -> None:
    _, ema = nets
    obj = {key: ema.state_dict(), "epoch": 7, "decay": 0.9998}
    path = tmp_path / "ema_only.pth"
    torch.save(obj, path)
    ckpt = load_checkpoint(path)
    assert ckpt.key == key and ckpt.networks == ()
    model = make_tiny()
    assert load_into_model(model, ckpt.state_dict, key=ckpt.key) == ""
    assert_loaded(model, ema.state_dict())

    doc, res = precise(path, data)
    assert warnings_in(res.stderr) == []
    assert doc["key"] == key and "networks" not in doc
    assert_only_stats_changed(obj, torch.load(doc["output"], weights_only=True), key)


# --------------------------------------------------------------------------------------------
# The model's state and an EMA state: the EMA by default, key= for the other


@pytest.mark.parametrize("key", EMA_KEYS)
@pytest.mark.parametrize("raw_key", ["state_dict", "model"])
def test_ema_used_by_default_and_key_picks_the_model(
    tmp_path: Path, nets, data, key: str, raw_key: str
) -> None:
    raw, ema = nets
    opt = torch.optim.SGD(raw.parameters(), lr=0.1, momentum=0.9)
    raw(torch.randn(4, 3, 8, 8)).sum().backward()
    opt.step()
    obj = {raw_key: raw.state_dict(), key: ema.state_dict(), "optimizer": opt.state_dict(),
           "epoch": 3}  # fmt: skip
    path = tmp_path / "both.pth"
    torch.save(obj, path)

    ckpt = load_checkpoint(path)
    assert ckpt.key == key
    assert [(n.key, n.ema) for n in ckpt.networks] == [(key, True), (raw_key, False)]
    model = make_tiny()
    load_into_model(model, ckpt.state_dict, key=ckpt.key)
    assert_loaded(model, ema.state_dict())

    doc, res = precise(path, data)
    assert warnings_in(res.stderr) == [
        f"bnscope: warning: using the EMA/SWA copy '{key}'; this checkpoint also holds the raw "
        f"weights ('{raw_key}', 2 BN layers): --key {raw_key} to use them"
    ]
    assert doc["key"] == key  # the report's "which key was used"
    assert [(n["key"], n["ema"], n["used"]) for n in doc["networks"]] == [
        (key, True, True),
        (raw_key, False, False),
    ]
    assert_only_stats_changed(obj, torch.load(doc["output"], weights_only=True), key)

    doc, res = precise(path, data, "--key", raw_key, "-o", tmp_path / "raw.pth")
    assert doc["key"] == raw_key and doc["ema_key"] == key
    assert f"--key {key} to use it" in res.stderr
    assert [(n["key"], n["used"]) for n in doc["networks"]] == [(raw_key, True), (key, False)]
    assert_only_stats_changed(obj, torch.load(doc["output"], weights_only=True), raw_key)


def test_table_header_names_both_states(tmp_path: Path, nets) -> None:
    raw, ema = nets
    path = tmp_path / "timm.pth.tar"
    torch.save({"state_dict": raw.state_dict(), "state_dict_ema": ema.state_dict()}, path)
    res = run("inspect", path)
    assert res.exit_code == 0, res.stderr
    assert "state dict under key: 'state_dict_ema'" in res.stdout
    assert "network 'state_dict_ema': 2 BN layers, EMA copy (reported on)" in res.stdout
    assert "network 'state_dict': 2 BN layers (--key state_dict)" in res.stdout
    ema_mean = ema.state_dict()["1.running_mean"]
    doc = json.loads(run("inspect", path, "--json").stdout)
    assert doc["layers"][0]["mean_max"] == pytest.approx(float(ema_mean.max()), rel=1e-6)


def test_parameters_only_ema_is_not_preferred(tmp_path: Path, nets) -> None:
    """A hand-written EMA helper's shadow (parameters only, no BN statistics) is not a network
    bnscope can use: the model's state stays the default; alone, it is still found."""
    raw, ema = nets
    shadow = {n: p.detach().clone() for n, p in ema.named_parameters()}
    path = tmp_path / "shadow.pth"
    torch.save({"model": raw.state_dict(), "ema": shadow}, path)
    assert load_checkpoint(path).key == "model"
    torch.save({"ema": shadow, "step": 10}, path)
    assert load_checkpoint(path).key == "ema"


# --------------------------------------------------------------------------------------------
# Averaged models' own state dicts


def averaged(ema: nn.Module) -> AveragedModel:
    avg = AveragedModel(ema)
    for _ in range(3):
        avg.update_parameters(ema)
    assert int(avg.n_averaged) == 3
    return avg


def test_averaged_model_state_dict_as_the_checkpoint(tmp_path: Path, nets, data) -> None:
    _, ema = nets
    state = averaged(ema).state_dict()
    assert list(state)[0] == "n_averaged" and all(
        k.startswith("module.") for k in list(state)[1:]
    )
    path = tmp_path / "swa.pt"
    torch.save(state, path)
    ckpt = load_checkpoint(path)
    model = make_tiny()
    assert load_into_model(model, ckpt.state_dict, key=ckpt.key) == "module."
    assert_loaded(model, ema.state_dict())

    doc, _ = precise(path, data)
    assert doc["prefix"] == "module."
    written = torch.load(doc["output"], weights_only=True)
    assert list(written) == list(state)
    assert torch.equal(written["n_averaged"], state["n_averaged"])  # left alone
    changed = [k for k, v in state.items() if not torch.equal(v, written[k])]
    assert sorted(changed) == sorted(f"module.{k}" for k in BN_KEYS)

    static = json.loads(run("inspect", path, "--json").stdout)  # no model: from the buffers
    assert [lay["name"] for lay in static["layers"]] == ["1", "4"]
    assert static["prefix"] == "module."


@pytest.mark.parametrize("key", ["ema", "model_ema"])
def test_averaged_model_under_an_ema_key(tmp_path: Path, nets, data, key: str) -> None:
    raw, ema = nets
    swa = averaged(ema).state_dict()
    obj = {"model": raw.state_dict(), key: swa}
    path = tmp_path / "with_swa.pt"
    torch.save(obj, path)
    ckpt = load_checkpoint(path)
    assert ckpt.key == key
    doc, res = precise(path, data)
    assert doc["key"] == key and doc["prefix"] == "module."
    assert "--key model to use them" in res.stderr
    assert_only_stats_changed(obj, torch.load(doc["output"], weights_only=True), key, "module.")


def test_timm_model_ema_v2_layout(tmp_path: Path, nets, data) -> None:
    """``ModelEmaV2(model).state_dict()``: the copy's entries under ``module.``."""
    raw, ema = nets
    obj = {"state_dict": raw.state_dict(), "state_dict_ema": prefixed(ema.state_dict(), "module.")}
    path = tmp_path / "v2.pth"
    torch.save(obj, path)
    doc, _ = precise(path, data)
    assert (doc["key"], doc["prefix"]) == ("state_dict_ema", "module.")
    written = torch.load(doc["output"], weights_only=True)
    assert_only_stats_changed(obj, written, "state_dict_ema", "module.")


def test_mmengine_swapped_layout(tmp_path: Path, nets, data) -> None:
    """mmengine's EMAHook saves the averaged weights under ``state_dict`` and the raw ones under
    ``ema_state_dict`` (``module.*`` and ``steps``): ``state_dict`` is the EMA copy there."""
    raw, ema = nets
    ema_state = prefixed(raw.state_dict(), "module.")
    ema_state["steps"] = torch.tensor(120)
    obj = {
        "meta": {"epoch": 12},
        "state_dict": ema.state_dict(),
        "ema_state_dict": ema_state,
        "message_hub": {"log_scalars": {}},
    }
    path = tmp_path / "epoch_12.pth"
    torch.save(obj, path)
    ckpt = load_checkpoint(path)
    assert ckpt.key == "state_dict"
    assert [(n.key, n.ema) for n in ckpt.networks] == [
        ("state_dict", True),
        ("ema_state_dict", False),
    ]
    model = make_tiny()
    load_into_model(model, ckpt.state_dict, key=ckpt.key)
    assert_loaded(model, ema.state_dict())
    assert "key=ema_state_dict to use them" in (ckpt.ema_notice("") or "")

    doc, _ = precise(path, data, "--key", "ema_state_dict")  # the raw weights
    assert (doc["key"], doc["prefix"]) == ("ema_state_dict", "module.")
    written = torch.load(doc["output"], weights_only=True)
    assert_only_stats_changed(obj, written, "ema_state_dict", "module.")
    assert torch.equal(written["ema_state_dict"]["steps"], torch.tensor(120))


def test_precise_library_on_a_loaded_ema_matches_the_cli(tmp_path: Path, nets, data) -> None:
    """The library on the same EMA state (bnscope.open) writes the same file as the CLI."""
    import bnscope

    raw, ema = nets
    path = tmp_path / "ckpt.pth"
    torch.save({"state_dict": raw.state_dict(), "state_dict_ema": ema.state_dict()}, path)
    notices: list[str] = []
    job = bnscope.open(path, model=tiny_spec(), data=str(data), notify=notices.append)
    res = job.precise()
    out = res.save(tmp_path / "lib.pth")
    doc, _ = precise(path, data, "-o", tmp_path / "cli.pth")
    lib, cli = torch.load(out, weights_only=True), torch.load(doc["output"], weights_only=True)
    assert_same(lib, cli)
    assert any("--key" not in n and "key=state_dict to use them" in n for n in notices)
    assert res.report.extra["key"] == "state_dict_ema"
