"""``--data`` specs -> iterables of batches.

A spec is one of (docs/cli.md, section 8):

- a folder of images: class subfolders give labels (ImageFolder layout), a flat folder gives
  none. Images are decoded with Pillow inside DataLoader workers, converted to RGB (or to one
  channel), resized and center-cropped as torchvision's ``Resize``/``CenterCrop`` do, and
  normalized;
- a tensor file (``.pt``/``.pth``/``.npy``/``.npz``) or a folder of such shards;
- ``pkg.module:factory`` or ``path/to/file.py:factory``, a callable returning an iterable of
  batches (usually a DataLoader).

:func:`load_data` resolves a spec into a :class:`DataSource`. :func:`split_batch` and
:func:`move_to` are how the rest of bnscope takes batches apart and moves them; how a model runs
on a batch (``call``, :func:`bnscope.engine.runner.default_call`) is the engine's.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence, Sized
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset, IterableDataset, Subset

from bnscope.errors import BnscopeError, DataError
from bnscope.io.modelspec import resolve_spec, split_spec

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMAGE_SUFFIXES",
    "TENSOR_SUFFIXES",
    "INPUT_KEYS",
    "LABEL_KEYS",
    "ImageOptions",
    "DataSource",
    "DROP_SINGLE",
    "DROP_INCOMPLETE",
    "ImageFolderDataset",
    "TensorPairDataset",
    "load_data",
    "split_batch",
    "move_to",
]

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
TENSOR_SUFFIXES = {".pt", ".pth", ".npy", ".npz"}

#: Keys that name the input in a dict batch (and in a ``.pt`` dict / ``.npz``), in priority order.
INPUT_KEYS = ("x", "input", "inputs", "image", "images", "img", "pixel_values", "data")
#: Keys that name the labels in a dict batch (and in a ``.pt`` dict / ``.npz``), in priority order.
LABEL_KEYS = ("y", "label", "labels", "target", "targets")
# Tensor files accept a narrower set of input names than batches do.
_FILE_INPUT_KEYS = ("x", "input", "inputs", "data")

_TENSOR_FIX = "save the inputs as a tensor, an (x, y) pair, or a dict with 'x' (and optionally 'y')"
_DIR_FIX = (
    "put images in class subfolders (DIR/CLASS/IMG) or directly in DIR, "
    "or tensor shards (.pt .pth .npy .npz) directly in DIR"
)
_SIZE_FIX = "pass image_size=N to resize and crop"


# --------------------------------------------------------------------------------------------
# Options and result


@dataclass(frozen=True)
class ImageOptions:
    """How image folders are decoded and preprocessed.

    ``image_size`` is the center-crop size; ``None`` means no resize or crop, and then every
    image must have the same size. ``resize`` is the length the shorter side is resized to
    before the crop (default ``round(image_size * 8 / 7)``, so 224 -> 256). ``channels`` is 3
    (RGB) or 1 (grayscale, Pillow mode ``"L"``). ``mean``/``std`` normalize each channel; with
    one channel a 3-tuple is averaged, and a 1-tuple applies to every channel.
    """

    image_size: int | None = None
    resize: int | None = None
    channels: int = 3
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD

    def resize_to(self) -> int | None:
        """The shorter-side length images are resized to (``None`` without ``image_size``)."""
        if self.image_size is None:
            return None
        if self.resize is not None:
            return self.resize
        return int(round(self.image_size * 8 / 7))

    def normalization(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """``(mean, std)`` with exactly ``channels`` entries each."""
        return (
            _per_channel(self.mean, self.channels, "mean"),
            _per_channel(self.std, self.channels, "std"),
        )

    def validate(self) -> None:
        """Raise :class:`DataError` when the options cannot be applied."""
        if self.channels not in (1, 3):
            raise DataError(
                f"unsupported number of image channels: {self.channels}",
                "use channels=3 (RGB) or channels=1 (grayscale)",
            )
        if self.image_size is not None and self.image_size < 1:
            raise DataError(
                f"image size must be positive, got {self.image_size}", "pass image_size=N >= 1"
            )
        if self.resize is not None:
            if self.image_size is None:
                raise DataError(
                    "a resize length was given without an image size",
                    "pass image_size=N as well (the center-crop size)",
                )
            if self.resize < self.image_size:
                raise DataError(
                    f"resize length {self.resize} is smaller than the image size "
                    f"{self.image_size}, so the crop would not fit",
                    "pass a resize length >= the image size, or leave it at its default",
                )
        _, std = self.normalization()
        if any(not s > 0 for s in std):
            raise DataError(f"std must be positive, got {tuple(self.std)}", "pass std= values > 0")


def _per_channel(values: Sequence[float], channels: int, name: str) -> tuple[float, ...]:
    values = tuple(float(v) for v in values)
    if len(values) == channels:
        return values
    if len(values) == 1:
        return values * channels
    if channels == 1 and len(values) == 3:
        return (sum(values) / 3.0,)
    raise DataError(
        f"{name}= has {len(values)} values but images have {channels} channels",
        f"pass one value or {channels} values to {name}=",
    )


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
    """

    loader: Iterable[Any]
    description: str
    kind: str
    num_samples: int | None
    has_labels: bool | None
    classes: list[str] | None = field(default=None)
    dropped_samples: int = 0
    dropped_reason: str | None = None

    def __iter__(self) -> Iterator[Any]:
        return iter(self.loader)


