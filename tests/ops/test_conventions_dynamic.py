"""The conversion and convention checks of a live model (docs/statistics.md, section 11):
planted checkpoints (running_var holding a std, an inverse variance, an inverse std, Caffe's
scale factor; momentum 0.9; a model trained with eps 1e-3 loaded into eps 1e-5) found by
``inspect`` with the right code, conversion and figures, and their healthy counterparts
(a model trained normally, a stale-but-correct one, momentum 0.01 or None, the right eps) not
flagged by any of the three codes."""

from __future__ import annotations

import math
from collections.abc import Iterator

import pytest
import torch
from torch import nn

from bnscope.engine.evaluate import using_eps
from bnscope.nn_frozen import freeze_bn
from bnscope.ops.adapt import adapt_bn
from bnscope.ops.conventions import theil_sen
from bnscope.ops.inspect import inspect
from bnscope.ops.precise import precise_bn
from bnscope.ops.static import static_inspect

from ..models import make_tiny
from ..schemacheck import check_document

CONVENTION_CODES = {"momentum-convention", "var-convention", "eps-mismatch"}


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """Small models train and run faster on one thread (and a shared machine stays usable)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def image_data(batches: int = 16, size: int = 32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(batches):
        y = torch.randint(0, 3, (size,), generator=g)
        x = torch.randn(size, 3, 8, 8, generator=g) * 2 + 1 + y.view(-1, 1, 1, 1) * 0.3
        out.append((x, y))
    return out


def wide(momentum: float | None = 0.1, seed: int = 0) -> nn.Module:
    """make_tiny with 16 channels whose convolutions scale their output channels by
    e^-1.5 .. e^1.5: the BN layers' input variances span a factor e^6, as real networks' do."""
    torch.manual_seed(seed)
    model = make_tiny(width=16, momentum=momentum)
    scales = torch.exp(torch.linspace(-1.5, 1.5, 16))
    with torch.no_grad():
        for conv in (model[0], model[3]):
            conv.weight.mul_(scales[torch.randperm(16)].view(-1, 1, 1, 1))
    return model


def run_ema(model: nn.Module, data, epochs: int = 2) -> nn.Module:
    """Train-mode forwards of a fixed model: running statistics that are the EMA of this model."""
    model.train()
    with torch.no_grad():
        for _ in range(epochs):
            for x, _ in data:
                model(x)
    model.eval()
    return model


def sgd(model: nn.Module, data, epochs: int = 2, lr: float = 0.05) -> nn.Module:
    """Trained for real: SGD steps, each updating the EMA with its momentum."""
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    model.train()
    for _ in range(epochs):
        for x, y in data:
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    return model


def bns(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def codes(report) -> dict[str, set]:
    out: dict[str, set] = {}
    for f in report.findings:
        out.setdefault(f.code, set()).add(f.layer)
    return out


def layers(report) -> dict:
    return {layer.name: layer for layer in report.layers}


# --------------------------------------------------------------------------------------------
# var-convention


CONVERSIONS = {
    "std": lambda bn: bn.running_var.sqrt_(),
    "inverse-var": lambda bn: bn.running_var.reciprocal_(),
    "inverse-std": lambda bn: bn.running_var.add_(bn.eps).rsqrt_(),  # Caffe2's inv_std
    "scale": lambda bn: (bn.running_mean.mul_(999.98), bn.running_var.mul_(999.98)),
}


def copy_of(model: nn.Module) -> nn.Module:
    """A fresh ``wide()`` in eval mode with ``model``'s state: a checkpoint to plant into."""
    planted = wide()
    planted.load_state_dict(model.state_dict())
    return planted.eval()


@pytest.fixture(scope="module")
def healthy():
    data = image_data()
    return run_ema(wide(), data), data


