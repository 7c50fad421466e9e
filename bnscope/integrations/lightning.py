"""Precise BN inside a Lightning run: :class:`PreciseBN`, a callback that recomputes the exact
BN statistics of the current weights before validation.

Wu & Johnson (2021), "Rethinking 'Batch' in BatchNorm", section 3: the running statistics of a
model still in training are an EMA over weights that kept changing, so validating with them
measures a model that never existed; Precise BN recomputes population statistics of the fixed
weights. pycls, fvcore and detectron2 (``PreciseBN`` hooks) and mmcv (``PreciseBNHook``) do it
inside their trainers; this is the same for Lightning (Lightning-AI/pytorch-lightning#8811,
"update BN statistics before validation"). The statistics come from
:func:`bnscope.precise_bn` (float64, exact, all-reduced under DDP); this module only decides
when, on which data and how the model runs, and logs what changed.

Needs ``lightning>=2.0`` (``pip install "bnscope[lightning]"``).
"""

from __future__ import annotations

import contextlib
import math
import random
import statistics
from collections.abc import Callable, Generator, Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from ..engine.runner import BatchProtocol, default_call
from ..errors import ModelError, UsageError
from ..extras import PreciseReport
from ..ops.inspect import MATERIAL_GAP
from ..ops.precise import precise_bn
from ..records import Status

__all__ = ["MIXED_PRECISION_AMP", "NotCalledError", "PreciseBN", "staleness_metrics"]

#: Lightning's mixed precisions and the autocast :func:`bnscope.precise_bn` runs them with
#: (``amp=``); every other precision runs through the precision plugin's own input conversion
#: and forward context (``"bf16-true"``, ``"64-true"``; nothing for ``"32-true"``)
MIXED_PRECISION_AMP: dict[str, str] = {"bf16-mixed": "bf16", "16-mixed": "fp16"}


class NotCalledError(ModelError):
    """A BN layer never ran while :class:`PreciseBN` recomputed the statistics
    (``fail_on_not_called=True``)."""


def staleness_metrics(
    report: PreciseReport, prefix: str = "bnscope/", per_layer: bool = True
) -> dict[str, float]:
    """The metrics :class:`PreciseBN` logs for one recomputation, from a precise report.

    Each updated layer's change is the staleness of the EMA it replaced (docs/statistics.md,
    section 3): ``d_mu`` = |mu_EMA - mu_pop| / sqrt(var_pop + eps) and ``d_var`` =
    |log((var_EMA + eps) / (var_pop + eps))| per channel. Summary over the updated layers:
    ``max_d_mu``/``max_d_var`` (the worst channel of the worst layer), ``median_d_mu``/
    ``median_d_var`` (the median over layers of each layer's median channel),
    ``material_gap_layers`` (layers whose median d_mu or d_var exceeds
    :data:`bnscope.ops.inspect.MATERIAL_GAP`, the gap ``bnscope inspect`` calls material),
    and the counts ``updated_layers``, ``not_called_layers``, ``batches``, ``samples``. With
    ``per_layer``, each updated layer's worst channel as ``d_mu/<layer>`` and
    ``d_var/<layer>``. A plain function of the report, so it is tested without a trainer."""
    updated = [rec for rec in report.layers if rec.status == Status.UPDATED]
    not_called = sum(rec.status == Status.NOT_CALLED for rec in report.layers)
    out: dict[str, float] = {}
    mu_max = [rec.d_mu_max for rec in updated if rec.d_mu_max is not None]
    var_max = [rec.d_var_max for rec in updated if rec.d_var_max is not None]
    mu_med = [rec.d_mu_median for rec in updated if rec.d_mu_median is not None]
    var_med = [rec.d_var_median for rec in updated if rec.d_var_median is not None]
    if mu_max and var_max:
        out["max_d_mu"] = max(mu_max)
        out["max_d_var"] = max(var_max)
    if mu_med and var_med:
        out["median_d_mu"] = statistics.median(mu_med)
        out["median_d_var"] = statistics.median(var_med)
    out["material_gap_layers"] = float(
        sum(
            (rec.d_mu_median or 0.0) > MATERIAL_GAP or (rec.d_var_median or 0.0) > MATERIAL_GAP
            for rec in updated
        )
    )
    out["updated_layers"] = float(len(updated))
    out["not_called_layers"] = float(not_called)
    out["batches"] = float(report.extra["batches"])
    out["samples"] = float(report.extra["samples"])
    if per_layer:
        for rec in updated:
            if rec.d_mu_max is not None and rec.d_var_max is not None:
                out[f"d_mu/{rec.name}"] = rec.d_mu_max
                out[f"d_var/{rec.name}"] = rec.d_var_max
    return {prefix + key: value for key, value in out.items()}


