"""The bnscope demo model: a small BatchNorm CNN for 3x32x32 images.

This file is written by ``bnscope demo`` into the demo folder as ``model.py`` and is
loaded from there with the model spec ``DIR/model.py:make_model``.  It depends on
nothing but PyTorch, so it can be copied anywhere and imported on its own.

Architecture (``width`` = w; spatial size of each block's output on the right)::

    conv3x3(3 -> w)     BN2d  ReLU  MaxPool(2)     16x16
    conv3x3(w -> 2w)    BN2d  ReLU  MaxPool(2)      8x8
    conv3x3(2w -> 4w)   BN2d  ReLU  MaxPool(2)      4x4
    conv3x3(4w -> 4w)   BN2d  ReLU                  4x4
    global average pool
    Linear(4w -> 2w)    BN1d  ReLU  Dropout(0.1)
    Linear(2w -> num_classes)

The convolutions and the first linear layer have no bias (the BatchNorm after them has
one).  With the defaults (4 classes, width 16) the model has 62,932 parameters, four
``BatchNorm2d`` layers and one ``BatchNorm1d`` layer.

BatchNorm momentum
------------------
Every BatchNorm layer uses ``momentum=bn_momentum``, 0.01 by default: the TensorFlow /
Keras convention (``decay=0.99``) that many ported checkpoints carry, instead of
PyTorch's 0.1.  The running statistics are then an exponential moving average over
roughly the last 100 training steps, computed with the weights of those steps, so a
briefly trained model ends up with noticeably stale running statistics -- which is
exactly what the bnscope demo is meant to show.  Pass ``bn_momentum=0.1`` for the
PyTorch default.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["SmallCNN", "make_model"]


def _conv_block(in_ch: int, out_ch: int, *, bn_momentum: float | None, pool: bool) -> nn.Sequential:
    layers: list[nn.Module] = [
        nn.Conv2d(in_ch, out_ch, kernel_size=3, padding=1, bias=False),
        nn.BatchNorm2d(out_ch, momentum=bn_momentum),
        nn.ReLU(inplace=True),
    ]
    if pool:
        layers.append(nn.MaxPool2d(2))
    return nn.Sequential(*layers)


class SmallCNN(nn.Module):
    """Small convolutional classifier with BatchNorm after every conv and in the head."""

    def __init__(
        self, num_classes: int = 4, width: int = 16, bn_momentum: float | None = 0.01
    ) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if width < 1:
            raise ValueError(f"width must be >= 1, got {width}")
        w, m = width, bn_momentum
        self.num_classes = num_classes
        self.width = width
        self.features = nn.Sequential(
            _conv_block(3, w, bn_momentum=m, pool=True),
            _conv_block(w, 2 * w, bn_momentum=m, pool=True),
            _conv_block(2 * w, 4 * w, bn_momentum=m, pool=True),
            _conv_block(4 * w, 4 * w, bn_momentum=m, pool=False),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Sequential(
            nn.Linear(4 * w, 2 * w, bias=False),
            nn.BatchNorm1d(2 * w, momentum=m),
            nn.ReLU(inplace=True),
            nn.Dropout(0.1),
            nn.Linear(2 * w, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = torch.flatten(self.pool(x), 1)
        return self.head(x)


def make_model(num_classes: int = 4, width: int = 16, bn_momentum: float | None = 0.01) -> SmallCNN:
    """Build the bnscope demo model (freshly initialised, in training mode).

    ``bn_momentum`` is the momentum of every BatchNorm layer (see the module docstring);
    ``None`` makes them keep a cumulative average instead of an EMA.
    """
    return SmallCNN(num_classes=num_classes, width=width, bn_momentum=bn_momentum)