def test_healthy_model_is_fitted_and_not_flagged(healthy):
    model, data = healthy
    rep = inspect(model, data)
    assert not CONVENTION_CODES & set(codes(rep)), [f.message for f in rep.findings]
    for name in ("1", "4"):
        layer = layers(rep)[name]
        assert layer.var_convention is None and layer.var_scale is None
        assert layer.var_slope == pytest.approx(1.0, abs=0.05)  # running_var holds variances
    assert not rep.extra["verdict_text"].startswith("Converted")
    check_document(rep.to_dict())


@pytest.mark.parametrize("conversion", list(CONVERSIONS))
def test_converted_running_var_is_an_error_naming_the_conversion(healthy, conversion):
    model, data = healthy
    planted = copy_of(model)
    with torch.no_grad():
        for bn in bns(planted):
            CONVERSIONS[conversion](bn)
    rep = inspect(planted, data)
    found = [f for f in rep.findings if f.code == "var-convention"]
    assert {f.layer for f in found} == {"1", "4"} and {f.severity for f in found} == {"error"}
    assert len({f.message for f in found}) == 1  # one message: one row naming both layers
    for name in ("1", "4"):
        layer = layers(rep)[name]
        assert layer.var_convention == conversion
        expected = {"std": 0.5, "inverse-var": -1.0, "inverse-std": -0.5, "scale": 1.0}
        assert layer.var_slope == pytest.approx(expected[conversion], abs=0.1)
    assert "stale-ema" not in codes(rep)  # the conversion explains the gap
    for name in ("1", "4"):  # what conversion_figure draws: the points the fit used
        arrays, layer = rep.arrays[name], layers(rep)[name]
        assert len(arrays["var_x"]) == len(arrays["var_y"]) == 16
        assert theil_sen(arrays["var_x"], arrays["var_y"]) == pytest.approx(
            (layer.var_slope, arrays["var_intercept"]), rel=1e-12)  # fmt: skip
    message, fix = found[0].message, found[0].fix
    assert "in 2 of the 2 BN layers the fit could judge" in message
    assert "bnscope precise" in fix
    if conversion == "scale":
        assert layers(rep)["1"].var_scale == pytest.approx(999.98, rel=0.05)
        assert "running_mean /= " in fix and "Caffe's scale_factor" in message
    else:
        undo = {"std": "running_var ** 2", "inverse-var": "1 / running_var",
                "inverse-std": "running_var ** -2"}  # fmt: skip
        assert undo[conversion] in fix
    text = rep.extra["verdict_text"]
    assert text.startswith("Converted checkpoint: ")
    assert rep.extra["verdict"] == "stale"  # stale by the figures, explained by the conversion
    assert "Stale running statistics" not in text
    assert "Run bnscope precise, or undo the conversion" in text
    check_document(rep.to_dict())


def test_a_stale_layer_beside_a_converted_one_is_still_named_stale(healthy):
    model, data = healthy
    planted = copy_of(model)
    first, second = bns(planted)
    with torch.no_grad():
        CONVERSIONS["std"](first)
        second.running_mean.add_(3 * second.running_var.sqrt())  # an EMA far from the data
    rep = inspect(planted, data)
    assert layers(rep)["1"].var_convention == "std"
    assert layers(rep)["4"].var_convention is None and layers(rep)["4"].status == "stale"
    text = rep.extra["verdict_text"]
    assert text.startswith("Converted checkpoint: ") and "Stale running statistics: 1 of 2" in text
    assert rep.extra["verdict"] == "stale"


