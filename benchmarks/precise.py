"""Precise BN speed, exactness and host overhead: bnscope vs a plain forward loop, PyTorch's
swa_utils.update_bn and fvcore's equal-weight average.

Model: the ResNet-18-shaped CNN (CIFAR stem, default 32x32 inputs) or the ResNet-50-shaped CNN
(ImageNet stem, default 224x224) of benchmarks/resnet.py, with slightly perturbed weights (a
model that has trained a little: its running statistics are far from the population's).
Methods run on deep copies of the same model over the same batches, interleaved with the order
rotated each repetition; medians of --reps are reported:

- floor:    a plain train-mode forward loop under no_grad (what any method must at least do)
- bnscope:  bnscope.precise_bn (exact float64 population statistics)
- swa:      torch.optim.swa_utils.update_bn (cumulative average of batch statistics)
- fvcore:   fvcore.nn.update_bn_stats when fvcore is installed, else the same algorithm inline:
            for batch i every BN layer has momentum 1/(i+1), so the buffers end as the
            equal-weight average of the batch means and of the unbiased batch variances

Every method runs under the same autocast (--amp) and memory format (--channels-last): bnscope
gets amp= and channels_last=, the others run their forwards under torch.autocast, on model copies
and batches converted to channels-last beforehand (outside the timing, as bnscope finds them
already converted). On CUDA the batches are made on the device before timing, every method runs
once first as a warm-up, and the device is synchronized before and after each timed run.

Exactness against a float64 reference: the exact population mean and biased variance of every BN
layer's input over all batches (BN normalizing with batch statistics, train mode, momentum 0,
same autocast and memory format, inputs upcast to float64 in forward pre-hooks and pooled with
Chan et al.'s merge). Per method: max over layers and channels of |mu - mu_ref| / sigma_ref and
of |log(var / var_ref)|.

Host overhead (always on the CPU, with torch.profiler, on a small model: the ResNet-18-shaped net
with width 16, 16x16 inputs, batch 8): profiler events (nested ones included) that
bnscope.precise_bn adds to a plain forward loop, per BN call in steady state (slope between 68
and 132 batches: their difference is one block of bnscope.engine.capture.ROWS = 64 calls per
layer, so the slope includes the block merges), the fixed extra events, and scalar reads: profiler
``aten::_local_scalar_dense`` events and bnscope.engine.sync.READS (read points) per call, at
both batch counts (equal: no read per batch). bnscope's timed flag checks (one read point at most
every bnscope.engine.capture.CHECK_SECONDS) are switched off for these counts so that they do not
depend on the machine's speed. With --device cuda also: device synchronizations of one call over 10
batches, counted with torch.cuda.set_sync_debug_mode("warn"), for bnscope and the plain loop.

Exit status 1 when any reported figure is NaN.

Usage: python benchmarks/precise.py [--device cpu|cuda] [--model resnet18|resnet50]
       [--amp none|bf16|fp16] [--channels-last] [--size N] [--batch-size 32] [--batches 50]
       [--reps 5] [--threads 2] [--markdown] [--quick]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import math
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from resnet import make_resnet18, make_resnet50  # noqa: E402

import bnscope  # noqa: E402
import bnscope.engine.capture  # noqa: E402
import bnscope.engine.sync  # noqa: E402

F64 = torch.float64
AMP = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}
FLOOR = "plain train-mode forward loop"
BNSCOPE = "bnscope.precise_bn"
SWA = "torch swa_utils.update_bn"
FVCORE = "equal-weight average (fvcore's algorithm)"
#: batch counts of the host-overhead slope: one block of bnscope.engine.capture.ROWS calls apart
OVERHEAD_BATCHES = (68, 132)


@dataclass(frozen=True)
class Setup:
    """How every method runs the model."""

    device: torch.device
    amp: str  # "none", "bf16" or "fp16"
    channels_last: bool

    def autocast(self) -> contextlib.AbstractContextManager:
        dtype = AMP[self.amp]
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=dtype)

    def model(self, model: nn.Module) -> nn.Module:
        """A deep copy of ``model`` on the device, in the memory format."""
        m = copy.deepcopy(model).to(self.device)
        return m.to(memory_format=torch.channels_last) if self.channels_last else m

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def make_batches(
    n: int, batch: int, size: int, seed: int, device: torch.device, channels_last: bool = False
) -> list[torch.Tensor]:
    """Images with per-image brightness/contrast variation, like real data (not pure noise),
    made on ``device`` (no host-to-device copy inside any timed region)."""
    g = torch.Generator(device=device).manual_seed(seed)
    out = []
    for _ in range(n):
        x = torch.randn(batch, 3, size, size, generator=g, device=device)
        scale = 0.5 + torch.rand(batch, 1, 1, 1, generator=g, device=device)
        x = x * scale + torch.randn(batch, 1, 1, 1, generator=g, device=device)
        out.append(x.contiguous(memory_format=torch.channels_last) if channels_last else x)
    return out


def bn_layers(model: nn.Module) -> list[tuple[str, _BatchNorm]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, _BatchNorm)]


# --------------------------------------------------------------------------------------------
# The methods: each takes (model copy on the device, batches on the device, setup)

Method = Callable[[nn.Module, list[torch.Tensor], "Setup"], None]


def run_floor(model: nn.Module, batches: list[torch.Tensor], setup: Setup) -> None:
    model.train()
    with torch.no_grad(), setup.autocast():
        for x in batches:
            model(x)


def run_bnscope(model: nn.Module, batches: list[torch.Tensor], setup: Setup) -> None:
    amp = None if setup.amp == "none" else setup.amp
    bnscope.precise_bn(
        model, batches, device=setup.device, amp=amp, channels_last=setup.channels_last
    )


def run_swa(model: nn.Module, batches: list[torch.Tensor], setup: Setup) -> None:
    with setup.autocast():
        torch.optim.swa_utils.update_bn(batches, model)


def run_fvcore(model: nn.Module, batches: list[torch.Tensor], setup: Setup) -> None:
    from fvcore.nn import update_bn_stats

    model.train()
    with setup.autocast():
        update_bn_stats(model, batches, num_iters=len(batches))


def run_equal_weight(model: nn.Module, batches: list[torch.Tensor], setup: Setup) -> None:
    """fvcore's update_bn_stats algorithm: batch i enters every BN layer's buffers with
    momentum 1/(i+1), so they end as the plain average of the batch means and of the unbiased
    batch variances. Momentum is restored afterwards."""
    layers = [m for _, m in bn_layers(model)]
    saved = [m.momentum for m in layers]
    model.train()
    try:
        with torch.no_grad(), setup.autocast():
            for i, x in enumerate(batches):
                for m in layers:
                    m.momentum = 1.0 / (i + 1)
                model(x)
    finally:
        for m, momentum in zip(layers, saved, strict=True):
            m.momentum = momentum


def fvcore_method() -> Method:
    try:
        import fvcore.nn  # noqa: F401
    except ImportError:
        print("fvcore not installed: its algorithm runs inline", file=sys.stderr)
        return run_equal_weight
    return run_fvcore


# --------------------------------------------------------------------------------------------
# Exactness


class Pooled:
    """Per-channel count, mean and M2 in float64 on the device (Chan et al. 1979 merge)."""

    def __init__(self) -> None:
        self.count = 0
        self.mean: torch.Tensor | None = None
        self.m2: torch.Tensor | None = None

    def add(self, x: torch.Tensor) -> None:
        dims = [d for d in range(x.ndim) if d != 1]
        n = x.numel() // x.shape[1]
        var, mean = torch.var_mean(x.detach().to(F64), dim=dims, correction=0)
        if self.mean is None or self.m2 is None:
            self.count, self.mean, self.m2 = n, mean, var * n
            return
        total = self.count + n
        delta = mean - self.mean
        self.mean = self.mean + delta * (n / total)
        self.m2 = self.m2 + var * n + delta * delta * (self.count * n / total)
        self.count = total


def reference_stats(
    model: nn.Module, batches: list[torch.Tensor], setup: Setup
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Float64 population (mean, biased var) of every BN layer's input, BN normalizing with
    batch statistics (train mode, momentum 0 so the buffers stay), same autocast and format."""
    m = setup.model(model)
    m.train()
    pooled: dict[str, Pooled] = {}
    for name, mod in bn_layers(m):
        pooled[name] = Pooled()
        mod.momentum = 0.0

        def hook(module, args, _acc=pooled[name]):
            _acc.add(args[0])

        mod.register_forward_pre_hook(hook)
    with torch.no_grad(), setup.autocast():
        for x in batches:
            m(x)
    return {k: (p.mean, p.m2 / p.count) for k, p in pooled.items() if p.mean is not None}


