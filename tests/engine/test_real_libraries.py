"""The same checks as test_standins.py on the real classes of timm and torchvision, when
they import here (``pip install --no-deps timm torchvision``; torchvision's CUDA wheel imports on
a CPU torch once its ``nms``/``qnms`` operator schemas exist). Skipped cleanly otherwise: the
package depends on neither."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

import bnscope
from bnscope.engine import capture
from bnscope.engine.collect import collect

from ..reallibs import real_libraries
from .test_standins import assert_exact, bn_inputs_reference

LIBS = real_libraries()
pytestmark = pytest.mark.skipif(LIBS is None, reason="timm/torchvision not importable here")


@pytest.fixture(autouse=True)
def _no_timed_checks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(capture, "CHECK_SECONDS", float("inf"))


def data(n: int = 3, batch: int = 8, size: int = 32) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [
        (torch.randn(batch, 3, size, size, generator=g), torch.randint(0, 5, (batch,), generator=g))
        for _ in range(n)
    ]


def warmed(model: nn.Module, batches: list) -> nn.Module:
    model.train()
    with torch.no_grad():
        model(batches[0][0])
    return model.eval()


def test_timm_bn_act_models_are_exact_on_the_kernel_path():
    timm, _ = LIBS
    batches = data()
    model = warmed(timm.create_model("efficientnet_b0", pretrained=False, num_classes=5), batches)
    col = collect(copy.deepcopy(model), batches)
    act = [s for s in col.layers.values() if type(s.module).__name__ == "BatchNormAct2d"]
    assert act and not any(s.exact_path for s in act)
    fixed = copy.deepcopy(model)
    bnscope.precise_bn(fixed, batches)
    assert_exact(fixed, bn_inputs_reference(model, batches))
    rep = bnscope.ghost_analysis(copy.deepcopy(model), batches, sizes=[4])
    assert {layer.status for layer in rep.layers} == {"analysed"}


def test_timm_sync_batchnorm_act_under_a_process_group(tmp_path: Path):
    timm, _ = LIBS
    from timm.layers import convert_sync_batchnorm

    batches = data()
    model = warmed(timm.create_model("mobilenetv3_small_100", pretrained=False, num_classes=5),
                   batches)  # fmt: skip
    ref = bn_inputs_reference(model, batches)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 's'}", rank=0, world_size=1)
    try:
        synced = convert_sync_batchnorm(copy.deepcopy(model))
        bnscope.precise_bn(synced, batches)
    finally:
        dist.destroy_process_group()
    assert_exact(synced, ref)


def test_torchvision_frozen_batchnorm_backbone():
    _, torchvision = LIBS
    from torchvision.ops import FrozenBatchNorm2d

    batches = data()
    model = torchvision.models.resnet18(num_classes=5, norm_layer=FrozenBatchNorm2d).eval()
    static = bnscope.static_inspect(model)
    assert static.layers and all(layer.frozen for layer in static.layers)
    rep = bnscope.inspect(copy.deepcopy(model), batches)
    assert {layer.status for layer in rep.layers} == {"frozen"}
    kept = copy.deepcopy(model)
    rep = bnscope.precise_bn(kept, batches)
    assert {layer.status for layer in rep.layers} == {"frozen"}
    assert torch.equal(kept.bn1.running_mean, model.bn1.running_mean)
    redone = copy.deepcopy(model)
    rep = bnscope.precise_bn(redone, batches, include_frozen=True)
    assert {layer.status for layer in rep.layers} == {"updated"}
    x = torch.cat([b[0] for b in batches])
    with torch.no_grad():
        h = model.conv1(x).double()
    torch.testing.assert_close(redone.bn1.running_mean.double(), h.mean((0, 2, 3)),
                               rtol=1e-6, atol=1e-7)  # fmt: skip


def test_torchvision_plain_models_are_exact():
    _, torchvision = LIBS
    batches = data()
    for make in (torchvision.models.mobilenet_v3_small, torchvision.models.regnet_y_400mf):
        model = warmed(make(num_classes=5), batches)
        fixed = copy.deepcopy(model)
        bnscope.precise_bn(fixed, batches)
        assert_exact(fixed, bn_inputs_reference(model, batches))
