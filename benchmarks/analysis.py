"""Cost of the analyses against a plain forward loop measured in the same run.

Model: the ResNet-18-shaped CNN (CIFAR stem, default 32x32 inputs) or the ResNet-50-shaped CNN
(ImageNet stem, default 224x224) of benchmarks/resnet.py. Per repetition, interleaved with the
order rotated each time; medians of --reps are reported:

- floor:    one plain train-mode forward pass over the batches under no_grad
- inspect:  bnscope.inspect (a collection pass with batch statistics, then running- and
            population-statistics forwards; 3 forwards per batch when the data comes back in the
            same order, 4 otherwise)
- ghost:    bnscope.ghost_analysis with --sizes (a collection pass, then a population-statistics
            forward and one forward per size: k + 2 per batch for k sizes)

Everything runs on --device under the same autocast (--amp) and memory format
(--channels-last): the floor under torch.autocast on a model and batches converted beforehand,
bnscope with amp= and channels_last= (it finds model and batches already converted). On CUDA the
batches are made on the device before timing, every method runs once first as a warm-up and the
device is synchronized before and after each timed run.

Printed: median seconds, the time in units of the floor (forward passes' worth of time), the
forward passes each analysis actually ran per batch (``report.extra["forwards"]`` / batches),
and the targets: inspect at most 3.1x the floor, ghost at most (k + 2.1)x.

Usage: python benchmarks/analysis.py [--device cpu|cuda] [--model resnet18|resnet50]
       [--amp none|bf16|fp16] [--channels-last] [--size N] [--batch-size 32] [--batches 20]
       [--sizes 2,4,8,16,32] [--reps 3] [--threads 2] [--markdown] [--quick]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import math
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from resnet import make_resnet18, make_resnet50  # noqa: E402

import bnscope  # noqa: E402

AMP = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}
INSPECT_TARGET = 3.1
GHOST_EXTRA = 2.1  # ghost target: k + GHOST_EXTRA floors for k sizes


def make_batches(
    n: int, batch: int, size: int, classes: int, device: torch.device, channels_last: bool
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(images, labels) batches made on ``device``; images in channels-last when asked."""
    g = torch.Generator(device=device).manual_seed(0)
    out = []
    for _ in range(n):
        x = torch.randn(batch, 3, size, size, generator=g, device=device)
        x = x * (0.5 + torch.rand(batch, 1, 1, 1, generator=g, device=device))
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        y = torch.randint(0, classes, (batch,), generator=g, device=device)
        out.append((x, y))
    return out


def table(markdown: bool, head: list[str], rows: list[list[str]]) -> None:
    """A Markdown table, or plain columns (first left-aligned, the others right-aligned)."""
    if markdown:
        print("| " + " | ".join(head) + " |")
        print("| --- |" + " ---: |" * (len(head) - 1))
        for row in rows:
            print("| " + " | ".join(row) + " |")
        return
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
    for row in [head, *rows]:
        cells = [c.rjust(w) for c, w in zip(row, widths, strict=True)]
        cells[0] = row[0].ljust(widths[0])
        print("  ".join(cells))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", help="cpu or cuda (cuda:N)")
    ap.add_argument("--model", choices=("resnet18", "resnet50"), default="resnet18")
    ap.add_argument("--amp", choices=tuple(AMP), default="none")
    ap.add_argument("--channels-last", action="store_true")
    ap.add_argument("--size", type=int, default=None, help="32 (resnet18) or 224 (resnet50)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--batches", type=int, default=20)
    ap.add_argument("--sizes", default="2,4,8,16,32")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads with --device cpu (default 2; 1 with --quick)",
    )
    ap.add_argument("--markdown", action="store_true", help="print a Markdown table")
    ap.add_argument("--quick", action="store_true", help="tiny settings (a smoke test)")
    args = ap.parse_args()
    if args.threads is None:
        args.threads = 1 if args.quick else 2
    if args.quick:
        args.size, args.batch_size, args.batches, args.reps = 16, 16, 4, 2
        args.sizes = "2,4,8"
    size = args.size or (224 if args.model == "resnet50" else 32)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if cuda and not torch.cuda.is_available():
        sys.exit("--device cuda: CUDA is not available here")
    if cuda and device.index is None:  # "cuda" -> "cuda:N": the very device the tensors report
        device = torch.device("cuda", torch.cuda.current_device())
    if not cuda:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    sizes = [int(s) for s in args.sizes.split(",")]
    amp = None if args.amp == "none" else args.amp
    classes = 1000 if args.model == "resnet50" else 10
    model = make_resnet50(classes) if args.model == "resnet50" else make_resnet18(classes)
    model = model.to(device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    floor_model = copy.deepcopy(model)  # the floor updates its BN buffers; the analyses don't
    batches = make_batches(args.batches, args.batch_size, size, classes, device, args.channels_last)
    run = dict(device=device, amp=amp, channels_last=args.channels_last)

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(device)

    def autocast() -> contextlib.AbstractContextManager:
        if amp is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=AMP[args.amp])

    def floor(data: list) -> None:
        floor_model.train()
        with torch.no_grad(), autocast():
            for x, _ in data:
                floor_model(x)

    methods: dict[str, Callable[[list], object]] = {
        "floor": floor,
        "inspect": lambda data: bnscope.inspect(model, data, **run),
        "ghost": lambda data: bnscope.ghost_analysis(model, data, sizes=sizes, **run),
    }
    names = list(methods)
    times: dict[str, list[float]] = {k: [] for k in names}
    forwards: dict[str, float] = {"floor": 1.0}
    for name in names:  # warm-up: every method once
        methods[name](batches[:2])
    for rep in range(args.reps):
        order = names[rep % len(names) :] + names[: rep % len(names)]
        for name in order:
            sync()
            t0 = time.perf_counter()
            out = methods[name](batches)
            sync()
            times[name].append(time.perf_counter() - t0)
            if name != "floor":
                forwards[name] = out.extra["forwards"] / len(batches)
    floor_s = statistics.median(times["floor"])
    targets = {"floor": 1.0, "inspect": INSPECT_TARGET, "ghost": len(sizes) + GHOST_EXTRA}
    rows = []
    figures: list[float] = []
    for name in names:
        med = statistics.median(times[name])
        ratio = med / floor_s
        figures += [med, ratio, forwards[name]]
        target = "-" if name == "floor" else f"<= {targets[name]:.1f}"
        ok = "-" if name == "floor" else ("yes" if ratio <= targets[name] else "NO")
        rows.append([name, f"{med:.3f}", f"{ratio:.2f}", f"{forwards[name]:g}", target, ok])

    label = "ResNet-50-shaped" if args.model == "resnet50" else "ResNet-18-shaped"
    where = torch.cuda.get_device_name(device) if cuda else f"{args.threads} CPU threads"
    precision = "float32" if amp is None else f"autocast {amp}"
    fmt = ", channels-last" if args.channels_last else ""
    title = (
        f"{label} CNN, {size}x{size}, batch {args.batch_size}, {args.batches} batches, "
        f"{precision}{fmt}, {where}, median of {args.reps}; ghost sizes {args.sizes} "
        f"(k = {len(sizes)})"
    )
    head = ["method", "time (s)", "vs floor", "forwards per batch", "target vs floor", "met"]
    print(title)
    if args.markdown:
        print()
    table(args.markdown, head, rows)
    if any(math.isnan(f) for f in figures):
        print("a reported figure is NaN", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
