"""Cost of the analyses against a plain forward loop measured in the same run.

ResNet-18-shaped CNN (benchmarks/resnet.py), batch 32, CPU. Per repetition, interleaved:

- floor:    one plain train-mode forward pass over the batches under no_grad
- inspect:  bnscope.inspect (one collection pass, then running/precise/batch forwards)
- ghost:    bnscope.ghost_analysis with --sizes (collection pass, then a population-statistics
            forward and one forward per size)

Printed: median seconds and the ratio to the floor, next to the number of forward passes each
analysis makes per batch (what the ratio should be close to).

Usage: python benchmarks/analysis.py [--reps 3] [--batches 20] [--sizes 2,4,8,16,32]
       [--size 32] [--threads 2] [--markdown]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from resnet import make_resnet18  # noqa: E402

import bnscope  # noqa: E402


def make_batches(n: int, batch: int, size: int, seed: int = 0) -> list[tuple]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        x = torch.randn(batch, 3, size, size, generator=g)
        x = x * (0.5 + torch.rand(batch, 1, 1, 1, generator=g))
        out.append((x, torch.randint(0, 10, (batch,), generator=g)))
    return out


def run_floor(model, batches) -> None:
    m = copy.deepcopy(model)
    m.train()
    with torch.no_grad():
        for x, _ in batches:
            m(x)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--batches", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--sizes", default="2,4,8,16,32")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--markdown", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = make_resnet18(num_classes=10)
    batches = make_batches(args.batches, args.batch_size, args.size)
    sizes = [int(s) for s in args.sizes.split(",")]
    methods = {
        "floor": (lambda: run_floor(model, batches), 1),
        "inspect": (lambda: bnscope.inspect(model, batches), 4),
        "ghost": (lambda: bnscope.ghost_analysis(model, batches, sizes=sizes), 2 + len(sizes)),
    }
    times: dict[str, list[float]] = {k: [] for k in methods}
    run_floor(model, batches[:2])  # warm-up
    for rep in range(args.reps):
        order = list(methods)[rep % len(methods) :] + list(methods)[: rep % len(methods)]
        for name in order:
            t0 = time.perf_counter()
            methods[name][0]()
            times[name].append(time.perf_counter() - t0)
    floor = statistics.median(times["floor"])
    rows = []
    for name, (_, passes) in methods.items():
        med = statistics.median(times[name])
        rows.append((name, med, med / floor, passes))
    title = (
        f"ResNet-18-shaped CNN, {args.size}x{args.size}, batch {args.batch_size}, "
        f"{args.batches} batches, {args.threads} threads, median of {args.reps}; "
        f"ghost sizes {args.sizes}"
    )
    if args.markdown:
        print(title + "\n")
        print("| method | time (s) | vs floor | forward passes per batch |")
        print("| --- | ---: | ---: | ---: |")
        for name, med, ratio, passes in rows:
            print(f"| {name} | {med:.2f} | {ratio:.2f} | {passes} |")
    else:
        print(title)
        for name, med, ratio, passes in rows:
            print(f"{name:8s} {med:8.2f} s  x{ratio:5.2f}  ({passes} forwards per batch)")


if __name__ == "__main__":
    main()
