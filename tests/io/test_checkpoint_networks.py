"""Checkpoints holding more than one network: a Lightning module with an EMA copy and a weighted
loss, timm's ``state_dict``/``state_dict_ema``. Selection with ``--key PATH:PREFIX`` (and the
dotted form), automatic choice when loading into a model (the EMA copy when it fits: the
weights usually deployed), the announcement of the other network, and writing back only the
chosen network's statistics."""

from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import torch
from torch import nn

from bnscope.errors import CheckpointError, ModelError
from bnscope.io.checkpoint import load_checkpoint
from bnscope.io.fitting import load_into_model
from bnscope.io.saving import save_checkpoint
from bnscope.io.statedict import Network, find_networks

from ..clirun import one_error_line, run
from ..conftest import tiny_spec, trained_tiny

EMA_KEY = "state_dict:ema_model.module"
#: what precise writes in a BN layer (docs/statistics.md, section 3.1)
BN_STATS = ("running_mean", "running_var", "num_batches_tracked")


def prefixed(state: dict[str, torch.Tensor], prefix: str) -> OrderedDict:
    return OrderedDict((prefix + k, v) for k, v in state.items())


def make_tiny() -> nn.Module:
    from ..models import make_tiny as factory

    return factory()


@pytest.fixture
def nets() -> tuple[nn.Module, nn.Module]:
    """The raw network and its EMA copy: same architecture, different weights and stats."""
    return trained_tiny(seed=0, steps=5), trained_tiny(seed=1, steps=9)


@pytest.fixture
def lightning(tmp_path: Path, nets) -> tuple[Path, dict[str, Any]]:
    """``{"state_dict": {model.*, ema_model.module.*, criterion.weight}, ...}`` as Lightning
    saves a module holding the network, an EMA copy and a weighted loss."""
    raw, ema = nets
    opt = torch.optim.SGD(raw.parameters(), lr=0.1, momentum=0.9)
    raw(torch.randn(4, 3, 8, 8)).sum().backward()
    opt.step()
    state = prefixed(raw.state_dict(), "model.")
    state.update(prefixed(ema.state_dict(), "ema_model.module."))
    state["criterion.weight"] = torch.tensor([1.0, 2.0, 0.5])
    obj = {
        "epoch": 4,
        "global_step": 120,
        "state_dict": state,
        "optimizer_states": [opt.state_dict()],
        "hyper_parameters": {"lr": 0.1},
    }
    path = tmp_path / "last.ckpt"
    torch.save(obj, path)
    return path, obj


@pytest.fixture
def timm(tmp_path: Path, nets) -> Path:
    raw, ema = nets
    path = tmp_path / "timm.pth"
    torch.save(
        {"state_dict": raw.state_dict(), "state_dict_ema": ema.state_dict(), "epoch": 3}, path
    )
    return path


@pytest.fixture
def data(tmp_path: Path) -> Path:
    g = torch.Generator().manual_seed(0)
    path = tmp_path / "d.pt"
    torch.save({"x": torch.randn(48, 3, 8, 8, generator=g) * 2 + 1}, path)
    return path


def assert_loaded(model: nn.Module, source: nn.Module) -> None:
    mine, theirs = model.state_dict(), source.state_dict()
    assert list(mine) == list(theirs)
    for k in mine:
        assert torch.equal(mine[k], theirs[k]), k


def is_bn_stat(key: str, stats: tuple[str, ...] = BN_STATS) -> bool:
    return key.rsplit(".", 1)[-1] in stats