# --------------------------------------------------------------------------------------------
# Errors raised inside DataLoader workers


class _SampleError(DataError):
    """A :class:`DataError` raised while reading one sample, possibly in a worker process.

    torch re-raises a worker's exception in the main process as ``type(exc)(text)``, where
    ``text`` is "Caught ... in DataLoader worker process N." followed by the worker's whole
    traceback. This class recovers the original one-line message and fix from the traceback's
    last line, so the user still sees one clean line. Fixes given to it contain no ``"; "``.
    """

    def __init__(self, message: str, fix: str | None = None) -> None:
        if fix is None and message.startswith("Caught "):
            message, fix = _unwrap_worker_text(message)
        super().__init__(message, fix)


def _unwrap_worker_text(text: str) -> tuple[str, str | None]:
    lines = [line for line in text.splitlines() if line.strip()]
    last = lines[-1] if lines else text
    marker = f"{_SampleError.__name__}: "
    if marker not in last:
        return text, None
    line = last.split(marker, 1)[1].strip()
    message, sep, fix = line.rpartition("; ")
    if not sep:
        return line, None
    return message, fix


def _describe(exc: BaseException, limit: int = 300) -> str:
    """``"Type: message"`` on one line, shortened to ``limit`` characters."""
    text = " ".join(str(exc).split())
    out = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return out if len(out) <= limit else out[: limit - 3] + "..."


# --------------------------------------------------------------------------------------------
# Images


def _is_hidden(name: str) -> bool:
    return name.startswith(".")


def _is_image(name: str) -> bool:
    return not _is_hidden(name) and os.path.splitext(name)[1].lower() in IMAGE_SUFFIXES


def _walk_images(folder: Path) -> list[Path]:
    """Image files under ``folder``, recursively, in torchvision's order; hidden entries skipped."""
    found: list[Path] = []
    for root, _, files in sorted(os.walk(folder, followlinks=True)):
        if any(_is_hidden(part) for part in Path(root).relative_to(folder).parts):
            continue
        found.extend(Path(root) / name for name in sorted(files) if _is_image(name))
    return found


def _has_images(folder: Path) -> bool:
    """Whether any image file lies under ``folder``; stops at the first one."""
    for _, dirs, files in os.walk(folder, followlinks=True):
        dirs[:] = [d for d in dirs if not _is_hidden(d)]
        if any(_is_image(name) for name in files):
            return True
    return False


