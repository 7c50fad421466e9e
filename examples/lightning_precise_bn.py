"""Precise BN inside a Lightning run: the ``PreciseBN`` callback before every validation.

    pip install "bnscope[lightning]"
    python examples/lightning_precise_bn.py

The model and data of ``train_and_fix.py`` (a small BN CNN whose BatchNorm momentum is 0.01,
so its running statistics average the last ~100 steps and lag the weights), trained with a
Lightning ``Trainer`` on the CPU for 2 epochs, twice from the same seed: once as it is, once
with ``bnscope.integrations.lightning.PreciseBN``, which recomputes the exact population
statistics of the current weights on the training data before each validation. The callback
changes nothing else (not even the random numbers the run draws), so both runs have the same
weights at every epoch, and the validation accuracies differ only by the BN statistics. It
prints both, then what the callback logged: how far training's running statistics were from
the recomputed ones. Nothing is written to disk.
"""

from __future__ import annotations

import tempfile
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader
from train_and_fix import make_data, make_model

from bnscope.integrations.lightning import PreciseBN

Batch = tuple[torch.Tensor, torch.Tensor]


class Classifier(pl.LightningModule):
    def __init__(self, steps: int) -> None:
        super().__init__()
        self.net = make_model()
        self.steps = steps
        self.accuracy: list[float] = []  # one per validation
        self._correct = self._seen = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        x, y = batch
        self._correct += int((self(x).argmax(1) == y).sum())
        self._seen += len(y)

    def on_validation_epoch_end(self) -> None:
        self.accuracy.append(self._correct / self._seen)
        self._correct = self._seen = 0

    def configure_optimizers(self) -> dict[str, Any]:
        opt = torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9, nesterov=True)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, self.steps)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def fit(callbacks: list[pl.Callback], epochs: int = 2) -> Classifier:
    torch.manual_seed(0)
    train = DataLoader(make_data(1024, seed=0), batch_size=32, shuffle=True, drop_last=True)
    val = DataLoader(make_data(512, seed=1), batch_size=256)
    model = Classifier(steps=epochs * len(train))
    with tempfile.TemporaryDirectory() as root:
        trainer = pl.Trainer(
            max_epochs=epochs, accelerator="cpu", devices=1, logger=False,
            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
            num_sanity_val_steps=0, default_root_dir=root, callbacks=callbacks,
        )  # fmt: skip
        trainer.fit(model, train, val)
    return model


def main() -> None:
    plain = fit([])
    # the statistics of all 32 training batches (1024 samples) before each validation
    precise_bn = PreciseBN(batches=None)
    fixed = fit([precise_bn])
    for epoch, (before, after) in enumerate(zip(plain.accuracy, fixed.accuracy, strict=True)):
        print(f"epoch {epoch}: validation accuracy {before:.1%} with the running statistics "
              f"training kept, {after:.1%} with PreciseBN")  # fmt: skip
    report = precise_bn.last_report
    assert report is not None
    print(f"PreciseBN before the last validation: {report.extra['batches']} batches, "
          f"{report.extra['samples']} samples")  # fmt: skip
    for layer in report.layers:
        print(f"  {layer.name:8} d_mu max {layer.d_mu_max:.3f}  d_var max {layer.d_var_max:.3f}")


if __name__ == "__main__":
    main()
