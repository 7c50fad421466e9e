"""The bnscope demo model: a small BatchNorm CNN for 3x32x32 images.

This file is written by ``bnscope demo`` into the demo folder as ``model.py`` and is
loaded from there with the model spec ``DIR/model.py:make_model``.  It depends on
nothing but PyTorch, so it can be copied anywhere and imported on its own.

Architecture (``width`` = w)::

    conv3x3(3 -> w)       BN2d  ReLU                 32x32
    conv3x3(w -> 2w)      BN2d  ReLU  MaxPool(2)     16x16
    conv3x3(2w -> 2w)     BN2d  ReLU  MaxPool(2)      8x8
    conv3x3(2w -> 4w, s2) BN2d  ReLU                  4x4
    global average pool
    Linear(4w -> 2w)      BN1d  ReLU  Dropout(0.1)
    Linear(2w -> num_classes)

With the defaults (4 classes, width 16) it has about 33k parameters, four
``BatchNorm2d`` layers and one ``BatchNorm1d`` layer.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["SmallCNN", "make_model"]


def _conv_block(in_ch: int, out_ch: int, *, stride: int = 1, pool: bool = False) -> nn.Sequential:
    layers: list[nn.Module] = [
        nn.Conv2d(in_ch, out_ch, kernel_size=3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(out_ch),
        nn.ReLU(inplace=True),
    ]
    if pool:
        layers.append(nn.MaxPool2d(2))
    return nn.Sequential(*layers)


class SmallCNN(nn.Module):
    """Small convolutional classifier with BatchNorm after every conv and in the head."""

    def __init__(self, num_classes: int = 4, width: int = 16) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if width < 1:
            raise ValueError(f"width must be >= 1, got {width}")
        w = width
        self.num_classes = num_classes
        self.width = width
        self.features = nn.Sequential(
            _conv_block(3, w),
            _conv_block(w, 2 * w, pool=True),
            _conv_block(2 * w, 2 * w, pool=True),
            _conv_block(2 * w, 4 * w, stride=2),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Sequential(
            nn.Linear(4 * w, 2 * w, bias=False),
            nn.BatchNorm1d(2 * w),
            nn.ReLU(inplace=True),
            nn.Dropout(0.1),
            nn.Linear(2 * w, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = torch.flatten(self.pool(x), 1)
        return self.head(x)


def make_model(num_classes: int = 4, width: int = 16) -> SmallCNN:
    """Build the bnscope demo model (freshly initialised, in training mode)."""
    return SmallCNN(num_classes=num_classes, width=width)
