"""A checkpoint "converted" from another framework with a standard deviation in running_var:
bnscope.inspect finds it, names the conversion and the transform that undoes it.

    python examples/conversion_check.py

Nothing but PyTorch and bnscope; the data is generated and nothing is written to disk. A small
BatchNorm CNN trains for four epochs; its state dict then goes through a faulty converter that
stores sqrt(running_var), as happens when a port maps a standard-deviation blob (or takes one
root too many). Then:

- ``bnscope.inspect`` on the converted model fits log running_var against log var_pop over each
  layer's channels: slope 1 for variances, 1/2 for standard deviations, -1 and -1/2 for inverse
  variances and inverse standard deviations (docs/statistics.md, section 11.2), and reports a
  ``var-convention`` error with the fix;
- the transform the fix names (``running_var = running_var ** 2``) gives the trained statistics
  back, and the same check finds nothing.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import bnscope

CLASSES = 4
EPOCHS = 4


def make_data(n: int, seed: int) -> TensorDataset:
    """``n`` images of 4 classes: noise of random brightness and a bright 4x4 square in the
    quadrant of the class."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, CLASSES, (n,), generator=g)
    x = torch.randn(n, 3, 16, 16, generator=g) + torch.rand(n, 1, 1, 1, generator=g) * 2
    for i in range(n):
        row, col = divmod(int(y[i]), 2)
        x[i, :, 8 * row + 2 : 8 * row + 6, 8 * col + 2 : 8 * col + 6] += 1.5
    return TensorDataset(x, y)


def make_model() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, CLASSES),
    )  # fmt: skip


def faulty_conversion(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A converter that stores the standard deviation where PyTorch keeps the variance."""
    return {k: v.sqrt() if k.endswith("running_var") else v for k, v in state.items()}


@torch.no_grad()
def accuracy(model: nn.Module, loader: DataLoader) -> float:
    model.eval()
    correct = sum(int((model(x).argmax(1) == y).sum()) for x, y in loader)
    return correct / len(loader.dataset)  # type: ignore[arg-type]


def main() -> None:
    torch.manual_seed(0)
    train_set = make_data(1024, seed=0)
    train_loader = DataLoader(train_set, batch_size=32, shuffle=True, drop_last=True)
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    # a cosine schedule to 0: the last steps barely move the weights, so the EMA catches up
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, EPOCHS * len(train_loader))
    model.train()
    for _ in range(EPOCHS):
        for x, y in train_loader:
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()

    data = DataLoader(train_set, batch_size=32)  # what bnscope reads: the training data
    ported = make_model()
    ported.load_state_dict(faulty_conversion(model.state_dict()))
    print(f"accuracy: trained model {accuracy(model, data):.1%}, "
          f"converted checkpoint {accuracy(ported, data):.1%}")  # fmt: skip

    report = bnscope.inspect(ported, data)
    print(report.extra["verdict_text"])
    for layer in report.layers:
        print(f"  layer {layer.name}: slope of log running_var on log var_pop "
              f"{layer.var_slope:.2f}, running_var holds: {layer.var_convention}")  # fmt: skip
    finding = next(f for f in report.findings if f.code == "var-convention")
    print(f"{finding.severity} {finding.code}: {finding.message}")
    print(f"fix: {finding.fix}")

    with torch.no_grad():  # the transform the fix names
        for module in ported.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_var.pow_(2)
    report = bnscope.inspect(ported, data)
    left = [f.code for f in report.findings if f.code == "var-convention"]
    print(f"after running_var = running_var ** 2: accuracy {accuracy(ported, data):.1%}, "
          f"var-convention findings: {len(left)}")  # fmt: skip


if __name__ == "__main__":
    main()
