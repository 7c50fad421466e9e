"""``--data`` specs -> a :class:`DataSource` of batches.

A spec is one of (docs/cli.md, section 8):

- a folder of images: class subfolders give labels (ImageFolder layout), a flat folder gives
  none (:mod:`bnscope.io.images`);
- a tensor file (``.pt``/``.pth``/``.npy``/``.npz``) or a folder of such shards
  (:mod:`bnscope.io.tensorfiles`);
- ``pkg.module:factory`` or ``path/to/file.py:factory``, a callable returning an iterable of
  batches (usually a DataLoader) (:mod:`bnscope.io.factories`).

:func:`load_data` resolves a spec into a :class:`DataSource`: image folders and tensor files
are batched, sharded across ranks and their incomplete last batch dropped here. An image that
cannot be decoded stops the reading with a :class:`DataError` naming it, or, with
``skip_unreadable=True``, is left out of its batch and listed (:meth:`DataSource.unreadable`).
How batches are taken apart is :mod:`bnscope.io.batches`'s.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence, Sized
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, Subset

from bnscope.errors import DataError
from bnscope.io.factories import _factory_parts, _FactoryBatches, _load_factory
from bnscope.io.images import (
    _DIR_FIX,
    _READ_FIX,
    IMAGE_SUFFIXES,
    Collated,
    ImageFolderDataset,
    ImageOptions,
    Unreadable,
    _has_images,
    _is_hidden,
    collate_readable,
    split_like,
)
from bnscope.io.tensorfiles import TENSOR_SUFFIXES, _tensor_dataset

__all__ = [
    "DataSource",
    "DROP_SINGLE",
    "batch_count",
    "DROP_INCOMPLETE",
    "known_batches",
    "load_data",
]


#: ``DataSource.dropped_reason``: a last batch of one sample was left out (``drop_single``):
#: BatchNorm cannot normalize one sample of [N, C] inputs with batch statistics.
DROP_SINGLE = "batch-of-one"
#: ``DataSource.dropped_reason``: an incomplete last batch was left out (``drop_last``).
DROP_INCOMPLETE = "drop-last"


@dataclass
class DataSource:
    """A resolved ``--data`` spec: an iterable of batches plus what is known about it.

    ``num_samples`` is the number of samples this rank iterates over (``None`` for factories),
    after ``dropped_samples`` samples of an incomplete last batch were left out for the reason
    ``dropped_reason`` (:data:`DROP_SINGLE` or :data:`DROP_INCOMPLETE`; ``None`` when none
    were); ``has_labels`` is ``None`` when unknown.

    For a labelled image folder, ``classes`` are its class folders' names (in name order) and
    ``label_names`` the names its labels index: the same list, or the class names given to
    :func:`load_data` when the folders were matched to them by name (``matched``).
    ``split_folders`` are class folders named like dataset splits (``train``, ``val``...).
    """

    loader: Iterable[Any]
    description: str
    kind: str
    num_samples: int | None
    has_labels: bool | None
    classes: list[str] | None = field(default=None)
    dropped_samples: int = 0
    dropped_reason: str | None = None
    label_names: list[str] | None = None
    matched: bool = False
    split_folders: list[str] = field(default_factory=list)

    def __iter__(self) -> Iterator[Any]:
        return iter(self.loader)

    def unreadable(self) -> dict[str, str]:
        """The images left out so far because they could not be decoded (only with
        ``skip_unreadable=True``; otherwise the first one stops the reading): path -> reason."""
        return dict(getattr(self.loader, "skipped", {}))


def batch_count(data: Iterable[Any]) -> int | None:
    """How many batches one pass over ``data`` yields, when that is known without reading it:
    :func:`known_batches`, and otherwise ``len()`` of any other sized iterable (used for
    progress totals only; the refusal of ``batches=`` beyond the data trusts
    :func:`known_batches` alone). None for a generator or another iterable without ``len()``,
    and for a DataLoader over an ``IterableDataset`` (its length is only an estimate)."""
    known = known_batches(data)
    if known is not None:
        return known[0]
    data = _unwrap(data)
    if isinstance(data, DataLoader) or not isinstance(data, Sized):
        return None
    try:
        count = len(data)
    except (TypeError, NotImplementedError):
        return None
    return count if isinstance(count, int) and count >= 0 else None


def _unwrap(data: Any) -> Any:
    """The loader behind a :class:`DataSource` or a factory's batches."""
    while isinstance(data, (DataSource, _FactoryBatches)):
        data = data.loader
    return data


