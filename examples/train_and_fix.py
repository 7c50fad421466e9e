"""Train a small BatchNorm CNN in plain PyTorch, then let bnscope find and fix its statistics.

    python examples/train_and_fix.py

Nothing but PyTorch and bnscope; the data is generated (4 classes of 3x16x16 images: a faint
square in one of the four quadrants, on noise of random brightness), nothing is written to
disk. The model trains with BatchNorm momentum 0.01 (TensorFlow/Keras' decay 0.99), so its
running statistics average the last ~100 steps and lag the final weights. Then:

- ``bnscope.inspect`` measures how stale each layer's running statistics are, and how the
  model does with running, precise (population) and batch statistics;
- ``bnscope.precise_bn`` recomputes every BN layer's running statistics, exactly, as the
  population statistics of the trained model on the training data, in place;
- evaluation on held-out data shows what that changed.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import bnscope

CLASSES = 4


def make_data(n: int, seed: int) -> TensorDataset:
    """``n`` images in random class order (so batches read in order are i.i.d.): noise of
    random brightness, and a faint 4x4 square somewhere in the quadrant of the class."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, CLASSES, (n,), generator=g)
    x = torch.randn(n, 3, 16, 16, generator=g) + torch.rand(n, 1, 1, 1, generator=g) * 2
    offsets = torch.randint(0, 5, (n, 2), generator=g)
    for i in range(n):
        row, col = divmod(int(y[i]), 2)
        top, left = 8 * row + int(offsets[i, 0]), 8 * col + int(offsets[i, 1])
        x[i, :, top : top + 4, left : left + 4] += 1.0
    return TensorDataset(x, y)


def make_model() -> nn.Module:
    def block(cin: int, cout: int) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, 3, padding=1, bias=False),
                nn.BatchNorm2d(cout, momentum=0.01), nn.ReLU()]  # fmt: skip

    return nn.Sequential(
        *block(3, 16), nn.MaxPool2d(2), *block(16, 32), nn.MaxPool2d(2), *block(32, 32),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, CLASSES),
    )  # fmt: skip


@torch.no_grad()
def accuracy(model: nn.Module, loader: DataLoader) -> float:
    model.eval()
    correct = sum(int((model(x).argmax(1) == y).sum()) for x, y in loader)
    return correct / len(loader.dataset)  # type: ignore[arg-type]


def main() -> None:
    torch.manual_seed(0)
    train_set, val_set = make_data(1024, seed=0), make_data(512, seed=1)
    train_loader = DataLoader(train_set, batch_size=32, shuffle=True, drop_last=True)
    model = make_model()

    # plain training: SGD, cosine learning rate, 3 epochs
    epochs = 3
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs * len(train_loader))
    model.train()
    for _ in range(epochs):
        for x, y in train_loader:
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()

    # what bnscope reads: the training data in batches of the training size (i.i.d. batches)
    data = DataLoader(train_set, batch_size=32)
    val = DataLoader(val_set, batch_size=256)

    report = bnscope.inspect(model, data)  # dynamic report; the model is left unchanged
    print(report.extra["verdict_text"])
    for layer in report.layers:
        print(f"  {layer.name:4} {layer.status:6} d_mu median {layer.d_mu_median:.3f}  "
              f"z {layer.z_mu:.1f}")  # fmt: skip

    before = accuracy(model, val)
    result = bnscope.precise_bn(model, data)  # running statistics replaced, in place
    after = accuracy(model, val)
    print(f"Precise BN: {result.extra['batches']} batches, {result.extra['samples']} samples")
    print(f"validation accuracy: {before:.1%} with the running statistics training left, "
          f"{after:.1%} with Precise BN statistics")  # fmt: skip


if __name__ == "__main__":
    main()