def _scan_image_folder(root: Path) -> tuple[list[Path], list[int] | None, list[str] | None]:
    """``(files, labels, classes)``; labels and classes are ``None`` for a flat folder."""
    loose: list[Path] = []
    subdirs: list[Path] = []
    for entry in sorted(os.scandir(root), key=lambda e: e.name):
        if _is_hidden(entry.name):
            continue
        if entry.is_dir():
            subdirs.append(Path(entry.path))
        elif entry.is_file() and _is_image(entry.name):
            loose.append(Path(entry.path))
    per_class = {d.name: _walk_images(d) for d in subdirs}
    with_images = [name for name, files in per_class.items() if files]
    if loose and with_images:
        raise DataError(
            f"{root} mixes loose images ({len(loose)}, e.g. {loose[0].name}) with class "
            f"subfolders ({len(with_images)}, e.g. {with_images[0]})",
            "put every image in a class subfolder (labelled) or all directly in the folder "
            "(unlabelled)",
        )
    if loose:
        return loose, None, None
    if not with_images:
        raise DataError(f"no images found in {root}", _DIR_FIX.replace("DIR", str(root)))
    classes = sorted(per_class)
    files: list[Path] = []
    labels: list[int] = []
    for index, name in enumerate(classes):
        files.extend(per_class[name])
        labels.extend([index] * len(per_class[name]))
    return files, labels, classes


_READ_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)
_READ_FIX = "remove or replace the file, or point data= at a folder without it"


def _read_error(path: Path, exc: BaseException) -> _SampleError:
    if isinstance(exc, UnidentifiedImageError):
        detail = "not an image, or a format Pillow cannot read"
    else:
        detail = _describe(exc)
    return _SampleError(f"cannot read image {path} ({detail})", _READ_FIX)


def _open_image(path: Path, mode: str) -> Image.Image:
    """Decode ``path`` fully and convert it to ``mode``, as torchvision's ``pil_loader``."""
    try:
        with Image.open(path) as img:
            return img.convert(mode)
    except _READ_ERRORS as exc:
        raise _read_error(path, exc) from exc


def _image_size(path: Path) -> tuple[int, int]:
    """``(width, height)`` from the header alone."""
    try:
        with Image.open(path) as img:
            return img.size
    except _READ_ERRORS as exc:
        raise _read_error(path, exc) from exc


def _resize_center_crop(img: Image.Image, size: int, resize: int) -> Image.Image:
    """torchvision ``Resize(resize)`` (bilinear) then ``CenterCrop(size)`` on a PIL image."""
    w, h = img.size
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = resize, int(resize * long / short)
    new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    if (new_w, new_h) != (w, h):
        img = img.resize((new_w, new_h), Image.Resampling.BILINEAR)
    left = int(round((new_w - size) / 2.0))
    top = int(round((new_h - size) / 2.0))
    return img.crop((left, top, left + size, top + size))


class ImageFolderDataset(Dataset):
    """Images under ``root``: class subfolders (labelled) or loose images (unlabelled).

    Files are found when the dataset is built; they are decoded in ``__getitem__`` (so in
    DataLoader workers). An item is ``(x, label)`` for a labelled folder and ``x`` for a flat
    one; ``x`` is a float32 CHW tensor, normalized. Without ``image_size`` every image must have
    the size of the first one; the first mismatch raises :class:`DataError`.
    """

    def __init__(self, root: str | Path, options: ImageOptions = ImageOptions()) -> None:
        options.validate()
        self.root = Path(root)
        self.options = options
        self.files, self.labels, self.classes = _scan_image_folder(self.root)
        self._mode = "RGB" if options.channels == 3 else "L"
        mean, std = options.normalization()
        self._mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self._std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
        self._reference: tuple[Path, tuple[int, int]] | None = None
        if options.image_size is None:
            self._reference = (self.files[0], _image_size(self.files[0]))

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> Any:
        path = self.files[index]
        img = _open_image(path, self._mode)
        size = self.options.image_size
        if size is not None:
            resize = self.options.resize_to()
            assert resize is not None
            img = _resize_center_crop(img, size, resize)
        elif self._reference is not None and img.size != self._reference[1]:
            ref_path, (rw, rh) = self._reference
            raise _SampleError(
                f"images have different sizes: {ref_path} is {rw}x{rh}, "
                f"{path} is {img.size[0]}x{img.size[1]}",
                _SIZE_FIX,
            )
        array = np.asarray(img, dtype=np.float32) / 255.0
        if array.ndim == 2:
            array = array[:, :, None]
        x = torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))
        x = (x - self._mean) / self._std
        if self.labels is None:
            return x
        return x, self.labels[index]