def known_batches(data: Any) -> tuple[int, int | None] | None:
    """``(batches, batch_size)`` that one iteration over ``data`` yields, when that is known
    without reading any of it; ``None`` otherwise. ``batch_size`` is ``None`` when unknown.

    Known: a :class:`DataSource` of an image folder or tensor file, a factory's or your own
    ``DataLoader`` over a map-style dataset (``len()`` of its batch sampler, ``drop_last``
    included; a sampler's ``len()`` is trusted, as PyTorch does), a list or tuple of batches.
    Unknown: generators and other iterables, ``DataLoader``s over an ``IterableDataset``.
    """
    data = _unwrap(data)
    if isinstance(data, (list, tuple)):
        return len(data), None
    if isinstance(data, DataLoader) and not isinstance(data.dataset, IterableDataset):
        try:
            return len(data), data.batch_size
        except TypeError:  # a batch sampler without len()
            return None
    return None


# --------------------------------------------------------------------------------------------
# load_data


class _ClosingDataLoader(DataLoader):
    """A DataLoader whose worker processes stop as soon as iteration ends early.

    torch stops workers when its iterator is garbage collected; when the iterator dies in a
    reference cycle (as it does once an exception's traceback is kept), the queues it needs are
    finalized first and every worker costs a 5 s join timeout. Stopping them explicitly on an
    exception, or when the consumer stops early, avoids that stall.

    With ``seed`` set, every iteration yields the same batches in the same order: the
    shuffling generator is re-seeded at the start of each one. Commands that read the data
    twice (inspect, ghost) then see identical batches, and inspect can pair its two passes.

    Batches from :func:`~bnscope.io.images.collate_readable` that set unreadable images aside
    are handled here, in the main process, where they arrive also from worker processes. By
    default the first such image stops the iteration with a :class:`DataError` naming it and
    its position in the data (the workers are stopped as for any other exception). With
    ``skip_unreadable`` set, the batch of the other images is yielded instead, ``skipped``
    collects every image left out (path -> reason) over all iterations, and an iteration in
    which no image could be read at all is a :class:`DataError`.
    """

    seed: int | None = None
    skip_unreadable: bool = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.skipped: dict[str, str] = {}

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        if self.seed is not None and self.generator is not None:
            self.generator.manual_seed(self.seed)
        iterator = super().__iter__()
        try:
            yielded = 0
            left_out: list[str] = []
            for batch in iterator:
                if isinstance(batch, Collated):
                    if not self.skip_unreadable:
                        raise _unreadable_error(batch.skipped[0])
                    self.skipped.update((it.path, it.reason) for it in batch.skipped)
                    left_out.extend(it.path for it in batch.skipped)
                    if batch.batch is None:
                        continue
                    batch = batch.batch
                yielded += 1
                yield batch
            if not yielded and left_out:
                raise DataError(
                    f"none of the {len(left_out)} images could be read (e.g. {left_out[0]}: "
                    f"{self.skipped[left_out[0]]})",
                    _READ_FIX,
                )
        except BaseException:  # includes GeneratorExit: the consumer stopped early
            shutdown = getattr(iterator, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()
            raise


def _unreadable_error(item: Unreadable) -> DataError:
    """The error of an image that cannot be decoded, when unreadable images are not skipped:
    which image of how many, the file, and why."""
    return DataError(
        f"{item.describe()} cannot be read: {item.path}: {item.reason}",
        "remove or replace the file, or pass skip_unreadable=True to leave unreadable images "
        "out (a warning names them)",
    )


def _make_loader(
    dataset: Dataset,
    *,
    batch_size: int,
    workers: int,
    shuffle: bool,
    seed: int,
    drop_last: bool,
    same_order: bool = False,
    skip_unreadable: bool = False,
    collate_fn: Any = None,
) -> DataLoader:
    generator = torch.Generator()
    generator.manual_seed(seed)
    loader = _ClosingDataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=workers,
        generator=generator,
        drop_last=drop_last,
        persistent_workers=False,
        pin_memory=False,
        collate_fn=collate_fn,
    )
    loader.seed = seed if same_order else None
    loader.skip_unreadable = skip_unreadable
    return loader


def _dropped(
    num_samples: int, batch_size: int, drop_last: bool, drop_single: bool
) -> tuple[int, str | None]:
    """How many samples the last batch leaves out, and why: every incomplete last batch with
    ``drop_last``; with ``drop_single`` a last batch of exactly one sample (unless it is all
    the data: then nothing is left to run and the model's own error is the clearer one)."""
    remainder = num_samples % batch_size
    if drop_last and remainder:
        return remainder, DROP_INCOMPLETE
    if drop_single and remainder == 1 and num_samples > 1:
        return 1, DROP_SINGLE
    return 0, None


