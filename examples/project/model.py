"""The project's model: a small BatchNorm CNN for 3x16x16 images (``model.py:make_model``)."""

from __future__ import annotations

from torch import nn


def make_model(num_classes: int = 4, width: int = 16) -> nn.Module:
    """Three conv-BN-ReLU blocks, global average pooling, a linear classifier. BatchNorm
    momentum 0.01 (TensorFlow/Keras' decay 0.99): the running statistics average the last
    ~100 training steps."""

    def block(cin: int, cout: int) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, 3, padding=1, bias=False),
                nn.BatchNorm2d(cout, momentum=0.01), nn.ReLU()]  # fmt: skip

    w = width
    return nn.Sequential(
        *block(3, w), nn.MaxPool2d(2), *block(w, 2 * w), nn.MaxPool2d(2), *block(2 * w, 2 * w),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * w, num_classes),
    )  # fmt: skip
