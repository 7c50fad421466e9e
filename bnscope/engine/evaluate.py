"""Evaluation in eval mode: accuracy and loss with labels, agreement between two models.

Used to show what a statistics change does: the same inputs through the model before and after
(Precise BN, Adaptive BN). Every module's mode is restored afterwards.
"""

from __future__ import annotations

import contextlib
import itertools
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from ..errors import DataError
from ..extras import ComparisonDict, MetricsDict, ReportMetrics, VariantMetrics
from . import sync
from .collect import check_batches
from .runner import Runner, make_runner, placed

F64 = torch.float64
#: the target cross-entropy leaves out: where labels outside the outputs' classes are put
_IGNORE = -100


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

    def to_dict(self) -> MetricsDict:
        return {"samples": self.samples, "accuracy": self.accuracy, "loss": self.loss}


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

    def to_dict(self) -> ComparisonDict:
        return {
            "a": self.a.to_dict(),
            "b": self.b.to_dict(),
            "has_labels": self.has_labels,
            "agreement": self.agreement,
            "kl": self.kl,
            "rel_diff": self.rel_diff,
        }


class Scores:
    """What one variant's outputs scored so far, kept on the device (no host read per batch):
    top-1 correct and summed cross-entropy against labels, top-1 agreement and summed
    KL(softmax(ref) || softmax(out)) against a reference output, the summed squared
    difference from the reference (with the reference's own squared sum), and the number of
    labels that are not class indices of the outputs (``bad``: below 0 or at least K, checked
    by :func:`check_label_range` once the sums are read). ``labelled`` (host) counts the
    labelled samples and ``outputs`` (host) the class scores K of the last labelled batch.
    :func:`read_scores` reads any number of them at once."""

    FIELDS = ("correct", "loss", "agree", "kl", "diff2", "ref2", "bad")

    def __init__(self) -> None:
        self.labelled = 0
        self.outputs: int | None = None
        self.sums: torch.Tensor | None = None
        self.host: dict[str, float] | None = None

    def add(
        self,
        out: torch.Tensor,
        *,
        labels: torch.Tensor | None = None,
        ref: torch.Tensor | None = None,
    ) -> None:
        """One batch: ``labels`` when they are usable class labels for ``out`` ([N, K]),
        ``ref`` the reference output of the same inputs (agreement and KL for [N, K] scores)."""
        zero = torch.zeros((), dtype=F64, device=out.device)
        correct = loss = agree = kl = diff2 = ref2 = bad = zero
        if labels is not None:
            self.labelled += labels.numel()
            self.outputs = out.shape[1]
            # a label outside 0..K-1 is counted, never indexed: cross_entropy would raise on
            # the CPU and stop the process with a device-side assert on CUDA
            outside = (labels < 0) | (labels >= out.shape[1])
            correct = (out.argmax(1) == labels).sum().to(F64)
            target = labels.long().masked_fill(outside, _IGNORE)
            loss = F.cross_entropy(
                out.float(), target, reduction="sum", ignore_index=_IGNORE
            ).to(F64)
            bad = outside.sum().to(F64)
        if ref is not None:
            diff2 = (ref.double() - out.double()).square().sum()
            ref2 = ref.double().square().sum()
            if ref.ndim == 2 and ref.shape[1] > 1:
                agree, kl = agreement_and_kl(ref, out)
        part = torch.stack([correct, loss, agree, kl, diff2, ref2, bad])
        self.sums = part if self.sums is None else self.sums.add_(part)
        self.host = None

    def value(self, key: str) -> float:
        """A sum, after :func:`read_scores` (0 when nothing was added)."""
        if self.host is None:
            read_scores([self])
        assert self.host is not None
        return self.host[key]

    def metrics(self, samples: int, ok: bool) -> Metrics:
        if not ok or self.labelled == 0:
            return Metrics(samples, None, None)
        return Metrics(
            samples, self.value("correct") / self.labelled, self.value("loss") / self.labelled
        )


def read_scores(scores: Iterable[Scores]) -> None:
    """Read the sums of every :class:`Scores` in one transfer."""
    todo = [s for s in scores if s.sums is not None]
    if not todo:
        for s in scores:
            s.host = dict.fromkeys(Scores.FIELDS, 0.0)
        return
    host = sync.fetch([s.sums for s in todo if s.sums is not None])
    for s, values in zip(todo, host, strict=True):
        s.host = dict(zip(Scores.FIELDS, values.tolist(), strict=True))
    for s in scores:
        if s.sums is None:
            s.host = dict.fromkeys(Scores.FIELDS, 0.0)