def _batched_source(
    dataset: Dataset,
    description: str,
    kind: str,
    labelled: bool,
    classes: list[str] | None,
    *,
    drop_single: bool,
    rank: int,
    world_size: int,
    collate_fn: Any = None,
    **loader_args: Any,
) -> DataSource:
    """A :class:`DataSource` over ``dataset`` (this rank's samples), in batches of
    ``batch_size``; the last batch is dropped as :func:`_dropped` says."""
    local = len(dataset)  # type: ignore[arg-type]
    batch_size = loader_args["batch_size"]
    dropped, reason = _dropped(local, batch_size, loader_args.pop("drop_last"), drop_single)
    if dropped and dropped == local and world_size == 1:
        raise DataError(
            f"dropping the incomplete last batch leaves no data: {local} samples, batch size "
            f"{batch_size}",
            f"use batch_size={local} or less, or keep the incomplete batch "
            "(drop_last=False)",
        )
    loader = _make_loader(dataset, drop_last=bool(dropped), collate_fn=collate_fn, **loader_args)
    return DataSource(
        loader, description, kind, local - dropped, labelled, classes, dropped, reason
    )


def _shard(dataset: Dataset, total: int, rank: int, world_size: int) -> Dataset:
    if world_size == 1:
        return dataset
    return Subset(dataset, list(range(rank, total, world_size)))


def _shard_note(local: int, total: int, what: str, rank: int, world_size: int) -> str:
    if world_size == 1:
        return f"{total} {what}"
    return f"{local} of {total} {what} on rank {rank} of {world_size}"


def _check_args(batch_size: int, workers: int, rank: int, world_size: int) -> None:
    if batch_size < 1:
        raise DataError(
            f"batch size must be at least 1, got {batch_size}", "pass batch_size=N >= 1"
        )
    if workers < 0:
        raise DataError(f"workers must be 0 or more, got {workers}", "pass workers=N >= 0")
    if world_size < 1 or not 0 <= rank < world_size:
        raise DataError(
            f"invalid rank {rank} for world size {world_size}",
            "launch with torchrun, or leave rank and world size at their defaults",
        )


