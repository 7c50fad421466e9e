"""A tiny LightningModule with BN, its data, an in-memory logger, a probe callback and the
float64 reference statistics, shared by test_lightning.py and the DDP worker script.

Importing this imports lightning: the importer defines torchvision's operator schemas first
(``tests/reallibs.py``: torchmetrics imports the CUDA torchvision wheel installed here)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import Logger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

F64 = torch.float64
SAMPLES = 96
BATCH = 16


class Net(nn.Module):
    """Conv1d-BN-ReLU, Linear-BN-ReLU(-Dropout), Linear; ``spare``: a BN that forward never
    calls."""

    def __init__(self, spare: bool = False) -> None:
        super().__init__()
        self.conv = nn.Conv1d(2, 6, 3)
        self.bn1 = nn.BatchNorm1d(6)
        self.fc = nn.Linear(6 * 10, 8)
        self.bn2 = nn.BatchNorm1d(8)
        self.drop = nn.Dropout(0.2)
        self.head = nn.Linear(8, 3)
        if spare:
            self.spare = nn.BatchNorm1d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn1(self.conv(x))).flatten(1)
        return self.head(self.drop(torch.relu(self.bn2(self.fc(h)))))


def bn_names(net: nn.Module) -> list[str]:
    return [n for n, m in net.named_modules() if isinstance(m, nn.BatchNorm1d)]


def dataset(seed: int = 0) -> TensorDataset:
    """Inputs far from zero mean and unit variance, so stale statistics show."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(SAMPLES, 2, 12, generator=g) * 3 + 1.5
    y = torch.randint(0, 3, (SAMPLES,), generator=g)
    return TensorDataset(x, y)


def loader(shuffle: bool = False, **kwargs: Any) -> DataLoader:
    return DataLoader(dataset(), batch_size=BATCH, shuffle=shuffle, **kwargs)


class Module(pl.LightningModule):
    """Cross-entropy on Net, SGD with momentum; records every module's mode in each step."""

    def __init__(self, spare: bool = False, freeze_dropout: bool = False) -> None:
        super().__init__()
        self.net = Net(spare)
        self.freeze_dropout = freeze_dropout
        self.train_modes: list[dict[str, bool]] = []
        self.val_modes: list[dict[str, bool]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def modes(self) -> dict[str, bool]:
        return {name: m.training for name, m in self.named_modules()}

    def on_train_start(self) -> None:
        if self.freeze_dropout:  # a submodule the user keeps in eval mode while training
            self.net.drop.eval()

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        self.train_modes.append(self.modes())
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.val_modes.append(self.modes())
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("val_loss", loss, batch_size=len(x), sync_dist=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.2, momentum=0.9)


class MemoryLogger(Logger):
    """Every ``log_metrics`` call, as (step, metrics)."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[tuple[int | None, dict[str, float]]] = []

    @property
    def name(self) -> str:
        return "memory"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.rows.append((step, dict(metrics)))

    def series(self, key: str) -> list[tuple[int | None, float]]:
        return [(step, m[key]) for step, m in self.rows if key in m]


class Probe(pl.Callback):
    """Records, at validation start and at each training epoch's end, the module's state
    (weights and BN buffers, cloned), its modes, the global step and the state of torch's
    generator. Placed after PreciseBN in ``callbacks``, it sees what PreciseBN left; placed
    before, what it found, and the generator state PreciseBN read a shuffled loader with."""

    def __init__(self) -> None:
        self.seen: list[dict[str, Any]] = []

    def _record(self, hook: str, trainer: pl.Trainer, pl_module: Module) -> None:
        if trainer.sanity_checking:
            return
        self.seen.append({
            "hook": hook,
            "step": trainer.global_step,
            "state": {k: v.detach().clone() for k, v in pl_module.net.state_dict().items()},
            "modes": pl_module.modes(),
            "rng": torch.get_rng_state(),
        })  # fmt: skip

    def on_validation_start(self, trainer: pl.Trainer, pl_module: Module) -> None:
        self._record("validation", trainer, pl_module)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: Module) -> None:
        self._record("epoch_end", trainer, pl_module)


def trainer(root: Any, callbacks: list[pl.Callback], **kwargs: Any) -> pl.Trainer:
    """A quiet CPU trainer: no checkpoints, no progress bar, files only under ``root``."""
    options: dict[str, Any] = {
        "accelerator": "cpu",
        "devices": 1,
        "max_epochs": 2,
        "logger": MemoryLogger(),
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
        "limit_val_batches": 2,
        "log_every_n_steps": 1,
        "default_root_dir": str(root),
        "callbacks": callbacks,
    }
    options.update(kwargs)
    return pl.Trainer(**options)


def replay(data: Iterable[Any], rng: torch.Tensor) -> list[Any]:
    """The batches one pass over ``data`` gives with torch's generator in state ``rng`` (a
    shuffled DataLoader's order), without changing the generator."""
    with torch.random.fork_rng(devices=[]):
        torch.set_rng_state(rng)
        return list(data)


def reference(
    state: dict[str, torch.Tensor],
    batches: Iterable[Any],
    spare: bool = False,
    autocast: torch.dtype | None = None,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Population mean and biased variance of every BN layer's input (float64) of a Net with
    ``state``'s weights, BN normalizing with batch statistics, over all ``batches``: the
    forward in float64, or in float32 under CPU autocast to ``autocast``, pooled directly.
    The inputs of a BN layer after the first depend on which samples share a batch, so
    ``batches`` must be the very batches the statistics were computed on."""
    net = Net(spare)
    net.load_state_dict(state)
    net.train()
    net.drop.eval()
    if autocast is None:
        net = net.double()
    inputs: dict[str, list[torch.Tensor]] = {name: [] for name in bn_names(net)}
    modules = dict(net.named_modules())
    hooks = [
        modules[name].register_forward_pre_hook(
            lambda m, args, name=name: inputs[name].append(args[0].detach().to(F64))
        )
        for name in inputs
    ]
    try:
        with torch.no_grad():
            for x, _ in batches:
                if autocast is None:
                    net(x.to(F64))
                else:
                    with torch.autocast("cpu", dtype=autocast):
                        net(x)
    finally:
        for h in hooks:
            h.remove()
    out = {}
    for name, xs in inputs.items():
        if not xs:
            continue
        x = torch.cat(xs).transpose(0, 1).reshape(xs[0].shape[1], -1)
        out[name] = (x.mean(dim=1), x.var(dim=1, unbiased=False))
    return out