def logits_of(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    if isinstance(out, dict):
        for key in ("logits", "out", "output"):
            value = out.get(key)
            if isinstance(value, torch.Tensor):
                return value
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
    data: Iterable[Any], batches: int | None, runner: Runner
) -> Iterator[tuple[Any, Any]]:
    """The first ``batches`` batches of ``data`` (all when None) prepared by ``runner`` (on its
    device and memory format), each with its labels (None without)."""
    for batch in itertools.islice(data, batches):
        batch = runner.prepare(batch)
        yield batch, runner.labels(batch)


def batch_kind(
    ref: torch.Tensor, labels: Any, num_classes: int | None = None, role: str = "data"
) -> tuple[int, bool, bool]:
    """For one batch's reference output: (samples, whether outputs are [N, K] class scores,
    whether ``labels`` are usable integer class labels for them).

    ``num_classes`` is how many classes the labels index when the data knows it but not which
    of the model's outputs they are (an image folder's class folders, numbered in name order):
    more than K is a :class:`DataError` naming ``role`` (the labels cannot be the model's
    classes), fewer and the labels are not used (which K - ``num_classes`` classes are missing
    is unknown, so label i need not be output i). Checked on the host, from shapes only."""
    n = ref.shape[0] if ref.ndim else 1
    is_cls = ref.ndim == 2 and ref.shape[1] > 1
    ok_labels = (
        isinstance(labels, torch.Tensor)
        and is_cls
        and labels.ndim == 1
        and not labels.is_floating_point()
        and not labels.is_complex()
        and labels.shape[0] == n
    )
    if ok_labels and num_classes is not None:
        k = ref.shape[1]
        if num_classes > k:
            raise DataError(
                f"{role}= has labels of {num_classes} classes but the model outputs {k} class "
                "scores",
                f"point {role}= at data of the model's classes (at most {k} class folders, "
                "named as in training), or check model= and model_kwargs=",
            )
        ok_labels = num_classes == k
    return n, is_cls, ok_labels


def check_label_range(scores: Scores, role: str = "data") -> None:
    """After :func:`read_scores`: a :class:`DataError` naming ``role`` when some label was not
    a class index of the outputs (below 0, or K or more for K class scores)."""
    bad = int(scores.value("bad"))
    if not bad:
        return
    k = scores.outputs
    classes = f"the model's {k} classes (0 to {k - 1})" if k else "the model's classes"
    raise DataError(
        f"{role}= has labels outside {classes}: {bad} of {scores.labelled} labels",
        f"labels must be class indices of the model's outputs: check {role}= (and its class "
        "folders) against model= and model_kwargs=",
    )


