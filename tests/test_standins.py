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
from bnscope import capture
from bnscope.collect import collect

from .standins import BatchNormAct2d, SyncBatchNormAct, act_net, convert_sync_batchnorm
from .statecheck import assert_same_state, snapshot

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
    after = snapshot(fixed, skip_buffers={f"{n}.running_{s}" for n in "13" for s in ("mean", "var")})
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
    ra = bnscope.inspect(copy.deepcopy(plain), data).extra["consistency"]
    rb = bnscope.inspect(copy.deepcopy(synced), data).extra["consistency"]
    assert ra["agreement"] == pytest.approx(rb["agreement"])
    ga = bnscope.ghost_analysis(copy.deepcopy(plain), data, sizes=[4]).extra["sizes"]
    gb = bnscope.ghost_analysis(copy.deepcopy(synced), data, sizes=[4]).extra["sizes"]
    assert ga[0]["agreement"] == pytest.approx(gb[0]["agreement"])
    assert math.isclose(ga[0]["accuracy"], gb[0]["accuracy"])


def test_local_sync_batchnorm_is_a_no_op_without_a_process_group():
    from bnscope import distributed

    original = nn.SyncBatchNorm.forward
    with distributed.local_batchnorm():
        assert nn.SyncBatchNorm.forward is original
