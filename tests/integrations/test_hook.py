"""PreciseBNHook inside real training loops: the same statistics as precise_bn, an exact sample
bound, the schedule, a training run that goes on exactly as without the hook, SWA/EMA copies
(a real AveragedModel, timm-style ModelEmaV2/V3, timm's own when it imports), autocast, and two
gloo processes with a plain and a DDP-wrapped model."""

from __future__ import annotations

import copy
import random
from collections import namedtuple
from collections.abc import Iterable
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn, update_bn
from torch.utils.data import DataLoader, TensorDataset

import bnscope
from bnscope.engine.wrappers import unwrap
from bnscope.errors import DataError, UsageError
from bnscope.integrations.hook import PreciseBNHook, first_rows, rng_preserved, sample_share
from bnscope.ops.precise import precise_bn
from bnscope.records import Status

from ..ranks import spawn_ranks
from ..statecheck import assert_same_state, snapshot

BN_STATS = ("running_mean", "running_var", "num_batches_tracked")


# --------------------------------------------------------------------------------------------
# Models and data


class Net(nn.Module):
    """Conv-BN-ReLU x2, dropout, linear-BN1d head; ``frozen`` (a BN the loop keeps in eval
    mode) and ``stem`` (a conv with requires_grad=False) when asked."""

    def __init__(self, frozen: bool = False, dropout: float = 0.0) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(6)
        self.conv = nn.Conv2d(6, 8, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.frozen = nn.BatchNorm2d(8) if frozen else None
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear(8, 5)
        self.head = nn.BatchNorm1d(5)
        self.out = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn1(self.stem(x)))
        h = self.bn2(self.conv(h))
        if self.frozen is not None:
            h = self.frozen(h)
        h = self.drop(torch.relu(h).mean((2, 3)))
        return self.out(torch.relu(self.head(self.fc(h))))


def make_net(seed: int = 0, **kwargs: Any) -> Net:
    torch.manual_seed(seed)
    net = Net(**kwargs)
    with torch.no_grad():  # running statistics away from their init
        for _ in range(3):
            net(torch.randn(8, 3, 6, 6) * 2 + 1)
    return net


def dataset(n: int = 96, seed: int = 1) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 6, 6, generator=g) * 1.5 + torch.rand(n, 1, 1, 1, generator=g) * 2
    return TensorDataset(x, torch.randint(0, 3, (n,), generator=g))


def batches(sizes: Iterable[int], seed: int = 2) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i, n in enumerate(sizes):
        x = torch.randn(n, 3, 6, 6, generator=g) * 2 + 0.3 * i  # batches of different means
        out.append((x, torch.randint(0, 3, (n,), generator=g)))
    return out