# --------------------------------------------------------------------------------------------
# Tensor files


class TensorPairDataset(Dataset):
    """Samples ``x[i]`` (or ``(x[i], y[i])`` when labels are given) from in-memory tensors."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor | None = None) -> None:
        self.x = x
        self.y = y

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def __getitem__(self, index: int) -> Any:
        if self.y is None:
            return self.x[index]
        return self.x[index], self.y[index]


def _as_tensor(value: Any, path: Path, what: str) -> torch.Tensor:
    if isinstance(value, np.ndarray):
        if value.dtype == object:
            raise DataError(f"{what} in {path} is an object array", _TENSOR_FIX)
        try:
            value = torch.from_numpy(np.ascontiguousarray(value))
        except TypeError as exc:
            raise DataError(
                f"{what} in {path} has unsupported dtype ({_describe(exc)})", _TENSOR_FIX
            ) from exc
    if not isinstance(value, torch.Tensor):
        raise DataError(f"{what} in {path} is a {type(value).__name__}, not a tensor", _TENSOR_FIX)
    return value


def _pick(mapping: Mapping[str, Any], keys: Sequence[str]) -> str | None:
    return next((k for k in keys if k in mapping), None)


def _key_list(keys: Iterable[Any], limit: int = 8) -> str:
    """``'a', 'b', ... (N in all)``: the first ``limit`` names, quoted."""
    names = [str(k) for k in keys]
    if not names:
        return "none"
    shown = ", ".join(repr(k) for k in names[:limit])
    return shown if len(names) <= limit else f"{shown}, ... ({len(names)} in all)"


def _from_mapping(content: Mapping[str, Any], path: Path) -> tuple[Any, Any]:
    x_key = _pick(content, _FILE_INPUT_KEYS)
    if x_key is None:
        if len(content) == 1:  # a single unnamed array (np.savez(f, arr) -> "arr_0")
            return next(iter(content.values())), None
        raise DataError(
            f"{path} has no input entry (looked for {', '.join(_FILE_INPUT_KEYS)}; "
            f"found {_key_list(content.keys())})",
            _TENSOR_FIX,
        )
    y_key = _pick(content, LABEL_KEYS)
    return content[x_key], (content[y_key] if y_key is not None else None)


def _read_tensor_file(path: Path) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(x, y)`` from one tensor file, checked and with floating inputs as float32."""
    suffix = path.suffix.lower()
    try:
        if suffix in (".pt", ".pth"):
            content = torch.load(path, map_location="cpu", weights_only=True)
        elif suffix == ".npy":
            content = np.load(path, allow_pickle=False)
        else:
            with np.load(path, allow_pickle=False) as npz:
                content = {name: npz[name] for name in npz.files}
    except Exception as exc:  # unpickling, zip and format errors come in many types
        raise DataError(f"cannot load tensor file {path} ({_describe(exc)})", _TENSOR_FIX) from exc

    if isinstance(content, Mapping):
        x, y = _from_mapping(content, path)
    elif isinstance(content, (tuple, list)):
        if len(content) not in (1, 2):
            raise DataError(
                f"{path} holds a {type(content).__name__} of {len(content)} items; expected "
                "(x,) or (x, y)",
                _TENSOR_FIX,
            )
        x, y = content[0], (content[1] if len(content) == 2 else None)
    else:
        x, y = content, None

    x = _as_tensor(x, path, "the input")
    y = _as_tensor(y, path, "the labels") if y is not None else None
    if x.dim() == 0 or x.shape[0] == 0:
        raise DataError(
            f"{path} holds no samples (input shape {tuple(x.shape)})",
            "save inputs with the sample dimension first, e.g. shape (N, C, H, W)",
        )
    if y is None and x.dim() == 1 and not (x.is_floating_point() or x.is_complex()):
        raise DataError(
            f"{path} looks like labels only (a 1-D {x.dtype} tensor of {x.shape[0]} values)",
            "save the inputs too, e.g. torch.save({'x': inputs, 'y': labels}, path)",
        )
    if y is not None and (y.dim() != 1 or y.shape[0] != x.shape[0]):
        raise DataError(
            f"labels in {path} have shape {tuple(y.shape)} but the inputs hold "
            f"{x.shape[0]} samples",
            "save one label per sample as a 1-D tensor of length N",
        )
    if x.is_floating_point() and x.dtype != torch.float32:
        x = x.float()
    return x, y