def assert_same(a: Any, b: Any, where: str = "") -> None:
    """Equal structure; tensors bit-identical (torch.equal and dtype)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and list(a) == list(b), where
        for k in a:
            assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def assert_only_network_stats_changed(
    before: dict, after: dict, prefix: str, stats: tuple[str, ...] = BN_STATS
) -> None:
    """Only the BN statistics (and counts) under ``prefix`` changed; everything else is
    bit-identical (the other network, criterion, optimizer, epoch, ...)."""
    assert list(after) == list(before)
    for name in before:
        if name != "state_dict":
            assert_same(before[name], after[name], name)
    sd_in, sd_out = before["state_dict"], after["state_dict"]
    assert list(sd_out) == list(sd_in)
    changed = []
    for k, v in sd_in.items():
        if k.startswith(prefix) and is_bn_stat(k, stats):
            if not torch.equal(v, sd_out[k]):
                changed.append(k)
            assert sd_out[k].dtype == v.dtype
        else:
            assert sd_out[k].dtype == v.dtype and torch.equal(v, sd_out[k]), k
    assert sorted(changed) == sorted(f"{prefix}{n}.{s}" for n in ("1", "4") for s in stats)


# --------------------------------------------------------------------------------------------
# Library: finding and selecting networks


def test_networks_found_in_lightning_checkpoint(lightning) -> None:
    path, _ = lightning
    ckpt = load_checkpoint(path)
    assert ckpt.key == "state_dict" and ckpt.network_prefix == ""
    assert [(n.key, n.prefix, n.bn_layers, n.ema) for n in ckpt.networks] == [
        ("state_dict:model", "model.", 2, False),
        (EMA_KEY, "ema_model.module.", 2, True),
    ]
    assert ckpt.default_network() == ckpt.networks[1]  # the EMA copy, as when fitting
    assert list(ckpt.network_state(ckpt.networks[1])) == list(make_tiny().state_dict())


def test_automatic_selection_loads_the_ema_and_names_the_raw(lightning, nets) -> None:
    path, _ = lightning
    _, ema = nets
    ckpt = load_checkpoint(path)
    model = make_tiny()
    prefix = load_into_model(model, ckpt.state_dict, key=ckpt.key)
    assert prefix == "ema_model.module."
    assert_loaded(model, ema)
    assert ckpt.used_network(prefix) == ckpt.networks[1]
    assert ckpt.ema_notice(prefix) == (
        "using the EMA/SWA copy 'ema_model.module.'; this checkpoint also holds the raw "
        "weights ('model.', 2 BN layers): key=state_dict:model to use them"
    )
    info = ckpt.network_info(prefix)
    assert info["ema_key"] is None
    assert [(n["prefix"], n["used"]) for n in info["networks"]] == [
        ("model.", False),
        ("ema_model.module.", True),
    ]


def test_key_selects_the_raw_network(lightning, nets) -> None:
    path, _ = lightning
    ckpt = load_checkpoint(path, key="state_dict:model")
    model = make_tiny()
    assert load_into_model(model, ckpt.state_dict, key=ckpt.key) == ""
    assert_loaded(model, nets[0])
    assert ckpt.used_network("") == ckpt.networks[0]
    assert EMA_KEY in (ckpt.ema_notice("") or "")  # the EMA copy left unused is named


@pytest.mark.parametrize(
    "key",
    [EMA_KEY, "state_dict.ema_model.module", ":ema_model.module", "state_dict:ema_model.module."],
)
def test_key_selects_the_ema_network(lightning, nets, key: str) -> None:
    path, _ = lightning
    _, ema = nets
    ckpt = load_checkpoint(path, key=key)
    assert ckpt.key == EMA_KEY
    assert ckpt.network_prefix == "ema_model.module."
    assert list(ckpt.state_dict) == list(ema.state_dict())
    model = make_tiny()
    assert load_into_model(model, ckpt.state_dict, key=ckpt.key) == ""
    assert_loaded(model, ema)
    assert ckpt.used_network("") == ckpt.networks[1]
    assert ckpt.ema_notice("") is None
    assert ckpt.network_info("")["ema_key"] is None


def test_key_prefix_then_known_prefix_stripped(lightning, nets) -> None:
    path, _ = lightning
    ckpt = load_checkpoint(path, key="state_dict:ema_model")
    model = make_tiny()
    assert load_into_model(model, ckpt.state_dict, key=ckpt.key) == "module."
    assert_loaded(model, nets[1])
    assert ckpt.used_network("module.").ema and ckpt.ema_notice("module.") is None


def test_dotted_key_to_the_raw_network(lightning, nets) -> None:
    path, _ = lightning
    ckpt = load_checkpoint(path, key="state_dict.model")
    assert ckpt.key == "state_dict:model"
    model = make_tiny()
    assert load_into_model(model, ckpt.state_dict, key=ckpt.key) == ""
    assert_loaded(model, nets[0])
    assert EMA_KEY in (ckpt.ema_notice("") or "")


def test_prefix_matching_nothing_names_the_prefixes(lightning) -> None:
    path, _ = lightning
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path, key="state_dict:ema")
    assert "'ema.'" in info.value.message
    assert "model., ema_model.module., criterion." in info.value.message
    assert "key=state_dict:PREFIX" in (info.value.fix or "")
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path, key="state_dict.nope")
    assert "no entry 'nope'" in info.value.message
    assert "model., ema_model.module., criterion." in info.value.message
    # Above the state dict's level the existing error (top-level keys) stays.
    with pytest.raises(CheckpointError, match="top-level keys are epoch, global_step"):
        load_checkpoint(path, key="nope")


def test_strict_within_the_chosen_network(tmp_path: Path, lightning) -> None:
    _, obj = lightning
    state = OrderedDict(
        (k, v) for k, v in obj["state_dict"].items() if not k.endswith("4.running_var")
    )
    path = tmp_path / "damaged.ckpt"
    torch.save({**obj, "state_dict": state}, path)
    ckpt = load_checkpoint(path)
    with pytest.raises(ModelError) as info:
        load_into_model(make_tiny(), ckpt.state_dict, key=ckpt.key)
    message = info.value.message
    assert "network 'model.'" in message
    assert "1 missing key (4.running_var)" in message
    assert "unexpected" not in message  # the EMA's and criterion's entries are not blamed


def test_other_entries_kept_strict_with_one_network(tmp_path: Path, nets) -> None:
    """Only several networks make entries of no network ignorable: with one network the
    criterion's weight is an unexpected key, and the error names the --key that fits."""
    raw, _ = nets
    state = prefixed(raw.state_dict(), "model.")
    state["criterion.weight"] = torch.ones(3)
    path = tmp_path / "one.ckpt"
    torch.save({"state_dict": state, "epoch": 1}, path)
    ckpt = load_checkpoint(path)
    assert ckpt.networks == () and ckpt.network_info("") == {} and ckpt.ema_notice("") is None
    with pytest.raises(ModelError) as info:
        load_into_model(make_tiny(), ckpt.state_dict, key=ckpt.key)
    assert "criterion.weight" in info.value.message
    assert "key=state_dict:model" in (info.value.fix or "")
    model = make_tiny()
    selected = load_checkpoint(path, key="state_dict:model")
    assert load_into_model(model, selected.state_dict, key=selected.key) == ""
    assert_loaded(model, raw)


