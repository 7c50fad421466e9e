"""Evaluation in eval mode: accuracy and loss with labels, agreement between two models.

Used to show what a statistics change does: the same inputs through the model before and after
(Precise BN, Adaptive BN). Every module's mode is restored afterwards.
"""

from __future__ import annotations

import contextlib
import itertools
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from .collect import check_batches, default_call, model_device
from .data import move_to, split_batch
from .errors import DataError


@contextlib.contextmanager
def eval_mode(*models: nn.Module) -> Iterator[None]:
    """Every module of every model in eval mode for the block; each module's own flag is
    restored afterwards (not ``model.train(flag)`` at the root, which flattens modes)."""
    flags = {m: m.training for model in models for m in model.modules()}
    try:
        for m in flags:
            m.training = False
        yield
    finally:
        for m, flag in flags.items():
            m.training = flag


@dataclass(frozen=True)
class Metrics:
    """Accuracy and mean cross-entropy over ``samples`` labelled samples (None without labels
    or when outputs are not class scores)."""

    samples: int
    accuracy: float | None
    loss: float | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Comparison:
    """Two models on the same inputs: each one's metrics, top-1 agreement, mean
    KL(p_a || p_b) of the softmax outputs, and the relative L2 difference of raw outputs."""

    a: Metrics
    b: Metrics
    has_labels: bool
    agreement: float | None
    kl: float | None
    rel_diff: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "a": self.a.to_dict(),
            "b": self.b.to_dict(),
            "has_labels": self.has_labels,
            "agreement": self.agreement,
            "kl": self.kl,
            "rel_diff": self.rel_diff,
        }