def test_converted_frozen_layers_are_stale_and_the_fix_names_include_frozen(healthy):
    """Frozen layers have status frozen, not stale, and bnscope precise keeps their statistics
    by default: the verdict must still be stale, and the fix must say --include-frozen (which
    does clear the conversion)."""
    model, data = healthy
    planted = copy_of(model)
    with torch.no_grad():
        for bn in bns(planted):
            CONVERSIONS["std"](bn)
    frozen = freeze_bn(planted)
    rep = inspect(frozen, data)
    assert {layer.status for layer in rep.layers} == {"frozen"}
    found = [f for f in rep.findings if f.code == "var-convention"]
    assert {f.layer for f in found} == {"1", "4"}
    assert all("bnscope precise CKPT --data TRAIN_DATA --include-frozen" in f.fix for f in found)
    assert all("would change accuracy" not in f.fix for f in found)  # precise's eval skips them
    assert rep.extra["verdict"] == "stale"
    text = rep.extra["verdict_text"]
    assert text.startswith("Converted checkpoint: ")
    assert "Run bnscope precise --include-frozen, or undo the conversion" in text
    assert "within EMA noise" not in text
    check_document(rep.to_dict())
    precise_bn(frozen, data, include_frozen=True)  # what the fix says
    again = inspect(frozen, data)
    assert "var-convention" not in codes(again) and again.extra["verdict"] == "healthy"


def test_a_converted_layer_beside_a_frozen_healthy_one_keeps_the_precise_fix(healthy):
    model, data = healthy
    planted = copy_of(model)
    first, _ = bns(planted)
    with torch.no_grad():
        CONVERSIONS["std"](first)
    mixed = freeze_bn(planted, only=["4"])
    rep = inspect(mixed, data)
    found = [f for f in rep.findings if f.code == "var-convention"]
    assert [f.layer for f in found] == ["1"]
    assert "--include-frozen" not in found[0].fix and "bnscope precise" in found[0].fix
    assert "Run bnscope precise, or undo the conversion" in rep.extra["verdict_text"]


def test_undoing_the_conversion_as_the_fix_says_clears_it(healthy):
    model, data = healthy
    planted = copy_of(model)
    with torch.no_grad():
        for bn in bns(planted):
            bn.running_var.sqrt_()
        for bn in bns(planted):  # running_var = running_var ** 2
            bn.running_var.pow_(2)
    assert "var-convention" not in codes(inspect(planted, data))


def test_stale_but_correct_statistics_are_stale_not_converted(healthy):
    """The layer input scaled after the EMA (means off by c, variances by c^2): stale-ema."""
    model, data = healthy
    stale = wide()
    stale.load_state_dict(model.state_dict())
    stale.eval()
    with torch.no_grad():
        stale[0].weight.mul_(2.5)
    rep = inspect(stale, data)
    assert "1" in codes(rep)["stale-ema"]
    assert not CONVENTION_CODES & set(codes(rep))
    assert layers(rep)["1"].var_slope == pytest.approx(1.0, abs=0.1)


def test_narrow_layers_are_not_judged():
    """Too few channels (make_tiny as it is: 4 < MIN_CHANNELS): no fit, no finding, even with
    a std in running_var."""
    data = image_data(6)
    torch.manual_seed(0)
    model = run_ema(make_tiny(), data)
    with torch.no_grad():
        for bn in bns(model):
            bn.running_var.sqrt_()
    rep = inspect(model, data)
    assert all(layer.var_slope is None for layer in rep.layers)
    assert "var-convention" not in codes(rep)


# --------------------------------------------------------------------------------------------
# momentum-convention


@pytest.fixture(scope="module")
def tf_momentum_model():
    """Trained with PyTorch momentum 0.9 (a TF momentum copied as is)."""
    data = image_data(24)
    return sgd(wide(momentum=0.9), data), data


