"""A BN module used at two places of a model has its entries twice in the state dict: precise
writes the new statistics under both names (else loading the output would put the old ones
back), and --freeze writes both in the frozen layout."""

from __future__ import annotations

import textwrap

import torch

import bnscope
from bnscope.nn import freeze_bn

MODEL = textwrap.dedent(
    """
    from torch import nn


    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = nn.BatchNorm1d(3)
            self.seq = nn.Sequential(self.bn)  # the same module under a second name

        def forward(self, x):
            return self.seq(x)


    def make():
        return Shared()
    """
)


def test_shared_layer_is_written_under_every_name(tmp_path):
    (tmp_path / "shared.py").write_text(MODEL)
    spec = f"{tmp_path / 'shared.py'}:make"
    namespace: dict = {}
    exec(MODEL, namespace)
    ckpt = tmp_path / "s.pt"
    torch.save(namespace["make"]().state_dict(), ckpt)
    x = torch.randn(64, 3, generator=torch.Generator().manual_seed(0)) * 3 + 5
    data = tmp_path / "x.pt"
    torch.save(x, data)
    var, mean = torch.var_mean(x.double(), dim=0, correction=0)

    job = bnscope.open(ckpt, model=spec, data=str(data), device="cpu")
    written = torch.load(job.precise().save(), weights_only=True)
    for name in ("bn", "seq.0"):
        torch.testing.assert_close(written[f"{name}.running_mean"].double(), mean)
        torch.testing.assert_close(written[f"{name}.running_var"].double(), var)
    model = namespace["make"]()
    model.load_state_dict(written)  # the later name no longer puts the old statistics back
    torch.testing.assert_close(model.bn.running_mean.double(), mean)

    job = bnscope.open(ckpt, model=spec, data=str(data), device="cpu")
    frozen = torch.load(job.precise(freeze=True).save(), weights_only=True)
    assert sorted(frozen) == sorted(
        f"{name}.{entry}"
        for name in ("bn", "seq.0")
        for entry in ("weight", "bias", "running_mean", "running_var")
    )
    user = freeze_bn(namespace["make"]())
    user.load_state_dict(frozen, strict=True)
    torch.testing.assert_close(user.seq[0].running_var.double(), var)