@contextlib.contextmanager
def _random_state_kept(device: torch.device) -> Iterator[None]:
    """Run the block and give the random generators back their state: torch's CPU generator
    (and the CUDA one of ``device``), numpy's and Python's. Reading a shuffled train loader
    draws from them (its sampler's permutation, its workers' base seed); with the state kept,
    a run with the callback sees the same random numbers as one without it."""
    if device.type == "cpu":
        devices: list[int] = []
        device_type = "cuda"  # fork_rng's default; with no devices only the CPU state is kept
    else:
        devices = [device.index if device.index is not None else 0]
        device_type = device.type
    py_state = random.getstate()
    np_state = np.random.get_state()
    try:
        with torch.random.fork_rng(devices=devices, device_type=device_type):
            yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)


def _bounded(
    data: Iterable[Any],
    batches: int | None,
    samples: int | None,
    count: Callable[[Any], int],
) -> Generator[Any, None, None]:
    """The batches of ``data``, at most ``batches`` of them, stopping after the batch that
    brings the sample count (``count(batch)``) to ``samples`` or more; fewer when the data
    runs out first (a train loader shorter than the bound is used whole)."""
    done = seen = 0
    iterator = iter(data)
    try:
        while batches is None or done < batches:
            if samples is not None and seen >= samples:
                return
            try:
                batch = next(iterator)
            except StopIteration:
                return
            yield batch
            done += 1
            seen += count(batch)
    finally:
        del iterator  # a worker iterator of a non-persistent loader shuts its workers down