def _tensor_dataset(files: Sequence[Path]) -> tuple[Dataset, int, bool]:
    """A dataset over one or more tensor files: ``(dataset, num_samples, has_labels)``."""
    parts: list[TensorPairDataset] = []
    first: tuple[Path, torch.Tensor, torch.Tensor | None] | None = None
    for path in files:
        x, y = _read_tensor_file(path)
        if first is not None:
            p0, x0, y0 = first
            if x.shape[1:] != x0.shape[1:] or x.dtype != x0.dtype:
                raise DataError(
                    f"shard {path.name} holds samples of shape {tuple(x.shape[1:])} "
                    f"({x.dtype}), but {p0.name} holds {tuple(x0.shape[1:])} ({x0.dtype})",
                    "make every shard hold samples of the same shape and dtype",
                )
            if (y is None) != (y0 is None):
                raise DataError(
                    f"shard {path.name} {'has no' if y is None else 'has'} labels, but "
                    f"{p0.name} {'has no' if y0 is None else 'has'} labels",
                    "save labels in every shard or in none",
                )
        else:
            first = (path, x, y)
        parts.append(TensorPairDataset(x, y))
    assert first is not None
    total = sum(len(p) for p in parts)
    if len(parts) == 1:
        return parts[0], total, first[2] is not None
    return torch.utils.data.ConcatDataset(parts), total, first[2] is not None


# --------------------------------------------------------------------------------------------
# Factories


def _factory_parts(spec: str) -> tuple[str, str] | None:
    """``(module_or_file, attribute)`` when ``spec`` is a factory spec (the grammar of
    :func:`bnscope.io.modelspec.split_spec`), else ``None``; an existing path is a path."""
    if ":" not in spec or Path(spec).exists():
        return None
    return split_spec(spec)


def _factory_kwargs(factory: Callable[..., Any], values: dict[str, int]) -> dict[str, int]:
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return {}
    accepted = {
        name
        for name, p in params.items()
        if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    }
    return {k: v for k, v in values.items() if k in accepted}


def _load_factory(target: str, attr: str, spec: str, values: dict[str, int]) -> Iterable[Any]:
    obj = resolve_spec(f"{target}:{attr}", DataError, "data")
    if callable(obj) and not isinstance(obj, (Iterable, Dataset)):
        try:
            result = obj(**_factory_kwargs(obj, values))
        except DataError:
            raise
        except Exception as exc:
            raise DataError(
                f"data factory {spec!r} raised {_describe(exc)}", "fix the error in the factory"
            ) from exc
    else:
        result = obj
    if isinstance(result, Dataset) and not isinstance(result, IterableDataset):
        raise DataError(
            f"data factory {spec!r} returned a {type(result).__name__} (a dataset of samples), "
            "not batches",
            "return torch.utils.data.DataLoader(dataset, batch_size=batch_size)",
        )
    if not isinstance(result, Iterable) or isinstance(result, (str, bytes)):
        raise DataError(
            f"data factory {spec!r} returned a {type(result).__name__}, not an iterable of batches",
            "return a DataLoader or another iterable of batches",
        )
    return result


class _FactoryBatches:
    """A factory's iterable of batches whose failures while producing a batch become one-line
    DataErrors naming the spec and the batch (a reader that breaks after a few
    batches, a DataLoader worker that raises). ``KeyboardInterrupt``, ``StopIteration`` and
    bnscope's own errors pass through unchanged; other attributes are the loader's."""

    def __init__(self, loader: Iterable[Any], spec: str) -> None:
        self.loader = loader
        self.spec = spec

    def __iter__(self) -> Iterator[Any]:
        try:
            inner = iter(self.loader)
        except (BnscopeError, StopIteration):
            raise
        except Exception as exc:
            raise _iteration_error(self.spec, exc, 0) from exc
        return _FactoryIterator(inner, self.spec)

    def __getattr__(self, name: str) -> Any:
        if name in ("loader", "spec"):
            raise AttributeError(name)
        return getattr(self.loader, name)


