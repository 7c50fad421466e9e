"""Synthetic labelled shape images for the bnscope demo, written in ImageFolder layout.

Every image is a single shape of one of :data:`CLASSES` on a random two-colour gradient
background with a few faint distractor blobs and per-pixel Gaussian noise.  Position,
size, aspect ratio, rotation and colours are random, and the shape is drawn at 2x
resolution and box-downsampled, so the classes are learnable by a small CNN in a few
epochs but not trivially separable from colour statistics alone.

Everything is deterministic from an integer seed (``numpy.random.Generator``).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

__all__ = ["CLASSES", "make_image", "write_image_folder", "write_dataset"]

CLASSES: tuple[str, ...] = ("circle", "triangle", "cross", "stripes")

_SUPER = 2  # draw at 2x then downsample (cheap anti-aliasing)
_NOISE_STD = 10.0  # per-pixel Gaussian noise, in 0..255 units
_PNG_COMPRESS_LEVEL = 1


def _random_color(rng: np.random.Generator) -> np.ndarray:
    return rng.integers(0, 256, size=3).astype(np.float64)


def _contrasting_color(rng: np.random.Generator, bg_mean: np.ndarray) -> tuple[int, int, int]:
    """A random colour at least moderately far from the background mean colour."""
    for _ in range(32):
        c = _random_color(rng)
        if np.linalg.norm(c - bg_mean) >= 110.0:
            break
    return (int(c[0]), int(c[1]), int(c[2]))


def _background(rng: np.random.Generator, n: int) -> tuple[Image.Image, np.ndarray]:
    """Linear two-colour gradient at a random angle, as an RGB image of side ``n``."""
    c0, c1 = _random_color(rng), _random_color(rng)
    # Keep the gradient moderate so the shape stays the most salient structure.
    c1 = c0 + 0.5 * (c1 - c0)
    theta = rng.uniform(0.0, 2.0 * math.pi)
    ys, xs = np.mgrid[0:n, 0:n].astype(np.float64) / max(n - 1, 1)
    t = (xs - 0.5) * math.cos(theta) + (ys - 0.5) * math.sin(theta)
    t = (t - t.min()) / max(t.max() - t.min(), 1e-9)
    arr = c0[None, None, :] * (1.0 - t[..., None]) + c1[None, None, :] * t[..., None]
    img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    return img, 0.5 * (c0 + c1)


def _rotate(points: np.ndarray, angle: float, center: tuple[float, float]) -> list[tuple]:
    ca, sa = math.cos(angle), math.sin(angle)
    rot = np.array([[ca, -sa], [sa, ca]])
    out = points @ rot.T + np.asarray(center)[None, :]
    return [(float(x), float(y)) for x, y in out]


def _draw_distractors(
    draw: ImageDraw.ImageDraw, rng: np.random.Generator, n: int, bg_mean: np.ndarray
) -> None:
    """A few small, faint blobs so that 'any object present' is not a giveaway."""
    for _ in range(int(rng.integers(0, 4))):
        r = rng.uniform(0.02, 0.06) * n
        cx, cy = rng.uniform(0, n, size=2)
        col = bg_mean + rng.normal(0.0, 45.0, size=3)
        fill = tuple(int(v) for v in np.clip(col, 0, 255))
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)


def _draw_shape(draw: ImageDraw.ImageDraw, cls: str, rng: np.random.Generator, n: int) -> None:
    """Draw the class shape onto an "L" mask (255 = shape) at a random pose."""
    radius = rng.uniform(0.20, 0.34) * n  # half-extent of the shape
    margin = radius * 1.05
    cx = rng.uniform(margin, n - margin)
    cy = rng.uniform(margin, n - margin)
    angle = rng.uniform(0.0, 2.0 * math.pi)

    if cls == "circle":
        aspect = rng.uniform(0.8, 1.0)
        t = np.linspace(0.0, 2.0 * math.pi, 48, endpoint=False)
        pts = np.stack([radius * np.cos(t), radius * aspect * np.sin(t)], axis=1)
        draw.polygon(_rotate(pts, angle, (cx, cy)), fill=255)
    elif cls == "triangle":
        base = np.array([math.pi / 2, math.pi / 2 + 2 * math.pi / 3, math.pi / 2 + 4 * math.pi / 3])
        t = base + rng.uniform(-0.2, 0.2, size=3)
        r = radius * rng.uniform(0.9, 1.1, size=3)
        pts = np.stack([r * np.cos(t), r * np.sin(t)], axis=1)
        draw.polygon(_rotate(pts, angle, (cx, cy)), fill=255)
    elif cls == "cross":
        arm = radius * rng.uniform(0.22, 0.32)
        for a in (angle, angle + math.pi / 2):
            pts = np.array([[-radius, -arm], [radius, -arm], [radius, arm], [-radius, arm]])
            draw.polygon(_rotate(pts, a, (cx, cy)), fill=255)
    elif cls == "stripes":
        # 3-4 parallel bars inside a roughly square patch, at a random orientation.
        k = int(rng.integers(3, 5))
        period = 2.0 * radius / k
        bar = period * rng.uniform(0.45, 0.6)
        half_len = radius * rng.uniform(0.85, 1.0)
        for i in range(k):
            x0 = -radius + i * period
            pts = np.array(
                [[x0, -half_len], [x0 + bar, -half_len], [x0 + bar, half_len], [x0, half_len]]
            )
            draw.polygon(_rotate(pts, angle, (cx, cy)), fill=255)
    else:
        raise ValueError(f"unknown class {cls!r}; expected one of {CLASSES}")


def make_image(cls: str, rng: np.random.Generator, size: int = 32) -> Image.Image:
    """Draw one ``size`` x ``size`` RGB image of class ``cls`` using ``rng``."""
    if cls not in CLASSES:
        raise ValueError(f"unknown class {cls!r}; expected one of {CLASSES}")
    if size < 8:
        raise ValueError(f"size must be >= 8, got {size}")
    n = size * _SUPER
    img, bg_mean = _background(rng, n)
    draw = ImageDraw.Draw(img)
    _draw_distractors(draw, rng, n, bg_mean)
    mask = Image.new("L", (n, n), 0)
    _draw_shape(ImageDraw.Draw(mask), cls, rng, n)
    img.paste(_contrasting_color(rng, bg_mean), (0, 0), mask)
    img = img.resize((size, size), Image.Resampling.BOX)
    arr = np.asarray(img, dtype=np.float32)
    arr = arr + rng.normal(0.0, _NOISE_STD, size=arr.shape).astype(np.float32)
    return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8))


def write_image_folder(root: Path, per_class: int, seed: int, size: int = 32) -> int:
    """Write ``per_class`` images of every class to ``root/<class>/<i>.png``.

    File names are zero-padded indices (``00000.png``...).  Class ``c`` uses its own
    generator seeded with ``(seed, index of c)``, so the output is deterministic and
    each class's images do not depend on ``per_class`` of the others.  Returns the number
    of images written.
    """
    if per_class < 0:
        raise ValueError(f"per_class must be >= 0, got {per_class}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    root = Path(root)
    count = 0
    for ci, cls in enumerate(CLASSES):
        d = root / cls
        d.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng([seed, ci])
        for i in range(per_class):
            make_image(cls, rng, size).save(
                d / f"{i:05d}.png", format="PNG", compress_level=_PNG_COMPRESS_LEVEL
            )
            count += 1
    return count


def write_dataset(
    root: Path, train_per_class: int = 400, val_per_class: int = 100, seed: int = 0
) -> dict[str, int]:
    """Write ``root/train`` and ``root/val`` ImageFolder trees; return ``{"train": n, "val": m}``.

    The two splits use disjoint derived seeds (``2*seed`` and ``2*seed + 1``).
    """
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    root = Path(root)
    return {
        "train": write_image_folder(root / "train", train_per_class, seed=2 * seed),
        "val": write_image_folder(root / "val", val_per_class, seed=2 * seed + 1),
    }