def errors(model: nn.Module, ref: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> tuple:
    """(max |mu - mu_ref| / sigma_ref, max |log(var / var_ref)|) over layers and channels."""
    d_mu, d_var = [], []
    for name, mod in bn_layers(model):
        if name in ref:
            mu, var = ref[name]
            rm, rv = mod.running_mean.to(F64), mod.running_var.to(F64)
            d_mu.append(((rm - mu).abs() / var.sqrt().clamp_min(1e-12)).max())
            d_var.append((rv.clamp_min(1e-30) / var.clamp_min(1e-30)).log().abs().max())
    return float(torch.stack(d_mu).max()), float(torch.stack(d_var).max())


# --------------------------------------------------------------------------------------------
# Host overhead


def profile_counts(
    fn: Method, model: nn.Module, batches: list[torch.Tensor], setup: Setup
) -> tuple[int, int, int]:
    """(profiler events, aten::_local_scalar_dense events, bnscope.engine.sync.READS made) of one
    call of ``fn`` on a fresh copy of ``model``, after an unprofiled warm-up."""
    m = setup.model(model)
    fn(m, batches[:2], setup)
    reads = bnscope.engine.sync.READS
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn(m, batches, setup)
    reads = bnscope.engine.sync.READS - reads
    events = prof.events()
    scalar = sum(1 for e in events if e.name == "aten::_local_scalar_dense")
    return len(events), scalar, reads


def host_overhead() -> dict[str, float]:
    """Profiler events and reads that bnscope adds per BN call and in all (CPU, small model)."""
    cpu = Setup(torch.device("cpu"), "none", False)
    torch.manual_seed(0)
    model = make_resnet18(num_classes=10, width=16)
    layers = len(bn_layers(model))
    n1, n2 = OVERHEAD_BATCHES
    batches = make_batches(n2, 8, 16, seed=2, device=cpu.device)
    counts = {}
    saved = bnscope.engine.capture.CHECK_SECONDS
    bnscope.engine.capture.CHECK_SECONDS = math.inf  # no timed checks: counts independent of speed
    try:
        for label, fn in (("plain", run_floor), ("bnscope", run_bnscope)):
            for n in (n1, n2):
                counts[label, n] = profile_counts(fn, model, batches[:n], cpu)
    finally:
        bnscope.engine.capture.CHECK_SECONDS = saved
    extra1 = counts["bnscope", n1][0] - counts["plain", n1][0]
    extra2 = counts["bnscope", n2][0] - counts["plain", n2][0]
    per_call = (extra2 - extra1) / ((n2 - n1) * layers)
    return {
        "layers": layers,
        "plain_per_batch": (counts["plain", n2][0] - counts["plain", n1][0]) / (n2 - n1),
        "per_call": per_call,
        "extra_n1": extra1,
        "extra_n2": extra2,
        "fixed": extra1 - per_call * layers * n1,
        "scalar_n1": counts["bnscope", n1][1],
        "scalar_n2": counts["bnscope", n2][1],
        "scalar_plain": counts["plain", n2][1],
        "reads_n1": counts["bnscope", n1][2],
        "reads_n2": counts["bnscope", n2][2],
    }


def cuda_syncs(model: nn.Module, batches: list[torch.Tensor], setup: Setup) -> dict[str, int]:
    """Device synchronizations of one call over the batches: bnscope and the plain loop."""
    out = {}
    for label, fn in (("plain", run_floor), ("bnscope", run_bnscope)):
        m = setup.model(model)
        fn(m, batches[:2], setup)  # warm-up
        setup.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                fn(m, batches, setup)
            finally:
                torch.cuda.set_sync_debug_mode(0)
        out[label] = sum(1 for w in caught if "synchroniz" in str(w.message).lower())
    return out


# --------------------------------------------------------------------------------------------


def table(markdown: bool, head: list[str], rows: list[list[str]]) -> None:
    """A Markdown table, or plain columns (first left-aligned, the others right-aligned)."""
    if markdown:
        print("| " + " | ".join(head) + " |")
        print("| --- |" + " ---: |" * (len(head) - 1))
        for r in rows:
            print("| " + " | ".join(r) + " |")
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
    ap.add_argument("--batches", type=int, default=50)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads with --device cpu (default 2; 1 with --quick)",
    )
    ap.add_argument("--markdown", action="store_true", help="print Markdown tables")
    ap.add_argument("--quick", action="store_true", help="tiny settings (a smoke test)")
    args = ap.parse_args()
    if args.threads is None:
        args.threads = 1 if args.quick else 2
    if args.quick:
        args.size, args.batch_size, args.batches, args.reps = 16, 16, 6, 2
    size = args.size or (224 if args.model == "resnet50" else 32)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if cuda and not torch.cuda.is_available():
        sys.exit("--device cuda: CUDA is not available here")
    if cuda and device.index is None:  # "cuda" -> "cuda:N": the very device the tensors report
        device = torch.device("cuda", torch.cuda.current_device())
    setup = Setup(device, args.amp, args.channels_last)
    if not cuda:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    model = make_resnet50() if args.model == "resnet50" else make_resnet18()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    batches = make_batches(args.batches, args.batch_size, size, 1, setup.device, args.channels_last)
    ref = reference_stats(model, batches, setup)

    methods = {FLOOR: run_floor, BNSCOPE: run_bnscope, SWA: run_swa, FVCORE: fvcore_method()}
    names = list(methods)
    times: dict[str, list[float]] = {k: [] for k in names}
    accuracy: dict[str, tuple[float, float]] = {}
    for name in names:  # warm-up: every method once (CUDA kernels, allocator, CPU caches)
        methods[name](setup.model(model), batches if cuda else batches[:2], setup)
    for rep in range(args.reps):
        # rotate the order each repetition so no method always runs first or last
        order = names[rep % len(names) :] + names[: rep % len(names)]
        for name in order:
            m = setup.model(model)
            setup.synchronize()
            t0 = time.perf_counter()
            methods[name](m, batches, setup)
            setup.synchronize()
            times[name].append(time.perf_counter() - t0)
            accuracy[name] = errors(m, ref)
            del m
    floor = statistics.median(times[FLOOR])
    figures: list[float] = []
    rows = []
    for name in names:
        med = statistics.median(times[name])
        d_mu, d_var = accuracy[name]
        figures += [med, med / floor, d_mu, d_var]
        rows.append([name, f"{med:.3f}", f"{med / floor:.3f}", f"{d_mu:.2e}", f"{d_var:.2e}"])

    where = torch.cuda.get_device_name(setup.device) if cuda else f"{args.threads} CPU threads"
    label = "ResNet-50-shaped" if args.model == "resnet50" else "ResNet-18-shaped"
    fmt = ", channels-last" if args.channels_last else ""
    precision = "float32" if args.amp == "none" else f"autocast {args.amp}"
    if cuda and args.amp == "none" and torch.backends.cudnn.allow_tf32:
        precision += " (cuDNN TF32 allowed)"
    print(
        f"{label} CNN, {size}x{size}, batch {args.batch_size}, {args.batches} batches, "
        f"{precision}{fmt}, {where}, median of {args.reps}, torch {torch.__version__}"
    )
    if args.markdown:
        print()
    head = ["method", "time (s)", "vs floor", "max d_mu", "max abs log var ratio"]
    table(args.markdown, head, rows)

    ov = host_overhead()
    n1, n2 = OVERHEAD_BATCHES
    figures += [float(v) for v in ov.values()]
    print()
    print(
        f"Host overhead of bnscope.precise_bn over the plain loop (CPU, torch.profiler, "
        f"ResNet-18-shaped width 16, 16x16, batch 8, {ov['layers']} BN layers; the plain loop "
        f"makes {ov['plain_per_batch']:.0f} events per batch)"
    )
    if args.markdown:
        print()
    rows = [
        ["extra profiler events per BN call (slope)", f"{ov['per_call']:.3f}"],
        ["fixed extra profiler events (intercept)", f"{ov['fixed']:.0f}"],
        [f"extra profiler events at {n1} / {n2} batches", f"{ov['extra_n1']} / {ov['extra_n2']}"],
        [
            f"aten::_local_scalar_dense at {n1} / {n2} batches (plain: {ov['scalar_plain']})",
            f"{ov['scalar_n1']} / {ov['scalar_n2']}",
        ],
        [
            f"bnscope.engine.sync.READS per call at {n1} / {n2} batches",
            f"{ov['reads_n1']} / {ov['reads_n2']}",
        ],
    ]
    if cuda:
        n = min(10, len(batches))
        syncs = cuda_syncs(model, batches[:n], setup)
        figures += [float(v) for v in syncs.values()]
        rows.append(
            [
                f"CUDA synchronizations, one call over {n} batches (bnscope / plain loop)",
                f"{syncs['bnscope']} / {syncs['plain']}",
            ]
        )
    table(args.markdown, ["figure", "value"], rows)
    if ov["scalar_n1"] != ov["scalar_n2"] or ov["reads_n1"] != ov["reads_n2"]:
        print("NOTE: the number of reads grows with the number of batches")
    if any(math.isnan(f) for f in figures):
        print("a reported figure is NaN", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
