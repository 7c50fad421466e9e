"""Turn command-line inputs (merged with the project file) into library objects."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import UsageError
from ..io.config import ProjectConfig
from .runtime import merged, parse_floats, rank_and_world_size

if TYPE_CHECKING:
    from torch import nn

    from ..io.checkpoint import Checkpoint
    from ..io.data import DataSource
    from .runtime import Ui


@dataclass
class DataFlags:
    """The data options of a command, before merging with the project file."""

    batch_size: int | None = None
    workers: int | None = None
    input_key: str | None = None
    image_size: int | None = None
    resize: int | None = None
    channels: int | None = None
    mean: str | None = None
    std: str | None = None
    seed: int = 0
    drop_last: bool | None = None
    call: str | None = None


@dataclass
class RunFlags:
    """How the model runs: ``--device``, ``--amp``, ``--channels-last`` (before merging with
    the project file, which may set ``amp`` and ``channels_last``)."""

    device: str | None = None
    amp: str | None = None
    channels_last: bool = False


def resolve_run_flags(flags: RunFlags, config: ProjectConfig) -> tuple[str, str | None, bool]:
    """(device, amp, channels_last) checked before anything is loaded or run."""
    from .runtime import resolve_amp, resolve_device

    device = resolve_device(flags.device)
    amp = resolve_amp(merged(flags.amp, config, "amp"), device)
    channels_last = bool(flags.channels_last or merged(None, config, "channels_last", False))
    return device, amp, channels_last


@dataclass
class ModelFlags:
    """Where the checkpoint's model comes from: the wrapper ``key``, ``--trust-checkpoint``,
    the ``--model`` spec and its ``--model-kwargs`` (before merging with the project file)."""

    key: str | None = None
    trust: bool = False
    model: str | None = None
    model_kwargs: str | None = None


def open_checkpoint(path: Path, key: str | None, trust: bool, config: ProjectConfig) -> Checkpoint:
    from ..io.checkpoint import load_checkpoint

    return load_checkpoint(path, key=merged(key, config, "key"), trust=trust)


def build_model_for(
    ckpt: Checkpoint,
    model_spec: str | None,
    model_kwargs: str | None,
    config: ProjectConfig,
    ui: Ui | None = None,
) -> tuple[nn.Module | None, str, str | None]:
    """The model with the checkpoint's weights loaded (strict), the prefix stripped, and the
    model spec used. ``(None, "", None)`` when no model spec is given and the checkpoint is not
    a trusted whole module.

    When the checkpoint holds several networks, the one that fits the model is loaded (the
    raw weights rather than an EMA copy of the same architecture) and the prefix is that
    network's; ``ui`` then warns about an EMA copy left unused, with the ``--key`` to use it."""
    from ..io.checkpoint import load_into_model
    from ..io.modelspec import build_model

    spec = merged(model_spec, config, "model")
    kwargs: Any = merged(model_kwargs, config, "model_kwargs")
    if spec is None:
        if ckpt.format == "module" and ckpt.module is not None:
            if kwargs:
                raise UsageError("--model-kwargs given without --model", "add --model SPEC")
            return ckpt.module, "", "(whole module from the checkpoint)"
        if kwargs:
            raise UsageError("--model-kwargs given without --model", "add --model SPEC")
        return None, "", None
    if ckpt.format == "torchscript":
        raise UsageError(
            "a TorchScript archive cannot be loaded into a --model (its weights are inspected "
            "statically)",
            "drop --model, or save the model's state_dict() and use that",
        )
    model = build_model(spec, kwargs)
    prefix = load_into_model(model, ckpt.state_dict, key=ckpt.key)
    notice = ckpt.ema_notice(prefix)
    if ui is not None and notice:
        ui.warn(notice)
    return model, prefix, spec


def require_batchnorm(model: Any, command: str, include_frozen: bool | None = None) -> None:
    """``precise``, ``adapt`` and ``ghost`` have nothing to do on a model without BN layers:
    one line before anything runs (no copy of the checkpoint is written). Frozen BN layers
    count; for precise and adapt (``include_frozen`` not None) a model whose BN layers are all
    frozen needs ``--include-frozen``."""
    from ..engine.capture import is_batchnorm, is_frozen_batchnorm

    frozen = [m for m in model.modules() if is_frozen_batchnorm(m)]
    if not any(is_batchnorm(m) for m in model.modules()):
        if not frozen:
            raise UsageError(
                f"the model has no BatchNorm layer: {command} has nothing to do",
                "check --model (bnscope inspect CKPT lists the BN layers a checkpoint holds)",
            )
        kind = type(frozen[0]).__name__
        if command == "ghost":
            raise UsageError(
                f"every BN layer of the model is frozen ({len(frozen)} {kind}): frozen layers "
                "normalize with their stored statistics at every batch size, so ghost has "
                "nothing to analyse",
                "bnscope inspect CKPT --data DATA measures frozen statistics against the data",
            )
        if include_frozen is False:
            raise UsageError(
                f"every BN layer of the model is frozen ({len(frozen)} {kind}): {command} "
                "keeps frozen statistics unless asked",
                "pass --include-frozen to re-estimate them (bnscope inspect measures them "
                "against the data)",
            )


