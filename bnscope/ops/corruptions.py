"""Common image corruptions at five severities, as in CIFAR-10-C.

The corruptions and their severity parameters follow

    Dan Hendrycks and Thomas Dietterich, "Benchmarking Neural Network Robustness to Common
    Corruptions and Perturbations", ICLR 2019 (arXiv:1903.12261),

with the CIFAR-10-C parameters of the paper's own generator, ``make_cifar_c.py`` in
https://github.com/hendrycks/robustness (``ImageNet-C/create_c/make_cifar_c.py``). Ten of its
corruptions are here: the four noises, contrast, brightness, Gaussian and defocus blur, pixelate
and JPEG. They are used to shift a data set's statistics on purpose, e.g. to see how far a
checkpoint's BatchNorm statistics are from the corrupted data and how much Adaptive BN recovers.

Only numpy and Pillow are used. Where the original calls scikit-image, SciPy or OpenCV, the
same arithmetic is written out with numpy:

- ``gaussian_blur``: ``skimage.filters.gaussian`` is SciPy's ``gaussian_filter`` on the two
  spatial axes (kernel truncated at 4 sigma, borders extended with the edge pixel, SciPy's
  ``mode='nearest'``, scikit-image's default); here it is a separable numpy kernel with the same
  radius, weights and border rule;
- ``defocus_blur``: the kernel is the paper's ``disk()`` (an aliased disk on a 17x17 grid,
  normalized, then ``cv2.GaussianBlur`` 3x3 with sigma ``alias_blur``), and the image is filtered
  per channel as ``cv2.filter2D`` does (borders reflected without repeating the edge pixel,
  OpenCV's default ``BORDER_REFLECT_101``);
- ``impulse_noise``: ``skimage.util.random_noise(mode='s&p', amount=c)``: each value (each
  channel of each pixel) is replaced with probability ``c``, by 0 or 1 with equal odds;
- ``brightness``: scikit-image's ``rgb2hsv``/``hsv2rgb``, written in numpy;
- the noises draw from the ``numpy.random.Generator`` passed in instead of the global
  ``np.random`` state, so outputs are reproducible but not the released CIFAR-10-C arrays.

One deliberate difference: the original turns its float result into bytes with ``np.uint8``,
which truncates (a systematic -0.5 grey-level bias and occasional off-by-one on exact values such
as ``k / 255 * 255``); here float results are rounded to the nearest integer.

:func:`corrupt` corrupts one image and :func:`corrupt_folder` writes a corrupted copy of an image
folder; ``bnscope corrupt SRC DST --corruption NAME --severity N`` (:mod:`bnscope.cli.corrupt_cmd`)
does the latter from a shell.
"""

from __future__ import annotations

import contextlib
import functools
import io
import os
import shutil
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import numpy as np
from PIL import Image

from bnscope.errors import DataError, UsageError
from bnscope.io.outputs import create_temp

__all__ = [
    "SEVERITY_PARAMS",
    "CORRUPTIONS",
    "IMAGE_SUFFIXES",
    "corrupt",
    "corrupt_folder",
    "gaussian_noise",
    "shot_noise",
    "impulse_noise",
    "speckle_noise",
    "contrast",
    "brightness",
    "gaussian_blur",
    "defocus_blur",
    "pixelate",
    "jpeg_compression",
]

Corruption = Callable[[np.ndarray, int, np.random.Generator], np.ndarray]

# Severity 1..5 parameters, copied from the CIFAR-10-C generator of Hendrycks & Dietterich
# (ICLR 2019): make_cifar_c.py in https://github.com/hendrycks/robustness
# (ImageNet-C/create_c/make_cifar_c.py). The ImageNet-C parameters are different (larger images).
SEVERITY_PARAMS: dict[str, tuple[Any, ...]] = {
    # std of the additive N(0, c) noise, image in [0, 1]
    "gaussian_noise": (0.04, 0.06, 0.08, 0.09, 0.10),
    # photon count scale: poisson(x * c) / c
    "shot_noise": (500, 250, 100, 75, 50),
    # fraction of values replaced by salt (1) or pepper (0)
    "impulse_noise": (0.01, 0.02, 0.03, 0.05, 0.07),
    # std of the multiplicative noise: x + x * N(0, c)
    "speckle_noise": (0.06, 0.1, 0.12, 0.16, 0.2),
    # contrast factor around the per-channel mean: (x - mean) * c + mean
    "contrast": (0.75, 0.5, 0.4, 0.3, 0.15),
    # added to the HSV value channel
    "brightness": (0.05, 0.1, 0.15, 0.2, 0.3),
    # Gaussian sigma in pixels
    "gaussian_blur": (0.4, 0.6, 0.7, 0.8, 1),
    # (disk radius, alias blur sigma)
    "defocus_blur": ((0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1, 0.2), (1.5, 0.1)),
    # fraction of the side length to box-downsample to
    "pixelate": (0.95, 0.9, 0.85, 0.75, 0.65),
    # JPEG quality
    "jpeg_compression": (80, 65, 58, 50, 40),
}