def bn_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {
        k: v.clone() for k, v in model.state_dict().items() if k.rsplit(".", 1)[-1] in BN_STATS
    }


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert list(a) == list(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def direct_population(module: nn.Module, data: Iterable[Any]) -> dict[str, tuple]:
    """Per BN layer, float64 mean and biased variance of every element of its input over all
    of ``data``, the layers normalizing with batch statistics (a train-mode copy, no dropout):
    the definition, computed from the inputs themselves."""
    model = copy.deepcopy(module).train()
    inputs: dict[str, list[torch.Tensor]] = {}
    handles = []
    for name, mod in model.named_modules():
        if isinstance(mod, nn.modules.batchnorm._BatchNorm):
            def keep(_m: nn.Module, args: tuple, name: str = name) -> None:
                x = args[0].detach().to(torch.float64)
                dims = [d for d in range(x.ndim) if d != 1]
                inputs.setdefault(name, []).append(x.permute(1, *dims).reshape(x.shape[1], -1))

            handles.append(mod.register_forward_pre_hook(keep))
    with torch.no_grad():
        for batch in data:
            model(batch[0] if isinstance(batch, (tuple, list)) else batch)
    for h in handles:
        h.remove()
    out = {}
    for name, parts in inputs.items():
        x = torch.cat(parts, dim=1)
        out[name] = (x.mean(1), x.var(1, unbiased=False))
    return out


@pytest.fixture(autouse=True)
def _one_thread():
    """float32 kernels give the same bits only for the same thread count; one is also much
    faster for these tiny models on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --------------------------------------------------------------------------------------------
# The same statistics as precise_bn; the sample bound


def test_exported_from_the_package() -> None:
    assert bnscope.PreciseBNHook is PreciseBNHook
    assert "PreciseBNHook" in dir(bnscope)


def test_update_is_precise_bn_of_the_current_model() -> None:
    data = batches([8, 8, 6, 8])
    net, ref = make_net(), make_net()
    hook = PreciseBNHook(net, data)
    rep = hook.update()
    want = precise_bn(ref, data)
    assert_same_tensors(bn_state(net), bn_state(ref))
    assert [lay.to_dict() for lay in rep.layers] == [lay.to_dict() for lay in want.layers]
    assert rep.extra == want.extra and hook.last_report is rep
    assert [lay.status for lay in rep.layers] == [Status.UPDATED] * 3


def test_samples_is_exact_and_cuts_the_last_batch() -> None:
    data = batches([8, 8, 8, 8])
    net = make_net()
    rep = PreciseBNHook(net, data, samples=20).update()
    assert (rep.extra["batches"], rep.extra["samples"]) == (3, 20)
    assert rep.extra["label_mix"] is not None and rep.extra["label_mix"]["samples"] == 20
    # the same as precise_bn on the first 20 samples (the last batch cut to 4)
    ref = make_net()
    precise_bn(ref, [data[0], data[1], (data[2][0][:4], data[2][1][:4])])
    assert_same_tensors(bn_state(net), bn_state(ref))
    # and the population statistics of exactly those 20 samples (in those batches: a layer
    # after the first sees inputs normalized with the statistics of its batch)
    direct = direct_population(make_net(), [data[0][0], data[1][0], data[2][0][:4]])
    for name, (mean, var) in direct.items():
        layer = getattr(net, name)
        torch.testing.assert_close(layer.running_mean, mean.float(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(layer.running_var, var.float(), rtol=1e-5, atol=1e-6)


def test_samples_on_whole_batches_cuts_nothing() -> None:
    data = batches([8, 8, 8])
    net, ref = make_net(), make_net()
    rep = PreciseBNHook(net, data, samples=16).update()
    precise_bn(ref, data[:2])
    assert rep.extra["batches"] == 2 and rep.extra["samples"] == 16
    assert_same_tensors(bn_state(net), bn_state(ref))


def test_batches_bound() -> None:
    data = batches([8, 8, 8])
    rep = PreciseBNHook(make_net(), data, batches=2).update()
    assert (rep.extra["batches"], rep.extra["samples"]) == (2, 16)


def test_first_rows_cuts_every_per_sample_tensor() -> None:
    x, y, other = torch.arange(10.0).reshape(5, 2), torch.arange(5), torch.ones(3)
    assert [t.tolist() for t in first_rows((x, y), 2, 5)] == [[[0.0, 1.0], [2.0, 3.0]], [0, 1]]
    assert isinstance(first_rows([x, y], 2, 5), list)
    cut = first_rows({"x": x, "y": y, "lengths": other, "name": "b0", "scale": torch.tensor(2.0)},
                     3, 5)  # fmt: skip
    assert cut["x"].shape == (3, 2) and cut["y"].tolist() == [0, 1, 2]
    assert cut["lengths"] is other and cut["name"] == "b0" and float(cut["scale"]) == 2.0
    pair = namedtuple("pair", "x y")
    got = first_rows(pair(x, y), 1, 5)
    assert isinstance(got, pair) and got.y.tolist() == [0]


def test_samples_with_dict_batches() -> None:
    data = [{"x": x, "y": y} for x, y in batches([6, 6])]
    net, ref = make_net(), make_net()
    rep = PreciseBNHook(net, data, samples=9).update()
    assert rep.extra["samples"] == 9
    precise_bn(ref, [data[0], {"x": data[1]["x"][:3], "y": data[1]["y"][:3]}])
    assert_same_tensors(bn_state(net), bn_state(ref))


def test_samples_more_than_the_data_is_an_error() -> None:
    hook = PreciseBNHook(make_net(), batches([8, 8]), samples=40)
    with pytest.raises(DataError) as info:
        hook.update()
    assert info.value.message == "the data ran out after 16 samples, but samples=40 were asked for"
    assert "lower samples=" in (info.value.fix or "")
    assert hook.history == [] and hook.last_report is None


def test_cut_to_one_sample_names_samples() -> None:
    mlp = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 2))
    data = [torch.randn(4, 4), torch.randn(4, 4)]
    with pytest.raises(DataError) as info:
        PreciseBNHook(mlp, data, samples=5).update()
    assert info.value.message.startswith(
        "samples=5 leaves a last batch of 1 sample (cut from 4), and a BN layer cannot"
    )
    assert "2 or more" in (info.value.fix or "")


@pytest.mark.parametrize(
    ("kwargs", "text"),
    [
        ({"samples": 8, "batches": 2}, "batches= and samples= both given"),
        ({"samples": 0}, "samples must be a positive integer, got 0"),
        ({"every_n_steps": 0}, "every_n_steps must be a positive integer, got 0"),
        ({"every_n_epochs": 1.5}, "every_n_epochs must be a positive integer, got 1.5"),
        ({"batches": 4}, "batches=4, but the data holds 3 batches"),
        ({"amp": "int8"}, "amp='int8' is not bf16 or fp16"),
        ({"device": "tpu"}, "device='tpu' is not auto, cpu, cuda or cuda:N"),
    ],
)
def test_bad_arguments_are_refused_at_construction(kwargs: dict, text: str) -> None:
    with pytest.raises((UsageError, DataError)) as info:
        PreciseBNHook(make_net(), batches([4, 4, 4]), **kwargs)
    assert info.value.message.startswith(text)


def test_sample_share_adds_up() -> None:
    assert [sample_share(37, r, 2) for r in range(2)] == [19, 18]
    assert [sample_share(10, r, 4) for r in range(4)] == [3, 3, 2, 2]
    assert [sample_share(1, r, 3) for r in range(3)] == [1, 0, 0]


# --------------------------------------------------------------------------------------------
# When


def test_every_n_steps() -> None:
    hook = PreciseBNHook(make_net(), batches([4, 4]), every_n_steps=3)
    done = [s for s in range(0, 10) if hook.maybe_update(step=s) is not None]
    assert done == [3, 6, 9]
    assert hook.last_step == 9 and hook.last_epoch is None and hook.updates == 3
    assert hook(step=9) is None  # the model has not changed since
    assert hook(step=12) is not None and hook.last_step == 12  # __call__ is maybe_update


def test_every_n_epochs_and_both() -> None:
    hook = PreciseBNHook(make_net(), batches([4, 4]), every_n_epochs=2)
    assert [e for e in range(1, 6) if hook(epoch=e)] == [2, 4]
    assert hook(epoch=4) is None  # same epoch again
    both = PreciseBNHook(make_net(), batches([4, 4]), every_n_steps=5, every_n_epochs=1)
    assert both(step=3) is None
    assert both(step=4, epoch=1) is not None  # epoch end
    assert both(step=5) is not None and both(step=5, epoch=2) is None  # not twice at step 5
    assert [(u.step, u.epoch) for u in both.history] == [(4, 1), (5, None)]


def test_without_schedule_every_call_updates() -> None:
    hook = PreciseBNHook(make_net(), batches([4, 4]))
    assert hook() is not None and hook() is not None and hook.updates == 2
    assert hook.due(step=7) and hook(step=7) is not None and not hook.due(step=7)


@pytest.mark.parametrize(
    ("call", "text"),
    [
        ({}, "maybe_update() needs step= or epoch= when every_n_steps= or every_n_epochs="),
        ({"step": -1}, "step must be a count of steps done (an integer 0 or more), got -1"),
        ({"epoch": 2.0}, "epoch must be a count of epochs done (an integer 0 or more), got 2.0"),
    ],
)
def test_bad_counters(call: dict, text: str) -> None:
    hook = PreciseBNHook(make_net(), batches([4, 4]), every_n_steps=2)
    with pytest.raises(UsageError) as info:
        hook.maybe_update(**call)
    assert info.value.message.startswith(text)


def test_history_and_summary() -> None:
    net = make_net()
    hook = PreciseBNHook(net, batches([8, 8]), every_n_steps=2)
    assert hook.summary() == {} and hook.last_report is None
    hook(step=2, epoch=0)
    last = hook.history[-1]
    assert (last.step, last.epoch, last.batches, last.samples) == (2, 0, 2, 16)
    assert (last.updated, last.not_called) == (3, 0)
    layers = hook.last_report.layers if hook.last_report else ()
    assert last.d_mu_max == max(lay.d_mu_max for lay in layers) > 0
    assert last.d_var_max == max(lay.d_var_max for lay in layers) > 0
    summary = hook.summary()
    assert set(summary) == {
        "precise_bn/step", "precise_bn/epoch", "precise_bn/batches", "precise_bn/samples",
        "precise_bn/updated", "precise_bn/not_called", "precise_bn/d_mu_max",
        "precise_bn/d_var_max", "precise_bn/seconds",
    }  # fmt: skip
    assert summary["precise_bn/samples"] == 16.0 and summary["precise_bn/step"] == 2.0
    assert set(hook.summary(prefix="bn.")) == {k.replace("precise_bn/", "bn.") for k in summary}
    assert repr(hook) == "PreciseBNHook(Net, every_n_steps=2, updates=1)"


def test_unused_layer_is_reported_and_kept() -> None:
    net = make_net()
    net.unused = nn.BatchNorm2d(3)  # defined, never called by forward
    before = net.unused.running_mean.clone()
    rep = PreciseBNHook(net, batches([4, 4])).update()
    status = {lay.name: lay.status for lay in rep.layers}
    assert status["unused"] == Status.NOT_CALLED
    assert torch.equal(net.unused.running_mean, before)
    assert hook_summary_not_called(net) == 1


def hook_summary_not_called(net: nn.Module) -> float:
    hook = PreciseBNHook(net, batches([4]))
    hook.update()
    return hook.summary()["precise_bn/not_called"]


# --------------------------------------------------------------------------------------------
# The training run goes on as without the hook


def train(hook_kwargs: dict | None, *, steps_per_check: int = 3) -> dict[str, Any]:
    """Two epochs of SGD with momentum over a shuffled loader (dropout on, a BN the loop keeps
    in eval mode, a frozen stem); with ``hook_kwargs`` a PreciseBNHook on the training loader
    runs every 3 steps, right after the optimizer step (the gradients still there), and each
    call is checked to leave the model, its gradients and the optimizer as they were."""
    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)
    net = make_net(frozen=True, dropout=0.3)
    net.stem.weight.requires_grad_(False)
    net.train()
    net.frozen.eval()  # type: ignore[union-attr]
    loader = DataLoader(dataset(), batch_size=16, shuffle=True)
    opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.05,
                          momentum=0.9)  # fmt: skip
    hook = (
        PreciseBNHook(net, loader, every_n_steps=steps_per_check, **hook_kwargs)
        if hook_kwargs is not None
        else None
    )
    step = 0
    reports = []
    for _ in range(2):
        for x, y in loader:
            loss = nn.functional.cross_entropy(net(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
            if hook is not None and hook.due(step=step):
                trained = {f"{n}.{s}" for n in ("bn1", "bn2", "head") for s in BN_STATS}
                before = snapshot(net, skip_buffers=trained)
                grads = {n: (p.grad, p.grad.clone()) for n, p in net.named_parameters()
                         if p.grad is not None}  # fmt: skip
                opt_state = copy.deepcopy(opt.state_dict())
                reports.append(hook(step=step))
                assert_same_state(before, snapshot(net, skip_buffers=trained))
                for n, p in net.named_parameters():
                    if n in grads:
                        assert p.grad is grads[n][0] and torch.equal(p.grad, grads[n][1]), n
                after = opt.state_dict()
                assert after["param_groups"] == opt_state["param_groups"]
                for k, v in opt_state["state"].items():
                    assert torch.equal(after["state"][k]["momentum_buffer"], v["momentum_buffer"])
                assert [p for g in opt.param_groups for p in g["params"]] == [
                    p for p in net.parameters() if p.requires_grad
                ]
    return {
        "params": {n: p.detach().clone() for n, p in net.named_parameters()},
        "reports": reports,
        "hook": hook,
        "net": net,
    }


def test_training_goes_on_exactly_as_without_the_hook() -> None:
    plain = train(None)
    hooked = train({"samples": 40})
    assert len(hooked["reports"]) == 4  # steps 3, 6, 9, 12 of 12
    for rep in hooked["reports"]:
        assert rep.extra["samples"] == 40
        status = {lay.name: lay.status for lay in rep.layers}
        # the BN the loop keeps in eval mode is not touched (the model is training)
        assert status == {"bn1": Status.UPDATED, "bn2": Status.UPDATED,
                          "frozen": Status.SKIPPED, "head": Status.UPDATED}  # fmt: skip
    # parameters bit for bit as without the hook: nothing the training draws changed
    assert_same_tensors(plain["params"], hooked["params"])
    # the BN statistics did change: the last update's are precise statistics, EMA'd since
    assert not torch.equal(plain["net"].bn1.running_mean, hooked["net"].bn1.running_mean)
    assert torch.equal(plain["net"].frozen.running_var, hooked["net"].frozen.running_var)


def test_without_preserve_rng_the_pass_changes_what_training_draws() -> None:
    plain = train(None)
    hooked = train({"samples": 40, "preserve_rng": False})
    assert not torch.equal(plain["params"]["out.weight"], hooked["params"]["out.weight"])


def test_rng_preserved_restores_every_generator_also_on_error() -> None:
    random.seed(1)
    np.random.seed(1)
    torch.manual_seed(1)
    want = (random.random(), float(np.random.rand()), float(torch.rand(())))
    random.seed(1)
    np.random.seed(1)
    torch.manual_seed(1)
    with pytest.raises(RuntimeError), rng_preserved():
        random.random(), np.random.rand(), torch.rand(3)
        raise RuntimeError("boom")
    assert (random.random(), float(np.random.rand()), float(torch.rand(()))) == want


def test_eval_mode_model_updates_every_layer_and_stays_in_eval() -> None:
    net = make_net(frozen=True).eval()
    rep = PreciseBNHook(net, batches([8, 8])).update()
    assert all(lay.status == Status.UPDATED for lay in rep.layers)
    assert not any(m.training for m in net.modules())
    rep = PreciseBNHook(net, batches([8, 8]), only_training=True).update()
    assert all(lay.status == Status.SKIPPED for lay in rep.layers)


def test_error_mid_pass_leaves_the_model_and_history() -> None:
    net = make_net()
    net.train()
    before = snapshot(net)
    data = [batches([8])[0], (torch.full((8, 3, 6, 6), float("nan")), torch.zeros(8))]
    hook = PreciseBNHook(net, data)
    with pytest.raises(DataError, match="NaN or Inf reached BN layer"):
        hook.update(step=1)
    assert_same_state(before, snapshot(net))
    assert hook.history == [] and hook.last_step is None


# --------------------------------------------------------------------------------------------
# Loaders with persistent workers


def persistent_loader() -> DataLoader:
    return DataLoader(dataset(48), batch_size=8, num_workers=1, persistent_workers=True)


def test_bounded_pass_keeps_persistent_workers_for_the_training_loop() -> None:
    loader = persistent_loader()
    precise_bn(make_net(), loader, batches=2)  # stops early: the workers must stay up
    assert sum(1 for _ in loader) == len(loader) == 6
    hook = PreciseBNHook(make_net(), loader, samples=20)
    hook.update()
    hook.update()  # twice in a row: the iterator was left by the hook, not by training
    assert sum(1 for _ in loader) == 6


def test_persistent_loader_in_the_middle_of_an_epoch_is_refused() -> None:
    loader = persistent_loader()
    hook = PreciseBNHook(make_net(), loader, samples=16)
    it = iter(loader)
    next(it)
    with pytest.raises(UsageError) as info:
        hook.update()
    assert info.value.message.startswith(
        "data= is a DataLoader with persistent_workers=True that is in the middle of an epoch "
        "(1 of 6 batches read)"
    )
    assert sum(1 for _ in it) == 5  # the training loop's epoch is intact
    assert hook.update().extra["samples"] == 16  # at the epoch's end it runs (2 batches)
    it = iter(loader)  # the next epoch, as far as the hook's pass went: not the hook's state
    next(it), next(it)
    with pytest.raises(UsageError, match=r"\(2 of 6 batches read\)"):
        hook.update()


# --------------------------------------------------------------------------------------------
# Wrappers: SWA, EMA, DataParallel, torch.compile


class ModelEmaV2(nn.Module):
    """timm's ModelEmaV2 layout: a deep copy as ``.module``, kept in eval mode; every state
    entry (parameters and buffers) averaged with ``decay``."""

    def __init__(self, model: nn.Module, decay: float = 0.9) -> None:
        super().__init__()
        self.module = copy.deepcopy(model)
        self.module.eval()
        self.decay = decay

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for ema_v, model_v in zip(self.module.state_dict().values(),
                                  model.state_dict().values(), strict=True):  # fmt: skip
            if ema_v.is_floating_point():
                ema_v.copy_(self.decay * ema_v + (1.0 - self.decay) * model_v)
            else:
                ema_v.copy_(model_v)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.module(*args, **kwargs)


class ModelEmaV3(ModelEmaV2):
    """timm's ModelEmaV3 layout (a subclass here; timm's is its own nn.Module)."""

    @torch.no_grad()
    def update(self, model: nn.Module, step: int | None = None) -> None:
        ema = [v for v in self.module.state_dict().values() if v.is_floating_point()]
        new = [v for v in model.state_dict().values() if v.is_floating_point()]
        torch._foreach_lerp_(ema, new, 1.0 - self.decay)


def trained_with_averages() -> tuple[Net, AveragedModel, AveragedModel, ModelEmaV2, ModelEmaV3]:
    """A net trained a few SGD steps with an SWA average, an EMA AveragedModel and the two
    timm-style EMA copies updated after every step."""
    net = make_net(seed=3)
    net.train()
    swa = AveragedModel(net)
    ema = AveragedModel(net, multi_avg_fn=get_ema_multi_avg_fn(0.8))
    v2, v3 = ModelEmaV2(net), ModelEmaV3(net)
    opt = torch.optim.SGD(net.parameters(), lr=0.2, momentum=0.9)
    for x, y in batches([8] * 6, seed=5):
        nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
        opt.zero_grad()
        for avg in (swa, ema):
            avg.update_parameters(net)
        v2.update(net)
        v3.update(net)
    return net, swa, ema, v2, v3


def test_unwrap_known_wrappers_only() -> None:
    net = make_net()
    assert unwrap(net) is net
    assert unwrap(AveragedModel(net)).__class__ is Net
    assert unwrap(nn.DataParallel(net)) is net
    assert unwrap(torch.compile(net)) is net  # nothing is compiled until it is called
    assert unwrap(nn.DataParallel(AveragedModel(net))).__class__ is Net
    v3 = ModelEmaV3(net)
    assert unwrap(v3) is v3.module

    class Normalized(nn.Module):  # adds work of its own around .module: run as given
        def __init__(self) -> None:
            super().__init__()
            self.module = net

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.module((x - 1.0) / 2.0)

    wrapped = Normalized()
    assert unwrap(wrapped) is wrapped

    class EmaWithHead(nn.Module):  # an EMA-named class with a parameter of its own
        def __init__(self) -> None:
            super().__init__()
            self.module = net
            self.scale = nn.Parameter(torch.ones(1))

    assert isinstance(unwrap(EmaWithHead()), EmaWithHead)


@pytest.mark.parametrize("which", ["swa", "ema"])
def test_precise_bn_of_an_averaged_model(which: str) -> None:
    """Exact statistics of the averaged weights: what swa_utils.update_bn is meant to give."""
    _, swa, ema, _, _ = trained_with_averages()
    avg = swa if which == "swa" else ema
    data = batches([8, 8, 8, 8], seed=9)
    count = avg.n_averaged.clone()
    params = {n: p.detach().clone() for n, p in avg.module.named_parameters()}
    ref = copy.deepcopy(avg)

    rep = precise_bn(avg, data)
    assert [lay.name for lay in rep.layers] == ["bn1", "bn2", "head"]  # the network's names
    assert torch.equal(avg.n_averaged, count)
    assert_same_tensors(params, {n: p.detach() for n, p in avg.module.named_parameters()})
    direct = direct_population(ref.module, data)
    for name, (mean, var) in direct.items():
        layer = getattr(avg.module, name)
        torch.testing.assert_close(layer.running_mean, mean.float(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(layer.running_var, var.float(), rtol=1e-5, atol=1e-6)

    # update_bn: the same means (equal batch sizes), but the variance is the average of the
    # batches' unbiased variances, without the spread of the batch means between batches:
    # var_pop = mean_B(biased var_B) + mean_B((mu_B - mu)^2) (docs/statistics.md, section 3)
    update_bn([b[0] for b in data], ref)
    with torch.no_grad():
        means = torch.stack([ref.module.stem(b[0]).double().mean((0, 2, 3)) for b in data])
    spread = ((means - means.mean(0)) ** 2).mean(0)
    assert float(spread.max()) > 0.01  # batches of different means
    n = 8 * 6 * 6  # elements per channel in one batch
    ours, theirs = avg.module.bn1, ref.module.bn1
    torch.testing.assert_close(theirs.running_mean, ours.running_mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(
        ours.running_var.double(), theirs.running_var.double() * (n - 1) / n + spread,
        rtol=1e-5, atol=1e-6,
    )  # fmt: skip


@pytest.mark.parametrize("kind", ["swa", "ema", "v2", "v3"])
def test_hook_on_averaged_and_ema_copies(kind: str) -> None:
    net, swa, ema, v2, v3 = trained_with_averages()
    avg = {"swa": swa, "ema": ema, "v2": v2, "v3": v3}[kind]
    inner = unwrap(avg)
    assert inner is avg.module
    modes = {n: m.training for n, m in avg.named_modules()}
    wrapper_state = {k: v.clone() for k, v in avg.state_dict().items()
                     if not k.startswith("module.")}  # fmt: skip
    data = DataLoader(dataset(40), batch_size=8)
    hook = PreciseBNHook(avg, data, every_n_epochs=1, samples=30)
    rep = hook(epoch=1)
    assert rep is not None and rep.extra["samples"] == 30
    # timm's copies are kept in eval mode: every BN layer of them is recomputed anyway
    assert [(lay.name, lay.status) for lay in rep.layers] == [
        ("bn1", Status.UPDATED), ("bn2", Status.UPDATED), ("head", Status.UPDATED)
    ]  # fmt: skip
    assert {n: m.training for n, m in avg.named_modules()} == modes
    assert_same_tensors(wrapper_state, {k: v for k, v in avg.state_dict().items()
                                        if not k.startswith("module.")})  # fmt: skip
    x = dataset(40).tensors[0]
    direct = direct_population(inner, [x[:8], x[8:16], x[16:24], x[24:30]])
    for name, (mean, var) in direct.items():
        torch.testing.assert_close(getattr(inner, name).running_var, var.float(), rtol=1e-5,
                                   atol=1e-6)  # fmt: skip
        torch.testing.assert_close(getattr(inner, name).running_mean, mean.float(), rtol=1e-5,
                                   atol=1e-6)  # fmt: skip
    # the raw network was not touched
    assert not torch.equal(net.bn1.running_mean, inner.bn1.running_mean)


def test_real_timm_model_ema_v3() -> None:
    from ..reallibs import real_libraries

    libs = real_libraries()
    if libs is None:
        pytest.skip("timm/torchvision not importable here (the package needs neither)")
    from timm.utils.model_ema import ModelEmaV3 as TimmEmaV3

    net = make_net(seed=4)
    ema = TimmEmaV3(net, decay=0.5)
    ema.update(make_net(seed=5), step=1)
    hook = PreciseBNHook(ema, DataLoader(dataset(32), batch_size=8))
    rep = hook.update()
    assert [lay.name for lay in rep.layers] == ["bn1", "bn2", "head"]
    direct = direct_population(ema.module, dataset(32).tensors[0].split(8))
    torch.testing.assert_close(ema.module.bn2.running_var, direct["bn2"][1].float(),
                               rtol=1e-5, atol=1e-6)  # fmt: skip


# --------------------------------------------------------------------------------------------
# Autocast


def test_bf16_autocast_on_cpu() -> None:
    data = batches([8, 8, 8])
    net, ref, full = make_net(), make_net(), make_net()
    rep = PreciseBNHook(net, data, amp="bf16").update()
    precise_bn(ref, data, amp=torch.bfloat16)
    precise_bn(full, data)
    assert not torch.is_autocast_enabled("cpu")
    assert_same_tensors(bn_state(net), bn_state(ref))
    # the statistics of what reached the BN layers under autocast: bf16 convolutions, close
    # to float32's and not equal to them
    assert not torch.equal(net.bn2.running_var, full.bn2.running_var)
    torch.testing.assert_close(net.bn2.running_var, full.bn2.running_var, rtol=3e-2, atol=3e-2)
    assert rep.extra["samples"] == 24


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_model_fp16_and_cuda_rng_kept() -> None:
    data = DataLoader(dataset(48), batch_size=8, shuffle=True)
    net, ref = make_net().cuda(), make_net().cuda()
    torch.manual_seed(0)
    cuda_rng = torch.cuda.get_rng_state()
    rep = PreciseBNHook(net, data, samples=20, amp="fp16").update()
    assert torch.equal(torch.cuda.get_rng_state(), cuda_rng)
    torch.manual_seed(0)
    ref_rep = PreciseBNHook(ref, data, samples=20, amp="fp16").update()
    assert rep.extra["samples"] == ref_rep.extra["samples"] == 20
    assert net.bn1.running_mean.device.type == "cuda"
    for k, v in bn_state(ref).items():  # the same samples (shuffle seeded alike), same figures
        torch.testing.assert_close(bn_state(net)[k], v, msg=k)


# --------------------------------------------------------------------------------------------
# Two gloo processes: a plain model and a DDP-wrapped one

WORLD = 2
DEADLINE_S = 120
#: each rank's batches (sizes); samples=37 gives rank 0 its first 19, rank 1 its first 18
SHARD_SIZES = {0: [8, 8, 8], 1: [5, 9, 7]}
SAMPLES = 37


def shard(rank: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return batches(SHARD_SIZES[rank], seed=20 + rank)


def first(data: list, samples: int) -> list:
    out, left = [], samples
    for x, y in data:
        if left <= 0:
            break
        out.append((x[:left], y[:left]))
        left -= min(left, x.shape[0])
    return out


def _cases(rank: int) -> dict[str, Any]:
    res: dict[str, Any] = {}
    mine = shard(rank)

    net = make_net(seed=7)
    net.train()
    hook = PreciseBNHook(net, mine, samples=SAMPLES)
    rep = hook.update(step=1)
    res["plain"] = {"buffers": bn_state(net), "extra": rep.extra, "history": hook.history}

    torch.manual_seed(0)
    ddp_net = make_net(seed=7)
    ddp = nn.parallel.DistributedDataParallel(ddp_net)
    res["unwrapped"] = unwrap(ddp) is ddp_net
    params_before = {n: p.detach().clone() for n, p in ddp_net.named_parameters()}
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    hook = PreciseBNHook(ddp, mine, samples=SAMPLES, every_n_steps=1)
    rep = hook(step=1)
    assert rep is not None
    res["ddp"] = {"buffers": bn_state(ddp_net), "extra": rep.extra}
    res["ddp_params_kept"] = all(
        torch.equal(p, params_before[n]) for n, p in ddp_net.named_parameters()
    )
    # DDP keeps training: one step, gradients averaged over the ranks
    x, y = mine[0]
    nn.functional.cross_entropy(ddp(x), y).backward()
    opt.step()
    res["ddp_after_step"] = {n: p.detach().clone() for n, p in ddp_net.named_parameters()}
    res["ddp_training"] = ddp.training and ddp_net.training

    # batches= is per rank
    net = make_net(seed=7)
    rep = PreciseBNHook(net, mine, batches=2).update()
    res["batches"] = {"buffers": bn_state(net), "extra": rep.extra}
    return res


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    return spawn_ranks(_cases, tmp_path_factory.mktemp("hook_dist"), WORLD, timeout_s=60,
                       deadline_s=DEADLINE_S)  # fmt: skip


@pytest.mark.timing
@pytest.mark.parametrize("case", ["plain", "ddp"])
def test_two_ranks_end_with_the_statistics_of_the_union(ranks, case: str) -> None:
    r0, r1 = ranks[0][case], ranks[1][case]
    assert_same_tensors(r0["buffers"], r1["buffers"])  # every rank, bit for bit
    assert r0["extra"] == r1["extra"]
    assert (r0["extra"]["samples"], r0["extra"]["world_size"]) == (SAMPLES, 2)
    assert r0["extra"]["batches"] == 6  # 8, 8, 3 on rank 0 and 5, 9, 4 on rank 1
    # one process on the union of what the ranks read (their first 19 and 18 samples)
    ref = make_net(seed=7)
    ref.train()
    precise_bn(ref, first(shard(0), 19) + first(shard(1), 18))
    for k, v in bn_state(ref).items():
        if k.endswith("num_batches_tracked"):
            assert torch.equal(r0["buffers"][k], v), k
        else:
            torch.testing.assert_close(r0["buffers"][k], v, rtol=1e-6, atol=1e-7, msg=k)


@pytest.mark.timing
def test_ddp_model_unwrapped_and_keeps_training(ranks) -> None:
    assert ranks[0]["unwrapped"] and ranks[1]["unwrapped"]
    assert ranks[0]["ddp_params_kept"] and ranks[1]["ddp_params_kept"]
    assert ranks[0]["ddp_training"] and ranks[1]["ddp_training"]
    assert_same_tensors(ranks[0]["ddp_after_step"], ranks[1]["ddp_after_step"])
    start = {n: p for n, p in make_net(seed=7).named_parameters()}
    assert not torch.equal(ranks[0]["ddp_after_step"]["out.weight"], start["out.weight"])
    history = ranks[0]["plain"]["history"]
    assert [(u.step, u.samples, u.batches) for u in history] == [(1, SAMPLES, 6)]


@pytest.mark.timing
def test_batches_per_rank(ranks) -> None:
    r0, r1 = ranks[0]["batches"], ranks[1]["batches"]
    assert_same_tensors(r0["buffers"], r1["buffers"])
    assert (r0["extra"]["batches"], r0["extra"]["samples"]) == (4, 30)  # 8 + 8 and 5 + 9
