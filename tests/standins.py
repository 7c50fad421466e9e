"""Stand-ins for the BN flavours of real architectures, with the module structure and forwards
of the originals (timm ``layers/norm_act.py``, torchvision ``ops/misc.py``), so that tests need
neither library. Also models with several inputs and dict inputs."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class BatchNormAct2d(nn.BatchNorm2d):
    """timm's ``BatchNormAct2d``: BatchNorm2d, then dropout and an activation, with the
    batch_norm call written out as timm writes it (its own forward, not ``super().forward``)."""

    def __init__(self, num_features: int, drop: float = 0.0, act: type = nn.ReLU, **kw) -> None:
        super().__init__(num_features, **kw)
        self.drop = nn.Dropout(drop) if drop else nn.Identity()
        self.act = act()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.momentum is None:
            exponential_average_factor = 0.0
        else:
            exponential_average_factor = self.momentum
        if self.training and self.track_running_stats:
            if self.num_batches_tracked is not None:
                self.num_batches_tracked.add_(1)
                if self.momentum is None:
                    exponential_average_factor = 1.0 / float(self.num_batches_tracked)
                else:
                    exponential_average_factor = self.momentum
        if self.training:
            bn_training = True
        else:
            bn_training = (self.running_mean is None) and (self.running_var is None)
        x = F.batch_norm(
            x,
            self.running_mean if not self.training or self.track_running_stats else None,
            self.running_var if not self.training or self.track_running_stats else None,
            self.weight,
            self.bias,
            bn_training,
            exponential_average_factor,
            self.eps,
        )
        x = self.drop(x)
        return self.act(x)


class SyncBatchNormAct(nn.SyncBatchNorm):
    """timm's ``SyncBatchNormAct``: SyncBatchNorm's forward, then dropout and an activation."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = super().forward(x)
        if hasattr(self, "drop"):
            x = self.drop(x)
        if hasattr(self, "act"):
            x = self.act(x)
        return x


def convert_sync_batchnorm(module: nn.Module) -> nn.Module:
    """timm's ``convert_sync_batchnorm``: BatchNormAct2d -> SyncBatchNormAct (keeping its act
    and drop), other BatchNorm -> SyncBatchNorm; parameters and buffers carried over."""
    out = module
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        cls = SyncBatchNormAct if isinstance(module, BatchNormAct2d) else nn.SyncBatchNorm
        out = cls(module.num_features, module.eps, module.momentum, module.affine,
                  module.track_running_stats)  # fmt: skip
        if module.affine:
            with torch.no_grad():
                out.weight = module.weight
                out.bias = module.bias
        out.running_mean = module.running_mean
        out.running_var = module.running_var
        out.num_batches_tracked = module.num_batches_tracked
        if isinstance(module, BatchNormAct2d):
            out.act = module.act
            out.drop = module.drop
    for name, child in module.named_children():
        out.add_module(name, convert_sync_batchnorm(child))
    return out


class FrozenBatchNorm2d(nn.Module):
    """torchvision's ``FrozenBatchNorm2d``: fixed statistics and affine parameters, all
    buffers, normalization written out (no batch_norm call, no training mode)."""

    def __init__(self, num_features: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.reshape(1, -1, 1, 1)
        b = self.bias.reshape(1, -1, 1, 1)
        rv = self.running_var.reshape(1, -1, 1, 1)
        rm = self.running_mean.reshape(1, -1, 1, 1)
        scale = w * (rv + self.eps).rsqrt()
        bias = b - rm * scale
        return x * scale + bias


def act_net(drop: float = 0.0) -> nn.Sequential:
    """conv -> BatchNormAct2d (ReLU) twice, pool, linear: a timm-style CNN."""
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), BatchNormAct2d(8, drop=drop),
        nn.Conv2d(8, 8, 3, padding=1, bias=False), BatchNormAct2d(8, act=nn.Hardswish),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4),
    )  # fmt: skip


def frozen_backbone() -> nn.Sequential:
    """A detection-style backbone: conv -> FrozenBatchNorm2d -> ReLU, twice, pool, linear."""
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), FrozenBatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, bias=False), FrozenBatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4),
    )  # fmt: skip


class TwoInputs(nn.Module):
    """``forward(image, extra)``: a conv branch with BN and an MLP branch with BN1d, fused."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.fc = nn.Linear(5, 6)
        self.bn1d = nn.BatchNorm1d(6)
        self.head = nn.Linear(6, 4)

    def forward(self, image: torch.Tensor, extra: torch.Tensor) -> torch.Tensor:
        a = torch.relu(self.bn(self.conv(image))).mean((2, 3))
        b = torch.relu(self.bn1d(self.fc(extra)))
        return self.head(a + b)


class DictInputs(TwoInputs):
    """The same network taking ``forward(pixel_values, features)`` from dict batches."""

    def forward(self, pixel_values: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        return super().forward(pixel_values, features)
