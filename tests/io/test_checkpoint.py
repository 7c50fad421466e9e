"""Tests for bnscope.io.checkpoint, statedict, fitting and saving: every supported checkpoint
form, errors, and atomic saving."""

from __future__ import annotations

import hashlib
import os
import random
import sys
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import pytest
import safetensors.torch
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import bnscope.io.outputs as outputs_mod
from bnscope.errors import CheckpointError, ModelError
from bnscope.io.checkpoint import Checkpoint, load_checkpoint
from bnscope.io.fitting import load_into_model, match_to_model, strip_prefix
from bnscope.io.saving import default_output_path, save_checkpoint
from bnscope.io.statedict import KNOWN_PREFIXES, WRAPPER_KEYS, common_prefix, locate_state_dict

BN_KEYS = ("1.running_mean", "1.running_var")


# --------------------------------------------------------------------------------------------
# Helpers and module-level classes (whole-module pickles need importable classes)


def make_model(seed: int = 0, out_features: int = 3) -> nn.Sequential:
    """Conv -> BN -> ReLU -> Flatten -> Linear with non-trivial running statistics."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 4 * 4, out_features),
    )
    bn = model[1]
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(4))
        bn.running_var.copy_(torch.rand(4) + 0.5)
        bn.num_batches_tracked.fill_(7)
    return model


class Wrapped(nn.Module):
    """A model whose own keys start with ``model.`` (like a LightningModule's inner net)."""

    def __init__(self) -> None:
        super().__init__()
        self.model = make_model()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


class Holder(nn.Module):
    """Stands in for DataParallel/DDP: the wrapped model lives under ``module``."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.module = inner


class Gone(nn.Module):
    """Pickled, then hidden, to simulate a class that is not importable at load time."""

    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(2)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def with_prefix(state_dict: dict[str, torch.Tensor], prefix: str) -> OrderedDict:
    return OrderedDict((prefix + k, v) for k, v in state_dict.items())


def new_stats(ckpt: Checkpoint, prefix: str = "") -> dict[str, torch.Tensor]:
    """Updates for the BN buffers, given as float64 to exercise the cast."""
    return {
        prefix + "1.running_mean": torch.arange(4, dtype=torch.float64) + 0.25,
        prefix + "1.running_var": torch.arange(4, dtype=torch.float64) + 2.0,
    }


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert list(a) == list(b)
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert torch.equal(a[k], b[k]), k


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".tmp"))


# --------------------------------------------------------------------------------------------
# Loading: every form


def test_plain_state_dict(tmp_path: Path) -> None:
    model = make_model()
    path = tmp_path / "ckpt.pt"
    torch.save(model.state_dict(), path)
    ckpt = load_checkpoint(path)
    assert ckpt.format == "torch"
    assert ckpt.key is None
    assert ckpt.module is None and not ckpt.trusted_module
    assert_same_tensors(ckpt.state_dict, model.state_dict())
    assert hasattr(ckpt.state_dict, "_metadata")


def test_legacy_serialization(tmp_path: Path) -> None:
    model = make_model()
    path = tmp_path / "legacy.pt"
    torch.save(model.state_dict(), path, _use_new_zipfile_serialization=False)
    ckpt = load_checkpoint(path)
    assert ckpt.format == "torch"
    assert_same_tensors(ckpt.state_dict, model.state_dict())


@pytest.mark.parametrize("wrapper", WRAPPER_KEYS)
def test_wrapper_keys(tmp_path: Path, wrapper: str) -> None:
    model = make_model()
    path = tmp_path / "ckpt.pt"
    torch.save({"epoch": 3, wrapper: model.state_dict(), "note": "x"}, path)
    ckpt = load_checkpoint(path)
    assert ckpt.key == wrapper
    assert_same_tensors(ckpt.state_dict, model.state_dict())


def test_wrapper_order_prefers_state_dict(tmp_path: Path) -> None:
    a, b = make_model(1), make_model(2)
    path = tmp_path / "ckpt.pt"
    torch.save({"model": a.state_dict(), "state_dict": b.state_dict()}, path)
    ckpt = load_checkpoint(path)
    assert ckpt.key == "state_dict"
    assert_same_tensors(ckpt.state_dict, b.state_dict())


def test_nested_wrapper(tmp_path: Path) -> None:
    model = make_model()
    path = tmp_path / "ckpt.pt"
    torch.save({"model": {"state_dict": model.state_dict(), "step": 10}, "epoch": 1}, path)
    ckpt = load_checkpoint(path)
    assert ckpt.key == "model.state_dict"
    assert_same_tensors(ckpt.state_dict, model.state_dict())


def test_key_override_and_dotted_key(tmp_path: Path) -> None:
    a, b = make_model(1), make_model(2)
    path = tmp_path / "ckpt.pt"
    torch.save({"model": a.state_dict(), "ema": {"weights": b.state_dict()}}, path)
    assert load_checkpoint(path).key == "model"
    ckpt = load_checkpoint(path, key="ema.weights")
    assert ckpt.key == "ema.weights"
    assert_same_tensors(ckpt.state_dict, b.state_dict())
    # A key pointing at a wrapper continues the automatic search below it.
    torch.save({"ema": {"state_dict": b.state_dict(), "decay": 0.9}}, path)
    assert load_checkpoint(path, key="ema").key == "ema.state_dict"


def test_missing_key_lists_available(tmp_path: Path) -> None:
    path = tmp_path / "ckpt.pt"
    torch.save({"model": make_model().state_dict(), "epoch": 3}, path)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path, key="ema")
    assert "'ema'" in info.value.message and "model, epoch" in info.value.message
    assert info.value.fix
    with pytest.raises(CheckpointError, match="holds an int"):
        load_checkpoint(path, key="epoch")


def test_no_state_dict_found(tmp_path: Path) -> None:
    path = tmp_path / "ckpt.pt"
    torch.save({"epoch": 3, "name": "run", "cfg": {"lr": 0.1}}, path)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    assert (
        info.value.message == f"no state dict found in {path}: top-level keys are epoch, name, cfg"
    )
    assert "key=" in info.value.fix


@pytest.mark.parametrize(
    "obj", [torch.zeros(3), [torch.zeros(3)], {}], ids=["tensor", "list", "empty"]
)
def test_not_a_state_dict(tmp_path: Path, obj: object) -> None:
    path = tmp_path / "ckpt.pt"
    torch.save(obj, path)
    with pytest.raises(CheckpointError, match="no state dict found"):
        load_checkpoint(path)


def test_mixed_top_level_dict(tmp_path: Path) -> None:
    weight = torch.randn(2, 2)
    path = tmp_path / "ckpt.pt"
    torch.save({"conv.weight": weight, "epoch": 3}, path)
    ckpt = load_checkpoint(path)
    assert ckpt.key is None
    assert list(ckpt.state_dict) == ["conv.weight"]
    out = save_checkpoint(ckpt, {"conv.weight": torch.ones(2, 2)}, tmp_path / "out.pt")
    raw = torch.load(out, weights_only=True)
    assert list(raw) == ["conv.weight", "epoch"] and raw["epoch"] == 3
    assert torch.equal(raw["conv.weight"], torch.ones(2, 2))


def test_locate_state_dict_on_objects() -> None:
    model = make_model()
    sd, key = locate_state_dict(model)
    assert key is None and list(sd) == list(model.state_dict())
    sd, key = locate_state_dict({"net": {"module": model.state_dict()}})
    assert key == "net.module"
    sd, key = locate_state_dict({"a.b": {"c": model.state_dict()}}, key="a.b.c")
    assert key == "a.b.c"
    with pytest.raises(CheckpointError, match="the checkpoint"):
        locate_state_dict({"x": 1})


def test_safetensors_with_metadata(tmp_path: Path) -> None:
    model = make_model()
    path = tmp_path / "w.safetensors"
    safetensors.torch.save_file(model.state_dict(), path, metadata={"arch": "tiny"})
    ckpt = load_checkpoint(path)
    assert ckpt.format == "safetensors" and ckpt.key is None
    assert ckpt.metadata == {"arch": "tiny"}
    assert set(ckpt.state_dict) == set(model.state_dict())
    for k, v in model.state_dict().items():
        assert torch.equal(ckpt.state_dict[k], v)
    # Recognised by its header without the suffix.
    other = tmp_path / "weights.bin"
    other.write_bytes(path.read_bytes())
    assert load_checkpoint(other).format == "safetensors"
    with pytest.raises(CheckpointError, match="does not apply"):
        load_checkpoint(path, key="model")


def test_whole_module_needs_trust(tmp_path: Path) -> None:
    model = make_model()
    path = tmp_path / "model.pt"
    torch.save(model, path)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    assert "pickled Python objects" in info.value.message
    assert "Sequential" in info.value.message
    assert "trust=True" in info.value.line()
    ckpt = load_checkpoint(path, trust=True)
    assert ckpt.format == "module" and ckpt.trusted_module
    assert isinstance(ckpt.module, nn.Sequential) and ckpt.raw is ckpt.module
    assert_same_tensors(ckpt.state_dict, model.state_dict())


def test_dict_containing_module(tmp_path: Path) -> None:
    model = make_model()
    path = tmp_path / "ckpt.pt"
    torch.save({"model": model, "epoch": 3}, path)
    with pytest.raises(CheckpointError, match="pickled Python objects"):
        load_checkpoint(path)
    ckpt = load_checkpoint(path, trust=True)
    assert ckpt.format == "torch" and ckpt.key == "model"
    assert ckpt.trusted_module and ckpt.module is ckpt.raw["model"]
    assert_same_tensors(ckpt.state_dict, model.state_dict())


def test_trusted_but_unimportable_class(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "gone.pt"
    torch.save(Gone(), path)
    monkeypatch.delattr(sys.modules[__name__], "Gone")
    with pytest.raises(CheckpointError, match="cannot unpickle") as info:
        load_checkpoint(path, trust=True)
    assert info.value.message == (
        f"cannot unpickle {path}: the module '{__name__}' imported here has no 'Gone', so it "
        "is not the code the checkpoint was saved with"
    )


def test_trusted_module_whose_code_cannot_be_imported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a whole module pickled from a local model.py: the file says which module it needs
    monkeypatch.setattr(sys, "path", list(sys.path))
    code = tmp_path / "code"
    code.mkdir()
    (code / "localnet_h.py").write_text(
        "from torch import nn\n\n\nclass Net(nn.Sequential):\n    pass\n"
    )
    sys.path.insert(0, str(code))
    import localnet_h  # type: ignore[import-not-found]

    path = tmp_path / "whole.pt"
    torch.save(localnet_h.Net(nn.BatchNorm1d(3)), path)
    sys.path.remove(str(code))
    monkeypatch.delitem(sys.modules, "localnet_h")
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path, trust=True)
    err = info.value
    assert err.message == (
        f"cannot unpickle {path}: the model was saved with the Python module 'localnet_h', "
        "which cannot be imported here"
    )
    assert err.fix == (
        "run from the folder that holds localnet_h.py, add that folder to PYTHONPATH, or pass "
        "model=FOLDER/localnet_h.py:FACTORY (FOLDER then goes on the import path)"
    )
    assert isinstance(err.__cause__, ModuleNotFoundError)
    # importable again: it loads
    sys.path.insert(0, str(code))
    assert load_checkpoint(path, trust=True).format == "module"


NAMES = ["circle", "cross", "stripes", "triangle"]


@pytest.mark.parametrize(
    "entries",
    [
        {"classes": NAMES},
        {"class_names": tuple(NAMES)},
        {"class_to_idx": {"stripes": 2, "circle": 0, "triangle": 3, "cross": 1}},
        {"idx_to_class": dict(enumerate(NAMES))},
        {"id2label": {str(i): n for i, n in enumerate(NAMES)}},
    ],
    ids=["classes", "class_names", "class_to_idx", "idx_to_class", "id2label"],
)
def test_class_names_the_checkpoint_carries(tmp_path: Path, entries: dict) -> None:
    sd = make_model().state_dict()
    path = tmp_path / "c.pt"
    torch.save({"state_dict": sd, **entries}, path)
    assert load_checkpoint(path).class_names == NAMES
    # next to a nested state dict, too
    torch.save({"model": {"state_dict": sd, **entries}}, path)
    ckpt = load_checkpoint(path)
    assert ckpt.key == "model.state_dict" and ckpt.class_names == NAMES


@pytest.mark.parametrize(
    "value",
    [10, ["a", "a"], ["a", 3], [], "abc", {"a": 0, "b": 2}, {0: "a", 2: "b"}, {"x": "a"}],
)
def test_malformed_class_names_are_ignored(tmp_path: Path, value: object) -> None:
    path = tmp_path / "c.pt"
    key = "class_to_idx" if isinstance(value, dict) and "a" in value else "idx_to_class"
    for name in ("classes", key):
        torch.save({"state_dict": make_model().state_dict(), name: value}, path)
        assert load_checkpoint(path).class_names is None


def test_class_names_of_other_forms(tmp_path: Path) -> None:
    model = make_model()
    plain = tmp_path / "plain.pt"
    torch.save(model.state_dict(), plain)
    assert load_checkpoint(plain).class_names is None
    st_path = tmp_path / "w.safetensors"
    safetensors.torch.save_file(
        model.state_dict(), st_path, metadata={"classes": '["b", "a"]'}
    )
    assert load_checkpoint(st_path).class_names == ["b", "a"]
    safetensors.torch.save_file(model.state_dict(), st_path, metadata={"classes": "b, a"})
    assert load_checkpoint(st_path).class_names is None


@pytest.mark.parametrize("how", ["script", "trace"])
def test_torchscript(tmp_path: Path, how: str) -> None:
    model = make_model().eval()
    if how == "script":
        scripted = torch.jit.script(model)
    else:
        scripted = torch.jit.trace(model, torch.randn(2, 3, 6, 6))
    path = tmp_path / "ts.pt"
    scripted.save(str(path))
    ckpt = load_checkpoint(path)  # no trust needed
    assert ckpt.format == "torchscript" and not ckpt.trusted_module
    assert isinstance(ckpt.module, torch.jit.ScriptModule)
    assert "1.running_mean" in ckpt.state_dict
    assert torch.equal(ckpt.state_dict["1.running_var"], model[1].running_var)
    with pytest.raises(CheckpointError, match="TorchScript archives are inspected statically"):
        save_checkpoint(ckpt, {}, tmp_path / "out.pt")
    assert not (tmp_path / "out.pt").exists()


# --------------------------------------------------------------------------------------------
# Loading: errors


def _truncated(tmp_path: Path, name: str, write: Callable[[Path], object]) -> Path:
    full = tmp_path / ("full-" + name)
    write(full)
    data = full.read_bytes()
    path = tmp_path / name
    path.write_bytes(data[: len(data) // 2])
    return path


BROKEN = {
    "random": lambda p: p.write_bytes(random.Random(1).randbytes(4096)),
    "urandom": lambda p: p.write_bytes(os.urandom(4096)),
    "text": lambda p: p.write_text("epoch,loss\n1,0.5\n2,0.4\n"),
    "empty": lambda p: p.write_bytes(b""),
    "json": lambda p: p.write_text('{"state_dict": {}}'),
}


@pytest.mark.parametrize(
    ("kind", "trust"),
    # Random bytes are never loaded with trust: unpickling them unrestricted is pointless.
    [(kind, trust) for kind in sorted(BROKEN) for trust in (False, True) if kind != "urandom"]
    + [("urandom", False)],
)
def test_unreadable_files(tmp_path: Path, kind: str, trust: bool) -> None:
    path = tmp_path / "ckpt.pt"
    BROKEN[kind](path)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path, trust=trust)
    assert info.value.fix
    assert "\n" not in info.value.line()


@pytest.mark.parametrize("form", ["zip", "legacy", "torchscript", "safetensors", "module"])
@pytest.mark.parametrize("trust", [False, True])
def test_truncated_files(tmp_path: Path, form: str, trust: bool) -> None:
    model = make_model().eval()
    writers = {
        "zip": lambda p: torch.save(model.state_dict(), p),
        "legacy": lambda p: torch.save(model.state_dict(), p, _use_new_zipfile_serialization=False),
        "torchscript": lambda p: torch.jit.script(model).save(str(p)),
        "safetensors": lambda p: safetensors.torch.save_file(model.state_dict(), p),
        "module": lambda p: torch.save(model, p),
    }
    name = "ckpt.safetensors" if form == "safetensors" else "ckpt.pt"
    path = _truncated(tmp_path, name, writers[form])
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path, trust=trust)
    assert str(path) in info.value.message


def test_missing_file_and_directory(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "nope.pt")
    with pytest.raises(CheckpointError, match="is a directory, not a checkpoint file"):
        load_checkpoint(tmp_path)


def test_empty_file_message(tmp_path: Path) -> None:
    path = tmp_path / "ckpt.pt"
    path.write_bytes(b"")
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    assert info.value.message.startswith(f"cannot read {path} as a PyTorch, safetensors or")
    assert "empty" in info.value.message


def test_keyboard_interrupt_not_swallowed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "ckpt.pt"
    torch.save(make_model().state_dict(), path)

    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "load", interrupted)
    with pytest.raises(KeyboardInterrupt):
        load_checkpoint(path)


# --------------------------------------------------------------------------------------------
# Prefixes and fitting a model


@pytest.mark.parametrize(
    ("keys", "expected"),
    [
        (["module.a", "module.b"], "module."),
        (["module._orig_mod.a", "module._orig_mod.b.c"], "module._orig_mod."),
        (["_orig_mod.module.a"], "_orig_mod.module."),
        (["model.model.a"], "model.model."),
        (["module.a", "b"], ""),
        (["modules.a"], ""),
        ([], ""),
    ],
)
def test_common_prefix(keys: list[str], expected: str) -> None:
    assert common_prefix(keys) == expected


def test_strip_prefix_keeps_order_and_metadata() -> None:
    sd = Holder(make_model()).state_dict()
    stripped = strip_prefix(sd, "module.")
    assert list(stripped) == [k[len("module.") :] for k in sd]
    assert stripped._metadata[""] == sd._metadata["module"]
    assert stripped._metadata["1"] == sd._metadata["module.1"]
    assert "module" not in stripped._metadata
    assert list(strip_prefix({"a.x": 1, "b": 2}, "a.")) == ["x", "b"]


@pytest.mark.parametrize("prefix", ["", "module.", "model.", "_orig_mod.", "module._orig_mod."])
def test_prefixes_stripped_when_model_lacks_them(prefix: str) -> None:
    source = make_model(1)
    sd = with_prefix(source.state_dict(), prefix)
    target = make_model(2)
    renamed, stripped = match_to_model(sd, target.state_dict().keys())
    assert stripped == prefix
    assert list(renamed) == list(source.state_dict())
    assert load_into_model(target, sd) == prefix
    assert_same_tensors(target.state_dict(), source.state_dict())


def test_prefix_kept_when_model_has_it() -> None:
    source = Wrapped()
    keys = list(source.state_dict())
    assert all(k.startswith("model.") for k in keys)
    target_keys = Wrapped().state_dict().keys()
    # Saved from the model itself: nothing stripped.
    renamed, stripped = match_to_model(source.state_dict(), target_keys)
    assert stripped == "" and list(renamed) == keys
    # Saved from DDP around it: only "module." goes.
    renamed, stripped = match_to_model(with_prefix(source.state_dict(), "module."), target_keys)
    assert stripped == "module." and list(renamed) == keys
    # Saved from Lightning around it: one "model." goes, the model's own stays.
    renamed, stripped = match_to_model(with_prefix(source.state_dict(), "model."), target_keys)
    assert stripped == "model." and list(renamed) == keys
    target = Wrapped()
    assert load_into_model(target, with_prefix(source.state_dict(), "module._orig_mod.")) == (
        "module._orig_mod."
    )
    assert_same_tensors(target.state_dict(), source.state_dict())


@settings(max_examples=40, deadline=None)
@given(chain=st.lists(st.sampled_from(KNOWN_PREFIXES), max_size=3))
def test_match_to_model_undoes_any_prefix_chain(chain: list[str]) -> None:
    model_keys = ["0.weight", "1.running_mean", "4.bias"]
    prefix = "".join(chain)
    sd = {prefix + k: torch.zeros(1) for k in model_keys}
    renamed, stripped = match_to_model(sd, model_keys)
    assert stripped == prefix
    assert list(renamed) == model_keys


def test_load_into_model_with_ddp_metadata() -> None:
    source = make_model(1)
    sd = Holder(source).state_dict()
    target = make_model(2)
    assert load_into_model(target, sd) == "module."
    assert_same_tensors(target.state_dict(), source.state_dict())


def test_load_into_model_old_checkpoint_without_num_batches_tracked() -> None:
    sd = {k: v for k, v in make_model(1).state_dict().items() if "num_batches" not in k}
    target = make_model(2)
    assert load_into_model(target, sd) == ""
    assert torch.equal(target[1].running_mean, sd["1.running_mean"])


def test_load_into_model_mismatch() -> None:
    sd = with_prefix(make_model(1, out_features=5).state_dict(), "module.")
    del sd["module.1.weight"], sd["module.1.bias"]
    sd["module.extra.weight"] = torch.zeros(1)
    target = make_model(2)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(ModelError) as info:
        load_into_model(target, sd)
    message = info.value.message
    assert message.startswith("checkpoint does not fit the model")
    assert "2 missing keys (1.weight, 1.bias)" in message
    assert "1 unexpected key (extra.weight)" in message
    assert "2 shape mismatches (4.weight: checkpoint [5, 64] vs model [3, 64]" in message
    assert "'module.'" in message
    assert "model=" in info.value.fix
    assert "\n" not in info.value.line()
    assert_same_tensors(target.state_dict(), before)  # nothing was copied


def test_load_into_model_lists_at_most_five() -> None:
    target = nn.Sequential(*[nn.Linear(1, 1) for _ in range(4)])
    with pytest.raises(ModelError) as info:
        load_into_model(target, {"x": torch.zeros(1)})
    assert "8 missing keys (0.weight, 0.bias, 1.weight, 1.bias, 2.weight, ...)" in str(info.value)


# --------------------------------------------------------------------------------------------
# Saving


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("runs/ckpt.pt", "runs/ckpt.precise.pt"),
        ("w.safetensors", "w.precise.safetensors"),
        ("ckpt", "ckpt.precise"),
        ("a/b.pth.tar", "a/b.pth.precise.tar"),
    ],
)
def test_default_output_path(path: str, expected: str) -> None:
    assert default_output_path(Path(path), "precise") == Path(expected)


def _training_checkpoint(tmp_path: Path) -> tuple[Path, nn.Module, dict]:
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 3, 6, 6)).sum().backward()
    opt.step()
    obj = {
        "epoch": 5,
        "model": {"state_dict": with_prefix(model.state_dict(), "module._orig_mod."), "ema": 1},
        "optimizer": opt.state_dict(),
        "config": {"lr": 0.1, "name": "run"},
        "half": torch.randn(3).half(),
    }
    path = tmp_path / "ckpt.pt"
    torch.save(obj, path)
    return path, model, obj


def test_save_round_trip_preserves_everything_else(tmp_path: Path) -> None:
    path, model, obj = _training_checkpoint(tmp_path)
    digest = sha256(path)
    ckpt = load_checkpoint(path)
    assert ckpt.key == "model.state_dict"
    original = {k: v.clone() for k, v in ckpt.state_dict.items()}
    updates = new_stats(ckpt, prefix="module._orig_mod.")
    out = save_checkpoint(ckpt, updates, tmp_path / "ckpt.precise.pt")
    assert out == tmp_path / "ckpt.precise.pt"
    assert sha256(path) == digest  # the input file is untouched
    assert_same_tensors(ckpt.state_dict, original)  # the loaded checkpoint is untouched

    raw = torch.load(out, map_location="cpu", weights_only=True)
    assert list(raw) == list(obj)
    assert raw["epoch"] == 5 and raw["config"] == obj["config"] and raw["model"]["ema"] == 1
    assert torch.equal(raw["half"], obj["half"]) and raw["half"].dtype == torch.float16
    opt_old, opt_new = obj["optimizer"], raw["optimizer"]
    assert opt_new["param_groups"] == opt_old["param_groups"]
    assert opt_new["state"].keys() == opt_old["state"].keys()
    for i, state in opt_old["state"].items():
        for name, value in state.items():
            assert torch.equal(opt_new["state"][i][name], value)

    sd = raw["model"]["state_dict"]
    assert isinstance(sd, OrderedDict)
    assert list(sd) == list(original)  # prefix and order kept
    for k, v in original.items():
        assert sd[k].dtype == v.dtype, k
        if k in updates:
            assert torch.equal(sd[k], updates[k].float()), k
        else:
            assert torch.equal(sd[k], v), k

    # Reloading the written file gives the same structure again.
    again = load_checkpoint(out)
    assert again.key == ckpt.key and list(again.state_dict) == list(ckpt.state_dict)
    target = make_model(3)
    assert load_into_model(target, again.state_dict) == "module._orig_mod."
    assert torch.equal(target[1].running_mean, updates["module._orig_mod.1.running_mean"].float())


def test_save_plain_state_dict_keeps_metadata(tmp_path: Path) -> None:
    path = tmp_path / "ckpt.pt"
    torch.save(make_model().state_dict(), path)
    ckpt = load_checkpoint(path)
    out = save_checkpoint(ckpt, new_stats(ckpt), tmp_path / "out.pt")
    raw = torch.load(out, weights_only=True)
    assert raw._metadata == ckpt.state_dict._metadata
    assert raw["1.num_batches_tracked"].dtype == torch.long


def test_save_safetensors_round_trip(tmp_path: Path) -> None:
    model = make_model()
    path = tmp_path / "w.safetensors"
    safetensors.torch.save_file(model.state_dict(), path, metadata={"arch": "tiny"})
    digest = sha256(path)
    ckpt = load_checkpoint(path)
    updates = new_stats(ckpt)
    out = save_checkpoint(ckpt, updates, default_output_path(path, "precise"))
    assert out.name == "w.precise.safetensors"
    assert sha256(path) == digest
    again = load_checkpoint(out)
    assert again.format == "safetensors" and again.metadata == {"arch": "tiny"}
    for k, v in model.state_dict().items():
        expected = updates[k].float() if k in updates else v
        assert again.state_dict[k].dtype == v.dtype
        assert torch.equal(again.state_dict[k], expected), k


def test_save_whole_module(tmp_path: Path) -> None:
    model = make_model()
    path = tmp_path / "model.pt"
    torch.save(model, path)
    ckpt = load_checkpoint(path, trust=True)
    updates = new_stats(ckpt)
    out = save_checkpoint(ckpt, updates, tmp_path / "out.pt")
    assert torch.equal(ckpt.module[1].running_mean, model[1].running_mean)  # not modified
    again = load_checkpoint(out, trust=True)
    assert again.format == "module" and isinstance(again.module, nn.Sequential)
    for k, v in model.state_dict().items():
        expected = updates[k].float() if k in updates else v
        assert torch.equal(again.state_dict[k], expected), k


def test_save_dict_containing_module(tmp_path: Path) -> None:
    model = make_model()
    path = tmp_path / "ckpt.pt"
    torch.save({"epoch": 3, "model": model}, path)
    ckpt = load_checkpoint(path, trust=True)
    out = save_checkpoint(ckpt, new_stats(ckpt), tmp_path / "out.pt")
    raw = torch.load(out, weights_only=False)
    assert list(raw) == ["epoch", "model"] and raw["epoch"] == 3
    assert isinstance(raw["model"], nn.Sequential)
    assert torch.equal(raw["model"][1].running_var, torch.arange(4.0) + 2.0)
    assert torch.equal(raw["model"][0].weight, model[0].weight)


def test_save_refuses_input_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "ckpt.pt"
    torch.save(make_model().state_dict(), path)
    digest = sha256(path)
    ckpt = load_checkpoint(path)
    monkeypatch.chdir(tmp_path)
    link = tmp_path / "link.pt"
    os.link(path, link)
    for target in (path, Path("ckpt.pt"), tmp_path / "sub" / ".." / "ckpt.pt", link):
        with pytest.raises(CheckpointError) as info:
            save_checkpoint(ckpt, new_stats(ckpt), target, force=True)
        assert "refusing to overwrite the input checkpoint" in info.value.message
        assert info.value.fix == "choose another output= path"
    assert sha256(path) == digest


def test_save_refuses_existing_without_force(tmp_path: Path) -> None:
    path = tmp_path / "ckpt.pt"
    torch.save(make_model().state_dict(), path)
    ckpt = load_checkpoint(path)
    out = tmp_path / "out.pt"
    out.write_bytes(b"keep me")
    with pytest.raises(CheckpointError) as info:
        save_checkpoint(ckpt, new_stats(ckpt), out)
    assert "already exists" in info.value.message and "force=True" in info.value.fix
    assert out.read_bytes() == b"keep me"
    save_checkpoint(ckpt, new_stats(ckpt), out, force=True)
    assert torch.equal(load_checkpoint(out).state_dict["1.running_var"], torch.arange(4.0) + 2)
    assert leftovers(tmp_path) == []


def test_save_rejects_bad_updates_and_outputs(tmp_path: Path) -> None:
    path = tmp_path / "ckpt.pt"
    torch.save(make_model().state_dict(), path)
    ckpt = load_checkpoint(path)
    with pytest.raises(CheckpointError, match="does not have: nope"):
        save_checkpoint(ckpt, {"nope": torch.zeros(4)}, tmp_path / "a.pt")
    with pytest.raises(CheckpointError, match=r"has shape \[3\]"):
        save_checkpoint(ckpt, {"1.running_mean": torch.zeros(3)}, tmp_path / "a.pt")
    with pytest.raises(CheckpointError, match="output directory does not exist"):
        save_checkpoint(ckpt, {}, tmp_path / "missing" / "a.pt")
    with pytest.raises(CheckpointError, match="is a directory"):
        save_checkpoint(ckpt, {}, tmp_path, force=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt"]


def test_save_unwritable_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "ckpt.pt"
    torch.save(make_model().state_dict(), path)
    ckpt = load_checkpoint(path)

    def denied(*args: object, **kwargs: object) -> None:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(outputs_mod, "create_temp", denied)
    with pytest.raises(CheckpointError) as info:
        save_checkpoint(ckpt, {}, tmp_path / "out.pt")
    assert "cannot write" in info.value.message and "Permission denied" in info.value.message
    assert not (tmp_path / "out.pt").exists()


def test_written_file_has_normal_permissions(tmp_path: Path) -> None:
    path = tmp_path / "ckpt.pt"
    torch.save(make_model().state_dict(), path)
    out = save_checkpoint(load_checkpoint(path), {}, tmp_path / "out.pt")
    mask = os.umask(0)
    os.umask(mask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~mask
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("error", [RuntimeError("disk on fire"), KeyboardInterrupt()])
@pytest.mark.parametrize("existing", [False, True])
def test_failed_save_leaves_nothing_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, error: BaseException, existing: bool
) -> None:
    path = tmp_path / "ckpt.pt"
    torch.save({"model": make_model().state_dict(), "epoch": 1}, path)
    digest = sha256(path)
    ckpt = load_checkpoint(path)
    out = tmp_path / "out.pt"
    if existing:
        out.write_bytes(b"old")
    real_save = torch.save

    def failing_save(obj: object, f: object, *args: object, **kwargs: object) -> None:
        real_save(obj, f, *args, **kwargs)  # write some bytes first, then fail
        raise error

    monkeypatch.setattr(torch, "save", failing_save)
    expected = KeyboardInterrupt if isinstance(error, KeyboardInterrupt) else CheckpointError
    with pytest.raises(expected) as info:
        save_checkpoint(ckpt, new_stats(ckpt), out, force=True)
    if expected is CheckpointError:
        assert "disk on fire" in info.value.message
    assert leftovers(tmp_path) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == (
        ["ckpt.pt", "out.pt"] if existing else ["ckpt.pt"]
    )
    if existing:
        assert out.read_bytes() == b"old"
    assert sha256(path) == digest


# --------------------------------------------------------------------------------------------
# Devices of saved tensors


_TEST_TAGS: dict[int, str] = {}


def _test_tagger(storage: object) -> str | None:
    return _TEST_TAGS.get(storage.data_ptr()) if _TEST_TAGS else None  # type: ignore[attr-defined]


torch.serialization.register_package(0, _test_tagger, lambda storage, location: None)


def _saved_locations(path: Path) -> tuple[dict[str, str], object]:
    """Where each tensor of a ``{"state_dict": ..., ...}`` file says it was saved from."""
    seen: dict[int, str] = {}

    def record(storage: object, location: str) -> object:
        seen[storage.data_ptr()] = location  # type: ignore[attr-defined]
        return storage

    obj = torch.load(path, map_location=record, weights_only=True)

    def where(t: torch.Tensor) -> str:
        return seen.get(t.untyped_storage().data_ptr(), "?")

    return {k: where(v) for k, v in obj["state_dict"].items()} | {"step": where(obj["step"])}, obj


def test_saved_tensors_keep_their_device_tags(tmp_path: Path) -> None:
    """A checkpoint saved from a GPU (tensors tagged cuda:0) is read onto the CPU and written
    back with the same tags, updated BN buffers included; a CPU tensor stays a CPU tensor."""
    model = make_model()
    sd = model.state_dict()
    obj = {"state_dict": sd, "step": torch.tensor(7)}
    src = tmp_path / "gpu.pt"
    _TEST_TAGS.update({t.untyped_storage().data_ptr(): "cuda:0" for t in sd.values()})
    try:
        torch.save(obj, src)
    finally:
        _TEST_TAGS.clear()
    where, _ = _saved_locations(src)
    assert set(where.values()) == {"cuda:0", "cpu"} and where["step"] == "cpu"

    ckpt = load_checkpoint(src)
    bn = next(k for k in sd if k.endswith("running_mean"))
    out = save_checkpoint(ckpt, {bn: torch.full_like(sd[bn], 0.5)}, tmp_path / "out.pt")
    after, written = _saved_locations(out)
    assert after == where
    assert torch.equal(written["state_dict"][bn], torch.full_like(sd[bn], 0.5))
    assert written["step"].device.type == "cpu"

    plain = tmp_path / "cpu.pt"
    torch.save(obj, plain)
    out = save_checkpoint(load_checkpoint(plain), {bn: sd[bn] + 1}, tmp_path / "out2.pt")
    assert set(_saved_locations(out)[0].values()) == {"cpu"}
