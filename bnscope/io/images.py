"""Image folders as datasets: finding, decoding, resizing and normalizing the images.

A folder of images is a ``--data`` spec (docs/cli.md, section 8): class subfolders give labels
(ImageFolder layout), a flat folder gives none. Images are decoded with Pillow inside DataLoader
workers, converted to RGB (or to one channel), resized and center-cropped as torchvision's
``Resize``/``CenterCrop`` do, and normalized, as :class:`ImageOptions` says.

Labels are the class folders' positions in name order, or, given the class names the labels
must follow (the training classes), those names' positions: a folder that lacks some classes
keeps the others' labels. An image that cannot be decoded becomes an :class:`Unreadable` item
that :func:`collate_readable` sets aside; the loader (:mod:`bnscope.io.data`) then stops with
an error naming it, or, when asked to skip unreadable images, leaves it out and lists it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset, default_collate

from bnscope.errors import DataError
from bnscope.io._messages import _exc_line, _names

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMAGE_SUFFIXES",
    "SPLIT_NAMES",
    "ImageOptions",
    "ImageFolderDataset",
    "Unreadable",
    "collate_readable",
    "folder_classes",
]

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}

_DIR_FIX = (
    "put images in class subfolders (DIR/CLASS/IMG) or directly in DIR, "
    "or tensor shards (.pt .pth .npy .npz) directly in DIR"
)
_SIZE_FIX = "pass image_size=N to resize and crop"

#: class folder names that name a dataset split rather than a class (compared in lower case):
#: an image folder with such class folders is likely the parent of the splits
SPLIT_NAMES = frozenset(
    {"train", "training", "val", "valid", "validation", "test", "testing", "eval", "evaluation"}
)


# --------------------------------------------------------------------------------------------
# Options


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


def folder_classes(root: str | Path) -> list[str] | None:
    """The class names of an image folder, as :class:`ImageFolderDataset` numbers them (every
    subfolder, in name order, empty ones included), from its top level alone; ``None`` for a
    flat folder, a folder without images, or a path that is not a folder."""
    root = Path(root)
    if not root.is_dir():
        return None
    names: list[str] = []
    for entry in os.scandir(root):
        if _is_hidden(entry.name):
            continue
        if entry.is_dir():
            names.append(entry.name)
        elif entry.is_file() and _is_image(entry.name):
            return None
    if not names or not _has_images(root):
        return None
    return sorted(names)


def split_like(classes: Sequence[str]) -> list[str]:
    """The class names that name a dataset split (:data:`SPLIT_NAMES`), in order."""
    return [name for name in classes if name.lower() in SPLIT_NAMES]


def _class_index(root: Path, classes: list[str], reference: Sequence[str]) -> list[int]:
    """For each class folder, its position among the ``reference`` class names (the names the
    labels must follow); a :class:`DataError` for folders not among them."""
    position = {name: i for i, name in enumerate(reference)}
    unknown = [name for name in classes if name not in position]
    if unknown:
        what = "class folders that are" if len(unknown) > 1 else "a class folder that is"
        raise DataError(
            f"{root} has {what} not among the {len(reference)} training classes: "
            f"{_names(unknown)} (training classes: {_names(list(reference))})",
            "class folders are matched to the training classes by name: rename or remove "
            f"{'them' if len(unknown) > 1 else 'it'}",
        )
    return [position[name] for name in classes]


_READ_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)
_READ_FIX = "remove or replace the unreadable files, or point data= at a folder without them"


@dataclass(frozen=True)
class Unreadable:
    """What :class:`ImageFolderDataset` returns for an image that cannot be decoded (damaged,
    truncated, not an image): the file, why, and where it is in the folder (``position``, 1 to
    ``total``, in the dataset's order: files by name, class folders in turn; 0 when unknown).
    It is returned rather than raised so that it reaches the main process intact from a
    DataLoader worker: :func:`collate_readable` sets it aside, and the loader stops on it or
    skips it there."""

    path: str
    reason: str
    position: int = 0
    total: int = 0

    def describe(self) -> str:
        """``image 900 of 1000`` (``an image`` when the position is unknown)."""
        if self.position and self.total:
            return f"image {self.position} of {self.total}"
        return "an image"


def _read_reason(exc: BaseException) -> str:
    if isinstance(exc, UnidentifiedImageError):
        return "not an image, or a format Pillow cannot read"
    return _exc_line(exc, 200)


def _open_image(path: Path, mode: str) -> Image.Image | Unreadable:
    """Decode ``path`` fully and convert it to ``mode``, as torchvision's ``pil_loader``."""
    try:
        with Image.open(path) as img:
            return img.convert(mode)
    except _READ_ERRORS as exc:
        return Unreadable(str(path), _read_reason(exc))


def _first_size(root: Path, files: list[Path]) -> tuple[Path, tuple[int, int]]:
    """The first file whose header reads, and its ``(width, height)``."""
    for path in files:
        try:
            with Image.open(path) as img:
                return path, img.size
        except _READ_ERRORS:
            continue
    raise DataError(
        f"none of the {len(files)} images in {root} can be read (e.g. {files[0]})", _READ_FIX
    )


class Collated:
    """A batch of which some images could not be read: the batch of the others (``None``
    when none could) and the :class:`Unreadable` items set aside, in batch order."""

    def __init__(self, batch: Any, skipped: list[Unreadable]) -> None:
        self.batch = batch
        self.skipped = skipped


def collate_readable(items: list[Any]) -> Any:
    """``default_collate`` of the readable items; with :class:`Unreadable` items among them,
    a :class:`Collated` holding the batch of the others and those set aside (the loader
    unwraps it in the main process, so that worker processes can report it too)."""
    skipped = [it for it in items if isinstance(it, Unreadable)]
    if not skipped:
        return default_collate(items)
    readable = [it for it in items if not isinstance(it, Unreadable)]
    return Collated(default_collate(readable) if readable else None, skipped)


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
    one; ``x`` is a float32 CHW tensor, normalized. An image that cannot be decoded is an
    :class:`Unreadable` item instead (batch them with :func:`collate_readable`). Without
    ``image_size`` every image must have the size of the first readable one; the first
    mismatch raises :class:`DataError` naming the file and its position.

    ``classes`` are the names the labels must follow (the training classes, in label order):
    a class folder's label is then its name's position among them, and a folder whose name is
    not among them is a :class:`DataError`. Without them, labels are the class folders'
    positions in name order (``classes`` attribute: the folder's own class names;
    ``label_names``: the names the labels index).
    """

    def __init__(
        self,
        root: str | Path,
        options: ImageOptions = ImageOptions(),
        classes: Sequence[str] | None = None,
    ) -> None:
        options.validate()
        self.root = Path(root)
        self.options = options
        self.files, self.labels, self.classes = _scan_image_folder(self.root)
        self.label_names: list[str] | None = self.classes
        if classes is not None and self.classes is not None and self.labels is not None:
            index = _class_index(self.root, self.classes, classes)
            self.labels = [index[label] for label in self.labels]
            self.label_names = list(classes)
        self._mode = "RGB" if options.channels == 3 else "L"
        mean, std = options.normalization()
        self._mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self._std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
        self._reference: tuple[Path, tuple[int, int]] | None = None
        if options.image_size is None:
            self._reference = _first_size(self.root, self.files)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> Any:
        path = self.files[index]
        img = _open_image(path, self._mode)
        if isinstance(img, Unreadable):
            return replace(img, position=index + 1, total=len(self.files))
        size = self.options.image_size
        if size is not None:
            resize = self.options.resize_to()
            assert resize is not None
            img = _resize_center_crop(img, size, resize)
        elif self._reference is not None and img.size != self._reference[1]:
            ref_path, (rw, rh) = self._reference
            raise _SampleError(
                f"image {index + 1} of {len(self.files)} has a different size: {path} is "
                f"{img.size[0]}x{img.size[1]}, {ref_path} is {rw}x{rh}",
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