#: Files :func:`corrupt_folder` treats as images (the same set as ``bnscope.io.images``).
IMAGE_SUFFIXES = frozenset(
    {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
)
# Suffixes Pillow writes without loss; others (JPEG, WebP, GIF) are written as PNG.
_LOSSLESS_FORMATS = {
    ".png": "PNG",
    ".bmp": "BMP",
    ".ppm": "PPM",
    ".pgm": "PPM",
    ".tif": "TIFF",
    ".tiff": "TIFF",
}
# Pillow modes read as one channel; everything else is read as RGB.
_GRAY_MODES = frozenset({"1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"})


# --------------------------------------------------------------------------------------------
# Validation and conversions


def _names() -> str:
    return ", ".join(CORRUPTIONS)


def _check_name(name: object) -> str:
    if not isinstance(name, str) or name not in CORRUPTIONS:
        raise UsageError(f"unknown corruption {name!r}", f"choose one of: {_names()}")
    return name


def _check_severity(severity: object) -> int:
    if isinstance(severity, bool) or not isinstance(severity, int | np.integer):
        raise UsageError(f"severity must be an integer, got {severity!r}", "pass 1, 2, 3, 4 or 5")
    if not 1 <= int(severity) <= 5:
        raise UsageError(f"severity {int(severity)} is out of range", "pass 1, 2, 3, 4 or 5")
    return int(severity)


def _param(name: str, severity: object) -> Any:
    return SEVERITY_PARAMS[name][_check_severity(severity) - 1]


def _as_hwc(image: object) -> np.ndarray:
    """``image`` as a uint8 HxWxC array with C 1 or 3 (HxW becomes HxWx1)."""
    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        raise UsageError(
            f"images must be uint8, got {arr.dtype}",
            "convert first, e.g. np.clip(x * 255, 0, 255).round().astype(np.uint8)",
        )
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3 or arr.shape[2] not in (1, 3) or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise UsageError(
            f"images must be HxW, HxWx1 or HxWx3 (corrupt() also takes HxWx4) with H, W > 0, "
            f"got shape {arr.shape}",
            "pass one image, not a batch, with channels last",
        )
    return arr


def _to_uint8(x: np.ndarray) -> np.ndarray:
    """Float image in [0, 1] (clipped) -> uint8, rounded to nearest."""
    return np.rint(np.clip(x, 0.0, 1.0) * 255.0).astype(np.uint8)


def _float_corruption(name: str) -> Callable[[Callable[..., np.ndarray]], Corruption]:
    """Wrap ``fn(x, c, rng)`` on float HxWxC images in [0, 1] into a uint8 corruption."""

    def decorate(fn: Callable[..., np.ndarray]) -> Corruption:
        @functools.wraps(fn)
        def wrapper(
            image: np.ndarray, severity: int, rng: np.random.Generator | None = None
        ) -> np.ndarray:
            c = _param(name, severity)
            arr = np.asarray(image)
            x = _as_hwc(arr).astype(np.float64) / 255.0
            out = _to_uint8(fn(x, c, rng if rng is not None else np.random.default_rng()))
            return out.reshape(arr.shape)

        return wrapper

    return decorate


def _pil_corruption(name: str) -> Callable[[Callable[..., Image.Image]], Corruption]:
    """Wrap ``fn(img, c)`` on PIL images (mode L or RGB) into a uint8 corruption."""

    def decorate(fn: Callable[..., Image.Image]) -> Corruption:
        @functools.wraps(fn)
        def wrapper(
            image: np.ndarray, severity: int, rng: np.random.Generator | None = None
        ) -> np.ndarray:
            c = _param(name, severity)
            arr = np.asarray(image)
            hwc = _as_hwc(arr)
            if hwc.shape[2] == 1:
                img = Image.fromarray(np.ascontiguousarray(hwc[:, :, 0]), mode="L")
            else:
                img = Image.fromarray(np.ascontiguousarray(hwc), mode="RGB")
            out = np.asarray(fn(img, c).convert(img.mode), dtype=np.uint8)
            return out.reshape(arr.shape)

        return wrapper

    return decorate


# --------------------------------------------------------------------------------------------
# Filtering helpers (numpy replacements for SciPy / OpenCV)


def _gaussian_kernel_1d(sigma: float, radius: int) -> np.ndarray:
    t = np.arange(-radius, radius + 1, dtype=np.float64)
    k = np.exp(-0.5 * (t / sigma) ** 2)
    return k / k.sum()


def _correlate_1d(x: np.ndarray, kernel: np.ndarray, axis: int, mode: str) -> np.ndarray:
    """Correlate ``x`` with an odd 1-D ``kernel`` along ``axis``; ``mode`` as ``np.pad``."""
    r = len(kernel) // 2
    pad = [(0, 0)] * x.ndim
    pad[axis] = (r, r)
    padded = np.pad(x, pad, mode=cast(Any, mode))  # a mode name of np.pad
    n = x.shape[axis]
    out = np.zeros_like(x, dtype=np.float64)
    for i, w in enumerate(kernel):
        out += w * np.take(padded, np.arange(i, i + n), axis=axis)
    return out


def _correlate_2d(x: np.ndarray, kernel: np.ndarray, mode: str) -> np.ndarray:
    """Correlate each channel of HxW(xC) ``x`` with an odd 2-D ``kernel``; ``mode`` as np.pad."""
    rh, rw = kernel.shape[0] // 2, kernel.shape[1] // 2
    pad = [(rh, rh), (rw, rw)] + [(0, 0)] * (x.ndim - 2)
    padded = np.pad(x, pad, mode=cast(Any, mode))  # a mode name of np.pad
    h, w = x.shape[:2]
    out = np.zeros_like(x, dtype=np.float64)
    for i in range(kernel.shape[0]):
        for j in range(kernel.shape[1]):
            if kernel[i, j] != 0.0:
                out += kernel[i, j] * padded[i : i + h, j : j + w]
    return out


def _trim_zeros_2d(kernel: np.ndarray) -> np.ndarray:
    """Drop all-zero outer rings of a centred odd kernel (keeps it centred)."""
    while kernel.shape[0] > 1 and kernel.shape[1] > 1:
        ring = np.concatenate([kernel[0], kernel[-1], kernel[:, 0], kernel[:, -1]])
        if np.any(ring != 0.0):
            break
        kernel = kernel[1:-1, 1:-1]
    return kernel


def _disk(radius: float, alias_blur: float) -> np.ndarray:
    """The defocus kernel of the paper's ``disk()``: an aliased disk, normalized, then blurred
    with a 3x3 (5x5 for radius > 8) Gaussian of sigma ``alias_blur`` as ``cv2.GaussianBlur``."""
    if radius <= 8:
        coords = np.arange(-8, 8 + 1, dtype=np.float64)
        ksize = 3
    else:
        coords = np.arange(-radius, radius + 1, dtype=np.float64)
        ksize = 5
    xx, yy = np.meshgrid(coords, coords)
    aliased = ((xx**2 + yy**2) <= radius**2).astype(np.float64)
    aliased /= aliased.sum()
    # cv2.getGaussianKernel(ksize, sigma) for sigma > 0, and BORDER_REFLECT_101 (np 'reflect').
    g = _gaussian_kernel_1d(alias_blur, ksize // 2)
    blurred = _correlate_1d(_correlate_1d(aliased, g, 0, "reflect"), g, 1, "reflect")
    return _trim_zeros_2d(blurred)


def _rgb_to_hsv(rgb: np.ndarray) -> np.ndarray:
    """scikit-image's ``rgb2hsv`` for float RGB in [0, 1] (H in [0, 1))."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    v = rgb.max(axis=-1)
    delta = v - rgb.min(axis=-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        s = np.where(delta == 0.0, 0.0, delta / np.where(v == 0.0, 1.0, v))
        safe = np.where(delta == 0.0, 1.0, delta)
        h = np.where(
            b == v,
            4.0 + (r - g) / safe,
            np.where(g == v, 2.0 + (b - r) / safe, (g - b) / safe),
        )
    h = np.where(delta == 0.0, 0.0, (h / 6.0) % 1.0)
    return np.stack([h, s, v], axis=-1)


def _hsv_to_rgb(hsv: np.ndarray) -> np.ndarray:
    """scikit-image's ``hsv2rgb``."""
    h, s, v = hsv[..., 0], hsv[..., 1], hsv[..., 2]
    h6 = h * 6.0
    hi = np.floor(h6)
    f = h6 - hi
    hi = hi.astype(np.int64) % 6
    p = v * (1.0 - s)
    q = v * (1.0 - f * s)
    t = v * (1.0 - (1.0 - f) * s)
    table = np.stack(
        [
            np.stack([v, t, p], axis=-1),
            np.stack([q, v, p], axis=-1),
            np.stack([p, v, t], axis=-1),
            np.stack([p, q, v], axis=-1),
            np.stack([t, p, v], axis=-1),
            np.stack([v, p, q], axis=-1),
        ],
        axis=0,
    )
    return np.take_along_axis(table, hi[None, ..., None], axis=0)[0]


# --------------------------------------------------------------------------------------------
# The corruptions: fn(image uint8 HxW / HxWx1 / HxWx3, severity 1..5, rng) -> uint8, same shape


@_float_corruption("gaussian_noise")
def gaussian_noise(x: np.ndarray, c: float, rng: np.random.Generator) -> np.ndarray:
    """Additive Gaussian noise: ``x + N(0, c)``."""
    return x + rng.normal(0.0, c, size=x.shape)


@_float_corruption("shot_noise")
def shot_noise(x: np.ndarray, c: float, rng: np.random.Generator) -> np.ndarray:
    """Poisson (shot) noise: ``poisson(x * c) / c``."""
    return rng.poisson(x * c) / c


@_float_corruption("impulse_noise")
def impulse_noise(x: np.ndarray, c: float, rng: np.random.Generator) -> np.ndarray:
    """Salt-and-pepper noise: each value becomes 0 or 1 (equal odds) with probability ``c``."""
    flipped = rng.random(x.shape) < c
    salted = rng.random(x.shape) < 0.5
    out = x.copy()
    out[flipped & salted] = 1.0
    out[flipped & ~salted] = 0.0
    return out


@_float_corruption("speckle_noise")
def speckle_noise(x: np.ndarray, c: float, rng: np.random.Generator) -> np.ndarray:
    """Multiplicative noise: ``x + x * N(0, c)``."""
    return x + x * rng.normal(0.0, c, size=x.shape)


@_float_corruption("contrast")
def contrast(x: np.ndarray, c: float, rng: np.random.Generator) -> np.ndarray:
    """Contrast reduction around the per-channel mean (over H and W, as the original)."""
    means = x.mean(axis=(0, 1), keepdims=True)
    return (x - means) * c + means


@_float_corruption("brightness")
def brightness(x: np.ndarray, c: float, rng: np.random.Generator) -> np.ndarray:
    """Brightness: ``c`` added to the HSV value channel (clipped to 1)."""
    rgb = np.repeat(x, 3, axis=2) if x.shape[2] == 1 else x
    hsv = _rgb_to_hsv(rgb)
    hsv[..., 2] = np.clip(hsv[..., 2] + c, 0.0, 1.0)
    out = _hsv_to_rgb(hsv)
    return out[:, :, :1] if x.shape[2] == 1 else out


@_float_corruption("gaussian_blur")
def gaussian_blur(x: np.ndarray, c: float, rng: np.random.Generator) -> np.ndarray:
    """Gaussian blur of sigma ``c`` on H and W, truncated at 4 sigma, edge-extended borders."""
    kernel = _gaussian_kernel_1d(float(c), int(4.0 * c + 0.5))
    return _correlate_1d(_correlate_1d(x, kernel, 0, "edge"), kernel, 1, "edge")


@_float_corruption("defocus_blur")
def defocus_blur(x: np.ndarray, c: tuple[float, float], rng: np.random.Generator) -> np.ndarray:
    """Defocus blur: each channel filtered with the anti-aliased disk of radius ``c[0]``."""
    return _correlate_2d(x, _disk(c[0], c[1]), "reflect")


@_pil_corruption("pixelate")
def pixelate(img: Image.Image, c: float) -> Image.Image:
    """Pixelation: box-downsample to ``c`` times the size, box-upsample back."""
    w, h = img.size
    small = img.resize((max(1, int(w * c)), max(1, int(h * c))), Image.Resampling.BOX)
    return small.resize((w, h), Image.Resampling.BOX)


@_pil_corruption("jpeg_compression")
def jpeg_compression(img: Image.Image, c: int) -> Image.Image:
    """JPEG compression at quality ``c`` (Pillow's encoder and default subsampling)."""
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=c)
    buf.seek(0)
    with Image.open(buf) as decoded:
        decoded.load()
        return decoded.copy()


#: Corruption name -> ``fn(image, severity, rng)``, in the order of :data:`SEVERITY_PARAMS`.
CORRUPTIONS: dict[str, Corruption] = {
    "gaussian_noise": gaussian_noise,
    "shot_noise": shot_noise,
    "impulse_noise": impulse_noise,
    "speckle_noise": speckle_noise,
    "contrast": contrast,
    "brightness": brightness,
    "gaussian_blur": gaussian_blur,
    "defocus_blur": defocus_blur,
    "pixelate": pixelate,
    "jpeg_compression": jpeg_compression,
}


# --------------------------------------------------------------------------------------------
# Public entry points


def corrupt(
    image: np.ndarray | Image.Image,
    name: str,
    severity: int,
    rng: np.random.Generator | None = None,
) -> np.ndarray:
    """Corrupt one image with corruption ``name`` at ``severity`` (1..5).

    ``image`` is a uint8 array (HxW, HxWx1, HxWx3, or HxWx4 whose alpha channel is passed
    through) or a PIL image (read as L if it is a greyscale mode, else as RGB). Returns a uint8
    array of the same shape (for a PIL image: the shape of that L or RGB array). ``rng`` drives
    the noise; ``None`` uses fresh OS entropy.
    """
    fn = CORRUPTIONS[_check_name(name)]
    severity = _check_severity(severity)
    if rng is None:
        rng = np.random.default_rng()
    elif not isinstance(rng, np.random.Generator):
        raise UsageError(
            f"rng must be a numpy.random.Generator, got {type(rng).__name__}",
            "pass np.random.default_rng(seed) or None",
        )
    if isinstance(image, Image.Image):
        mode = "L" if image.mode in _GRAY_MODES else "RGB"
        arr = np.asarray(image.convert(mode), dtype=np.uint8)
    else:
        arr = np.asarray(image)
    if arr.ndim == 3 and arr.shape[2] == 4:
        _as_hwc(arr[:, :, :3])  # validates dtype and size
        out = np.empty_like(arr)
        out[:, :, :3] = fn(np.ascontiguousarray(arr[:, :, :3]), severity, rng)
        out[:, :, 3] = arr[:, :, 3]
        return out
    _as_hwc(arr)
    return fn(arr, severity, rng)


def _is_hidden(name: str) -> bool:
    return name.startswith(".")


def _scan(src: Path) -> tuple[list[Path], list[Path]]:
    """``(dirs, images)`` under ``src``, relative, sorted; hidden entries skipped."""
    dirs: list[Path] = []
    images: list[Path] = []
    for root, subdirs, files in os.walk(src, followlinks=True):
        subdirs[:] = sorted(d for d in subdirs if not _is_hidden(d))
        rel_root = Path(root).relative_to(src)
        dirs.extend(rel_root / d for d in subdirs)
        images.extend(
            rel_root / f
            for f in sorted(files)
            if not _is_hidden(f) and os.path.splitext(f)[1].lower() in IMAGE_SUFFIXES
        )
    return sorted(dirs), sorted(images)


def _output_path(rel: Path) -> tuple[Path, str]:
    fmt = _LOSSLESS_FORMATS.get(rel.suffix.lower())
    if fmt is not None:
        return rel, fmt
    return rel.with_suffix(".png"), "PNG"


def _image_rng(seed: int, rel: Path) -> np.random.Generator:
    """Per-image generator from ``seed`` and a stable hash of the relative path."""
    return np.random.default_rng([seed, zlib.crc32(rel.as_posix().encode("utf-8"))])


def _read_image(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as img:
            mode = "L" if img.mode in _GRAY_MODES else "RGB"
            return np.asarray(img.convert(mode), dtype=np.uint8)
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as exc:
        detail = " ".join(str(exc).split()) or type(exc).__name__
        raise DataError(
            f"cannot read image {path} ({detail})", "remove or replace the file"
        ) from exc


def _inside(path: Path, other: Path) -> bool:
    return path == other or other in path.parents


def corrupt_folder(
    src: str | Path,
    dst: str | Path,
    name: str,
    severity: int,
    *,
    seed: int = 0,
    force: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> int:
    """Write a corrupted copy of the image folder ``src`` to ``dst``; returns the image count.

    Every image under ``src`` (recursively, hidden entries skipped) is corrupted and written at
    the same relative path: PNG, TIFF, BMP and PPM/PGM keep their suffix, other formats become
    ``STEM.png``. Non-image files are not copied; every (non-hidden) subfolder is recreated, so an
    ImageFolder layout keeps its classes. Image ``i`` gets its own generator from ``seed`` and its
    relative path, so outputs are the same for the same seed whatever the order or machine.

    The copy is written to a temporary sibling of ``dst`` and renamed into place at the end: on
    any failure, including KeyboardInterrupt, ``dst`` is left as it was and the temporary folder
    is removed. An existing non-empty ``dst`` is replaced only with ``force``. ``progress(done,
    total)`` is called after each image.
    """
    name = _check_name(name)
    severity = _check_severity(severity)
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise UsageError(f"seed must be a non-negative integer, got {seed!r}", "pass e.g. 0")
    src = Path(src)
    dst = Path(dst)
    if not src.exists():
        raise DataError(f"source folder {src} does not exist", "check the path")
    if not src.is_dir():
        raise DataError(f"source {src} is not a folder", "pass a folder of images")
    src_abs = src.resolve()
    dst_abs = dst.resolve()
    if _inside(dst_abs, src_abs) or _inside(src_abs, dst_abs):
        raise UsageError(
            f"destination {dst} overlaps the source {src}",
            "choose a destination outside the source folder (and not containing it)",
        )
    if dst.exists() or dst.is_symlink():
        if not dst.is_dir() or dst.is_symlink():
            raise UsageError(f"destination {dst} exists and is not a folder", "choose another")
        if any(dst.iterdir()) and not force:
            raise UsageError(
                f"destination {dst} exists and is not empty",
                "pass force=True or choose another destination",
            )

    dirs, images = _scan(src)
    if not images:
        suffixes = " ".join(sorted(IMAGE_SUFFIXES))
        raise DataError(f"no images found in {src}", f"put image files ({suffixes}) under it")
    plan: dict[Path, tuple[Path, Path, str]] = {}
    for rel in images:
        out_rel, fmt = _output_path(rel)
        key = Path(out_rel.as_posix().lower())
        if key in plan:
            raise DataError(
                f"{plan[key][0]} and {rel} would both be written as {out_rel}",
                "rename one of them",
            )
        plan[key] = (rel, out_rel, fmt)

    created = _make_parents(dst_abs.parent)
    try:
        # created 0777 less the umask (mkdtemp would make DST 0700 once it is renamed)
        tmp = create_temp(dst_abs.parent, f".{dst_abs.name}.tmp-", directory=True)
    except OSError as exc:
        _remove_created(created)
        raise UsageError(
            f"cannot write into {dst_abs.parent} ({exc.strerror or exc})",
            "choose a destination folder you can write to",
        ) from exc
    try:
        for rel_dir in dirs:
            (tmp / rel_dir).mkdir(parents=True, exist_ok=True)
        total = len(plan)
        for done, (rel, out_rel, fmt) in enumerate(plan.values(), start=1):
            arr = _read_image(src / rel)
            out = corrupt(arr, name, severity, _image_rng(int(seed), rel))
            (tmp / out_rel).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(out).save(tmp / out_rel, format=fmt)
            if progress is not None:
                progress(done, total)
        _move_into_place(tmp, dst_abs)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        _remove_created(created)
        raise
    return total


def _make_parents(folder: Path) -> list[Path]:
    """Create ``folder`` and its missing parents; the ones created, deepest first. A file in
    the way is a one-line error (nothing created)."""
    missing: list[Path] = []
    for path in (folder, *folder.parents):
        if path.exists():
            if not path.is_dir():
                raise UsageError(
                    f"cannot create the destination's folder: {path} is a file",
                    "choose another destination",
                )
            break
        missing.append(path)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        _remove_created(missing)
        raise UsageError(
            f"cannot create {folder} ({exc.strerror or exc})", "choose another destination"
        ) from exc
    return missing


def _remove_created(folders: list[Path]) -> None:
    """Remove folders this run created (deepest first), if they are still empty."""
    for path in folders:
        with contextlib.suppress(OSError):
            path.rmdir()


def _move_into_place(tmp: Path, dst: Path) -> None:
    """Rename ``tmp`` to ``dst``, replacing an existing ``dst`` folder."""
    if not dst.exists():
        os.replace(tmp, dst)
        return
    old = create_temp(dst.parent, f".{dst.name}.old-", directory=True)
    old.rmdir()
    os.replace(dst, old)
    try:
        os.replace(tmp, dst)
    except BaseException:
        os.replace(old, dst)
        raise
    shutil.rmtree(old, ignore_errors=True)
