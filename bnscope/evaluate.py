"""Evaluation in eval mode: accuracy and loss with labels, agreement between two models.

Used to show what a statistics change does: the same inputs through the model before and after
(Precise BN, Adaptive BN). Every module's mode is restored afterwards.
"""

from __future__ import annotations

import contextlib
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


class _Tally:
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


def _logits(out: Any) -> torch.Tensor:
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


def compare_models(
    model_a: nn.Module,
    model_b: nn.Module,
    data: Iterable[Any],
    *,
    batches: int | None = None,
    call: Callable[[nn.Module, Any], Any] | None = None,
    device: torch.device | str | None = None,
) -> Comparison:
    """Run both models in eval mode on the same batches and compare them.

    With integer labels and [N, K] outputs: accuracy and cross-entropy of each. Always: top-1
    agreement and KL(softmax a || softmax b) for [N, K] outputs, and
    ||out_a - out_b|| / ||out_a|| for any tensor output.
    """
    check_batches(batches)
    call = call or default_call
    dev = torch.device(device) if device is not None else model_device(model_a)
    ta, tb = _Tally(), _Tally()
    classes = True
    labelled = True
    samples = agree = 0
    kl_sum = 0.0
    diff2 = ref2 = 0.0
    done = 0
    with eval_mode(model_a, model_b), torch.no_grad():
        for batch in data:
            if batches is not None and done >= batches:
                break
            batch = move_to(batch, dev)
            _, labels = split_batch(batch)
            try:
                out_a = _logits(call(model_a, batch))
                out_b = _logits(call(model_b, batch))
            except DataError:
                raise
            except (RuntimeError, ValueError, TypeError, IndexError) as exc:
                msg = " ".join(str(exc).split())[:300]
                raise DataError(
                    f"evaluation failed on batch {done}: {type(exc).__name__}: {msg}",
                    "check that --eval-data fits the model (channels, image size, --input-key)",
                ) from exc
            diff2 += float((out_a.double() - out_b.double()).pow(2).sum())
            ref2 += float(out_a.double().pow(2).sum())
            is_cls = out_a.ndim == 2 and out_a.shape[1] > 1
            classes = classes and is_cls
            n = out_a.shape[0] if out_a.ndim else 1
            samples += n
            if is_cls:
                agree += int((out_a.argmax(1) == out_b.argmax(1)).sum())
                la, lb = F.log_softmax(out_a.double(), 1), F.log_softmax(out_b.double(), 1)
                kl_sum += float((la.exp() * (la - lb)).sum())
            ok_labels = (
                labels is not None
                and is_cls
                and labels.ndim == 1
                and not labels.is_floating_point()
                and labels.shape[0] == n
            )
            labelled = labelled and ok_labels
            if ok_labels:
                ta.add(out_a, labels)
                tb.add(out_b, labels)
            done += 1
    if done == 0:
        raise DataError("the evaluation data yielded no batches", "check --eval-data")
    return Comparison(
        a=ta.metrics(samples, labelled),
        b=tb.metrics(samples, labelled),
        has_labels=labelled,
        agreement=agree / samples if classes and samples else None,
        kl=kl_sum / samples if classes and samples else None,
        rel_diff=math.sqrt(diff2 / ref2) if ref2 > 0 else math.sqrt(diff2),
    )
