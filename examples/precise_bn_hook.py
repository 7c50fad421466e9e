"""Precise BN inside a plain PyTorch training loop, for the model and for its EMA copy.

    python examples/precise_bn_hook.py

Nothing but PyTorch and bnscope; the data is generated (4 classes of 3x16x16 images: a faint
square in one of the four quadrants, on noise of random brightness), nothing is written to
disk. The model trains with BatchNorm momentum 0.01 (Keras' 0.99), so its running statistics
lag the weights; ``torch.optim.swa_utils.AveragedModel`` keeps an EMA of the weights, whose BN
statistics are never estimated at all (it averages parameters only, as by default). Then:

- ``bnscope.PreciseBNHook(model, ...)`` recomputes the model's statistics at the end of every
  epoch, on exactly 512 training samples, before validation; the training run itself goes on
  exactly as without it (same parameters, same random draws);
- ``bnscope.PreciseBNHook(ema, ...)`` does the same for the EMA copy: exact statistics of the
  averaged weights, what ``swa_utils.update_bn`` is for.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DataLoader, TensorDataset

import bnscope

CLASSES = 4


def make_data(n: int, seed: int) -> TensorDataset:
    """``n`` images in random class order: noise of random brightness, and a faint 4x4
    square somewhere in the quadrant of the class."""
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
    was_training = model.training
    model.eval()
    correct = sum(int((model(x).argmax(1) == y).sum()) for x, y in loader)
    model.train(was_training)
    return correct / len(loader.dataset)  # type: ignore[arg-type]


def main() -> None:
    torch.manual_seed(0)
    train_set, val_set = make_data(1024, seed=0), make_data(512, seed=1)
    train_loader = DataLoader(train_set, batch_size=32, shuffle=True, drop_last=True)
    val = DataLoader(val_set, batch_size=256)
    model = make_model()
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.98))

    # the hooks read the training data in batches of the training size
    hook = bnscope.PreciseBNHook(model, train_loader, samples=512, every_n_epochs=1)
    ema_hook = bnscope.PreciseBNHook(ema, train_loader, samples=512)

    epochs = 3
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs * len(train_loader))
    model.train()
    for epoch in range(1, epochs + 1):
        for x, y in train_loader:
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            ema.update_parameters(model)
        running = accuracy(model, val)
        report = hook.maybe_update(epoch=epoch)  # epochs done so far: due every epoch
        assert report is not None
        stale = hook.history[-1]
        print(f"epoch {epoch}: validation accuracy {running:.1%} with the running statistics, "
              f"{accuracy(model, val):.1%} after Precise BN on {stale.samples} samples "
              f"(largest change of a mean: {stale.d_mu_max:.2f} sigma)")  # fmt: skip

    before = accuracy(ema, val)
    ema_hook.update(epoch=epochs)
    print(f"EMA weights: validation accuracy {before:.1%} with the statistics the copy was made "
          f"with, {accuracy(ema, val):.1%} with Precise BN statistics of the averaged weights")
    print(f"hook history: {[(u.epoch, u.samples) for u in hook.history]}")


if __name__ == "__main__":
    main()
