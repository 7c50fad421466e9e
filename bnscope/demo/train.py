"""Minimal, quiet training and evaluation loops for the bnscope demo.

The loaders are expected to yield ``(x, y)`` batches: ``x`` a float tensor of
normalised images (N, C, H, W) and ``y`` integer class labels (N,).

Demo defaults
-------------
:data:`DEMO_EPOCHS`, :data:`DEMO_LR`, :data:`DEMO_BATCH_SIZE` and :data:`DEMO_FINAL_LR`
are the settings ``bnscope demo`` trains with (plain SGD, Nesterov momentum 0.9, weight
decay 5e-4, cosine decay to zero, shuffled batches of 32, ``drop_last=True``) on the
synthetic data of ``bnscope demo`` (800 training and 100 validation images per class:
4 epochs of 100 steps).  On one CPU thread (:data:`bnscope.demo.run.DEMO_THREADS`) this
takes well under 30 s and reaches about 95% validation accuracy with population
("precise") BatchNorm statistics, but clearly less with the running statistics the
training leaves behind,
because the demo model's BatchNorm momentum is 0.01 (see ``bnscope/demo/model.py``):
its running averages span the last ~100 steps and lag the final weights.

Learning-rate schedule and stale statistics
-------------------------------------------
:func:`lr_at` gives the learning rate of every optimisation step: an optional linear
warm-up followed by a cosine decay from ``lr`` to ``final_lr``.  With
``final_lr=None`` the rate is *not* decayed and stays at ``lr`` to the very last step;
the weights then keep moving until training stops and the running statistics are
staler still (but the model is also less accurate).  ``train(..., bn_momentum=m)``
overrides the momentum of every BatchNorm layer for the duration of training, another
knob for how stale the running statistics end up.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "DEMO_BATCH_SIZE",
    "DEMO_EPOCHS",
    "DEMO_FINAL_LR",
    "DEMO_LR",
    "evaluate",
    "lr_at",
    "train",
]

DEMO_EPOCHS = 4
DEMO_LR = 0.05
DEMO_BATCH_SIZE = 32
DEMO_FINAL_LR = 0.0


def lr_at(
    step: int,
    total_steps: int,
    *,
    lr: float,
    final_lr: float | None = 0.0,
    warmup_steps: int = 0,
) -> float:
    """Learning rate for optimisation step ``step`` (0-based) of ``total_steps``.

    Linear warm-up from ``lr / warmup_steps`` to ``lr`` over ``warmup_steps`` steps, then
    cosine annealing from ``lr`` to ``final_lr`` at the last step.  ``final_lr=None``
    keeps the rate constant at ``lr`` after warm-up (no annealing).
    """
    if warmup_steps > 0 and step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if final_lr is None:
        return lr
    span = max(total_steps - warmup_steps - 1, 1)
    t = min(max(step - warmup_steps, 0) / span, 1.0)
    return final_lr + 0.5 * (lr - final_lr) * (1.0 + math.cos(math.pi * t))


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    for b in model.buffers():
        return b.device
    return torch.device("cpu")


def _save_modes(model: nn.Module) -> list[tuple[nn.Module, bool]]:
    return [(m, m.training) for m in model.modules()]


def _restore_modes(modes: Iterable[tuple[nn.Module, bool]]) -> None:
    for m, was_training in modes:
        m.training = was_training


def train(
    model: nn.Module,
    loader: Iterable[Any],
    *,
    epochs: int,
    lr: float,
    seed: int,
    progress: Callable[[str], None] | None = None,
    final_lr: float | None = 0.0,
    warmup_steps: int = 0,
    optimizer: str = "sgd",
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    bn_momentum: float | None | Literal["keep"] = "keep",
) -> list[dict[str, float]]:
    """Train ``model`` in place with cross-entropy; return one record per epoch.

    Each record is ``{"epoch": k (1-based), "loss": mean training loss, "accuracy":
    training-mode accuracy in [0, 1], "lr": learning rate of the epoch's last step}``;
    loss and accuracy are running figures over the epoch, measured in training mode.

    ``optimizer`` is ``"sgd"`` (momentum ``momentum``, Nesterov) or ``"adam"`` (AdamW); the
    learning rate follows :func:`lr_at` with ``final_lr`` and ``warmup_steps`` (see
    the module docstring: ``final_lr=None`` keeps ``lr`` to the very end, leaving
    deliberately stale BatchNorm running statistics; a loader without ``len()`` also gets
    a constant rate).  ``bn_momentum``, unless ``"keep"``, replaces the momentum of every
    BatchNorm layer while training (``None`` = cumulative average); the original
    momenta are restored afterwards.  Randomness (data order of a
    shuffling loader without its own generator, dropout) is drawn from a forked global
    RNG seeded with ``seed``, so the global RNG state is unchanged afterwards.  Nothing
    is printed; ``progress``, if given, receives one line per epoch.  The training flag of
    every module is restored at the end.
    """
    if epochs < 0:
        raise ValueError(f"epochs must be >= 0, got {epochs}")
    if lr <= 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    params = [p for p in model.parameters() if p.requires_grad]
    if optimizer == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(
            params, lr=lr, momentum=momentum, nesterov=momentum > 0, weight_decay=weight_decay
        )
    elif optimizer == "adam":
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    else:
        raise ValueError(f"optimizer must be 'sgd' or 'adam', got {optimizer!r}")

    try:
        steps_per_epoch = len(loader)  # type: ignore[arg-type]
    except TypeError:  # unsized iterable: cannot anneal per step, keep lr constant
        steps_per_epoch, final_lr = 0, None
    total_steps = max(steps_per_epoch * epochs, 1)
    device = _model_device(model)
    modes = _save_modes(model)
    bn_layers = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    old_momenta = [m.momentum for m in bn_layers]
    records: list[dict[str, float]] = []
    step = 0
    try:
        if bn_momentum != "keep":
            for m in bn_layers:
                m.momentum = bn_momentum
        model.train()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for epoch in range(1, epochs + 1):
                loss_sum, correct, seen = 0.0, 0, 0
                cur_lr = lr
                for x, y in loader:
                    x = x.to(device, non_blocking=True)
                    y = y.to(device, non_blocking=True)
                    cur_lr = lr_at(
                        step, total_steps, lr=lr, final_lr=final_lr, warmup_steps=warmup_steps
                    )
                    for group in opt.param_groups:
                        group["lr"] = cur_lr
                    logits = model(x)
                    loss = F.cross_entropy(logits, y)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    step += 1
                    n = y.shape[0]
                    loss_sum += float(loss.detach()) * n
                    correct += int((logits.detach().argmax(1) == y).sum())
                    seen += n
                rec = {
                    "epoch": epoch,
                    "loss": loss_sum / max(seen, 1),
                    "accuracy": correct / max(seen, 1),
                    "lr": cur_lr,
                }
                records.append(rec)
                if progress is not None:
                    progress(
                        f"epoch {epoch}/{epochs}  loss {rec['loss']:.4f}  "
                        f"acc {100 * rec['accuracy']:.1f}%  lr {cur_lr:.4g}"
                    )
    finally:
        _restore_modes(modes)
        for m, old in zip(bn_layers, old_momenta, strict=True):
            m.momentum = old
    return records


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable[Any]) -> dict[str, float]:
    """Eval-mode accuracy and mean cross-entropy of ``model`` over ``loader``.

    Returns ``{"loss": mean loss, "accuracy": fraction correct, "count": n}``.  The
    ``training`` flag of every module is saved beforehand and restored afterwards, so
    a model with some submodules deliberately in eval mode is left exactly as it was.
    """
    device = _model_device(model)
    modes = _save_modes(model)
    loss_sum, correct, seen = 0.0, 0, 0
    try:
        model.eval()
        for x, y in loader:
            x = x.to(device, non_blocking=True)
            y = y.to(device, non_blocking=True)
            logits = model(x)
            loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
            correct += int((logits.argmax(1) == y).sum())
            seen += int(y.shape[0])
    finally:
        _restore_modes(modes)
    return {
        "loss": loss_sum / max(seen, 1),
        "accuracy": correct / max(seen, 1),
        "count": seen,
    }
