"""Test-time BN adaptation you can ship (PriorBatchNorm), and partial Adaptive BN.

    python examples/test_time_prior.py

Nothing but PyTorch and bnscope; the data is generated and nothing is written to disk. A small
BatchNorm CNN trains on clean images (4 classes of 3x16x16: a faint square in one of the four
quadrants, on noise of random brightness), then meets a shifted test domain (lower contrast,
a colour cast, some more noise). Then:

- ``bnscope.nn.convert_to_prior_bn(model, N)`` makes every BN layer normalize each test batch
  with its own statistics mixed with the stored (source) statistics as N pseudo samples
  (Schneider et al. 2020): N = 0 is test-batch statistics, N = inf the source model. The
  stored statistics are never written, the state dict keeps its keys and values, and
  ``revert_prior_bn`` gives the plain BN layers back: this is the model to deploy when every
  test batch may come from another domain;
- ``bnscope.adapt_bn`` re-estimates the statistics once on unlabeled shifted data, in full or
  in part (``only="mean"``, ``first_layers=K``), for a domain that stays.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import bnscope
from bnscope.nn import convert_to_prior_bn, revert_prior_bn

CLASSES = 4


def make_data(n: int, seed: int, shifted: bool = False) -> TensorDataset:
    """``n`` images in random class order; ``shifted``: the test domain (contrast 0.5, a
    colour cast per channel, some more noise)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, CLASSES, (n,), generator=g)
    x = torch.randn(n, 3, 16, 16, generator=g) + torch.rand(n, 1, 1, 1, generator=g) * 2
    offsets = torch.randint(0, 5, (n, 2), generator=g)
    for i in range(n):
        row, col = divmod(int(y[i]), 2)
        top, left = 8 * row + int(offsets[i, 0]), 8 * col + int(offsets[i, 1])
        x[i, :, top : top + 4, left : left + 4] += 1.0
    if shifted:
        cast = torch.tensor([1.5, -1.0, 0.5]).view(1, 3, 1, 1)
        x = 0.5 * x + cast + 0.3 * torch.randn(x.shape, generator=g)
    return TensorDataset(x, y)


def make_model() -> nn.Module:
    def block(cin: int, cout: int) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]

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
    torch.set_num_threads(1)  # a small model: one thread is fast, and sums in a fixed order
    torch.manual_seed(0)
    train_set = make_data(1024, seed=0)
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True)
    model.train()
    for _ in range(3):
        for x, y in DataLoader(train_set, batch_size=32, shuffle=True, drop_last=True):
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    bnscope.precise_bn(model, DataLoader(train_set, batch_size=32))  # exact source statistics

    clean = DataLoader(make_data(512, seed=1), batch_size=32)
    test = DataLoader(make_data(512, seed=2, shifted=True), batch_size=32)  # test batches of 32
    source = accuracy(model, test)
    print(f"source model: {accuracy(model, clean):.1%} on clean images, {source:.1%} shifted")

    # test time: each batch of 32 mixed with the source statistics as N pseudo samples
    for prior in (0, 16, 64, math.inf):
        deployed = convert_to_prior_bn(copy.deepcopy(model), prior)
        print(f"test-time prior N={prior:g}: {accuracy(deployed, test):.1%}")

    # the conversion keeps the parameters, buffers and state-dict keys, and is undone in place
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model = revert_prior_bn(convert_to_prior_bn(model, 16))
    after = model.state_dict()
    same = before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in after)
    print(f"state dict unchanged by convert/revert: {same}")

    # Adaptive BN: one re-estimation on unlabeled shifted data, in full or in part
    unlabeled = [x for x, _ in DataLoader(make_data(1024, seed=3, shifted=True), batch_size=32)]
    results = []
    for label, kwargs in (("means only", {"only": "mean"}),
                          ("first BN layer", {"first_layers": 1}),
                          ("all statistics", {})):  # fmt: skip
        adapted = copy.deepcopy(model)
        report = bnscope.adapt_bn(adapted, unlabeled, **kwargs)
        received = [layer.adapted or "-" for layer in report.layers]
        results.append(f"{label} {accuracy(adapted, test):.1%} ({', '.join(received)})")
    print("Adaptive BN on unlabeled shifted data: " + "; ".join(results))


if __name__ == "__main__":
    main()