def load_data(
    spec: str | Path,
    *,
    batch_size: int = 32,
    workers: int = 0,
    image: ImageOptions = ImageOptions(),
    shuffle: bool = True,
    seed: int = 0,
    drop_last: bool = False,
    rank: int = 0,
    world_size: int = 1,
    same_order: bool = True,
    drop_single: bool = True,
    classes: Sequence[str] | None = None,
    skip_unreadable: bool = False,
    keys: Sequence[str] = (),
) -> DataSource:
    """Resolve a ``--data`` spec into a :class:`DataSource` of batches.

    The defaults are the commands' (docs/cli.md, section 8): image folders and tensor files
    are read in a shuffled order seeded by ``seed`` (``shuffle=True``), the same order on every
    iteration (``same_order=True``), in batches of 32, and a last batch of one sample is left
    out (``drop_single=True``). Shuffling matters: BN statistics gathered from batches that
    each hold one class (a folder read in order) are not the i.i.d. population's, and precise,
    adapt and inspect say so with a ``non-iid-batches`` finding when the batches carry labels.
    ``shuffle=False`` reads the samples in order (files by name, class folders in turn);
    ``same_order=False`` draws a new order on every iteration, as a training loop wants.

    Image folders and tensor files become a DataLoader over this rank's samples
    (``rank::world_size``: every sample on exactly one rank). A factory is called with those
    of ``batch_size``, ``num_workers``/``workers``, ``seed``, ``rank`` and ``world_size`` that its
    signature names; shuffling, dropping and sharding are then up to the factory. A
    module-level iterable (``pkg.mod:loader``) is used as it is. Raises :class:`DataError`.

    The last batch of an image folder or tensor file (per rank) is incomplete when the batch
    size does not divide the samples. ``drop_last=True`` leaves every incomplete last batch
    out; ``drop_single=True`` (the default, as in the commands) leaves out a last batch of
    exactly one sample, which BatchNorm cannot normalize on [N, C] inputs with batch
    statistics. The
    :class:`DataSource` counts the samples left out (``dropped_samples``, ``dropped_reason``).

    ``classes`` are the class names the labels of an image folder must follow (the training
    classes, in label order): each class folder is labelled with its name's position among
    them, so a folder lacking some classes keeps the others' labels, and a class folder not
    among them is a :class:`DataError`. Without them an image folder's labels are its class
    folders' positions in name order.

    An image that cannot be decoded (damaged, truncated, not an image) stops the reading with a
    :class:`DataError` naming it and its position in the folder (``image 900 of 1000``: files
    by name, class folders in turn), also when it is decoded in a worker process: statistics
    of a data set with holes in it are not the ones asked for. With ``skip_unreadable=True``
    such images are left out of their batches instead and listed by
    :meth:`DataSource.unreadable` as the batches are read (a folder in which no image can be
    read is still an error).

    ``keys`` names per-sample entries of tensor files to carry into the batches (group ids
    such as ``image_id``, :func:`bnscope.leakage_analysis`): every file must hold them, and
    the batches become dicts (``{"x": ..., "y": ..., "image_id": ...}``). Image folders and
    factories ignore it (a factory's batches carry what it puts in them).
    """
    _check_args(batch_size, workers, rank, world_size)
    loader_args: dict[str, Any] = dict(
        batch_size=batch_size, workers=workers, shuffle=shuffle, seed=seed, drop_last=drop_last,
        same_order=same_order, drop_single=drop_single, rank=rank, world_size=world_size,
        skip_unreadable=skip_unreadable,
    )  # fmt: skip

    if isinstance(spec, str):
        parts = _factory_parts(spec)
        if parts is not None:
            values = {
                "batch_size": batch_size,
                "num_workers": workers,
                "workers": workers,
                "seed": seed,
                "rank": rank,
                "world_size": world_size,
            }
            loader = _load_factory(parts[0], parts[1], spec, values)
            batches = _FactoryBatches(loader, spec)
            return DataSource(batches, f"factory {spec}", "factory", None, None)

    path = Path(spec)
    if not path.exists():
        raise DataError(
            f"data not found: {spec}",
            "pass an image folder, a tensor file (.pt .pth .npy .npz), a folder of them, "
            "or pkg.module:factory",
        )

    if path.is_file():
        if path.suffix.lower() in IMAGE_SUFFIXES:
            raise DataError(
                f"data is a single image: {spec}",
                "pass the folder that holds the images (with class subfolders for labels)",
            )
        if path.suffix.lower() not in TENSOR_SUFFIXES:
            raise DataError(
                f"unsupported data file {spec} (suffix {path.suffix or 'none'!r})",
                "pass a tensor file (.pt .pth .npy .npz), a folder of images or of tensor "
                "files, or pkg.module:factory",
            )
        dataset, total, labelled = _tensor_dataset([path], keys)
        local = _shard(dataset, total, rank, world_size)
        note = _shard_note(len(cast(Sized, local)), total, "samples", rank, world_size)
        return _batched_source(
            local, f"tensor file {spec} ({note})", "tensors", labelled, None, **loader_args
        )

    if not path.is_dir():
        raise DataError(f"data is neither a file nor a folder: {spec}", "pass a file or folder")

    if _has_images(path):
        images = ImageFolderDataset(path, image, classes)
        total = len(images)
        local = _shard(images, total, rank, world_size)
        note = _shard_note(len(cast(Sized, local)), total, "images", rank, world_size)
        found = images.classes
        matched = found is not None and classes is not None
        if found is None:
            description = f"image folder {spec} (flat, {note}, no labels)"
        elif matched and classes is not None and len(found) < len(classes):
            description = (
                f"image folder {spec} ({len(found)} of the {len(classes)} training classes, "
                f"{note})"
            )
        else:
            description = f"image folder {spec} ({len(found)} classes, {note})"
        source = _batched_source(
            local,
            description,
            "images",
            found is not None,
            list(found) if found is not None else None,
            collate_fn=collate_readable,
            **loader_args,
        )
        source.label_names = images.label_names
        source.matched = matched
        source.split_folders = split_like(found or [])
        return source

    shards = sorted(
        (
            p
            for p in path.iterdir()
            if p.is_file() and not _is_hidden(p.name) and p.suffix.lower() in TENSOR_SUFFIXES
        ),
        key=lambda p: p.name,
    )
    if not shards:
        raise DataError(
            f"no images or tensor files found in {spec}", _DIR_FIX.replace("DIR", str(spec))
        )
    dataset, total, labelled = _tensor_dataset(shards, keys)
    local = _shard(dataset, total, rank, world_size)
    note = _shard_note(len(cast(Sized, local)), total, "samples", rank, world_size)
    return _batched_source(
        local,
        f"tensor shards in {spec} ({len(shards)} files, {note})",
        "tensors",
        labelled,
        None,
        **loader_args,
    )
