"""Static findings on planted faults, checked against closed-form values."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from bnscope.ops.static import find_bn_buffers, static_inspect
from bnscope.records import FINDING_CODES, Finding

from ..schemacheck import check_document


def model(n: int = 3) -> nn.Module:
    return nn.Sequential(*[m for _ in range(n) for m in (nn.Linear(4, 4), nn.BatchNorm1d(4))])


def updated(m: nn.Module, count: int = 100) -> nn.Module:
    for mod in m.modules():
        if isinstance(mod, nn.BatchNorm1d):
            mod.running_mean.fill_(0.5)
            mod.running_var.fill_(2.0)
            mod.num_batches_tracked.fill_(count)
    return m


def codes(report) -> list[tuple[str, str | None]]:
    return [(f.code, f.layer) for f in report.findings]


def test_healthy_model_has_no_findings():
    rep = static_inspect(updated(model()).state_dict())
    assert rep.findings == ()
    assert [r.name for r in rep.layers] == ["1", "3", "5"]
    assert rep.extra["momentum_assumed"] is True


def test_no_batchnorm():
    rep = static_inspect(nn.Linear(3, 3).state_dict())
    assert codes(rep) == [("no-batchnorm", None)]
    assert rep.layers == ()


def test_never_updated_only_for_the_untouched_layer():
    m = updated(model())
    m[3].reset_running_stats()
    rep = static_inspect(m.state_dict())
    assert codes(rep) == [("never-updated", "3")]
    assert rep.findings[0].severity == "error"


def test_ema_warmup_weight_is_closed_form():
    m = updated(model(), count=100)
    m[1].num_batches_tracked.fill_(7)
    rep = static_inspect(m.state_dict())
    assert codes(rep) == [("ema-warmup", "1")]
    assert rep.layers[0].ema_init_weight == pytest.approx(0.9**7)
    assert rep.layers[1].ema_init_weight == pytest.approx(0.9**100)
    # with the real momentum of a module
    m[1].momentum = 0.4
    rep = static_inspect(m)
    assert rep.layers[0].ema_init_weight == pytest.approx(0.6**7)
    assert rep.layers[0].momentum_assumed is False
    assert codes(rep) == [("ema-warmup", "1")]


def test_warmup_threshold_edge():
    # (0.9)^43 = 0.0108 >= 0.01 ; (0.9)^44 = 0.0097 < 0.01
    m = updated(model(1), count=43)
    assert codes(static_inspect(m.state_dict())) == [("ema-warmup", "1")]
    m = updated(model(1), count=44)
    assert codes(static_inspect(m.state_dict())) == []


def test_momentum_none_cumulative_average():
    m = updated(model(1), count=3)
    m[1].momentum = None
    rep = static_inspect(m)
    assert rep.layers[0].ema_init_weight == 0.0
    assert rep.findings == ()


def test_tiny_variance_and_gain():
    m = updated(model(1))
    m[1].running_var[2] = 0.0
    m[1].weight.data[2] = 3.0
    rep = static_inspect(m.state_dict())
    assert codes(rep) == [("tiny-variance", "1")]
    layer = rep.layers[0]
    assert layer.tiny_var_channels == 1
    assert layer.gain_max == pytest.approx(3.0 / math.sqrt(1e-5))
    assert layer.var_min == 0.0


def test_dead_channel_is_not_tiny_variance():
    m = updated(model(1))
    m[1].weight.data[:2] = 0.0
    m[1].running_var[:2] = 0.0
    rep = static_inspect(m.state_dict())
    assert codes(rep) == [("dead-channel", "1")]
    assert rep.layers[0].dead_channels == 2
    assert rep.findings[0].severity == "info"


@pytest.mark.parametrize("what", ["running_mean", "running_var", "weight", "bias", "negative_var"])
def test_non_finite(what):
    m = updated(model(1))
    bn = m[1]
    if what == "negative_var":
        bn.running_var[0] = -1.0
    else:
        getattr(bn, what).data[0] = float("nan")
    rep = static_inspect(m.state_dict())
    assert ("non-finite", "1") in codes(rep)
    f = next(f for f in rep.findings if f.code == "non-finite")
    assert f.severity == "error"
    d = rep.to_dict()  # JSON-safe even with NaN
    import json

    json.dumps(d, allow_nan=False)


def test_buffers_found_without_weights_and_at_root():
    bn = nn.BatchNorm2d(5, affine=False)
    bn.num_batches_tracked.fill_(100)
    bn.running_var.fill_(3)
    layers = find_bn_buffers(bn.state_dict())
    assert [b.name for b in layers] == ["(root)"]
    rep = static_inspect(bn.state_dict())
    assert rep.layers[0].affine is False and rep.layers[0].gain_max is None
    assert rep.findings == ()


def test_missing_num_batches_tracked():
    sd = updated(model(1)).state_dict()
    del sd["1.num_batches_tracked"]
    rep = static_inspect(sd)
    assert rep.layers[0].num_batches_tracked is None
    assert rep.layers[0].ema_init_weight is None
    sd["1.running_mean"].zero_()
    sd["1.running_var"].fill_(1)
    assert codes(static_inspect(sd)) == [("never-updated", "1")]


def test_untracked_layers_are_skipped_in_modules():
    m = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2, track_running_stats=False))
    assert static_inspect(m).layers == ()


def test_report_schema_and_codes():
    rep = static_inspect(model(1).state_dict(), checkpoint="x.pt")
    d = rep.to_dict()
    assert d["schema"] == "bnscope.inspect/2"
    check_document(d)
    assert d["command"] == "inspect" and d["checkpoint"] == "x.pt"
    assert {"name", "num_features"} <= set(d["layers"][0])
    for f in d["findings"]:
        assert set(f) == {"code", "severity", "layer", "message", "fix"}
    with pytest.raises(ValueError):
        Finding(code="made-up", severity="info", layer=None, message="m", fix="f")
    assert len(FINDING_CODES) == 18


def test_float16_buffers():
    m = updated(model(1)).half()
    rep = static_inspect(m.state_dict())
    assert rep.layers[0].var_max == pytest.approx(2.0)
    assert torch.float16 == m[1].running_var.dtype
