"""Real-architecture BN flavours through every operation, against float64 references and
direct computations: timm's BN+activation layers (native fast path, ghost chunks through their
own forward), SyncBatchNorm subclasses under an initialized process group, custom forwards."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

import bnscope
from bnscope.engine import capture
from bnscope.engine.collect import collect

from ..standins import BatchNormAct2d, SyncBatchNormAct, act_net, convert_sync_batchnorm
from ..statecheck import assert_same_state, snapshot

F64 = torch.float64


@pytest.fixture(autouse=True)
def _no_timed_checks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(capture, "CHECK_SECONDS", float("inf"))


def images(n: int = 6, batch: int = 16, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        y = torch.randint(0, 4, (batch,), generator=g)
        x = torch.randn(batch, 3, 6, 6, generator=g) * 1.5 + y.view(-1, 1, 1, 1) * 0.4 + 0.5
        out.append((x, y))
    return out


def trained(model: nn.Module, data: list, steps: int = 3) -> nn.Module:
    """Running statistics moved away from their init (a few train-mode forwards)."""
    model.train()
    with torch.no_grad():
        for x, _ in data[:steps]:
            model(x)
    return model.eval()


def bn_inputs_reference(model: nn.Module, data: list) -> dict[str, tuple[torch.Tensor, ...]]:
    """Float64 population mean and biased variance of every BN layer's input, with the BN
    layers normalizing by batch statistics (their own forward, buffers left alone) and every
    other module in eval mode."""
    m = copy.deepcopy(model).eval()
    inputs: dict[str, list[torch.Tensor]] = {}
    for name, mod in m.named_modules():
        if isinstance(mod, nn.modules.batchnorm._BatchNorm):
            mod.training = True  # the layer only: its dropout child stays in eval mode
            mod.momentum = 0.0
            mod.register_forward_pre_hook(
                lambda mod, a, name=name: inputs.setdefault(name, []).append(a[0].to(F64))
            )
    with torch.no_grad():
        for x, _ in data:
            m(x)
    out = {}
    for name, xs in inputs.items():
        allx = torch.cat(xs)
        dims = [d for d in range(allx.ndim) if d != 1]
        var, mean = torch.var_mean(allx, dim=dims, correction=0)
        out[name] = (mean, var)
    return out


def assert_exact(model: nn.Module, ref: dict[str, tuple[torch.Tensor, ...]]) -> None:
    for name, mod in model.named_modules():
        if name in ref:
            mean, var = ref[name]
            d_mu = ((mod.running_mean.double() - mean).abs() / var.sqrt()).max()
            d_var = (mod.running_var.double() / var).log().abs().max()
            assert float(d_mu) < 1e-6 and float(d_var) < 1e-6, (name, float(d_mu), float(d_var))


# --------------------------------------------------------------------------------------------
# timm BN + activation


def test_bn_act_layers_take_the_kernel_path_and_are_exact():
    data = images()
    model = trained(act_net(drop=0.3), data)
    col = collect(copy.deepcopy(model), data)
    assert [col.layers[n].exact_path for n in ("1", "3")] == [False, False]
    fixed = copy.deepcopy(model)
    before = snapshot(fixed)
    bnscope.precise_bn(fixed, data)
    assert_exact(fixed, bn_inputs_reference(model, data))
    buffers = ("running_mean", "running_var", "num_batches_tracked")  # what precise writes
    written = {f"{n}.{s}" for n in "13" for s in buffers}
    after = snapshot(fixed, skip_buffers=written)
    assert_same_state({k: v for k, v in before.items() if k in after}, after)


class Renorm(nn.BatchNorm2d):
    """Not plain batch norm: the forward also reads the running statistics (as Batch
    Renormalization does), so the engine cannot take the kernel's moments."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x)
        return y + 0.0 * self.running_mean.view(1, -1, 1, 1)


class TwoCalls(nn.BatchNorm2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) + super().forward(x * 2) * 0.0


@pytest.mark.parametrize("cls", [Renorm, TwoCalls])
def test_other_custom_forwards_stay_on_the_float64_path(cls: type):
    data = images()
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), cls(4), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 4))  # fmt: skip
    trained(model, data)
    col = collect(copy.deepcopy(model), data)
    assert col.layers["1"].exact_path
    assert col.layers["1"].exact_note
    fixed = copy.deepcopy(model)
    bnscope.precise_bn(fixed, data)
    assert_exact(fixed, {"1": bn_inputs_reference(model, data)["1"]})