class _FactoryIterator:
    """The iterator of :class:`_FactoryBatches`; other attributes (``_shutdown_workers`` of a
    DataLoader's iterator) are the wrapped iterator's."""

    def __init__(self, inner: Iterator[Any], spec: str) -> None:
        self.inner = inner
        self.spec = spec
        self.index = 0

    def __iter__(self) -> Iterator[Any]:
        return self

    def __next__(self) -> Any:
        try:
            batch = next(self.inner)
        except (BnscopeError, StopIteration):
            raise
        except Exception as exc:
            raise _iteration_error(self.spec, exc, self.index) from exc
        self.index += 1
        return batch

    def __getattr__(self, name: str) -> Any:
        if name in ("inner", "spec", "index"):
            raise AttributeError(name)
        return getattr(self.inner, name)


def _iteration_error(spec: str, exc: BaseException, index: int) -> DataError:
    detail = _describe(exc)
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if "Original Traceback" in str(exc) and lines:  # from a DataLoader worker: its last line
        detail = lines[-1] if len(lines[-1]) <= 300 else lines[-1][:297] + "..."
    return DataError(
        f"data factory {spec!r} raised {detail} while producing batch {index}",
        "fix the error in the factory (or its data)",
    )


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
    """

    seed: int | None = None

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        if self.seed is not None and self.generator is not None:
            self.generator.manual_seed(self.seed)
        iterator = super().__iter__()
        try:
            yield from iterator
        except BaseException:  # includes GeneratorExit: the consumer stopped early
            shutdown = getattr(iterator, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()
            raise


def _make_loader(
    dataset: Dataset,
    *,
    batch_size: int,
    workers: int,
    shuffle: bool,
    seed: int,
    drop_last: bool,
    same_order: bool = False,
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
    )
    loader.seed = seed if same_order else None
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
    loader = _make_loader(dataset, drop_last=bool(dropped), **loader_args)
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
    shuffle: bool = False,
    seed: int = 0,
    drop_last: bool = False,
    rank: int = 0,
    world_size: int = 1,
    same_order: bool = False,
    drop_single: bool = False,
) -> DataSource:
    """Resolve a ``--data`` spec into a :class:`DataSource` of batches.

    ``same_order=True`` makes a shuffled image folder or tensor file yield the same batches in
    the same order on every iteration (the shuffle is re-seeded with ``seed`` each time), as the
    analyses that read the data twice want; by default every iteration draws a new order, as a
    training loop wants.

    Image folders and tensor files become a DataLoader over this rank's samples
    (``rank::world_size``: every sample on exactly one rank). A factory is called with those
    of ``batch_size``, ``num_workers``/``workers``, ``seed``, ``rank`` and ``world_size`` that its
    signature names; shuffling, dropping and sharding are then up to the factory. A
    module-level iterable (``pkg.mod:loader``) is used as it is. Raises :class:`DataError`.

    The last batch of an image folder or tensor file (per rank) is incomplete when the batch
    size does not divide the samples. ``drop_last=True`` leaves every incomplete last batch
    out; ``drop_single=True`` (what the CLI does by default) leaves out a last batch of exactly
    one sample, which BatchNorm cannot normalize on [N, C] inputs with batch statistics. The
    :class:`DataSource` counts the samples left out (``dropped_samples``, ``dropped_reason``).
    """
    _check_args(batch_size, workers, rank, world_size)
    loader_args: dict[str, Any] = dict(
        batch_size=batch_size, workers=workers, shuffle=shuffle, seed=seed, drop_last=drop_last,
        same_order=same_order, drop_single=drop_single, rank=rank, world_size=world_size,
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
        dataset, total, labelled = _tensor_dataset([path])
        local = _shard(dataset, total, rank, world_size)
        note = _shard_note(len(cast(Sized, local)), total, "samples", rank, world_size)
        return _batched_source(
            local, f"tensor file {spec} ({note})", "tensors", labelled, None, **loader_args
        )

    if not path.is_dir():
        raise DataError(f"data is neither a file nor a folder: {spec}", "pass a file or folder")

    if _has_images(path):
        images = ImageFolderDataset(path, image)
        total = len(images)
        local = _shard(images, total, rank, world_size)
        note = _shard_note(len(cast(Sized, local)), total, "images", rank, world_size)
        if images.classes is None:
            description = f"image folder {spec} (flat, {note}, no labels)"
        else:
            description = f"image folder {spec} ({len(images.classes)} classes, {note})"
        return _batched_source(
            local,
            description,
            "images",
            images.classes is not None,
            list(images.classes) if images.classes is not None else None,
            **loader_args,
        )

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
    dataset, total, labelled = _tensor_dataset(shards)
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


# --------------------------------------------------------------------------------------------
# Batches


def split_batch(batch: Any, input_key: str | None = None) -> tuple[Any, torch.Tensor | None]:
    """Split a batch into ``(inputs, labels)``; labels are ``None`` when absent.

    A tensor is all input. A tuple/list holds the input first and, when the second item is a
    tensor, the labels second. A dict gives its ``input_key`` entry, or else the first of
    :data:`INPUT_KEYS` present, with labels from the first of :data:`LABEL_KEYS` present.
    ``input_key`` only applies to dict batches. Raises :class:`DataError`.
    """
    if isinstance(batch, torch.Tensor):
        return batch, None
    if isinstance(batch, (tuple, list)):
        if not batch:
            raise DataError(
                "a batch is an empty sequence", "make the data yield (inputs, labels) or inputs"
            )
        label = batch[1] if len(batch) >= 2 and isinstance(batch[1], torch.Tensor) else None
        return batch[0], label
    if isinstance(batch, Mapping):
        if input_key is not None:
            if input_key not in batch:
                raise DataError(
                    f"batches have no key {input_key!r} (keys: {_key_list(batch.keys())})",
                    "pass input_key= with one of those keys",
                )
            key: Any = input_key
        else:
            key = _pick(batch, INPUT_KEYS)
            if key is None:
                raise DataError(
                    f"cannot tell which entry of the batch is the input "
                    f"(keys: {_key_list(batch.keys())})",
                    "pass input_key=KEY, or call= for several inputs",
                )
        label_key = _pick(batch, LABEL_KEYS)
        label = batch[label_key] if label_key is not None else None
        return batch[key], label if isinstance(label, torch.Tensor) else None
    raise DataError(
        f"unsupported batch type {type(batch).__name__}",
        "yield tensors, (inputs, labels) tuples or dicts, or pass a call(model, batch) function",
    )


def move_to(obj: Any, device: torch.device | str, *, channels_last: bool = False) -> Any:
    """``obj`` with every tensor inside tuples, lists and dicts moved to ``device`` (copies to
    a GPU are queued without waiting); with ``channels_last``, 4-D and 5-D floating tensors
    also take the channels-last memory format."""
    if isinstance(obj, torch.Tensor):
        fmt = None
        if channels_last and obj.is_floating_point():
            fmt = {4: torch.channels_last, 5: torch.channels_last_3d}.get(obj.dim())
        target = torch.device(device)
        if obj.device == target and (fmt is None or obj.is_contiguous(memory_format=fmt)):
            return obj  # already there: not even a no-op dispatch
        non_blocking = obj.device.type == "cpu" and target.type == "cuda"
        if fmt is None:
            return obj.to(target, non_blocking=non_blocking)
        return obj.to(target, non_blocking=non_blocking, memory_format=fmt)
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # namedtuple
        return type(obj)(*(move_to(v, device, channels_last=channels_last) for v in obj))
    if isinstance(obj, (tuple, list)):
        return type(obj)(move_to(v, device, channels_last=channels_last) for v in obj)
    if isinstance(obj, Mapping):
        items = {k: move_to(v, device, channels_last=channels_last) for k, v in obj.items()}
        try:
            return cast(Any, type(obj))(items)
        except Exception:
            return items
    return obj