def test_momentum_09_is_flagged_and_measured_as_noisy_as_one_batch(tf_momentum_model):
    model, data = tf_momentum_model
    rep = inspect(model, data)
    found = [f for f in rep.findings if f.code == "momentum-convention"]
    assert {f.layer for f in found} == {"1", "4"}
    assert {f.severity for f in found} == {"warning"}
    f = found[0]
    assert "momentum 0.9 keeps only 10% of the EMA's past" in f.message
    assert "PyTorch's 0.1" in f.message and "m/(2-m) = 0.82" in f.message
    assert "as far from the population as one batch's" in f.message
    assert f.fix.startswith("set momentum=0.1 on this layer")
    for name in ("1", "4"):
        layer = layers(rep)[name]
        # the running means are at least half as far from the population as one batch's
        # (an EMA with m = 0.1 of an unchanging model: 0.23, see below)
        assert layer.d_mu_rms / layer.batch_spread_mu_rms > 0.5, layer
    # a noisy status is explained by the momentum: no small-nbs finding besides it
    assert not codes(rep).get("small-nbs", set()) & {"1", "4"}
    check_document(rep.to_dict())


@pytest.mark.parametrize(("momentum", "low", "high"), [(0.9, 0.5, 1.6), (0.1, 0.0, 0.5)])
def test_ema_of_a_fixed_model_is_as_far_as_sqrt_m_over_2_minus_m_batches(momentum, low, high):
    """The EMA of an unchanging model differs from the population by noise only (section 5.2):
    sqrt(m / (2 - m)) of a single batch's distance, 0.90 for m = 0.9 and 0.23 for m = 0.1 (RMS
    over 16 channels: a spread of about 20% around that)."""
    data = image_data(24)
    rep = inspect(run_ema(wide(momentum=momentum), data, epochs=3), data)
    expected = math.sqrt(momentum / (2 - momentum))
    assert low < expected < high
    for name in ("1", "4"):
        layer = layers(rep)[name]
        assert low < layer.d_mu_rms / layer.batch_spread_mu_rms < high, layer
    assert ("momentum-convention" in codes(rep)) == (momentum == 0.9)


@pytest.mark.parametrize("momentum", [0.1, 0.01, None])
def test_pytorch_momenta_are_not_flagged(momentum):
    data = image_data(24)
    model = sgd(wide(momentum=momentum), data)
    rep = inspect(model, data)
    assert not CONVENTION_CODES & set(codes(rep)), [f.message for f in rep.findings]


def test_momentum_in_static_precise_and_adapt(tf_momentum_model):
    model, data = tf_momentum_model
    static = static_inspect(model)
    found = [f for f in static.findings if f.code == "momentum-convention"]
    assert {f.layer for f in found} == {"1", "4"}
    assert not any("measured" in f.message for f in found)  # no data: nothing measured
    # without model code PyTorch's 0.1 is assumed: nothing to say; a given momentum is checked
    assert "momentum-convention" not in codes(static_inspect(model.state_dict()))
    assert "momentum-convention" in codes(static_inspect(model.state_dict(), momentum=0.99))
    for operation in (precise_bn, adapt_bn):
        twin = wide(momentum=0.9)
        twin.load_state_dict(model.state_dict())
        rep = operation(twin, data[:4])
        found = [f for f in rep.findings if f.code == "momentum-convention"]
        assert {f.layer for f in found} == {"1", "4"}
        assert twin[1].momentum == 0.9  # read after the collection restored it
        assert "set momentum=0.1" in found[0].fix
    healthy_model = wide(momentum=0.1)
    assert "momentum-convention" not in codes(precise_bn(healthy_model, data[:4]))


# --------------------------------------------------------------------------------------------
# eps-mismatch