def agreement_and_kl(ref: torch.Tensor, out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For [N, K] class scores, as float64 device scalars: the number of equal top-1
    predictions and the summed KL(softmax(ref) || softmax(out)) over the N samples."""
    log_ref = F.log_softmax(ref.double(), 1)
    log_out = F.log_softmax(out.double(), 1)
    agree = (ref.argmax(1) == out.argmax(1)).sum().to(F64)
    return agree, (log_ref.exp() * (log_ref - log_out)).sum()


@contextlib.contextmanager
def batch_stats_mode(*models: nn.Module) -> Iterator[None]:
    """Every module in eval mode except BN layers, which normalize with the statistics of each
    test batch ("test-time batch statistics", the norm baseline of Schneider et al. 2020 and
    TENT). The BN layers' buffers are swapped for copies for the block, so their own tensors
    are never written; every buffer and mode is as before on exit."""
    from .capture import is_batchnorm

    flags = {m: m.training for model in models for m in model.modules()}
    swapped: list[tuple[nn.Module, str, torch.Tensor]] = []
    try:
        for m in flags:
            bn = is_batchnorm(m)
            m.training = bn
            if bn:
                for name, b in list(m._buffers.items()):
                    if b is not None:
                        swapped.append((m, name, b))
                        m._buffers[name] = b.detach().clone()
        yield
    finally:
        for m, name, b in swapped:
            m._buffers[name] = b
        for m, flag in flags.items():
            m.training = flag


def prior_model(model: nn.Module, prior: float) -> nn.Module:
    """A copy of ``model`` whose BN layers are :class:`bnscope.nn.PriorBatchNorm` with ``prior``
    pseudo samples (test-time statistics mixed with the stored ones, Schneider et al. 2020),
    sharing every parameter and buffer tensor with ``model``: it costs no memory for weights,
    and in eval mode it never writes them (the module only reads its buffers)."""
    import copy

    from ..nn import convert_to_prior_bn

    shared: dict[int, Any] = {id(t): t for t in (*model.parameters(), *model.buffers())}
    return convert_to_prior_bn(copy.deepcopy(model, shared), prior)


@contextlib.contextmanager
def using_statistics(
    layers: dict[nn.Module, tuple[torch.Tensor, torch.Tensor]],
) -> Iterator[None]:
    """The given BN layers' running_mean/running_var slots hold the given tensors for the
    block (in eval mode they normalize with them); their own tensors are put back on exit,
    untouched. Cheaper than a copy of the model or of its buffers."""
    saved = []
    try:
        for module, (mean, var) in layers.items():
            saved.append((module, module._buffers["running_mean"], module._buffers["running_var"]))
            module._buffers["running_mean"] = mean
            module._buffers["running_var"] = var
        yield
    finally:
        for module, old_mean, old_var in saved:
            module._buffers["running_mean"] = old_mean
            module._buffers["running_var"] = old_var


@contextlib.contextmanager
def using_eps(layers: dict[nn.Module, float]) -> Iterator[None]:
    """The given BN layers' ``eps`` is the given value for the block (their forward reads
    ``self.eps``); each layer's own eps is put back on exit, also when the block raises.
    Nothing else of the layers changes (docs/statistics.md, section 11.3)."""
    saved: list[tuple[nn.Module, Any]] = []
    try:
        for module, eps in layers.items():
            saved.append((module, getattr(module, "eps")))  # noqa: B009 - typed as Tensor
            setattr(module, "eps", eps)  # noqa: B010
        yield
    finally:
        for module, old in saved:
            setattr(module, "eps", old)  # noqa: B010


def relative_difference(diff2: float, ref2: float) -> float:
    """``rel_diff`` from the summed squared difference and the reference's squared sum:
    sqrt(diff2 / ref2), or sqrt(diff2) when the reference is all zero (docs/statistics.md,
    section 9)."""
    return math.sqrt(diff2 / ref2) if ref2 > 0 else math.sqrt(diff2)


@dataclass(frozen=True)
class Evaluation:
    """Several variants of a model on the same inputs (the same ``samples``). ``metrics`` per
    variant; ``agreement``, ``kl`` and ``rel_diff`` of every variant against the first one,
    the reference (which scores 1, 0 and 0 against itself).

    Variants are named after the statistics their BN layers normalize with, the same names
    in every report (docs/cli.md, section 5): ``running`` (the checkpoint's running
    statistics), ``precise`` (population statistics of the data), ``adapted`` (Adaptive BN's),
    ``batch`` (each batch's own statistics) and ``prior`` (each batch's statistics mixed with
    the running ones, :func:`prior_model`)."""

    metrics: dict[str, Metrics]
    has_labels: bool
    agreement: dict[str, float | None]
    kl: dict[str, float | None]
    rel_diff: dict[str, float]

    @property
    def reference(self) -> str:
        """The variant the others are compared with (the first)."""
        return next(iter(self.metrics))

    @property
    def samples(self) -> int:
        return next(iter(self.metrics.values())).samples

    def variant(self, name: str) -> VariantMetrics:
        """One variant's metrics: the same keys for every variant of every report."""
        m = self.metrics[name]
        return {
            "accuracy": m.accuracy,
            "loss": m.loss,
            "agreement": self.agreement[name],
            "kl": self.kl[name],
            "rel_diff": self.rel_diff[name],
        }

    def to_dict(self) -> ReportMetrics:
        """The ``metrics`` of a report (without ``data``, which a job adds)."""
        return {
            "samples": self.samples,
            "has_labels": self.has_labels,
            "reference": self.reference,
            "variants": {name: self.variant(name) for name in self.metrics},
        }


def evaluate_models(
    models: dict[str, nn.Module],
    data: Iterable[Any],
    *,
    modes: dict[str, str] | None = None,
    batches: int | None = None,
    call: Callable[[nn.Module, Any], Any] | None = None,
    device: torch.device | str | None = None,
    amp: str | torch.dtype | None = None,
    channels_last: bool = False,
    input_key: str | None = None,
    num_classes: int | None = None,
) -> Evaluation:
    """Run every model on the same batches, each in its mode: ``"eval"`` (running statistics,
    the default) or ``"batch"`` (BN with test-batch statistics, see :func:`batch_stats_mode`).

    With integer labels and [N, K] outputs: accuracy and cross-entropy of each. Against the
    first model: top-1 agreement and mean KL(softmax first || softmax other) for [N, K] outputs,
    and ||out_first - out_other|| / ||out_first|| for any tensor output. ``device`` (default:
    the first model's), ``amp`` and ``channels_last`` as in :func:`bnscope.precise_bn`; the
    models are put there for the run and left as they were. Sums stay on the device and are
    read once, at the end.

    Labels must be class indices of the outputs: one outside 0..K-1 is a :class:`DataError`
    (counted on the device, raised once the sums are read). ``num_classes`` as in
    :func:`batch_kind`: the labels of an image folder whose class folders were not matched to
    the model's classes by name.
    """
    check_batches(batches)
    if not models:
        raise ValueError("no models to evaluate")
    modes = modes or {}
    names = list(models)
    first = names[0]
    runner = make_runner(models[first], call, device, amp, channels_last, input_key)
    scores = {k: Scores() for k in names}
    classes = labelled = True
    samples = done = 0
    with contextlib.ExitStack() as stack:
        seen: set[int] = set()
        for m in models.values():
            if id(m) not in seen:
                seen.add(id(m))
                stack.enter_context(placed(m, runner))
        stack.enter_context(eval_mode(*[m for k, m in models.items() if modes.get(k) != "batch"]))
        for k, m in models.items():
            if modes.get(k) == "batch":
                stack.enter_context(batch_stats_mode(m))
        stack.enter_context(torch.no_grad())
        for batch, labels in labelled_batches(data, batches, runner):
            outs = {}
            for k in names:
                with forward_errors(
                    f"evaluation failed on batch {done}",
                    "check that eval_data= fits the model (channels, image size, "
                    "input_key=, a last batch of 1 with batch statistics)",
                ):
                    outs[k] = logits_of(runner(models[k], batch))
            ref = outs[first]
            n, is_cls, ok_labels = batch_kind(ref, labels, num_classes, "eval_data")
            classes = classes and is_cls
            samples += n
            labelled = labelled and ok_labels
            for k in names:
                scores[k].add(outs[k], labels=labels if ok_labels else None, ref=ref)
            done += 1
    if done == 0:
        raise DataError("the evaluation data yielded no batches", "check eval_data=")
    read_scores(scores.values())
    check_label_range(scores[first], "eval_data")

    def rel(k: str) -> float:
        return relative_difference(scores[k].value("diff2"), scores[k].value("ref2"))

    return Evaluation(
        metrics={k: scores[k].metrics(samples, labelled) for k in names},
        has_labels=labelled,
        agreement={
            k: scores[k].value("agree") / samples if classes and samples else None for k in names
        },
        kl={k: scores[k].value("kl") / samples if classes and samples else None for k in names},
        rel_diff={k: rel(k) for k in names},
    )


def compare_models(
    model_a: nn.Module,
    model_b: nn.Module,
    data: Iterable[Any],
    *,
    batches: int | None = None,
    call: Callable[[nn.Module, Any], Any] | None = None,
    device: torch.device | str | None = None,
    amp: str | torch.dtype | None = None,
    channels_last: bool = False,
    input_key: str | None = None,
    num_classes: int | None = None,
) -> Comparison:
    """Both models in eval mode on the same batches (see :func:`evaluate_models`)."""
    ev = evaluate_models(
        {"a": model_a, "b": model_b}, data, batches=batches, call=call, device=device, amp=amp,
        channels_last=channels_last, input_key=input_key, num_classes=num_classes,
    )  # fmt: skip
    return Comparison(
        a=ev.metrics["a"],
        b=ev.metrics["b"],
        has_labels=ev.has_labels,
        agreement=ev.agreement["b"],
        kl=ev.kl["b"],
        rel_diff=ev.rel_diff["b"],
    )