def open_data(
    spec: str | None,
    flags: DataFlags,
    config: ProjectConfig,
    option: str,
    *,
    shuffle: bool = False,
    shard: bool = True,
    ui: Ui | None = None,
) -> DataSource:
    """Resolve a ``--data``-like spec into a :class:`~bnscope.io.data.DataSource`.

    ``shuffle=True`` (seeded by ``--seed``) for statistics collection: with BN normalizing by
    batch statistics, deeper layers' inputs depend on the batch composition, so batches must
    be i.i.d. samples (an image folder read in order gives one class per batch).

    Under ``torchrun`` with ``shard=True`` each rank gets its share (image folders and tensor
    files: samples ``rank::world_size``; factories: ``rank`` and ``world_size`` when their
    signature names them; ``ui`` then warns about a factory that cannot shard).

    Batching of image folders and tensor files (per rank): ``--drop-last`` leaves out an
    incomplete last batch; without it only a last batch of 1 sample is left out (BatchNorm
    cannot normalize one sample on [N, C] inputs). The source counts what was left out and
    ``ui`` says it on stderr. Factories batch themselves: neither applies to them."""
    from ..io.data import ImageOptions, load_data

    if spec is None:
        raise UsageError(f"{option} is required here", f"pass {option} SPEC")
    defaults = ImageOptions()
    image = ImageOptions(
        image_size=merged(flags.image_size, config, "image_size"),
        resize=merged(flags.resize, config, "resize"),
        channels=merged(flags.channels, config, "channels", defaults.channels),
        mean=parse_floats(merged(flags.mean, config, "mean"), "--mean") or defaults.mean,
        std=parse_floats(merged(flags.std, config, "std"), "--std") or defaults.std,
    )
    rank, world_size = rank_and_world_size() if shard else (0, 1)
    batch_size = merged(flags.batch_size, config, "batch_size", 32)
    drop_last = bool(merged(flags.drop_last, config, "drop_last", False))
    source = load_data(
        spec,
        batch_size=batch_size,
        workers=merged(flags.workers, config, "workers", 0),
        image=image,
        shuffle=shuffle,
        seed=flags.seed,
        drop_last=drop_last,
        drop_single=True,  # a last batch of 1 sample: BatchNorm cannot normalize it
        rank=rank,
        world_size=world_size,
        same_order=True,  # inspect and ghost read it twice, inspect pairs the passes
    )
    if ui is not None:
        _note_dropped(ui, source, option, batch_size, flags.drop_last is True, rank, world_size)
    if world_size > 1 and source.kind == "factory" and ui is not None:
        if not _factory_shards(str(spec)):
            ui.warn(
                f"{option} {spec} does not take rank and world_size, so each of the "
                f"{world_size} ranks reads all of its batches (statistics stay exact; the work "
                "is repeated)"
            )
    return source


def _note_dropped(
    ui: Ui,
    source: DataSource,
    option: str,
    batch_size: int,
    drop_last_flag: bool,
    rank: int,
    world_size: int,
) -> None:
    """One line on stderr about samples the batching left out (or, for a factory given
    ``--drop-last``, could not leave out)."""
    from ..io.data import DROP_SINGLE

    if source.kind == "factory":
        if drop_last_flag:
            ui.warn(
                f"--drop-last does not apply to {option} {source.description}: a data factory "
                "batches itself (let its DataLoader drop the incomplete last batch)"
            )
        return
    if not source.dropped_samples:
        return
    total = (source.num_samples or 0) + source.dropped_samples
    where = f" on rank {rank} of {world_size}" if world_size > 1 else ""
    if source.dropped_reason == DROP_SINGLE:
        ui.warn(
            f"{option}: left out the last batch of 1 sample{where} ({total} samples in "
            f"batches of {batch_size}): BatchNorm cannot normalize a single sample with batch "
            "statistics (a --batch-size that leaves no batch of 1 uses every sample)"
        )
    else:
        count = source.dropped_samples
        ui.info(
            f"{option}: --drop-last left out the incomplete last batch of {count} "
            f"sample{'s' if count != 1 else ''}{where} ({total} samples in batches of "
            f"{batch_size})"
        )


def _factory_shards(spec: str) -> bool:
    """Whether a ``--data`` factory's signature takes ``rank`` and ``world_size``."""
    import inspect

    from ..errors import DataError
    from ..io.modelspec import resolve_spec

    try:
        obj = resolve_spec(spec, DataError, "data")
        params = inspect.signature(obj).parameters if callable(obj) else {}
    except Exception:  # noqa: BLE001 - only for a warning
        return True
    return "rank" in params and "world_size" in params