def tabular(n: int = 2048, seed: int = 0, small: float = 0.01):
    """Eight features, four of them with a standard deviation of ``small``, all equally
    informative once standardized: the class is the argmax of a random projection of the
    standardized features."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, 8, generator=g)
    y = (z @ torch.randn(8, 3, generator=g)).argmax(1)
    scale = torch.tensor([1.0] * 4 + [small] * 4)
    x = (z + torch.randn(8, generator=g)) * scale
    return list(zip(x.split(64), y.split(64), strict=True))


def mlp(eps: float) -> nn.Module:
    return nn.Sequential(
        nn.BatchNorm1d(8, eps=eps), nn.Linear(8, 16), nn.ReLU(), nn.BatchNorm1d(16, eps=eps),
        nn.Linear(16, 3),
    )  # fmt: skip


def trained_mlp(eps: float, data) -> nn.Module:
    torch.manual_seed(0)
    model = mlp(eps)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    model.train()
    for _ in range(8):
        for x, y in data:
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    return model


@pytest.fixture(scope="module")
def keras_trained():
    """A model trained with eps 1e-3 (TF/Keras) on data whose small features have variances of
    1e-4, and the data."""
    data = tabular()
    return trained_mlp(1e-3, data), data


def loaded_into(model: nn.Module, eps: float) -> nn.Module:
    other = mlp(eps)
    other.load_state_dict(model.state_dict())
    return other.eval()


def test_keras_eps_loaded_into_pytorch_eps_is_a_warning(keras_trained):
    model, data = keras_trained
    ported = loaded_into(model, 1e-5)
    rep = inspect(ported, data)
    found = [f for f in rep.findings if f.code == "eps-mismatch"]
    assert len(found) == 1 and found[0].severity == "warning" and found[0].layer is None
    check = rep.extra["eps_check"]
    assert check["eps"] == 1e-5 and check["other_eps"] == 1e-3 and check["evaluated"]
    assert check["layers"] >= 1 and check["channels"] >= 4
    assert check["max_gain_ratio"] == pytest.approx(math.sqrt(1.1e-3 / 1.1e-4), rel=0.2)
    running = rep.extra["metrics"]["variants"]["running"]
    assert check["variant"]["accuracy"] > running["accuracy"] + 0.05
    assert check["variant"]["loss"] < running["loss"]
    assert "with eps 0.001 instead" in found[0].message
    assert found[0].fix.startswith("set eps=0.001 on the BN layers")
    assert all(bn.eps == 1e-5 for bn in bns(ported))  # the model's own eps is back
    # 3 forwards per batch (collection, running, precise) and one more with the other eps
    assert rep.extra["forwards"] == 4 * len(data)
    check_document(rep.to_dict())
    # without labels: the change is material, so an info finding says eps must match
    rep = inspect(ported, [x for x, _ in data])
    found = [f for f in rep.findings if f.code == "eps-mismatch"]
    assert len(found) == 1 and found[0].severity == "info"
    assert "eps matters for this model" in found[0].message


def test_right_eps_is_not_flagged(keras_trained):
    """The same checkpoint with the eps it was trained with: the labels say it fits."""
    model, data = keras_trained
    rep = inspect(loaded_into(model, 1e-3), data)
    assert rep.extra["eps_check"]["evaluated"]  # eps matters here, and the check ran ...
    assert "eps-mismatch" not in codes(rep)  # ... and found the model's eps the better one


def test_trained_with_pytorch_eps_is_not_flagged():
    data = tabular()
    rep = inspect(trained_mlp(1e-5, data), data)
    assert rep.extra["eps_check"]["evaluated"]
    assert not CONVENTION_CODES & set(codes(rep)), [f.message for f in rep.findings]


def test_negligible_eps_runs_no_extra_forward():
    data = tabular(small=1.0)  # every variance about 1: eps is negligible
    rep = inspect(trained_mlp(1e-3, data), data)
    check = rep.extra["eps_check"]
    assert check["evaluated"] is False and check["variant"] is None and check["layers"] == 0
    assert check["max_gain_ratio"] < 1.01
    assert rep.extra["forwards"] == 3 * len(data)
    assert not CONVENTION_CODES & set(codes(rep))


def test_using_eps_restores_on_failure():
    model = mlp(1e-5)
    with pytest.raises(RuntimeError, match="boom"), using_eps({model[0]: 1e-3, model[3]: 1e-3}):
        assert model[0].eps == 1e-3 and model[3].eps == 1e-3
        raise RuntimeError("boom")
    assert model[0].eps == 1e-5 and model[3].eps == 1e-5
