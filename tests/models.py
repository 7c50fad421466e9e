"""Small models for tests, importable as ``path/to/tests/models.py:NAME`` specs."""

from __future__ import annotations

from torch import nn


def make_tiny(num_classes: int = 3, width: int = 4, momentum: float | None = 0.1) -> nn.Module:
    """Conv-BN-ReLU x2, pool, linear: 3x8x8 inputs (BN ``momentum`` as given)."""
    return nn.Sequential(
        nn.Conv2d(3, width, 3, padding=1, bias=False),
        nn.BatchNorm2d(width, momentum=momentum),
        nn.ReLU(),
        nn.Conv2d(width, width, 3, padding=1, bias=False),
        nn.BatchNorm2d(width, momentum=momentum),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(width, num_classes),
    )


def make_tiny_frozen(num_classes: int = 3, width: int = 4) -> nn.Module:
    """:func:`make_tiny` with frozen BN layers (``bnscope.nn.FrozenBatchNorm2d``): the model
    that fine-tunes from a ``bnscope precise --freeze`` checkpoint of make_tiny."""
    from bnscope.nn import FrozenBatchNorm2d

    model = make_tiny(num_classes, width)
    model[1], model[4] = FrozenBatchNorm2d(width), FrozenBatchNorm2d(width)
    return model


def make_fixed_size(num_classes: int = 3, width: int = 4) -> nn.Module:
    """Conv-BN-ReLU, flatten, linear: takes 3x8x8 inputs only (no global pooling)."""
    return nn.Sequential(
        nn.Conv2d(3, width, 3, padding=1, bias=False),
        nn.BatchNorm2d(width),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(width * 8 * 8, num_classes),
    )


def make_no_bn() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))


def make_raises() -> nn.Module:
    raise RuntimeError("factory exploded")


def make_not_module() -> int:
    return 3


class Wrapped(nn.Module):
    """A model whose own attribute is called ``model`` (its keys start with 'model.')."""

    def __init__(self) -> None:
        super().__init__()
        self.model = make_tiny()

    def forward(self, x):  # pragma: no cover - not run
        return self.model(x)


def make_mlp(features: int = 6, num_classes: int = 3) -> nn.Module:
    """Linear-BN1d-ReLU-Linear on flat inputs."""
    return nn.Sequential(
        nn.Linear(features, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, num_classes)
    )


#: the red value (0..255) of the solid images of class i for :class:`ColorClassifier`
def class_red(i: int) -> int:
    return 40 * i + 20


class ColorClassifier(nn.Module):
    """Class i for a solid image whose red value is ``class_red(i)`` (ImageNet-normalized
    inputs), through one BN layer that is the identity at its initial statistics: with the
    right labels its accuracy is exactly 1."""

    def __init__(self, num_classes: int = 4) -> None:
        import torch

        super().__init__()
        self.bn = nn.BatchNorm2d(3)
        red = torch.tensor([class_red(i) for i in range(num_classes)], dtype=torch.float32)
        self.register_buffer("centers", (red / 255 - 0.485) / 0.229)

    def forward(self, x):
        v = self.bn(x).mean((2, 3))[:, :1]
        return -(v - self.centers).square() * 100