def test_timm_state_dict_ema(timm, nets) -> None:
    raw, ema = nets
    ckpt = load_checkpoint(timm)
    assert ckpt.key == "state_dict_ema"  # the EMA copy first (EMA_KEYS)
    assert [(n.key, n.prefix, n.bn_layers, n.ema) for n in ckpt.networks] == [
        ("state_dict_ema", "", 2, True),
        ("state_dict", "", 2, False),
    ]
    model = make_tiny()
    assert load_into_model(model, ckpt.state_dict, key=ckpt.key) == ""
    assert_loaded(model, ema)
    assert ckpt.ema_notice("") == (
        "using the EMA/SWA copy 'state_dict_ema'; this checkpoint also holds the raw weights "
        "('state_dict', 2 BN layers): key=state_dict to use them"
    )
    assert ckpt.default_network() is None  # the located state dict holds one network

    chosen = load_checkpoint(timm, key="state_dict")
    model = make_tiny()
    load_into_model(model, chosen.state_dict, key=chosen.key)
    assert_loaded(model, raw)
    assert chosen.used_network("").key == "state_dict"
    assert "key=state_dict_ema to use it" in (chosen.ema_notice("") or "")
    # the EMA copy chosen with key=: nothing to announce
    explicit = load_checkpoint(timm, key="state_dict_ema")
    assert explicit.ema_notice("") is None


