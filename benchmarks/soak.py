"""Soak: precise, adapt, inspect and ghost over many small batches, with memory, Python objects,
file descriptors, threads and hooks sampled during the run.

Model: a small BN CNN (three conv-BN-ReLU stages, 16-32-64 channels, then pool, linear-BN1d,
linear: 4 BN layers, 10 classes). Data: ``--batches`` labelled batches of ``--batch-size``
images 3x``--size``x``--size``, generated on the fly from a seeded generator (re-iterable,
stores nothing: memory that grows with the number of batches can only come from the library).
Each op runs in a fresh subprocess (as benchmarks/memory.py does), after a warm-up run of the
same op on 20 batches (lazy imports, thread pools, allocator caches and first-call checks are
then part of the baseline, not of the run):

- precise: bnscope.precise_bn(model, data, batches=N)
- adapt:   bnscope.adapt_bn(model, data, batches=N)
- inspect: bnscope.inspect(model, data, batches=N)           (reads the data twice)
- ghost:   bnscope.ghost_analysis(model, data, sizes, batches=N)   (reads the data twice)

Sampling, through the op's ``progress(done, total)`` callback (``done`` counts batches read,
so 2N for inspect and ghost), every ``--every`` batches and at the end, after ``gc.collect()``:
RSS (``/proc/self/statm``), Python objects, open file descriptors (``/proc/self/fd``), threads
(``threading.active_count()`` and ``/proc/self/task``) and hooks (every hook dictionary of
every module of the model, plus torch's global module hooks, plus modules whose ``forward`` is
patched on the instance, plus the torch-function-mode stack). Python objects: after the
warm-up every live object is frozen (``gc.freeze()``), so ``len(gc.get_objects())`` counts
exactly the objects made since then that are still alive (and collections stay fast); objects
the garbage collector does not track (numpy arrays, strings, numbers) show in RSS only. The
time spent sampling is left out of the run's seconds.

Per op the table gives: the batches the data actually yielded and the forwards run (precise
and adapt: one per batch; inspect and ghost as their reports count them: inspect 3 per batch
when the outputs of its first pass are paired with the second, ghost 2 + number of sizes),
seconds, RSS at the first and last sample, the least-squares slope of RSS against batches read
in KiB per 1000 batches over the whole run and over its second half (for inspect and ghost:
their second pass), the new Python objects alive at the first and last sample and at most,
the new objects still alive once the op returned and its report was dropped ("left after"),
and fds, threads and hooks before (after the warm-up) and after the run.

Exit status 1 when a run leaves objects, fds, threads or hooks behind, or when the data did
not yield exactly N batches per pass.

Usage: python benchmarks/soak.py [--batches 2000] [--batch-size 8] [--size 16] [--threads 1]
       [--ops precise,adapt,inspect,ghost] [--sizes 2,4,8] [--every 50] [--check-seconds S]
       [--markdown] [--json FILE]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import threading
import time
from array import array
from collections.abc import Iterator
from pathlib import Path
from typing import Any

OPS = ("precise", "adapt", "inspect", "ghost")
KIB = 1024
WARMUP_BATCHES = 20


# --------------------------------------------------------------------------------------------
# Child: one op in its own process


class SyntheticLabelled:
    """``batches`` (images, labels) batches generated on demand from a seeded generator:
    re-iterable, every pass yields the same batches, nothing is kept. ``yielded`` counts the
    batches handed out over all passes."""

    def __init__(self, batches: int, batch_size: int, size: int, seed: int = 1) -> None:
        self.batches = batches
        self.batch_size = batch_size
        self.size = size
        self.seed = seed
        self.yielded = 0

    def __len__(self) -> int:
        return self.batches

    def __iter__(self) -> Iterator[Any]:
        import torch

        g = torch.Generator().manual_seed(self.seed)
        b, s = self.batch_size, self.size
        for _ in range(self.batches):
            x = torch.randn(b, 3, s, s, generator=g)  # per-image contrast and brightness
            contrast = 0.5 + torch.rand(b, 1, 1, 1, generator=g)
            x = x * contrast + torch.randn(b, 1, 1, 1, generator=g)
            y = torch.randint(0, 10, (b,), generator=g)
            self.yielded += 1
            yield x, y


def make_model() -> Any:
    from torch import nn

    def stage(c_in: int, c_out: int, stride: int) -> list[nn.Module]:
        return [
            nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False),
            nn.BatchNorm2d(c_out),
            nn.ReLU(inplace=True),
        ]

    return nn.Sequential(
        *stage(3, 16, 1), *stage(16, 32, 2), *stage(32, 64, 2),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(64, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 10),
    )  # fmt: skip


def rss_kib() -> int:
    """Resident set size from ``/proc/self/statm`` (pages), in KiB."""
    resident = int(Path("/proc/self/statm").read_text().split()[1])
    return resident * os.sysconf("SC_PAGE_SIZE") // KIB


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))  # the listing's own descriptor counts, always


def os_threads() -> int:
    return len(os.listdir("/proc/self/task"))


def hook_count(model: Any) -> int:
    """Hooks that can outlive a run: every hook dictionary of every module of ``model`` (forward,
    backward, state-dict, load hooks), torch's global module hooks, modules whose ``forward``
    is an instance attribute (a patched forward), and the torch-function-mode stack."""
    import torch
    import torch.nn.modules.module as module_globals

    total = 0
    for m in model.modules():
        for key, value in vars(m).items():
            if "hook" in key and isinstance(value, dict):
                total += len(value)
        total += "forward" in vars(m)
    for key in dir(module_globals):
        value = getattr(module_globals, key)
        if key.startswith("_global") and "hook" in key and isinstance(value, dict):
            total += len(value)
    return total + torch._C._len_torch_function_stack()


FIELDS = ("done", "rss_kib", "objects", "fds", "threads", "tasks", "hooks")


class Trace:
    """Samples in ``array("q")`` columns: appending makes no object that the garbage collector
    tracks, so the bookkeeping does not show in the object counts it records."""

    def __init__(self) -> None:
        self.columns = {key: array("q") for key in FIELDS}

    def record(self, model: Any, done: int) -> None:
        gc.collect()
        values = (
            done, rss_kib(), len(gc.get_objects()), open_fds(), threading.active_count(),
            os_threads(), hook_count(model),
        )  # fmt: skip
        for key, value in zip(FIELDS, values, strict=True):
            self.columns[key].append(value)

    def rows(self) -> list[dict[str, int]]:
        columns = self.columns.values()
        return [dict(zip(FIELDS, row, strict=True)) for row in zip(*columns, strict=True)]


def slope_kib_per_1000(points: list[tuple[int, int]]) -> float | None:
    """Least-squares slope of RSS (KiB) against batches read, per 1000 batches."""
    if len(points) < 3:
        return None
    n = len(points)
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    sxy = sum((x - mx) * (y - my) for x, y in points)
    return 1000 * sxy / sxx if sxx else None


def run_op(op: str, model: Any, data: SyntheticLabelled, batches: int, sizes: list[int],
           progress: Any) -> Any:  # fmt: skip
    import bnscope

    if op == "precise":
        return bnscope.precise_bn(model, data, batches=batches, progress=progress)
    if op == "adapt":
        return bnscope.adapt_bn(model, data, batches=batches, progress=progress)
    if op == "inspect":
        return bnscope.inspect(model, data, batches=batches, progress=progress)
    if op == "ghost":
        return bnscope.ghost_analysis(model, data, sizes, batches=batches, progress=progress)
    raise SystemExit(f"unknown op {op!r} (choose from {', '.join(OPS)})")


def child(op: str, args: argparse.Namespace) -> dict[str, Any]:
    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.check_seconds is not None:
        from bnscope.engine import capture

        capture.CHECK_SECONDS = args.check_seconds
    model = make_model()
    sizes = [int(s) for s in args.sizes.split(",")]
    # warm-up: the same call on a few batches (a progress callback too: with one, the ops ask
    # the data's length, which fills ABC caches once), report dropped
    run_op(op, model, SyntheticLabelled(WARMUP_BATCHES, args.batch_size, args.size, 2),
           WARMUP_BATCHES, sizes, lambda done, total: None)  # fmt: skip
    trace, edges = Trace(), Trace()  # during the run; before and after it
    sampling = [0.0]
    last = [-1]

    def progress(done: int, total: int | None) -> None:
        if done % args.every == 0 or done == total:
            t = time.perf_counter()
            trace.record(model, done)
            last[0] = done
            sampling[0] += time.perf_counter() - t

    data = SyntheticLabelled(args.batches, args.batch_size, args.size)
    gc.collect()
    gc.freeze()  # from here on gc.get_objects() lists only objects made since this point
    frozen = gc.get_freeze_count()
    edges.record(model, -1)
    t0 = time.perf_counter()
    report = run_op(op, model, data, args.batches, sizes, progress)
    seconds = time.perf_counter() - t0 - sampling[0]
    forwards = report.extra.get("forwards", report.extra.get("batches"))
    reported_batches = report.extra.get("batches")
    del report
    edges.record(model, -1)
    gc.unfreeze()
    samples = trace.rows()
    before, after = edges.rows()

    reads = last[0]
    points = [(s["done"], s["rss_kib"]) for s in samples]
    half = [(d, r) for d, r in points if d >= reads / 2]
    first, final = samples[0], samples[-1]
    return {
        "op": op,
        "batches": args.batches,
        "reads": reads,
        "yielded": data.yielded,
        "passes": data.yielded / args.batches,
        "reported_batches": reported_batches,
        "forwards": forwards,
        "seconds": seconds,
        "sampling_seconds": sampling[0],
        "samples": len(samples),
        "rss_first_kib": first["rss_kib"],
        "rss_last_kib": final["rss_kib"],
        "rss_max_kib": max(s["rss_kib"] for s in samples),
        "slope_all": slope_kib_per_1000(points),
        "slope_half": slope_kib_per_1000(half),
        "objects_first": first["objects"],
        "objects_last": final["objects"],
        "objects_max_excess": max(s["objects"] for s in samples) - first["objects"],
        "objects_frozen": frozen,
        "objects_before": before["objects"],
        "objects_after": after["objects"],
        "before": before,
        "after": after,
        "trace": samples,
    }


# --------------------------------------------------------------------------------------------
# Parent: one fresh subprocess per op


def run_child(op: str, args: argparse.Namespace) -> dict[str, Any]:
    cmd = [
        sys.executable, str(Path(__file__).resolve()), "--child", op,
        "--batches", str(args.batches), "--batch-size", str(args.batch_size),
        "--size", str(args.size), "--threads", str(args.threads), "--sizes", args.sizes,
        "--every", str(args.every),
    ]  # fmt: skip
    if args.check_seconds is not None:
        cmd += ["--check-seconds", str(args.check_seconds)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        sys.stderr.write(done.stderr)
        raise SystemExit(f"child {op} failed with exit code {done.returncode}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def fmt_slope(value: float | None) -> str:
    return "n/a" if value is None else f"{value:+.1f}"


def problems(r: dict[str, Any]) -> list[str]:
    """What a run left behind, or a data count that is not the one asked for."""
    out = []
    if r["objects_after"] > r["objects_before"]:
        out.append(f"{r['op']}: {r['objects_after'] - r['objects_before']} new objects left")
    for key in ("fds", "threads", "tasks", "hooks"):
        if r["after"][key] > r["before"][key]:
            out.append(f"{r['op']}: {key} {r['before'][key]} -> {r['after'][key]}")
    expected_passes = 2 if r["op"] in ("inspect", "ghost") else 1
    if r["yielded"] != expected_passes * r["batches"] or r["reported_batches"] != r["batches"]:
        out.append(
            f"{r['op']}: the data yielded {r['yielded']} batches, the report says "
            f"{r['reported_batches']} (expected {expected_passes} x {r['batches']})"
        )
    return out


def table(results: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    head = [
        "op", "batches read", "forwards", "s", "RSS first MiB", "RSS last MiB",
        "slope KiB/1k (all)", "slope KiB/1k (2nd half)", "new objects first -> last (max)",
        "left after", "fds", "threads", "hooks",
    ]  # fmt: skip
    body = []
    for r in results:
        b, a = r["before"], r["after"]
        body.append([
            r["op"],
            f"{r['yielded']} ({r['passes']:g} x {r['batches']})",
            str(r["forwards"]),
            f"{r['seconds']:.1f}",
            f"{r['rss_first_kib'] / KIB:.1f}",
            f"{r['rss_last_kib'] / KIB:.1f}",
            fmt_slope(r["slope_all"]),
            fmt_slope(r["slope_half"]),
            f"{r['objects_first']} -> {r['objects_last']} "
            f"({r['objects_first'] + r['objects_max_excess']})",
            str(r["objects_after"] - r["objects_before"]),
            f"{b['fds']} -> {a['fds']}",
            f"{b['threads']}/{b['tasks']} -> {a['threads']}/{a['tasks']}",
            f"{b['hooks']} -> {a['hooks']}",
        ])  # fmt: skip
    return head, body


def print_plain(head: list[str], body: list[list[str]]) -> None:
    widths = [max(len(x) for x in col) for col in zip(head, *body, strict=True)]
    for row in (head, *body):
        cells = [
            x.ljust(w) if i == 0 else x.rjust(w)
            for i, (x, w) in enumerate(zip(row, widths, strict=True))
        ]
        print("  ".join(cells))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, default=2000)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--size", type=int, default=16, help="image size (square)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--ops", default=",".join(OPS), help="comma-separated, from " + ",".join(OPS))
    ap.add_argument("--sizes", default="2,4,8", help="ghost sizes")
    ap.add_argument("--every", type=int, default=50, help="sample every this many batches read")
    ap.add_argument(
        "--check-seconds",
        type=float,
        help="bnscope.engine.capture.CHECK_SECONDS for the run (default: the library's, 5 s): "
        "merged blocks wait this long for their flag read",
    )
    ap.add_argument("--markdown", action="store_true", help="print a Markdown table")
    ap.add_argument("--json", metavar="FILE", help="also write every result (with traces) here")
    ap.add_argument("--child", metavar="OP", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.batches < 2 * args.every:
        ap.error("--batches must be at least twice --every (the slope needs samples)")

    if args.child:
        print(json.dumps(child(args.child, args)))
        return

    ops = [op.strip() for op in args.ops.split(",") if op.strip()]
    unknown = [op for op in ops if op not in OPS]
    if unknown:
        ap.error(f"unknown ops {', '.join(unknown)} (choose from {', '.join(OPS)})")
    results = []
    for op in ops:
        print(f"running {op} x {args.batches} batches ...", file=sys.stderr, flush=True)
        results.append(run_child(op, args))

    print(
        f"Small BN CNN (4 BN layers), batch {args.batch_size} of 3x{args.size}x{args.size}, "
        f"labelled, generated on the fly; ghost sizes {args.sizes}; {args.threads} CPU "
        f"thread(s); one fresh process per op, after a {WARMUP_BATCHES}-batch warm-up; "
        f"sampled every {args.every} batches read (after gc.collect())"
        + ("" if args.check_seconds is None else f"; CHECK_SECONDS {args.check_seconds:g}")
    )
    head, body = table(results)
    print()
    if args.markdown:
        print("| " + " | ".join(head) + " |")
        print("| " + " | ".join(["---"] + ["---:"] * (len(head) - 1)) + " |")
        for row in body:
            print("| " + " | ".join(row) + " |")
    else:
        print_plain(head, body)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    found = [p for r in results for p in problems(r)]
    for line in found:
        print(f"LEAK OR COUNT MISMATCH: {line}", file=sys.stderr)
    if found:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