def chunk_forward(module: nn.BatchNorm2d, x: torch.Tensor, g: int) -> torch.Tensor:
    """Direct computation: normalize chunks of g samples with their own biased statistics,
    affine, then the layer's own dropout (eval) and activation."""
    n, c = x.shape[:2]
    xs = x.double().view(n // g, g, c, *x.shape[2:])
    dims = (1, *range(3, xs.ndim))
    var, mean = torch.var_mean(xs, dim=dims, correction=0, keepdim=True)
    y = (xs - mean) / torch.sqrt(var + module.eps)
    w = module.weight.double().view(1, 1, c, *([1] * (x.ndim - 2)))
    b = module.bias.double().view(1, 1, c, *([1] * (x.ndim - 2)))
    y = (y * w + b).view_as(x).to(x.dtype)
    return module.act(module.drop(y))


def test_ghost_keeps_the_activation_of_bn_act_layers():
    """The NBS curve of a timm-style net equals a direct computation that splits every batch
    into chunks of g and keeps each layer's activation."""
    data = images(n=4, batch=16)
    model = trained(act_net(), data)
    pop = copy.deepcopy(model)
    bnscope.precise_bn(pop, data)
    rep = bnscope.ghost_analysis(copy.deepcopy(model), data, sizes=[4, 8])
    for g in (4, 8):
        chunked = copy.deepcopy(pop).eval()
        for mod in chunked.modules():
            if isinstance(mod, BatchNormAct2d):
                mod.forward = lambda x, mod=mod, g=g: chunk_forward(mod, x, g)
        agree = total = correct = 0
        with torch.no_grad():
            for x, y in data:
                ref = pop.eval()(x).argmax(1)
                out = chunked(x).argmax(1)
                agree += int((ref == out).sum())
                correct += int((out == y).sum())
                total += len(y)
        row = next(r for r in rep.extra["sizes"] if r["size"] == g)
        assert row["agreement"] == pytest.approx(agree / total)
        assert row["accuracy"] == pytest.approx(correct / total)
    assert all(layer.status == "analysed" for layer in rep.layers)


def test_ghost_reports_a_layer_it_cannot_split():
    class Manual(nn.BatchNorm2d):
        """Normalizes by hand: no batch_norm call for the ghost pass to split."""

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if self.training:
                var, mean = torch.var_mean(x, dim=(0, 2, 3), correction=0, keepdim=True)
            else:
                mean = self.running_mean.view(1, -1, 1, 1)
                var = self.running_var.view(1, -1, 1, 1)
            return (x - mean) / torch.sqrt(var + self.eps)

    data = images(n=3)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), Manual(4), nn.ReLU(),
                          nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 4))  # fmt: skip
    rep = bnscope.ghost_analysis(model, data, sizes=[4])
    status = {layer.name: (layer.status, layer.reason) for layer in rep.layers}
    assert status["1"][0] == "skipped" and "no batch_norm call" in status["1"][1]
    assert status["4"][0] == "analysed"


# --------------------------------------------------------------------------------------------
# SyncBatchNorm subclasses under an initialized process group


@pytest.fixture
def one_rank_group(tmp_path: Path):
    """A real (gloo, one rank) default process group, as under torchrun with one process."""
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1
    )
    try:
        yield
    finally:
        dist.destroy_process_group()


@pytest.mark.usefixtures("one_rank_group")
def test_sync_batchnorm_act_keeps_its_activation_under_a_process_group():
    data = images()
    plain = trained(act_net(drop=0.2), data)
    synced = convert_sync_batchnorm(copy.deepcopy(plain))
    assert isinstance(synced[1], SyncBatchNormAct) and isinstance(synced[1].act, nn.ReLU)
    ref = bn_inputs_reference(plain, data)
    for fn in (lambda m: bnscope.precise_bn(m, data), lambda m: bnscope.adapt_bn(m, data)):
        a, b = copy.deepcopy(plain), copy.deepcopy(synced)
        fn(a)
        fn(b)
        assert_exact(b, ref)
        for n in ("1", "3"):
            torch.testing.assert_close(b[int(n)].running_var, a[int(n)].running_var)
    assert nn.SyncBatchNorm.forward.__name__ == "forward"  # the class is put back
    assert "forward" not in synced[1].__dict__
    ra = bnscope.inspect(copy.deepcopy(plain), data).extra["metrics"]["variants"]
    rb = bnscope.inspect(copy.deepcopy(synced), data).extra["metrics"]["variants"]
    for name, variant in ra.items():
        assert variant["agreement"] == pytest.approx(rb[name]["agreement"]), name
    ga = bnscope.ghost_analysis(copy.deepcopy(plain), data, sizes=[4]).extra["sizes"]
    gb = bnscope.ghost_analysis(copy.deepcopy(synced), data, sizes=[4]).extra["sizes"]
    assert ga[0]["agreement"] == pytest.approx(gb[0]["agreement"])
    assert math.isclose(ga[0]["accuracy"], gb[0]["accuracy"])


def test_local_sync_batchnorm_is_a_no_op_without_a_process_group():
    from bnscope.engine import distributed

    original = nn.SyncBatchNorm.forward
    with distributed.local_batchnorm():
        assert nn.SyncBatchNorm.forward is original