def test_ema_copy_next_to_root_level_weights(nets) -> None:
    """A model that keeps its EMA copy as an attribute: raw keys at the top level."""
    raw, ema = nets
    state = OrderedDict(raw.state_dict())
    state.update(prefixed(ema.state_dict(), "ema."))
    found = find_networks(state)
    assert [(n.key, n.prefix, n.bn_layers, n.ema) for n in found] == [
        (":", "", 2, False),  # "PATH:": every entry under no EMA prefix
        (":ema", "ema.", 2, True),
    ]
    model = make_tiny()
    assert load_into_model(model, state) == "ema."
    assert_loaded(model, ema)


def test_key_ending_in_colon_selects_the_raw_network(tmp_path: Path, nets) -> None:
    raw, ema = nets
    state = OrderedDict(raw.state_dict())
    state.update(prefixed(ema.state_dict(), "ema."))
    path = tmp_path / "root.pt"
    torch.save({"state_dict": state, "epoch": 2}, path)
    ckpt = load_checkpoint(path, key="state_dict:")
    assert list(ckpt.state_dict) == list(raw.state_dict())
    model = make_tiny()
    assert load_into_model(model, ckpt.state_dict, key=ckpt.key) == ""
    assert_loaded(model, raw)
    used = ckpt.used_network("")
    assert used is not None and used.key == "state_dict:" and not used.ema
    assert ckpt.ema_notice("") == (
        "this checkpoint also holds an EMA copy ('ema.', 2 BN layers): key=state_dict:ema to "
        "use it"
    )
    out = save_checkpoint(ckpt, {"1.running_mean": torch.zeros(4)}, tmp_path / "o.pt")
    written = torch.load(out, weights_only=True)
    assert list(written["state_dict"]) == list(state)  # the EMA copy's entries kept
    for k, v in state.items():
        want = torch.zeros(4) if k == "1.running_mean" else v
        assert torch.equal(written["state_dict"][k], want), k


def test_averaged_model_prefix(nets) -> None:
    """torch.optim.swa_utils.AveragedModel keeps ``n_averaged`` next to ``module.*``."""
    raw, ema = nets
    state = prefixed(raw.state_dict(), "model.")
    state["swa_model.n_averaged"] = torch.tensor(3)
    state.update(prefixed(ema.state_dict(), "swa_model.module."))
    found = find_networks(state, key="state_dict")
    assert [(n.key, n.ema) for n in found] == [
        ("state_dict:model", False),
        ("state_dict:swa_model.module", True),
    ]


def test_one_network_finds_nothing(tmp_path: Path, nets) -> None:
    raw, _ = nets
    path = tmp_path / "plain.pt"
    torch.save({"model": prefixed(raw.state_dict(), "module."), "epoch": 1}, path)
    ckpt = load_checkpoint(path)
    assert ckpt.networks == () and ckpt.default_network() is None
    assert ckpt.network_info("module.") == {} and ckpt.ema_notice("module.") is None
    # Two BN-bearing top-level modules of one network are not two networks.
    assert find_networks({**prefixed(raw.state_dict(), "backbone."), **prefixed(
        raw.state_dict(), "head.")}) == ()  # fmt: skip
    assert isinstance(Network("k", "p.", 1), Network)


# --------------------------------------------------------------------------------------------
# Library: writing back


def test_save_with_prefix_selection_writes_under_the_prefix(tmp_path: Path, lightning) -> None:
    path, obj = lightning
    ckpt = load_checkpoint(path, key=EMA_KEY)
    mean_var = ("running_mean", "running_var")
    updates = {
        f"{n}.{s}": torch.full((4,), 3.0, dtype=torch.float64) for n in "14" for s in mean_var
    }
    out = save_checkpoint(ckpt, updates, tmp_path / "out.ckpt")
    written = torch.load(out, weights_only=True)
    assert_only_network_stats_changed(obj, written, "ema_model.module.", mean_var)
    assert torch.equal(
        written["state_dict"]["ema_model.module.4.running_var"], torch.full((4,), 3.0)
    )
    again = load_checkpoint(out, key=EMA_KEY)
    assert again.key == EMA_KEY and list(again.state_dict) == list(ckpt.state_dict)