class Tally:
    """Running count of correct top-1 predictions and summed cross-entropy."""

    def __init__(self) -> None:
        self.n = 0
        self.correct = 0
        self.loss = 0.0

    def add(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        self.n += labels.numel()
        self.correct += int((logits.argmax(1) == labels).sum())
        self.loss += float(F.cross_entropy(logits.float(), labels, reduction="sum"))

    def metrics(self, samples: int, ok: bool) -> Metrics:
        if not ok or self.n == 0:
            return Metrics(samples, None, None)
        return Metrics(samples, self.correct / self.n, self.loss / self.n)


def logits_of(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    if isinstance(out, dict):
        for key in ("logits", "out", "output"):
            if isinstance(out.get(key), torch.Tensor):
                return out[key]
    raise DataError(
        f"cannot evaluate: the model returned {type(out).__name__}, not a tensor",
        "pass call= that returns the logits tensor",
    )


@contextlib.contextmanager
def forward_errors(where: str, fix: str) -> Iterator[None]:
    """A model call that fails on a batch (shape, dtype, index errors) becomes one DataError
    line: ``where: ExceptionType: first 300 characters``, with ``fix``."""
    try:
        yield
    except DataError:
        raise
    except (RuntimeError, ValueError, TypeError, IndexError) as exc:
        msg = " ".join(str(exc).split())[:300]
        raise DataError(f"{where}: {type(exc).__name__}: {msg}", fix) from exc


def labelled_batches(
    data: Iterable[Any], batches: int | None, device: torch.device | str
) -> Iterator[tuple[Any, Any]]:
    """The first ``batches`` batches of ``data`` (all when None) on ``device``, each with its
    labels (None without)."""
    for batch in itertools.islice(data, batches):
        batch = move_to(batch, device)
        yield batch, split_batch(batch)[1]


def batch_kind(ref: torch.Tensor, labels: Any) -> tuple[int, bool, bool]:
    """For one batch's reference output: (samples, whether outputs are [N, K] class scores,
    whether ``labels`` are usable integer class labels for them)."""
    n = ref.shape[0] if ref.ndim else 1
    is_cls = ref.ndim == 2 and ref.shape[1] > 1
    ok_labels = (
        isinstance(labels, torch.Tensor)
        and is_cls
        and labels.ndim == 1
        and not labels.is_floating_point()
        and labels.shape[0] == n
    )
    return n, is_cls, ok_labels


def agreement_and_kl(ref: torch.Tensor, out: torch.Tensor) -> tuple[int, float]:
    """For [N, K] class scores: the number of equal top-1 predictions and the summed
    KL(softmax(ref) || softmax(out)) over the N samples (float64)."""
    log_ref = F.log_softmax(ref.double(), 1)
    log_out = F.log_softmax(out.double(), 1)
    agree = int((ref.argmax(1) == out.argmax(1)).sum())
    return agree, float((log_ref.exp() * (log_ref - log_out)).sum())


@contextlib.contextmanager
def batch_stats_mode(model: nn.Module) -> Iterator[None]:
    """Every module in eval mode except BN layers, which normalize with the statistics of each
    test batch ("test-time batch statistics", the norm baseline of Schneider et al. 2020 and
    TENT). Running statistics, ``num_batches_tracked`` and every mode are restored on exit."""
    from .capture import is_batchnorm

    flags = {m: m.training for m in model.modules()}
    saved = {
        m: {n: b.detach().clone() for n, b in m.named_buffers(recurse=False)}
        for m in model.modules()
        if is_batchnorm(m)
    }
    try:
        for m in flags:
            m.training = m in saved
        yield
    finally:
        with torch.no_grad():
            for m, buffers in saved.items():
                for n, value in buffers.items():
                    getattr(m, n).copy_(value)
        for m, flag in flags.items():
            m.training = flag


@dataclass(frozen=True)
class Evaluation:
    """Several variants of a model on the same inputs. ``metrics`` per variant; ``agreement``,
    ``kl`` and ``rel_diff`` of every other variant against the first one (the reference)."""

    metrics: dict[str, Metrics]
    has_labels: bool
    agreement: dict[str, float | None]
    kl: dict[str, float | None]
    rel_diff: dict[str, float]

    def to_dict(self) -> dict[str, Any]:
        return {
            "metrics": {k: v.to_dict() for k, v in self.metrics.items()},
            "has_labels": self.has_labels,
            "agreement": dict(self.agreement),
            "kl": dict(self.kl),
            "rel_diff": dict(self.rel_diff),
        }


def evaluate_models(
    models: dict[str, nn.Module],
    data: Iterable[Any],
    *,
    modes: dict[str, str] | None = None,
    batches: int | None = None,
    call: Callable[[nn.Module, Any], Any] | None = None,
    device: torch.device | str | None = None,
) -> Evaluation:
    """Run every model on the same batches, each in its mode: ``"eval"`` (running statistics,
    the default) or ``"batch"`` (BN with test-batch statistics, see :func:`batch_stats_mode`).

    With integer labels and [N, K] outputs: accuracy and cross-entropy of each. Against the
    first model: top-1 agreement and mean KL(softmax first || softmax other) for [N, K] outputs,
    and ||out_first - out_other|| / ||out_first|| for any tensor output.
    """
    check_batches(batches)
    if not models:
        raise ValueError("no models to evaluate")
    call = call or default_call
    modes = modes or {}
    names = list(models)
    first = names[0]
    dev = torch.device(device) if device is not None else model_device(models[first])
    tallies = {k: Tally() for k in names}
    agree = {k: 0 for k in names}
    kl_sum = {k: 0.0 for k in names}
    diff2 = {k: 0.0 for k in names}
    ref2 = 0.0
    classes = labelled = True
    samples = done = 0
    with contextlib.ExitStack() as stack:
        stack.enter_context(eval_mode(*[m for k, m in models.items() if modes.get(k) != "batch"]))
        for k, m in models.items():
            if modes.get(k) == "batch":
                stack.enter_context(batch_stats_mode(m))
        stack.enter_context(torch.no_grad())
        for batch, labels in labelled_batches(data, batches, dev):
            outs = {}
            for k in names:
                with forward_errors(
                    f"evaluation failed on batch {done}",
                    "check that --eval-data fits the model (channels, image size, "
                    "--input-key, a last batch of 1 with batch statistics)",
                ):
                    outs[k] = logits_of(call(models[k], batch))
            ref = outs[first]
            ref2 += float(ref.double().pow(2).sum())
            n, is_cls, ok_labels = batch_kind(ref, labels)
            classes = classes and is_cls
            samples += n
            labelled = labelled and ok_labels
            for k in names:
                out = outs[k]
                diff2[k] += float((ref.double() - out.double()).pow(2).sum())
                if is_cls:
                    a, kl = agreement_and_kl(ref, out)
                    agree[k] += a
                    kl_sum[k] += kl
                if ok_labels:
                    tallies[k].add(out, labels)
            done += 1
    if done == 0:
        raise DataError("the evaluation data yielded no batches", "check --eval-data")
    return Evaluation(
        metrics={k: tallies[k].metrics(samples, labelled) for k in names},
        has_labels=labelled,
        agreement={k: agree[k] / samples if classes and samples else None for k in names},
        kl={k: kl_sum[k] / samples if classes and samples else None for k in names},
        rel_diff={
            k: math.sqrt(diff2[k] / ref2) if ref2 > 0 else math.sqrt(diff2[k]) for k in names
        },
    )


def compare_models(
    model_a: nn.Module,
    model_b: nn.Module,
    data: Iterable[Any],
    *,
    batches: int | None = None,
    call: Callable[[nn.Module, Any], Any] | None = None,
    device: torch.device | str | None = None,
) -> Comparison:
    """Both models in eval mode on the same batches (see :func:`evaluate_models`)."""
    ev = evaluate_models(
        {"a": model_a, "b": model_b}, data, batches=batches, call=call, device=device
    )
    return Comparison(
        a=ev.metrics["a"],
        b=ev.metrics["b"],
        has_labels=ev.has_labels,
        agreement=ev.agreement["b"],
        kl=ev.kl["b"],
        rel_diff=ev.rel_diff["b"],
    )
