"""How models run: devices, autocast (amp), channels-last, placement that restores every
tensor, and the pass structure of inspect and ghost (forward passes per batch)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import bnscope
from bnscope.engine import runner as runner_mod
from bnscope.errors import UsageError
from bnscope.ops.inspect import PAIR_BUDGET  # noqa: F401 - the budget exists and is patchable

from ..statecheck import assert_same_state, snapshot

F64 = torch.float64


def net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6), nn.ReLU(),
        nn.Conv2d(6, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 4),
    )  # fmt: skip


def data(n: int = 6, batch: int = 8, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        y = torch.randint(0, 4, (batch,), generator=g)
        x = torch.randn(batch, 3, 6, 6, generator=g) * 1.5 + y.view(-1, 1, 1, 1) * 0.3
        out.append((x, y))
    return out


def reference(model: nn.Module, batches: list, amp: torch.dtype | None) -> dict[str, tuple]:
    """Float64 pooling of every BN layer's input as it reaches the layer (under the same
    autocast), with BN normalizing by batch statistics and its buffers left alone."""
    m = copy.deepcopy(model)
    m.eval()
    inputs: dict[str, list[torch.Tensor]] = {}
    for name, mod in m.named_modules():
        if isinstance(mod, nn.BatchNorm2d):
            mod.train()
            mod.momentum = 0.0
            mod.register_forward_pre_hook(
                lambda mod, a, name=name: inputs.setdefault(name, []).append(a[0].to(F64))
            )
    with torch.no_grad():
        for x, _ in batches:
            if amp is None:
                m(x)
            else:
                with torch.autocast("cpu", dtype=amp):
                    m(x)
    out = {}
    for name, xs in inputs.items():
        allx = torch.cat(xs)
        var, mean = torch.var_mean(allx, dim=(0, 2, 3), correction=0)
        out[name] = (mean, var, xs[0].dtype)
    return out


@pytest.mark.parametrize(("amp", "dtype"), [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_statistics_are_exact_for_what_reaches_bn_under_autocast(amp: str, dtype: torch.dtype):
    model = net()
    batches = data()
    ref = reference(model, batches, dtype)
    assert ref["1"][2] == torch.float64  # the hook upcasts; the layer saw `dtype` tensors
    fixed = copy.deepcopy(model)
    bnscope.precise_bn(fixed, batches, amp=amp)
    for name in ("1", "4"):
        bn = dict(fixed.named_modules())[name]
        mean, var, _ = ref[name]
        assert bn.running_mean.dtype == torch.float32
        torch.testing.assert_close(bn.running_mean.double(), mean, rtol=1e-6, atol=1e-6)
        assert float((bn.running_var.double() / var).log().abs().max()) < 1e-6
    plain = copy.deepcopy(model)
    bnscope.precise_bn(plain, batches)
    gap = (plain[4].running_var - fixed[4].running_var).abs().max()
    assert float(gap) > 1e-6  # autocast really changed what reached the second layer


def test_channels_last_gives_the_same_statistics_and_restores_the_layout():
    model = net()
    batches = data()
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    before = snapshot(b)
    ids = {name: (p, p.data.data_ptr()) for name, p in b.named_parameters()}
    bnscope.precise_bn(a, batches)
    bnscope.precise_bn(b, batches, channels_last=True)
    for name in ("1", "4"):
        ma, mb = dict(a.named_modules())[name], dict(b.named_modules())[name]
        torch.testing.assert_close(ma.running_mean, mb.running_mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ma.running_var, mb.running_var, rtol=1e-5, atol=1e-6)
    for name, p in b.named_parameters():
        assert p is ids[name][0] and p.data.data_ptr() == ids[name][1]
        assert p.is_contiguous()  # not left in channels-last
    buffers = ("running_mean", "running_var", "num_batches_tracked")  # what precise writes
    written = {f"{n}.{s}" for n in "14" for s in buffers}
    after = snapshot(b, skip_buffers=written)
    before = {k: v for k, v in before.items() if k in after}
    assert_same_state(before, after)


def test_channels_last_under_inspect_and_ghost_match_the_default_layout():
    model = net()
    batches = data()
    r1 = bnscope.inspect(copy.deepcopy(model), batches)
    r2 = bnscope.inspect(copy.deepcopy(model), batches, channels_last=True)
    c1, c2 = r1.extra["metrics"], r2.extra["metrics"]
    run1, run2 = c1["variants"]["running"], c2["variants"]["running"]
    assert c1["samples"] == c2["samples"]
    assert run1["accuracy"] == pytest.approx(run2["accuracy"], abs=0.05)
    assert run1["loss"] == pytest.approx(run2["loss"], rel=1e-5)  # another conv algorithm
    pre1, pre2 = c1["variants"]["precise"], c2["variants"]["precise"]
    assert pre1["agreement"] == pytest.approx(pre2["agreement"], abs=0.05)
    g1 = bnscope.ghost_analysis(copy.deepcopy(model), batches, sizes=[2, 4])
    g2 = bnscope.ghost_analysis(copy.deepcopy(model), batches, sizes=[2, 4], channels_last=True)
    for s1, s2 in zip(g1.extra["sizes"], g2.extra["sizes"], strict=True):
        assert s1["accuracy"] == pytest.approx(s2["accuracy"], abs=0.05)


def test_inspect_ghost_adapt_and_evaluate_run_under_autocast():
    model = net()
    batches = data()
    rep = bnscope.inspect(copy.deepcopy(model), batches, amp="bf16")
    assert rep.extra["metrics"]["samples"] == 48
    rep = bnscope.ghost_analysis(copy.deepcopy(model), batches, sizes=[2, 8], amp="bf16")
    assert [s["status"] for s in rep.extra["sizes"]] == ["ok", "ok"]
    m = copy.deepcopy(model)
    rep = bnscope.adapt_bn(m, [x for x, _ in batches], amp="fp16", prior=8)
    assert all(r.status == "updated" for r in rep.layers)
    ev = bnscope.evaluate_models({"a": m, "b": model}, batches, amp="bf16")
    assert ev.metrics["a"].samples == 48


def test_placed_gives_back_every_tensor_on_success_and_on_error():
    model = net()
    params = {n: (p, p.data_ptr(), p.stride()) for n, p in model.named_parameters()}
    buffers = {n: b for n, b in model.named_buffers()}
    run = runner_mod.make_runner(model, channels_last=True)
    for fail in (False, True):
        try:
            with runner_mod.placed(model, run):
                assert model[0].weight.is_contiguous(memory_format=torch.channels_last)
                if fail:
                    raise RuntimeError("boom")
        except RuntimeError:
            assert fail
        for n, p in model.named_parameters():
            assert p is params[n][0] and (p.data_ptr(), p.stride()) == params[n][1:]
        for n, b in model.named_buffers():
            assert b is buffers[n]


def test_bad_amp_and_device_values_are_usage_errors():
    model = net()
    batches = data(2)
    for amp in ("fp32", "int8", torch.float32, "bfloat17"):
        with pytest.raises(UsageError, match="is not bf16 or fp16"):
            bnscope.precise_bn(copy.deepcopy(model), batches, amp=amp)
    with pytest.raises(UsageError, match="is not auto, cpu, cuda or cuda:N"):
        bnscope.precise_bn(copy.deepcopy(model), batches, device="gpu-ish")
    if not torch.cuda.is_available():
        with pytest.raises(UsageError, match="CUDA is not available"):
            bnscope.precise_bn(copy.deepcopy(model), batches, device="cuda:7")
    elif torch.cuda.device_count() < 8:
        with pytest.raises(UsageError, match="CUDA device"):
            bnscope.precise_bn(copy.deepcopy(model), batches, device="cuda:7")


# --------------------------------------------------------------------------------------------
# Forward passes per batch


class Reshuffled:
    """A loader whose order changes on every pass (a DataLoader with shuffle=True and no
    fixed generator): inspect cannot pair its passes."""

    def __init__(self, batches: list) -> None:
        self.batches = batches
        self.passes = 0

    def __iter__(self):
        self.passes += 1
        order = list(range(len(self.batches)))
        g = torch.Generator().manual_seed(self.passes)
        for i in torch.randperm(len(order), generator=g).tolist():
            yield self.batches[i]


class LateSwap:
    """Same first batch on every pass, but from the second pass on batches 2 and 3 trade
    places: pairing starts, then fails on the device-side check."""

    def __init__(self, batches: list) -> None:
        self.batches = batches
        self.passes = 0

    def __iter__(self):
        self.passes += 1
        order = list(range(len(self.batches)))
        if self.passes > 1:
            order[2], order[3] = order[3], order[2]
        for i in order:
            yield self.batches[i]


def direct_batch_agreement(model: nn.Module, batches: list) -> float:
    """Top-1 agreement of batch-statistics outputs with running-statistics outputs."""
    m = copy.deepcopy(model)
    agree = total = 0
    with torch.no_grad():
        for x, _ in batches:
            m.eval()
            ref = m(x).argmax(1)
            for mod in m.modules():
                if isinstance(mod, nn.BatchNorm2d):
                    mod.train()
                    mod.momentum = 0.0
            bat = m(x).argmax(1)
            agree += int((ref == bat).sum())
            total += len(x)
    return agree / total


def test_inspect_runs_3_forwards_per_batch_when_the_order_repeats():
    model = net()
    batches = data(6)
    rep = bnscope.inspect(copy.deepcopy(model), batches)
    assert rep.extra["forwards"] == 18
    c = rep.extra["metrics"]["variants"]
    assert c["batch"]["agreement"] == pytest.approx(direct_batch_agreement(model, batches))


@pytest.mark.parametrize(("loader", "per_batch"), [(Reshuffled, 4), (LateSwap, 5)])
def test_inspect_pairs_only_identical_batches(loader: type, per_batch: int):
    """Another order on the second pass: 4 forwards per batch (found on the first batch), or,
    when the order changes later, a third pass (5 in all) that compares on pairs again."""
    model = net()
    batches = data(6)
    rep = bnscope.inspect(copy.deepcopy(model), loader(batches))
    assert rep.extra["forwards"] == per_batch * 6
    c = rep.extra["metrics"]["variants"]
    assert c["batch"]["agreement"] == pytest.approx(direct_batch_agreement(model, batches))
    same = bnscope.inspect(copy.deepcopy(model), batches).extra["metrics"]["variants"]
    for key in ("running", "batch", "precise"):  # sums in another order: float rounding
        assert c[key] == pytest.approx(same[key], rel=1e-6)
    assert c["batch"]["kl"] == pytest.approx(same["batch"]["kl"], rel=1e-9)


def test_inspect_keeps_outputs_within_its_budget(monkeypatch: pytest.MonkeyPatch):
    """Outputs beyond the budget are not kept: those batches get their own forward."""
    import bnscope.ops.inspect as dynamic

    model = net()
    batches = data(6)
    full = bnscope.inspect(copy.deepcopy(model), batches)
    # logits (8 x 4 float32), fingerprint (8 inputs + 8 labels, float64), 24 index bytes each
    one_batch = 8 * 4 * 4 + 16 * 8 + 2 * 24
    monkeypatch.setattr(dynamic, "PAIR_BUDGET", 2 * one_batch + one_batch // 2)
    rep = bnscope.inspect(copy.deepcopy(model), batches)
    assert rep.extra["forwards"] == 6 + 2 * 6 + 4
    got, want = rep.extra["metrics"]["variants"], full.extra["metrics"]["variants"]
    assert {k: v["agreement"] for k, v in got.items()} == {
        k: v["agreement"] for k, v in want.items()
    }
    for key in ("kl", "rel_diff"):
        assert got["batch"][key] == pytest.approx(want["batch"][key], rel=1e-9)


def test_ghost_runs_k_plus_2_forwards_per_batch():
    rep = bnscope.ghost_analysis(net(), data(5), sizes=[2, 4, 8])
    assert rep.extra["forwards"] == 5 * (3 + 2)