# --------------------------------------------------------------------------------------------
# Frozen BN


def frozen_model(data: list) -> nn.Module:
    """A frozen backbone whose stored statistics come from "another domain" (ImageNet-like
    pretraining): the first layer's are off by a shift and a scale."""
    from ..standins import frozen_backbone

    torch.manual_seed(3)
    model = frozen_backbone()
    with torch.no_grad():
        model[1].running_mean.fill_(0.3)
        model[1].running_var.fill_(2.0)
        model[1].weight.uniform_(0.5, 1.5)
        model[4].running_mean.fill_(0.1)
        model[4].running_var.fill_(0.5)
    return model.eval()


def frozen_reference(model: nn.Module, data: list, batch_stats: bool) -> dict[str, tuple]:
    """Float64 population statistics of each frozen layer's input: with every frozen layer
    normalizing with its stored statistics (the model as it runs), or with batch statistics
    (a FrozenBatchNorm2d turned into a BatchNorm2d in training mode, the usual AdaBN recipe)."""
    from ..standins import FrozenBatchNorm2d

    m = copy.deepcopy(model).eval()
    if batch_stats:
        for i, mod in enumerate(list(m)):
            if isinstance(mod, FrozenBatchNorm2d):
                bn = nn.BatchNorm2d(mod.running_mean.numel(), eps=mod.eps, momentum=0.0)
                with torch.no_grad():
                    bn.weight.copy_(mod.weight)
                    bn.bias.copy_(mod.bias)
                bn.training = True
                m[i] = bn
    inputs: dict[str, list[torch.Tensor]] = {}
    for name in ("1", "4"):
        m[int(name)].register_forward_pre_hook(
            lambda mod, a, name=name: inputs.setdefault(name, []).append(a[0].to(F64))
        )
    with torch.no_grad():
        for x, _ in data:
            m(x)
    out = {}
    for name, xs in inputs.items():
        var, mean = torch.var_mean(torch.cat(xs), dim=(0, 2, 3), correction=0)
        out[name] = (mean, var)
    return out


def test_frozen_layers_are_found_measured_and_kept_unless_asked():
    data = images()
    model = frozen_model(data)
    static = bnscope.static_inspect(model)
    assert [(r.name, r.frozen) for r in static.layers] == [("1", True), ("4", True)]
    assert not any(f.code == "no-batchnorm" for f in static.findings)

    kept = copy.deepcopy(model)
    before = snapshot(kept)
    rep = bnscope.precise_bn(kept, data)
    assert_same_state(before, snapshot(kept))  # measured, not written
    assert [(r.name, r.status) for r in rep.layers] == [("1", "frozen"), ("4", "frozen")]
    assert "FrozenBatchNorm2d" in rep.layers[0].reason and "include_frozen" in rep.layers[0].reason
    ref = frozen_reference(model, data, batch_stats=False)
    mean, var = ref["1"]
    d_mu = ((model[1].running_mean.double() - mean).abs() / (var + 1e-5).sqrt())
    assert rep.layers[0].d_mu_max == pytest.approx(float(d_mu.max()), rel=1e-6)
    torch.testing.assert_close(rep.arrays["4"]["new_var"], ref["4"][1], rtol=1e-9, atol=0)

    updated = copy.deepcopy(model)
    rep = bnscope.precise_bn(updated, data, include_frozen=True)
    assert [r.status for r in rep.layers] == ["updated", "updated"]
    assert "re-estimated" in rep.layers[0].reason
    ref = frozen_reference(model, data, batch_stats=True)
    for name in ("1", "4"):
        mean, var = ref[name]
        torch.testing.assert_close(updated[int(name)].running_mean.double(), mean,
                                   rtol=1e-6, atol=1e-7)  # fmt: skip
        assert float((updated[int(name)].running_var.double() / var).log().abs().max()) < 1e-6
    assert torch.equal(updated[1].weight, model[1].weight)  # only the statistics change


def test_frozen_layers_in_adapt_inspect_and_ghost():
    data = images()
    model = frozen_model(data)
    shifted = [(x * 2 + 1, y) for x, y in data]
    m = copy.deepcopy(model)
    rep = bnscope.adapt_bn(m, [x for x, _ in shifted])
    assert [r.status for r in rep.layers] == ["frozen", "frozen"]
    assert torch.equal(m[1].running_mean, model[1].running_mean)
    shift = [f for f in rep.findings if f.code == "domain-shift"]
    assert shift and all("include_frozen" in f.fix for f in shift)
    rep = bnscope.adapt_bn(m, [x for x, _ in shifted], include_frozen=True)
    assert [r.status for r in rep.layers] == ["updated", "updated"]
    ref = frozen_reference(model, shifted, batch_stats=True)
    torch.testing.assert_close(m[1].running_mean.double(), ref["1"][0], rtol=1e-6, atol=1e-7)

    rep = bnscope.inspect(copy.deepcopy(model), data)
    layers = {r.name: r for r in rep.layers}
    assert layers["1"].status == "frozen" and layers["1"].d_mu_median > 0.05
    assert layers["1"].z_mu is None and "stored statistics" in layers["1"].reason
    rep = bnscope.ghost_analysis(copy.deepcopy(model), data, sizes=[4])
    assert [(r.status, "frozen" in (r.reason or "")) for r in rep.layers] == [("skipped", True)] * 2


