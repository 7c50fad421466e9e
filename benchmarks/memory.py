"""Precise BN memory: peak RSS of bnscope.precise_bn vs a plain forward loop, 50 vs 500 batches.

ResNet-18-shaped CNN (benchmarks/resnet.py), CPU. The data is an iterable that generates each
batch on the fly from a seeded generator (nothing is kept), so memory that grows with the number
of batches can only come from the method itself. Every (method, batches) pair runs in a fresh
subprocess so that each peak is its own:

- floor:   a plain train-mode forward loop under no_grad over the same batches
- bnscope: bnscope.precise_bn(model, data, batches=N)

Per run the child reports
- peak RSS: ``ru_maxrss`` of the whole process (Python, torch, model, the run);
- setup RSS: resident memory after imports and model construction, before the first batch;
- run peak: the high-water mark of the run itself (``VmHWM`` after resetting it through
  ``/proc/self/clear_refs`` once setup is done; Linux only, else "n/a").

Printed: a table per run and the ratios large/small (per method) and bnscope/floor (per batch
count) of the peak RSS and of the run's own increase over setup (run peak - setup RSS).

Usage: python benchmarks/memory.py [--batches-small 50] [--batches-large 500]
       [--batch-size 32] [--size 32] [--threads 2] [--markdown]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

HERE = Path(__file__).resolve().parent
METHODS = ("floor", "bnscope")
MIB = 1024 * 1024


# --------------------------------------------------------------------------------------------
# Child: one run


class SyntheticImages:
    """``batches`` batches of images generated on demand (per-image brightness/contrast
    variation, like real data rather than pure noise). Re-iterable; stores nothing."""

    def __init__(self, batches: int, batch_size: int, size: int, seed: int = 1) -> None:
        self.batches = batches
        self.batch_size = batch_size
        self.size = size
        self.seed = seed

    def __len__(self) -> int:
        return self.batches

    def __iter__(self) -> Iterator:
        import torch

        g = torch.Generator().manual_seed(self.seed)
        b, s = self.batch_size, self.size
        for _ in range(self.batches):
            x = torch.randn(b, 3, s, s, generator=g)
            contrast = 0.5 + torch.rand(b, 1, 1, 1, generator=g)
            yield x * contrast + torch.randn(b, 1, 1, 1, generator=g)


def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_hwm() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0: write 5 to /proc/self/clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def child(method: str, batches: int, batch_size: int, size: int, threads: int) -> dict:
    import torch

    sys.path.insert(0, str(HERE))
    from resnet import make_resnet18

    from bnscope.ops.precise import precise_bn  # imported now: module imports count as setup

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = make_resnet18()
    data = SyntheticImages(batches, batch_size, size)
    # warm-up on one small batch so allocator/kernel setup is part of "setup" for both methods
    with torch.no_grad():
        model.train()
        model(torch.randn(2, 3, size, size))
    setup_kib = _status_kib("VmRSS")
    reset = _reset_hwm()

    t0 = time.perf_counter()
    if method == "floor":
        model.train()
        with torch.no_grad():
            for x in data:
                model(x)
    elif method == "bnscope":
        precise_bn(model, data, batches=batches)
    else:
        raise SystemExit(f"unknown method {method}")
    seconds = time.perf_counter() - t0

    ru = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    peak_bytes = ru if sys.platform == "darwin" else ru * 1024
    hwm_kib = _status_kib("VmHWM") if reset else None
    return {
        "method": method,
        "batches": batches,
        "peak_rss": peak_bytes,
        "setup_rss": setup_kib * 1024 if setup_kib is not None else None,
        "run_peak": hwm_kib * 1024 if hwm_kib is not None else None,
        "seconds": seconds,
    }


# --------------------------------------------------------------------------------------------
# Parent: one fresh subprocess per run


def run_child(method: str, batches: int, args: argparse.Namespace) -> dict:
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--child",
        method,
        str(batches),
        "--batch-size",
        str(args.batch_size),
        "--size",
        str(args.size),
        "--threads",
        str(args.threads),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        sys.stderr.write(done.stderr)
        raise SystemExit(f"child {method} {batches} failed with exit code {done.returncode}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def mib(value: float | None) -> str:
    return "n/a" if value is None else f"{value / MIB:.1f}"


def growth(r: dict) -> float | None:
    if r["run_peak"] is None or r["setup_rss"] is None:
        return None
    return max(r["run_peak"] - r["setup_rss"], 0)


def ratio(a: float | None, b: float | None) -> str:
    if a is None or b is None or b == 0:
        return "n/a"
    return f"{a / b:.3f}"


def print_plain(head: list[str], body: list[list[str]]) -> None:
    """Columns padded to width: the first left-aligned, the rest right-aligned."""
    widths = [max(len(x) for x in col) for col in zip(head, *body, strict=True)]
    for row in (head, *body):
        cells = [
            x.ljust(w) if i == 0 else x.rjust(w)
            for i, (x, w) in enumerate(zip(row, widths, strict=False))
        ]
        print("  ".join(cells))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches-small", type=int, default=50)
    ap.add_argument("--batches-large", type=int, default=500)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--size", type=int, default=32, help="image size (square)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--markdown", action="store_true", help="print Markdown tables")
    ap.add_argument("--child", nargs=2, metavar=("METHOD", "BATCHES"), help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.child:
        method, batches = args.child[0], int(args.child[1])
        result = child(method, batches, args.batch_size, args.size, args.threads)
        print(json.dumps(result))
        return

    counts = (args.batches_small, args.batches_large)
    results: dict[tuple[str, int], dict] = {}
    for n in counts:
        for method in METHODS:
            print(f"running {method} x {n} batches ...", file=sys.stderr, flush=True)
            results[method, n] = run_child(method, n, args)

    print(
        f"ResNet-18-shaped CNN, {args.size}x{args.size}, batch {args.batch_size}, "
        f"{args.threads} CPU threads, batches generated on the fly, one fresh process per run"
    )
    rows = [results[m, n] for n in counts for m in METHODS]
    head = ["method", "batches", "peak RSS MiB", "setup RSS MiB", "run peak MiB", "growth MiB", "s"]
    body = [
        [
            r["method"],
            str(r["batches"]),
            mib(r["peak_rss"]),
            mib(r["setup_rss"]),
            mib(r["run_peak"]),
            mib(growth(r)),
            f"{r['seconds']:.1f}",
        ]
        for r in rows
    ]
    small, large = counts
    ratios = [
        [
            f"{large}/{small} batches, {m}",
            ratio(results[m, large]["peak_rss"], results[m, small]["peak_rss"]),
            ratio(growth(results[m, large]), growth(results[m, small])),
        ]
        for m in METHODS
    ] + [
        [
            f"bnscope/floor, {n} batches",
            ratio(results["bnscope", n]["peak_rss"], results["floor", n]["peak_rss"]),
            ratio(growth(results["bnscope", n]), growth(results["floor", n])),
        ]
        for n in counts
    ]
    ratio_head = ["ratio", "peak RSS", "growth over setup"]
    if args.markdown:
        for h, b in ((head, body), (ratio_head, ratios)):
            print()
            print("| " + " | ".join(h) + " |")
            print("| " + " | ".join(["---"] + ["---:"] * (len(h) - 1)) + " |")
            for row in b:
                print("| " + " | ".join(row) + " |")
    else:
        for h, b in ((head, body), (ratio_head, ratios)):
            print()
            print_plain(h, b)


if __name__ == "__main__":
    main()