def test_safetensors_prefix_selection(tmp_path: Path, lightning, nets) -> None:
    _, obj = lightning
    path = tmp_path / "w.safetensors"
    safetensors.torch.save_file(dict(obj["state_dict"]), path)
    ckpt = load_checkpoint(path, key=":ema_model.module")
    assert ckpt.key == ":ema_model.module" and len(ckpt.networks) == 2
    model = make_tiny()
    load_into_model(model, ckpt.state_dict, key=ckpt.key)
    assert_loaded(model, nets[1])
    out = save_checkpoint(ckpt, {"1.running_mean": torch.zeros(4)}, tmp_path / "o.safetensors")
    written = safetensors.torch.load_file(out)
    assert set(written) == set(obj["state_dict"])
    for k, v in obj["state_dict"].items():
        if k == "ema_model.module.1.running_mean":
            assert torch.equal(written[k], torch.zeros(4))
        else:
            assert torch.equal(written[k], v), k
    with pytest.raises(CheckpointError, match="does not apply"):
        load_checkpoint(path, key="state_dict:model")


# --------------------------------------------------------------------------------------------
# CLI


def warnings_in(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "EMA copy" in line or "EMA/SWA copy" in line]


def test_cli_static_inspect_lists_networks(lightning) -> None:
    path, _ = lightning
    res = run("inspect", path)
    assert res.exit_code == 0, res.stderr
    assert "network 'model.': 2 BN layers (--key state_dict:model)" in res.stdout
    assert "network 'ema_model.module.': 2 BN layers, EMA copy (reported on)" in res.stdout
    assert "key prefix stripped: 'ema_model.module.'" in res.stdout
    assert warnings_in(res.stderr) == [
        "bnscope: warning: using the EMA/SWA copy 'ema_model.module.'; this checkpoint also "
        "holds the raw weights ('model.', 2 BN layers): --key state_dict:model to use them"
    ]

    doc = json.loads(run("inspect", path, "--json").stdout)
    assert [lay["name"] for lay in doc["layers"]] == ["1", "4"]
    assert doc["key"] == "state_dict" and doc["prefix"] == "ema_model.module."
    assert doc["ema_key"] is None
    assert [(n["key"], n["bn_layers"], n["ema"], n["used"]) for n in doc["networks"]] == [
        ("state_dict:model", 2, False, False),
        (EMA_KEY, 2, True, True),
    ]


def test_cli_static_inspect_of_the_ema(lightning, nets) -> None:
    path, _ = lightning
    res = run("inspect", path, "--key", "state_dict.ema_model.module", "--json")
    assert res.exit_code == 0, res.stderr
    assert warnings_in(res.stderr) == []
    doc = json.loads(res.stdout)
    assert doc["key"] == EMA_KEY and doc["ema_key"] is None
    assert [n["used"] for n in doc["networks"]] == [False, True]
    ema_mean = nets[1][1].running_mean
    assert doc["layers"][0]["mean_max"] == pytest.approx(float(ema_mean.max()), rel=1e-6)


def test_cli_no_new_output_for_one_network(tiny_ckpt) -> None:
    res = run("inspect", tiny_ckpt, "--json")
    assert res.exit_code == 0 and res.stderr == ""
    doc = json.loads(res.stdout)
    assert "networks" not in doc and "ema_key" not in doc
    assert "network " not in run("inspect", tiny_ckpt).stdout


def test_cli_precise_auto_updates_only_the_ema(lightning, data) -> None:
    path, obj = lightning
    res = run("precise", path, "--model", tiny_spec(), "--data", data, "--json")
    assert res.exit_code == 0, res.stderr
    assert len(warnings_in(res.stderr)) == 1 and "--key state_dict:model" in res.stderr
    doc = json.loads(res.stdout)
    assert doc["prefix"] == "ema_model.module." and doc["ema_key"] is None
    assert [n["used"] for n in doc["networks"]] == [False, True]
    written = torch.load(doc["output"], weights_only=True)
    assert_only_network_stats_changed(obj, written, "ema_model.module.")