class PreciseBN(Callback):
    """Recompute exact BN statistics of the current weights before each validation.

    Before every validation during ``trainer.fit`` (not the sanity check), in every
    ``every_n_epochs``-th epoch (the epoch index e with (e + 1) % every_n_epochs == 0), the
    callback runs :func:`bnscope.precise_bn` on the LightningModule: population statistics
    over at most ``batches`` batches (per rank; ``None``: no bound; a loader that holds fewer
    is read whole), stopping after the batch that brings the samples read (over all ranks;
    a batch's samples are the leading size of its first input) to ``samples``, of
    ``dataloader`` or, by default, the trainer's train dataloader. It writes them into the BN
    buffers, so validation (and a checkpoint saved after it) uses them. At the end of a due
    epoch it recomputes once more unless the weights have not changed since the last
    recomputation (``trainer.global_step``), so a run without validation gets them too,
    before ``ModelCheckpoint`` saves at the epoch's end.

    How the model runs: on ``pl_module.device``; under ``trainer.precision`` (``"bf16-mixed"``
    and ``"16-mixed"`` as ``amp="bf16"``/``"fp16"`` autocast, other precisions through the
    precision plugin's ``convert_input`` and ``forward_context``, as Lightning runs a step);
    each batch through ``call(module, batch)`` (default: ``forward`` on the batch's inputs,
    see :func:`bnscope.precise_bn`; pass ``call`` when ``training_step`` runs the model some
    other way), ``input_key`` picking the input of dict batches. Every module's mode is as
    Lightning left it (eval during validation, train at the epoch's end), and the random
    generators are as before, so reading a shuffled train loader does not change the rest of
    the run.

    Under DDP each rank reads its shard (the train dataloader's ``DistributedSampler``; a
    ``dataloader`` given here is read as it is on every rank: duplicated data leaves the
    population statistics unchanged, but sharding it saves time) and every rank writes the
    same statistics of the union.

    Logged through ``pl_module.log`` (so also ``trainer.callback_metrics``, for
    ``EarlyStopping``/``ModelCheckpoint`` monitors): :func:`staleness_metrics` under
    ``prefix``, how far the EMA that training kept was from the recomputed statistics.
    ``last_report`` is the latest :func:`bnscope.precise_bn` report (with its findings),
    ``last_step`` the ``global_step`` it was made at.

    A BN layer that never ran keeps its statistics and counts in ``not_called_layers``, with
    one warning per layer; with ``fail_on_not_called=True`` the callback raises
    :class:`NotCalledError` instead, which stops ``trainer.fit`` with its message.
    """

    def __init__(
        self,
        dataloader: Iterable[Any] | None = None,
        *,
        batches: int | None = 100,
        samples: int | None = None,
        every_n_epochs: int = 1,
        call: Callable[[nn.Module, Any], Any] | None = None,
        input_key: str | None = None,
        include_frozen: bool = False,
        fail_on_not_called: bool = False,
        log_layers: bool = True,
        prefix: str = "bnscope/",
    ) -> None:
        for name, value in (("batches", batches), ("samples", samples)):
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int) or value < 1
            ):
                raise UsageError(
                    f"{name} must be a positive integer or None, got {value!r}",
                    f"e.g. {name}=100, or {name}=None for no bound",
                )
        if (
            isinstance(every_n_epochs, bool)
            or not isinstance(every_n_epochs, int)
            or (every_n_epochs < 1)
        ):
            raise UsageError(
                f"every_n_epochs must be a positive integer, got {every_n_epochs!r}",
                "e.g. every_n_epochs=1 (before every validation)",
            )
        self.dataloader = dataloader
        self.batches = batches
        self.samples = samples
        self.every_n_epochs = every_n_epochs
        self.call = call
        self.input_key = input_key
        self.include_frozen = include_frozen
        self.fail_on_not_called = fail_on_not_called
        self.log_layers = log_layers
        self.prefix = prefix
        self.last_report: PreciseReport | None = None
        self.last_step: int | None = None
        self._warned: set[str] = set()

    # ----------------------------------------------------------------------------------------
    # Lightning hooks

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Recompute before a validation of ``trainer.fit`` in a due epoch."""
        if trainer.sanity_checking or trainer.state.fn != "fit" or not self._due(trainer):
            return
        self.recompute(trainer, pl_module, mid_epoch=not trainer.is_last_batch)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Recompute at the end of a due epoch unless it was done for these weights."""
        if self._due(trainer) and self.last_step != trainer.global_step:
            self.recompute(trainer, pl_module)

    # ----------------------------------------------------------------------------------------

    def _due(self, trainer: Trainer) -> bool:
        return (trainer.current_epoch + 1) % self.every_n_epochs == 0

    def _data(self, trainer: Trainer, mid_epoch: bool) -> Iterable[Any]:
        """``dataloader``, or the trainer's train dataloader when it is one loader that can
        be read now without disturbing the training epoch."""
        if self.dataloader is not None:
            return self.dataloader
        loader = trainer.train_dataloader
        if loader is None:
            raise UsageError(
                "PreciseBN: the trainer has no train dataloader to read",
                "pass dataloader= to PreciseBN",
            )
        if isinstance(loader, (Mapping, Sequence)):
            raise UsageError(
                f"PreciseBN: the trainer has {len(loader)} train dataloaders, not one",
                "pass the one to recompute the statistics on as dataloader= to PreciseBN",
            )
        persistent = getattr(loader, "persistent_workers", False) and (
            getattr(loader, "num_workers", 0) > 0
        )
        if mid_epoch and persistent:
            raise UsageError(
                "PreciseBN: validation runs in the middle of a training epoch and the train "
                "dataloader keeps persistent workers: reading it now would reset the iterator "
                "the training epoch is using",
                "pass dataloader= to PreciseBN (another DataLoader over the training data)",
            )
        return loader

    def _call(self, trainer: Trainer) -> Callable[[nn.Module, Any], Any]:
        """``call`` (or the default forward) with the precision plugin's input conversion,
        and its forward context where autocast does not stand for it."""
        plugin = trainer.precision_plugin
        inner = self.call
        input_key = self.input_key
        mixed = trainer.precision in MIXED_PRECISION_AMP

        def run(module: nn.Module, batch: Any) -> Any:
            batch = plugin.convert_input(batch)
            context = contextlib.nullcontext() if mixed else plugin.forward_context()
            with context:
                if inner is not None:
                    return inner(module, batch)
                return default_call(module, batch, input_key)

        return run

    def recompute(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        mid_epoch: bool = False,
        log: bool = True,
    ) -> PreciseReport:
        """Recompute the statistics now, log the change and return the report: what the hooks
        do. Call it yourself for a recomputation at another moment (on every rank under DDP),
        with ``log=False`` outside the Lightning hooks where ``pl_module.log`` is allowed.
        ``mid_epoch``: the training epoch is still reading the train dataloader."""
        data = self._data(trainer, mid_epoch)
        world = max(int(trainer.world_size), 1)
        share = None if self.samples is None else math.ceil(self.samples / world)
        protocol = BatchProtocol.for_model(pl_module, self.input_key)
        device = pl_module.device
        batches = _bounded(data, self.batches, share, protocol.samples)
        try:
            with _random_state_kept(device):
                report = precise_bn(
                    pl_module,
                    batches,
                    call=self._call(trainer),
                    device=device,
                    amp=MIXED_PRECISION_AMP.get(str(trainer.precision)),
                    input_key=self.input_key,
                    include_frozen=self.include_frozen,
                )
        finally:
            batches.close()  # also when the forward failed: the loader's iterator goes now
        self.last_report = report
        self.last_step = trainer.global_step
        self._check_called(report)
        if not log:
            return report
        metrics = staleness_metrics(report, self.prefix, self.log_layers)
        pl_module.log_dict(metrics, on_step=False, on_epoch=True, batch_size=1, sync_dist=world > 1)
        return report

    def _check_called(self, report: PreciseReport) -> None:
        missing = [rec.name for rec in report.layers if rec.status == Status.NOT_CALLED]
        if not missing:
            return
        names = ", ".join(missing)
        many = len(missing) > 1
        if self.fail_on_not_called:
            raise NotCalledError(
                f"PreciseBN: BN layer{'s' if many else ''} {names} never ran on "
                f"{report.extra['batches']} batches of training data, so "
                f"{'their' if many else 'its'} statistics could not be recomputed",
                "make forward run it, remove it, pass call=fn(module, batch) that runs the "
                "model as training_step does, or fail_on_not_called=False to keep its "
                "statistics and only report it",
            )
        for name in missing:
            if name not in self._warned:
                self._warned.add(name)
                rank_zero_warn(
                    f"PreciseBN: BN layer {name} never ran on the data; its statistics were "
                    "kept (fail_on_not_called=True stops the run instead)"
                )
