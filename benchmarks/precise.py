"""Precise BN speed and accuracy: bnscope vs a plain forward loop, fvcore and PyTorch.

ResNet-18-shaped CNN (benchmarks/resnet.py), 64x64 inputs, batch 32, 50 batches, CPU.
Methods run interleaved on copies of the same model over the same batches, R repetitions,
medians reported:

- floor:   a plain train-mode forward loop under no_grad (what any method must at least do)
- bnscope: bnscope.precise_bn
- swa:     torch.optim.swa_utils.update_bn
- fvcore:  fvcore.nn.update_bn_stats (only when fvcore is installed)

Accuracy is measured against a float64 reference: the exact population mean and variance of
every BN layer's input (the same float32 activations, pooled in float64). Printed per method:
max over layers and channels of |mu - mu_ref| / sigma_ref and of |log(var / var_ref)|.

Usage: python benchmarks/precise.py [--reps 5] [--batches 50] [--threads 2] [--markdown]
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from resnet import make_resnet18  # noqa: E402

import bnscope  # noqa: E402
from bnscope.stats import MomentAccumulator  # noqa: E402


def make_batches(n: int, batch: int, size: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    # images with per-image brightness/contrast variation, like real data (not pure noise)
    out = []
    for _ in range(n):
        x = torch.randn(batch, 3, size, size, generator=g)
        x = x * (0.5 + torch.rand(batch, 1, 1, 1, generator=g)) + torch.randn(
            batch, 1, 1, 1, generator=g
        )
        out.append(x)
    return out


def reference_stats(model: nn.Module, batches: list[torch.Tensor]) -> dict[str, tuple]:
    """Exact float64 pooling of every BN input with BN normalizing by batch statistics."""
    m = copy.deepcopy(model)
    m.train()
    accs: dict[str, MomentAccumulator] = {}
    handles = []
    for name, mod in m.named_modules():
        if isinstance(mod, _BatchNorm):
            accs[name] = MomentAccumulator(mod.num_features)
            mod.momentum = 0.0  # keep buffers; the forward still uses batch statistics

            def hook(module, args, _name=name):
                x = args[0]
                accs[_name].update_tensor(x, [d for d in range(x.ndim) if d != 1])

            handles.append(mod.register_forward_pre_hook(hook))
    with torch.no_grad():
        for x in batches:
            m(x)
    for h in handles:
        h.remove()
    return {k: (a.population_mean, a.population_var) for k, a in accs.items()}


def errors(model: nn.Module, ref: dict[str, tuple]) -> tuple[float, float]:
    d_mu = d_var = 0.0
    for name, mod in model.named_modules():
        if name in ref:
            mu, var = ref[name]
            rm, rv = mod.running_mean.double(), mod.running_var.double()
            d_mu = max(d_mu, float(((rm - mu).abs() / var.sqrt().clamp_min(1e-12)).max()))
            d_var = max(
                d_var, float((rv.clamp_min(1e-30) / var.clamp_min(1e-30)).log().abs().max())
            )
    return d_mu, d_var


def run_floor(model, batches):
    model.train()
    with torch.no_grad():
        for x in batches:
            model(x)


def run_bnscope(model, batches):
    bnscope.precise_bn(model, batches)


def run_swa(model, batches):
    torch.optim.swa_utils.update_bn(batches, model)


def run_fvcore(model, batches):
    from fvcore.nn import update_bn_stats

    model.train()
    update_bn_stats(model, batches, num_iters=len(batches))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--batches", type=int, default=50)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--markdown", action="store_true", help="print a Markdown table")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    model = make_resnet18()
    # a model that has trained a little: EMA buffers far from the population statistics
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    batches = make_batches(args.batches, args.batch_size, args.size, seed=1)
    ref = reference_stats(model, batches)

    methods = {
        "floor (plain forward loop)": run_floor,
        "bnscope.precise_bn": run_bnscope,
        "torch swa_utils.update_bn": run_swa,
    }
    try:
        import fvcore.nn  # noqa: F401

        methods["fvcore update_bn_stats"] = run_fvcore
    except ImportError:
        print("fvcore not installed: skipped", file=sys.stderr)

    times: dict[str, list[float]] = {k: [] for k in methods}
    accuracy: dict[str, tuple[float, float]] = {}
    run_floor(copy.deepcopy(model), batches[:2])  # warm-up
    names = list(methods)
    for rep in range(args.reps):
        # rotate the order each repetition so no method always runs first or last
        order = names[rep % len(names) :] + names[: rep % len(names)]
        for name in order:
            fn = methods[name]
            m = copy.deepcopy(model)
            t0 = time.perf_counter()
            fn(m, batches)
            times[name].append(time.perf_counter() - t0)
            accuracy[name] = errors(m, ref)
    floor = statistics.median(times["floor (plain forward loop)"])
    rows = []
    for name in methods:
        med = statistics.median(times[name])
        d_mu, d_var = accuracy[name]
        rows.append((name, med, med / floor, d_mu, d_var))
    head = (
        f"ResNet-18-shaped CNN, {args.size}x{args.size}, batch {args.batch_size}, "
        f"{args.batches} batches, {args.threads} CPU threads, median of {args.reps}"
    )
    print(head)
    if args.markdown:
        print("| method | time (s) | vs floor | max d_mu | max abs log var ratio |")
        print("| --- | ---: | ---: | ---: | ---: |")
        for name, med, ratio, d_mu, d_var in rows:
            print(f"| {name} | {med:.2f} | {ratio:.3f} | {d_mu:.2e} | {d_var:.2e} |")
    else:
        print(
            f"{'method':30s} {'time s':>8s} {'ratio':>7s} {'max d_mu':>10s} {'max|dlogvar|':>12s}"
        )
        for name, med, ratio, d_mu, d_var in rows:
            print(f"{name:30s} {med:8.2f} {ratio:7.3f} {d_mu:10.2e} {d_var:12.2e}")
    if any(not math.isfinite(r[3]) for r in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