# --------------------------------------------------------------------------------------------
# Several inputs, dict inputs


def two_input_data(n: int = 5, batch: int = 12, dict_form: bool = False) -> list:
    g = torch.Generator().manual_seed(4)
    out = []
    for _ in range(n):
        image = torch.randn(batch, 3, 5, 5, generator=g) + 0.5
        extra = torch.randn(batch, 5, generator=g) * 2
        y = torch.randint(0, 4, (batch,), generator=g)
        if dict_form:
            out.append({"pixel_values": image, "features": extra, "labels": y, "id": "x"})
        else:
            out.append((image, extra, y))
    return out


def two_input_reference(model: nn.Module, data: list) -> dict[str, tuple]:
    m = copy.deepcopy(model).eval()
    inputs: dict[str, list[torch.Tensor]] = {}
    for name in ("bn", "bn1d"):
        mod = getattr(m, name)
        mod.training = True
        mod.momentum = 0.0
        mod.register_forward_pre_hook(
            lambda mod, a, name=name: inputs.setdefault(name, []).append(a[0].to(F64))
        )
    with torch.no_grad():
        for b in data:
            if isinstance(b, dict):
                m(b["pixel_values"], b["features"])
            else:
                m(b[0], b[1])
    out = {}
    for name, xs in inputs.items():
        allx = torch.cat(xs)
        dims = [d for d in range(allx.ndim) if d != 1]
        var, mean = torch.var_mean(allx, dim=dims, correction=0)
        out[name] = (mean, var)
    return out


@pytest.mark.parametrize("form", ["tuple", "dict", "call"])
def test_models_with_several_inputs_through_every_operation(form: str):
    from ..standins import DictInputs, TwoInputs

    torch.manual_seed(5)
    model = (DictInputs if form == "dict" else TwoInputs)()
    data = two_input_data(dict_form=form == "dict")
    call = None
    if form == "call":  # batches of another shape, consumed by a call function
        data = [{"a": a, "b": b, "target": y} for a, b, y in data]

        def call(m: nn.Module, batch: dict) -> torch.Tensor:
            return m(batch["a"], batch["b"])

    trained(model, [((b["pixel_values"], b["features"]) if isinstance(b, dict) and "labels" in b
                     else (b["a"], b["b"]) if isinstance(b, dict) else (b[0], b[1]), None)
                    for b in data], steps=0)  # fmt: skip
    ref = two_input_reference(model, data if form != "call" else
                              [(b["a"], b["b"], b["target"]) for b in data])  # fmt: skip
    m = copy.deepcopy(model)
    rep = bnscope.precise_bn(m, data, call=call)
    assert rep.extra["samples"] == 60
    assert_exact(m, ref)
    m = copy.deepcopy(model)
    rep = bnscope.adapt_bn(m, data, call=call)
    assert rep.extra["samples"] == 60
    rep = bnscope.inspect(copy.deepcopy(model), data, call=call)
    c = rep.extra["metrics"]
    assert c["samples"] == 60
    assert c["has_labels"] == (form != "call")  # a call= batch's labels are not known
    rep = bnscope.ghost_analysis(copy.deepcopy(model), data, sizes=[4, 12], call=call)
    assert rep.extra["batch_size"] == 12 and rep.extra["samples"] == 60
    assert [row["status"] for row in rep.extra["sizes"]] == ["ok", "ok"]


def test_input_key_picks_the_model_input_of_dict_batches():
    torch.manual_seed(6)
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(3))
    data = [{"pic": torch.randn(8, 3, 2, 2), "other": torch.randn(8, 3, 2, 2)} for _ in range(3)]
    with torch.no_grad():
        model(data[0]["pic"])  # initializes the lazy layer
    with pytest.raises(bnscope.DataError, match="input_key"):
        bnscope.precise_bn(copy.deepcopy(model), data)
    m = copy.deepcopy(model)
    rep = bnscope.precise_bn(m, data, input_key="pic")
    assert rep.extra["samples"] == 24
    x = torch.cat([d["pic"] for d in data])
    with torch.no_grad():
        h = model[0](x).double()
    torch.testing.assert_close(m[1].running_mean.double(), h.mean((0, 2, 3)), rtol=1e-6, atol=1e-7)
