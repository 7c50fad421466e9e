"""One set of BN statistics per domain: adapt_domains and SplitBatchNorm.

    python examples/per_domain_bn.py

Nothing but PyTorch and bnscope; the data is generated and nothing is written to disk. A small
BatchNorm CNN trains on clean images (4 classes of 3x16x16: a faint square in one of the four
quadrants, on noise of random brightness), then is deployed on two target domains that shift
the images in opposite directions: ``dim`` (low contrast, darker) and ``glare`` (high
contrast, brighter, a colour cast). Then:

- ``bnscope.adapt_domains(model, {"dim": ..., "glare": ...})`` re-estimates the statistics on
  unlabeled data of each domain separately (the model keeps its source statistics) and
  measures per layer how far apart the domains' statistics are (median symmetric KL);
- one set of statistics for both domains (Adaptive BN on their mixed data) is compared with a
  set per domain;
- ``bnscope.nn.convert_to_split_bn(model, 3)`` and ``load_domain_statistics`` make one model
  whose ``SplitBatchNorm`` layers hold the source's and both domains' statistics, picked by
  ``use_domain(model, d)``: it predicts exactly as the three plain models.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import bnscope
from bnscope.nn import convert_to_split_bn, load_domain_statistics, use_domain

CLASSES = 4
#: the target domains: (contrast, brightness shift, colour cast per channel)
DOMAINS = {
    "dim": (0.4, -1.0, (0.0, 0.0, 0.0)),
    "glare": (2.0, 2.0, (1.0, 0.0, -0.5)),
}


def make_data(n: int, seed: int, domain: str | None = None) -> TensorDataset:
    """``n`` images in random class order, clean or as seen in ``domain``."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, CLASSES, (n,), generator=g)
    x = torch.randn(n, 3, 16, 16, generator=g) + torch.rand(n, 1, 1, 1, generator=g) * 2
    offsets = torch.randint(0, 5, (n, 2), generator=g)
    for i in range(n):
        row, col = divmod(int(y[i]), 2)
        top, left = 8 * row + int(offsets[i, 0]), 8 * col + int(offsets[i, 1])
        x[i, :, top : top + 4, left : left + 4] += 1.0
    if domain is not None:
        contrast, shift, cast = DOMAINS[domain]
        x = contrast * x + shift + torch.tensor(cast).view(1, 3, 1, 1)
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


def unlabeled(dataset: TensorDataset) -> list[torch.Tensor]:
    """Shuffled batches of 32 images, without labels (what adaptation sees)."""
    loader = DataLoader(dataset, batch_size=32, shuffle=True, generator=torch.Generator())
    return [x for x, _ in loader]


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

    tests = {n: DataLoader(make_data(512, seed=2, domain=n), batch_size=64) for n in DOMAINS}
    source = ", ".join(f"{accuracy(model, loader):.1%} {name}" for name, loader in tests.items())
    print(f"source statistics: {source}")

    # one re-estimation per domain, on unlabeled data of that domain
    targets = {name: make_data(1024, seed=3, domain=name) for name in DOMAINS}
    report = bnscope.adapt_domains(model, {name: unlabeled(d) for name, d in targets.items()})
    labels, matrix = report.extra["divergence_labels"], report.extra["divergence"]
    print(f"median symmetric KL over layers: dim vs glare {matrix[1][2]:.2f}, "
          f"source vs dim {matrix[0][1]:.2f}, source vs glare {matrix[0][2]:.2f}")  # fmt: skip
    pairs = [f"{r.name}: {r.pair_kl:.2f}" for r in report.layers]
    print(f"dim vs glare per BN layer: {', '.join(pairs)}")

    # one set of statistics for both domains: Adaptive BN on their mixed data
    shared = copy.deepcopy(model)
    mixed = torch.utils.data.ConcatDataset(list(targets.values()))
    bnscope.adapt_bn(shared, unlabeled(mixed))  # type: ignore[arg-type]
    both = ", ".join(f"{accuracy(shared, loader):.1%} {name}" for name, loader in tests.items())
    print(f"one set of statistics for both domains: {both}")

    # a set per domain: plain models, and one model with SplitBatchNorm layers
    names = labels  # "source", then the domains
    split = convert_to_split_bn(copy.deepcopy(model), len(names))
    load_domain_statistics(split, [bnscope.domain_state_dict(report, n) for n in names])
    per_domain, same = [], True
    for d, name in enumerate(names[1:], start=1):
        plain = copy.deepcopy(model)
        plain.load_state_dict(bnscope.domain_state_dict(report, name), strict=False)
        per_domain.append(f"{accuracy(plain, tests[name]):.1%} {name}")
        with use_domain(split, d):
            same &= accuracy(split, tests[name]) == accuracy(plain, tests[name])
            x = tests[name].dataset.tensors[0][:64]  # type: ignore[attr-defined]
            same &= torch.equal(split(x), plain(x))
    print(f"a set of statistics per domain: {', '.join(per_domain)}")
    print(f"split model (domains {', '.join(names)}) predicts as the per-domain models: {same}")


if __name__ == "__main__":
    main()