@dataclass
class Run:
    """Everything a model-running command needs, resolved and validated up front."""

    ckpt: Checkpoint
    model: nn.Module
    prefix: str
    spec: str | None
    source: DataSource
    evaluation: DataSource | None
    call: Any
    device: str
    out_path: Path | None
    amp: str | None = None
    channels_last: bool = False
    input_key: str | None = None

    def engine(self) -> dict[str, Any]:
        """The keyword arguments every library function that runs the model takes."""
        return {
            "call": self.call,
            "device": self.device,
            "amp": self.amp,
            "channels_last": self.channels_last,
            "input_key": self.input_key,
        }

    def describe(self) -> str:
        """"cuda:0, bf16 autocast, channels-last" for status lines."""
        parts = [self.device]
        if self.amp:
            parts.append(f"{self.amp} autocast")
        if self.channels_last:
            parts.append("channels-last")
        return ", ".join(parts)

    def base_extra(self, config: ProjectConfig) -> dict[str, Any]:
        """The report keys every model-running command shares."""
        return {
            "format": self.ckpt.format,
            "key": self.ckpt.key,
            "prefix": self.prefix,
            **self.ckpt.network_info(self.prefix),  # several networks: which one, EMA --key
            "model": self.spec,
            "project_file": str(config.path) if config.path else None,
            "data": self.source.description,
            "dropped_samples": self.source.dropped_samples,
            "dropped_reason": self.source.dropped_reason,
            "device": self.device,
            "amp": self.amp,
            "channels_last": self.channels_last,
        }


def prepare_run(
    command: str,
    config: ProjectConfig,
    path: Path,
    *,
    source: ModelFlags,
    data_spec: str,
    eval_spec: str | None = None,
    flags: DataFlags,
    run_flags: RunFlags,
    output: str | None = None,
    force: bool = False,
    tag: str | None = None,
    ui: Ui | None = None,
    require_model: bool = True,
    include_frozen: bool | None = None,
) -> Run | None:
    """Check the output path first when the command writes a checkpoint (``tag``: nothing
    runs if it would be refused), then load the checkpoint into the model and open the data.
    Collection data and evaluation data are shuffled (seeded): batch statistics need i.i.d.
    batches. Without model code: an error, or None when ``require_model`` is False.

    Under ``torchrun`` the collection data is sharded across ranks; evaluation data is not
    (every rank evaluates all of it, so every rank computes the same metrics)."""
    from ..io.checkpoint import check_output, default_output_path

    dev, amp, channels_last = resolve_run_flags(run_flags, config)
    call = resolve_call(merged(flags.call, config, "call"))
    out_path = None
    if tag is not None:
        out_path = Path(output) if output else default_output_path(path, tag)
        if path.exists():
            check_output(path, out_path, force=force)

    import torch

    torch.manual_seed(flags.seed)
    ckpt = open_checkpoint(path, source.key, source.trust, config)
    net, prefix, spec = build_model_for(ckpt, source.model, source.model_kwargs, config, ui)
    if net is None:
        if not require_model:
            return None
        raise UsageError(
            f"{command} runs the model: it needs --model pkg.module:factory or file.py:factory",
            "pass --model (or set model in bnscope.toml)",
        )
    require_batchnorm(net, command, include_frozen)
    source = open_data(data_spec, flags, config, "--data", shuffle=True, ui=ui)
    evaluation = (
        open_data(eval_spec, flags, config, "--eval-data", shuffle=True, shard=False, ui=ui)
        if eval_spec
        else None
    )
    return Run(
        ckpt, net, prefix, spec, source, evaluation, call, dev, out_path, amp, channels_last,
        merged(flags.input_key, config, "input_key"),
    )  # fmt: skip


def resolve_call(spec: str | None) -> Any:
    """``--call pkg.module:fn`` or ``file.py:fn``: a function ``fn(model, batch)`` that runs
    the model on a batch (None: inputs follow the model's ``forward``)."""
    if spec is None:
        return None
    from ..io.modelspec import resolve_spec

    fn = resolve_spec(spec, UsageError, "call")
    if not callable(fn):
        raise UsageError(
            f"--call {spec} is a {type(fn).__name__}, not a function",
            "point --call at a function call(model, batch) that returns the model's output",
        )
    return fn


def bn_updates(model: Any, layers: Any, prefix: str) -> dict[str, Any]:
    """Checkpoint keys -> new running_mean/running_var of the layers with status 'updated'."""
    modules = dict(model.named_modules())
    updates: dict[str, Any] = {}
    for rec in layers:
        if rec.status != "updated":
            continue
        name = "" if rec.name == "(root)" else rec.name
        mod = modules[name]
        base = f"{prefix}{name}." if name else prefix
        updates[f"{base}running_mean"] = mod.running_mean.detach().cpu()
        updates[f"{base}running_var"] = mod.running_var.detach().cpu()
    return updates
