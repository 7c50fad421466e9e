"""`bnscope precise --freeze`: the written checkpoint loads strictly into a model with frozen BN
layers (bnscope's, torchvision's when it imports), which computes what the precise model
computes in eval mode and whose statistics training cannot move; options and layer kinds."""

from __future__ import annotations

import copy
import json
import textwrap
import warnings

import pytest
import safetensors.torch
import torch
from torch import nn

import bnscope
from bnscope.nn import FrozenBatchNorm2d, freeze_bn

from ..clirun import one_error_line, run
from ..conftest import sha256, tiny_spec
from ..models import make_tiny, make_tiny_frozen
from ..reallibs import real_libraries

FROZEN_KEYS = ["weight", "bias", "running_mean", "running_var"]


def strip(sd: dict, prefix: str = "module.") -> dict:
    return {k.removeprefix(prefix): v for k, v in sd.items()}


def frozen_tiny() -> nn.Module:
    """The user's fine-tuning model: make_tiny with FrozenBatchNorm2d layers."""
    model = make_tiny_frozen()
    assert isinstance(model[1], FrozenBatchNorm2d)
    return model


def test_frozen_checkpoint_loads_strictly_and_computes_the_precise_model(precise_env):
    """Acceptance (a): the frozen model loads the --freeze output strictly; in eval mode its
    outputs equal the precise model's, and those of the plain precise output in BN layers."""
    tmp, ckpt, data, _, x = precise_env
    digest = sha256(ckpt)
    res = run("precise", ckpt, "--model", tiny_spec(), "--data", data, "--batch-size", "16",
              "--freeze", "--json")  # fmt: skip
    assert res.exit_code == 0, res.stderr
    doc = json.loads(res.stdout)
    out = tmp / "ck.frozen.pt"
    assert doc["freeze"] is True and doc["output"] == str(out) and out.exists()
    assert [(r["name"], r["status"], r["reason"]) for r in doc["layers"]] == [
        ("1", "updated", None), ("4", "updated", None)
    ]  # fmt: skip
    assert sha256(ckpt) == digest

    raw_in = torch.load(ckpt, weights_only=True)
    raw = torch.load(out, weights_only=True)
    assert raw.keys() == raw_in.keys() and raw["epoch"] == 7
    assert torch.equal(raw["optimizer"]["lr"], raw_in["optimizer"]["lr"])
    expected = [k for k in raw_in["model"] if not k.endswith("num_batches_tracked")]
    assert list(raw["model"]) == expected
    for layer in ("1", "4"):
        assert [k for k in raw["model"] if k.startswith(f"module.{layer}.")] == [
            f"module.{layer}.{name}" for name in FROZEN_KEYS
        ]
    frozen = frozen_tiny()
    frozen.load_state_dict(strip(raw["model"]), strict=True)

    plain = run("precise", ckpt, "--model", tiny_spec(), "--data", data, "--batch-size", "16")
    assert plain.exit_code == 0, plain.stderr
    bn_model = make_tiny()
    bn_model.load_state_dict(strip(torch.load(tmp / "ck.precise.pt", weights_only=True)["model"]))
    for key in ("1.running_mean", "1.running_var", "4.running_mean", "4.running_var"):
        assert torch.equal(frozen.state_dict()[key], bn_model.state_dict()[key]), key

    job = bnscope.open(ckpt, model=tiny_spec(), data=data, batch_size=16, device="cpu")
    job.precise(output=tmp / "unwritten.pt")  # the library's precise model, in memory
    live = job.model()
    assert live is not None
    with torch.no_grad():
        want = live.module.eval()(x)
        torch.testing.assert_close(frozen.eval()(x), want, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(bn_model.eval()(x), want, rtol=0, atol=0)
        frozen.train()  # a frozen model computes the same in train mode
        torch.testing.assert_close(frozen(x), want, rtol=1e-5, atol=1e-6)


def test_training_the_frozen_model_leaves_its_statistics_untouched(precise_env):
    """Acceptance (b): a few SGD steps in train mode change the weights, never the frozen
    statistics, weights or biases of the BN layers (buffers, bit for bit)."""
    tmp, ckpt, data, _, x = precise_env
    res = run("precise", ckpt, "--model", tiny_spec(), "--data", data, "--freeze", "--quiet")
    assert res.exit_code == 0, res.stderr
    model = frozen_tiny()
    model.load_state_dict(strip(torch.load(tmp / "ck.frozen.pt", weights_only=True)["model"]))
    frozen_before = {k: v.clone() for k, v in model.state_dict().items() if k[0] in "14"}
    conv_before = model[0].weight.detach().clone()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    y = torch.arange(len(x)) % 3
    model.train()
    for step in range(3):
        batch = slice(16 * step, 16 * step + 16)
        loss = nn.functional.cross_entropy(model(x[batch]), y[batch])
        opt.zero_grad()
        loss.backward()
        opt.step()
    for key, value in model.state_dict().items():
        if key in frozen_before:
            assert torch.equal(value, frozen_before[key]), key
    assert not torch.equal(model[0].weight, conv_before)
    assert not any(id(p) in {id(b) for b in model.buffers()} for p in model.parameters())


def test_torchvision_frozen_batchnorm_loads_the_output(precise_env):
    if real_libraries() is None:
        pytest.skip("torchvision does not import here")
    from torchvision.ops import FrozenBatchNorm2d as TorchvisionFrozen

    tmp, ckpt, data, _, x = precise_env
    res = run("precise", ckpt, "--model", tiny_spec(), "--data", data, "--freeze", "--quiet")
    assert res.exit_code == 0, res.stderr
    state = strip(torch.load(tmp / "ck.frozen.pt", weights_only=True)["model"])
    theirs = make_tiny()
    theirs[1], theirs[4] = TorchvisionFrozen(4), TorchvisionFrozen(4)
    theirs.load_state_dict(state, strict=True)
    ours = frozen_tiny()
    ours.load_state_dict(state, strict=True)
    with torch.no_grad():
        assert torch.equal(theirs.eval()(x), ours.eval()(x))


MODEL = textwrap.dedent(
    """
    import torch
    from torch import nn


    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.bn = nn.BatchNorm2d(4, affine=False)
            self.free = nn.BatchNorm2d(4, track_running_stats=False)
            self.unused = nn.BatchNorm2d(4)
            self.head = nn.Linear(4, 3)

        def forward(self, x):
            h = self.free(self.bn(self.conv(x))).relu()
            return self.head(h.mean((2, 3)))


    def make():
        return Net()
    """
)


def test_affine_false_not_called_and_statless_layers(tmp_path, precise_env):
    _, _, data, _, x = precise_env
    spec_file = tmp_path / "net.py"
    spec_file.write_text(MODEL)
    spec = f"{spec_file}:make"
    namespace: dict = {}
    exec(MODEL, namespace)  # the same class, to build the user's models here
    torch.manual_seed(0)
    net = namespace["make"]()
    with torch.no_grad():
        net.unused.running_mean.fill_(0.5)
        net.unused.num_batches_tracked.fill_(9)
    state = net.state_dict()
    ckpt = tmp_path / "net.safetensors"
    safetensors.torch.save_file(state, ckpt)

    res = run("precise", ckpt, "--model", spec, "--data", data, "--freeze", "--json")
    assert res.exit_code == 0, res.stderr
    doc = json.loads(res.stdout)
    out = tmp_path / "net.frozen.safetensors"
    assert doc["output"] == str(out) and doc["freeze"] is True
    layers = {r["name"]: (r["status"], r["reason"]) for r in doc["layers"]}
    assert layers == {
        "bn": ("updated", None),
        "free": ("skipped", "track_running_stats=False; no running statistics to freeze: "
                            "written as it was"),
        "unused": ("not-called", "never ran on the data; frozen with its stored statistics"),
    }  # fmt: skip
    (finding,) = [f for f in doc["findings"] if f["code"] == "not-called"]
    assert finding["layer"] == "unused" and "frozen with its stored" in finding["message"]

    written = safetensors.torch.load_file(out)
    for layer in ("bn", "unused"):
        assert sorted(k for k in written if k.startswith(f"{layer}.")) == sorted(
            f"{layer}.{name}" for name in FROZEN_KEYS
        )
    assert torch.equal(written["bn.weight"], torch.ones(4))
    assert torch.equal(written["bn.bias"], torch.zeros(4))
    assert torch.equal(written["unused.running_mean"], state["unused.running_mean"])
    assert sorted(k for k in written if k.startswith("free.")) == ["free.bias", "free.weight"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # freeze_bn warns about the layer without statistics
        user = freeze_bn(namespace["make"]())
    assert type(user.free) is nn.BatchNorm2d
    user.load_state_dict(written, strict=True)  # the model freeze_bn makes loads it
    with torch.no_grad():  # bn's input does not depend on the batches: conv of every sample
        h = net.conv(x).double()
    var, mean = torch.var_mean(h, dim=(0, 2, 3), correction=0)
    torch.testing.assert_close(written["bn.running_mean"].double(), mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(written["bn.running_var"].double(), var, rtol=1e-5, atol=0)


def test_output_option_force_and_the_text_report(precise_env):
    tmp, ckpt, data, _, _ = precise_env
    target = tmp / "for_finetuning.pt"
    target.write_bytes(b"")
    args = ("precise", ckpt, "--model", tiny_spec(), "--data", data, "--freeze", "-o", target)
    one_error_line(run(*args), f"{target} already exists")
    res = run(*args, "--force")
    assert res.exit_code == 0, res.stderr
    assert f"Wrote {target} for frozen BN (2 BN layers as FrozenBatchNorm" in " ".join(
        res.stdout.split()
    )
    assert not (tmp / "ck.frozen.pt").exists()
    frozen_tiny().load_state_dict(strip(torch.load(target, weights_only=True)["model"]))


def test_include_frozen_with_frozen_layers_in_the_model(tmp_path, precise_env):
    """A model whose BN layers are frozen already: kept unless --include-frozen, then
    re-estimated and written; their layout stays the frozen one."""
    _, _, data, _, _ = precise_env
    model = frozen_tiny()
    with torch.no_grad():
        model[1].running_mean.fill_(3.0)
    state = dict(model.state_dict())
    state["1.num_batches_tracked"] = torch.tensor(5)  # left from BN training: ignored on load
    ckpt = tmp_path / "f.pt"
    torch.save(state, ckpt)
    spec = tiny_spec("make_tiny_frozen")
    refused = run("precise", ckpt, "--model", spec, "--data", data, "--freeze")
    one_error_line(refused, "every BN layer of the model is frozen")
    res = run("precise", ckpt, "--model", spec, "--data", data, "--freeze", "--include-frozen",
              "--json")  # fmt: skip
    assert res.exit_code == 0, res.stderr
    doc = json.loads(res.stdout)
    assert [r["status"] for r in doc["layers"]] == ["updated", "updated"]
    written = torch.load(tmp_path / "f.frozen.pt", weights_only=True)
    assert "1.num_batches_tracked" not in written
    assert list(written) == [k for k in state if k != "1.num_batches_tracked"]
    assert not torch.equal(written["1.running_mean"], state["1.running_mean"])
    frozen_tiny().load_state_dict(written, strict=True)


def test_whole_module_with_a_bn_activation_layer_is_refused(tmp_path, precise_env):
    _, _, data, _, _ = precise_env
    from ..standins import act_net

    ckpt = tmp_path / "whole.pt"
    torch.save(act_net(), ckpt)
    res = run("precise", ckpt, "--trust-checkpoint", "--data", data, "--freeze")
    one_error_line(res, "has a forward of its own")
    assert not (tmp_path / "whole.frozen.pt").exists()


def test_live_model_job_cannot_freeze(precise_env):
    _, _, data, model, _ = precise_env
    job = bnscope.open(model=copy.deepcopy(model), data=str(data), device="cpu")
    with pytest.raises(bnscope.UsageError, match="freeze=True writes a checkpoint file"):
        job.precise(freeze=True)