def test_cli_precise_with_key_updates_only_the_raw_network(lightning, data) -> None:
    path, obj = lightning
    res = run("precise", path, "--key", "state_dict:model", "--model", tiny_spec(),
              "--data", data, "--json")  # fmt: skip
    assert res.exit_code == 0, res.stderr
    assert warnings_in(res.stderr) == [
        "bnscope: warning: this checkpoint also holds an EMA copy ('ema_model.module.', "
        f"2 BN layers): --key {EMA_KEY} to use it"
    ]
    doc = json.loads(res.stdout)
    assert doc["key"] == "state_dict:model" and doc["ema_key"] == EMA_KEY
    assert [n["used"] for n in doc["networks"]] == [True, False]
    written = torch.load(doc["output"], weights_only=True)
    assert_only_network_stats_changed(obj, written, "model.")


@pytest.mark.parametrize("key", [EMA_KEY, "state_dict.ema_model.module"])
def test_cli_precise_with_key_updates_only_the_ema(lightning, data, key: str) -> None:
    path, obj = lightning
    res = run("precise", path, "--key", key, "--model", tiny_spec(), "--data", data, "--json")
    assert res.exit_code == 0, res.stderr
    assert warnings_in(res.stderr) == []
    doc = json.loads(res.stdout)
    assert doc["key"] == EMA_KEY and doc["prefix"] == "" and doc["ema_key"] is None
    written = torch.load(doc["output"], weights_only=True)
    assert_only_network_stats_changed(obj, written, "ema_model.module.")


@pytest.mark.parametrize("command", ["adapt", "ghost", "inspect"])
def test_cli_commands_announce_the_ema(timm, data, command: str) -> None:
    args = ["--sizes", "4,8"] if command == "ghost" else []
    res = run(command, timm, "--model", tiny_spec(), "--data", data, "--batches", "2", *args,
              "--json", "--report-dir", timm.parent / f"out-{command}")  # fmt: skip
    assert res.exit_code == 0, res.stderr
    assert warnings_in(res.stderr) == [
        "bnscope: warning: using the EMA/SWA copy 'state_dict_ema'; this checkpoint also "
        "holds the raw weights ('state_dict', 2 BN layers): --key state_dict to use them"
    ]
    doc = json.loads(res.stdout)
    assert doc["key"] == "state_dict_ema" and doc["ema_key"] is None
    assert [(n["key"], n["used"]) for n in doc["networks"]] == [
        ("state_dict_ema", True),
        ("state_dict", False),
    ]


def test_cli_static_inspect_with_model_announces(timm) -> None:
    res = run("inspect", timm, "--model", tiny_spec())
    assert res.exit_code == 0, res.stderr
    assert "network 'state_dict_ema': 2 BN layers, EMA copy (reported on)" in res.stdout
    assert "network 'state_dict': 2 BN layers (--key state_dict)" in res.stdout
    assert len(warnings_in(res.stderr)) == 1


@pytest.mark.parametrize("command", ["inspect", "precise"])
def test_cli_prefix_matching_nothing_is_one_line(lightning, data, command: str) -> None:
    path, _ = lightning
    args = ["--model", tiny_spec(), "--data", data] if command == "precise" else []
    res = run(command, path, "--key", "state_dict:ema", *args)
    one_error_line(res, "its key prefixes are model., ema_model.module., criterion.")


def test_cli_model_error_within_network_is_one_line(tmp_path: Path, lightning) -> None:
    _, obj = lightning
    state = OrderedDict((k, v) for k, v in obj["state_dict"].items() if "4.running_var" not in k)
    path = tmp_path / "damaged.ckpt"
    torch.save({**obj, "state_dict": state}, path)
    res = run("inspect", path, "--model", tiny_spec())
    one_error_line(res, "network 'model.'")
    assert "1 missing key (4.running_var)" in res.stderr
