"""Tests for bnscope.ops.corruptions (Hendrycks & Dietterich 2019 corruptions, CIFAR-10-C
parameters)."""

from __future__ import annotations

import colorsys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import bnscope.ops.corruptions as bc
from bnscope.errors import DataError, UsageError
from bnscope.ops.corruptions import (
    CORRUPTIONS,
    SEVERITY_PARAMS,
    corrupt,
    corrupt_folder,
)

from ..clirun import one_error_line, run

NOISES = ("gaussian_noise", "shot_noise", "impulse_noise", "speckle_noise")
SEVERITIES = (1, 2, 3, 4, 5)


# --------------------------------------------------------------------------------------------
# Test images


def _structured(n: int = 32) -> list[np.ndarray]:
    """Colored images with edges and texture at several scales (fixed, no global rng)."""
    yy, xx = np.mgrid[:n, :n]
    r = np.random.default_rng(7)
    noise = r.integers(0, 256, (n, n, 3))
    diag = np.stack(
        [((xx + yy) // 3 % 2) * 220 + 20, ((xx - yy) // 5 % 2) * 200 + 30, xx * 255 // n], -1
    )
    rr = np.hypot(yy - n / 2 + 0.3, xx - n / 2 + 0.7)
    rings = np.stack(
        [(np.sin(rr * 1.3) + 1) * 120, (np.cos(rr * 0.7) + 1) * 120, yy * 255 // n], -1
    )
    blocks = np.kron(r.integers(0, 256, (n // 3 + 1, n // 3 + 1, 3)), np.ones((3, 3, 1)))
    ims = [noise, diag, rings, blocks[:n, :n]]
    return [np.clip(im, 0, 255).astype(np.uint8) for im in ims]


IMAGES = _structured()


def _mad(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).mean())


def _hf_energy(x: np.ndarray) -> float:
    x = x.astype(np.float64)
    return float((np.diff(x, axis=0) ** 2).mean() + (np.diff(x, axis=1) ** 2).mean())


def _strength(name: str, clean: np.ndarray, out: np.ndarray) -> float:
    if name == "contrast":
        return float(clean.astype(np.float64).std() - out.astype(np.float64).std())
    if name == "brightness":
        return float(out.astype(np.float64).mean() - clean.astype(np.float64).mean())
    return _mad(clean, out)


# --------------------------------------------------------------------------------------------
# Parameters


def test_parameter_table_is_the_published_cifar10c_one():
    assert list(CORRUPTIONS) == list(SEVERITY_PARAMS)
    assert SEVERITY_PARAMS["gaussian_noise"] == (0.04, 0.06, 0.08, 0.09, 0.10)
    assert SEVERITY_PARAMS["shot_noise"] == (500, 250, 100, 75, 50)
    assert SEVERITY_PARAMS["impulse_noise"] == (0.01, 0.02, 0.03, 0.05, 0.07)
    assert SEVERITY_PARAMS["speckle_noise"] == (0.06, 0.1, 0.12, 0.16, 0.2)
    assert SEVERITY_PARAMS["contrast"] == (0.75, 0.5, 0.4, 0.3, 0.15)
    assert SEVERITY_PARAMS["brightness"] == (0.05, 0.1, 0.15, 0.2, 0.3)
    assert SEVERITY_PARAMS["gaussian_blur"] == (0.4, 0.6, 0.7, 0.8, 1)
    assert SEVERITY_PARAMS["defocus_blur"] == (
        (0.3, 0.4),
        (0.4, 0.5),
        (0.5, 0.6),
        (1, 0.2),
        (1.5, 0.1),
    )
    assert SEVERITY_PARAMS["pixelate"] == (0.95, 0.9, 0.85, 0.75, 0.65)
    assert SEVERITY_PARAMS["jpeg_compression"] == (80, 65, 58, 50, 40)


def test_image_suffixes_match_the_data_loader():
    from bnscope.io.images import IMAGE_SUFFIXES

    assert set(bc.IMAGE_SUFFIXES) == set(IMAGE_SUFFIXES)


# --------------------------------------------------------------------------------------------
# Shape, dtype, range


@pytest.mark.parametrize("name", list(CORRUPTIONS))
def test_shape_dtype_range_every_severity(name):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (20, 28, 3), dtype=np.uint8)
    gray = rng.integers(0, 256, (20, 28), dtype=np.uint8)
    gray1 = gray[:, :, None]
    rgba = np.concatenate([rgb, rng.integers(0, 256, (20, 28, 1), dtype=np.uint8)], axis=2)
    tiny = rng.integers(0, 256, (1, 3, 3), dtype=np.uint8)
    for severity in SEVERITIES:
        for image in (rgb, gray, gray1, rgba, tiny, IMAGES[0]):
            out = corrupt(image, name, severity, np.random.default_rng(severity))
            assert out.shape == image.shape
            assert out.dtype == np.uint8
        out = corrupt(rgba, name, severity, np.random.default_rng(1))
        assert np.array_equal(out[:, :, 3], rgba[:, :, 3])  # alpha passed through
        # the dict functions take the same inputs directly
        assert CORRUPTIONS[name](gray, severity, np.random.default_rng(0)).shape == gray.shape


def test_pil_input():
    rgb = Image.fromarray(IMAGES[1])
    out = corrupt(rgb, "gaussian_blur", 2, np.random.default_rng(0))
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8
    gray = rgb.convert("L")
    out = corrupt(gray, "jpeg_compression", 3)
    assert out.shape == (32, 32) and out.dtype == np.uint8
    assert corrupt(rgb.convert("RGBA"), "contrast", 1).shape == (32, 32, 3)


def test_gray_noise_matches_single_channel():
    gray = IMAGES[0][:, :, 0]
    a = corrupt(gray, "gaussian_noise", 3, np.random.default_rng(5))
    b = corrupt(gray[:, :, None], "gaussian_noise", 3, np.random.default_rng(5))
    assert np.array_equal(a, b[:, :, 0])


# --------------------------------------------------------------------------------------------
# Strength grows with severity


@pytest.mark.parametrize("name", list(CORRUPTIONS))
def test_strength_non_decreasing_with_severity(name):
    strengths = []
    for severity in SEVERITIES:
        per_image = [
            _strength(name, im, corrupt(im, name, severity, np.random.default_rng(i)))
            for i, im in enumerate(IMAGES)
        ]
        strengths.append(np.mean(per_image))
    assert strengths[0] > 0, strengths
    assert all(b >= a for a, b in zip(strengths, strengths[1:], strict=False)), strengths


@pytest.mark.parametrize("name", ["gaussian_blur", "defocus_blur"])
def test_blur_removes_high_frequency_energy(name):
    losses = []
    for severity in SEVERITIES:
        loss = [_hf_energy(im) - _hf_energy(corrupt(im, name, severity)) for im in IMAGES]
        losses.append(np.mean(loss))
    assert losses[0] > 0
    assert all(b >= a for a, b in zip(losses, losses[1:], strict=False)), losses


# --------------------------------------------------------------------------------------------
# Determinism


@pytest.mark.parametrize("name", list(CORRUPTIONS))
def test_deterministic_for_a_fixed_rng(name):
    im = IMAGES[2]
    a = corrupt(im, name, 3, np.random.default_rng(123))
    b = corrupt(im, name, 3, np.random.default_rng(123))
    assert np.array_equal(a, b)
    c = corrupt(im, name, 3, np.random.default_rng(124))
    if name in NOISES:
        assert not np.array_equal(a, c)
    else:
        assert np.array_equal(a, c)  # the other corruptions use no randomness


# --------------------------------------------------------------------------------------------
# Closed-form checks


def test_contrast_closed_form():
    im = IMAGES[1]
    x = im.astype(np.float64) / 255.0
    mean = x.mean(axis=(0, 1), keepdims=True)  # per channel, as make_cifar_c.py
    expected = np.clip((x - mean) * 0.75 + mean, 0, 1) * 255
    out = corrupt(im, "contrast", 1)
    assert np.abs(out - expected).max() <= 0.5 + 1e-9


def test_brightness_of_grey_adds_to_value():
    for v in (0, 100, 250):
        im = np.full((4, 5, 3), v, dtype=np.uint8)
        for severity, c in zip(SEVERITIES, SEVERITY_PARAMS["brightness"], strict=True):
            expected = round(min(v / 255 + c, 1.0) * 255)
            assert np.all(corrupt(im, "brightness", severity) == expected)


def test_brightness_scales_colors_along_value():
    im = IMAGES[2]
    out = corrupt(im, "brightness", 2).astype(np.float64) / 255
    x = im.astype(np.float64) / 255
    v = x.max(axis=2, keepdims=True)
    expected = np.where(v > 0, x * np.minimum(v + 0.1, 1) / np.where(v > 0, v, 1), 0.1)
    assert np.abs(out - expected).max() <= 0.5 / 255 + 1e-9


def test_hsv_conversion_matches_colorsys():
    rgb = np.random.default_rng(3).random((50, 3))
    rgb[0] = 0.0
    rgb[1] = [0.2, 0.2, 0.2]
    hsv = bc._rgb_to_hsv(rgb)
    expected = np.array([colorsys.rgb_to_hsv(*p) for p in rgb])
    assert np.allclose(hsv, expected)
    assert np.allclose(bc._hsv_to_rgb(hsv), rgb)


@pytest.mark.parametrize("name", ["pixelate", "gaussian_blur", "defocus_blur", "contrast"])
def test_constant_image_unchanged(name):
    im = np.full((17, 23, 3), [10, 128, 240], dtype=np.uint8)
    for severity in SEVERITIES:
        assert np.array_equal(corrupt(im, name, severity), im)


def test_gaussian_noise_is_unbiased():
    im = np.full((64, 64, 3), 128, dtype=np.uint8)
    out = corrupt(im, "gaussian_noise", 5, np.random.default_rng(0)).astype(np.float64)
    assert abs(out.mean() - 128) < 1.0
    assert abs(out.std() - 0.10 * 255) < 1.0


def test_impulse_noise_fraction():
    im = np.full((64, 64, 3), 128, dtype=np.uint8)
    out = corrupt(im, "impulse_noise", 5, np.random.default_rng(0))
    changed = out != 128
    assert set(np.unique(out[changed])) <= {0, 255}
    assert abs(changed.mean() - 0.07) < 0.01
    assert abs((out == 255).mean() - (out == 0).mean()) < 0.01


def test_gaussian_blur_impulse_response_is_truncated_gaussian():
    im = np.zeros((21, 21), dtype=np.uint8)
    im[10, 10] = 255
    out = corrupt(im, "gaussian_blur", 5).astype(np.float64)  # sigma 1, radius 4
    t = np.arange(-4, 5)
    k = np.exp(-0.5 * t**2)
    k /= k.sum()
    expected = np.zeros((21, 21))
    expected[6:15, 6:15] = 255 * np.outer(k, k)
    assert np.abs(out - expected).max() <= 0.5 + 1e-9


def test_defocus_disk_kernels():
    # radius 0.3: the disk is one pixel, so the kernel is the 3x3 Gaussian of sigma 0.4
    k = bc._disk(0.3, 0.4)
    g = np.exp(-0.5 * (np.arange(-1, 2) / 0.4) ** 2)
    g /= g.sum()
    assert np.allclose(k, np.outer(g, g))
    # radius 1.5 with almost no alias blur: a 3x3 box
    k = bc._disk(1.5, 0.1)
    assert np.isclose(k.sum(), 1.0)
    centre = k[k.shape[0] // 2 - 1 : k.shape[0] // 2 + 2, k.shape[1] // 2 - 1 : k.shape[1] // 2 + 2]
    assert np.allclose(centre, 1 / 9, atol=1e-6)


def test_pixelate_matches_pillow_box():
    im = IMAGES[0]
    small = Image.fromarray(im).resize((int(32 * 0.75), int(32 * 0.75)), Image.Resampling.BOX)
    expected = np.asarray(small.resize((32, 32), Image.Resampling.BOX))
    assert np.array_equal(corrupt(im, "pixelate", 4), expected)


# --------------------------------------------------------------------------------------------
# Errors


def test_unknown_name_lists_the_names():
    with pytest.raises(UsageError) as info:
        corrupt(IMAGES[0], "fog", 1)
    line = info.value.line()
    assert "'fog'" in line and all(name in line for name in CORRUPTIONS)
    assert "\n" not in line


@pytest.mark.parametrize("severity", [0, 6, -1, 2.0, True, "3"])
def test_bad_severity(severity):
    with pytest.raises(UsageError):
        corrupt(IMAGES[0], "contrast", severity)
    with pytest.raises(UsageError):
        CORRUPTIONS["contrast"](IMAGES[0], severity, np.random.default_rng(0))


@pytest.mark.parametrize(
    "image",
    [
        np.zeros((4, 4, 3), dtype=np.float32),
        np.zeros((2, 4, 4, 3), dtype=np.uint8),
        np.zeros((4, 4, 2), dtype=np.uint8),
        np.zeros((0, 4, 3), dtype=np.uint8),
    ],
)
def test_bad_images(image):
    with pytest.raises(UsageError):
        corrupt(image, "gaussian_noise", 1, np.random.default_rng(0))


def test_bad_rng():
    with pytest.raises(UsageError):
        corrupt(IMAGES[0], "gaussian_noise", 1, rng=0)


# --------------------------------------------------------------------------------------------
# corrupt_folder


def _save(path: Path, array: np.ndarray, **kw) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, **kw)


def _make_folder(root: Path) -> Path:
    src = root / "src"
    _save(src / "cat" / "a.png", IMAGES[0])
    _save(src / "cat" / "b.jpg", IMAGES[1], quality=95)
    _save(src / "cat" / "sub" / "c.bmp", IMAGES[2][:20, :28])
    _save(src / "dog" / "d.png", IMAGES[3][:, :, 0])  # greyscale
    _save(src / "dog" / "e.webp", IMAGES[2])
    _save(src / "dog" / ".hidden.png", IMAGES[0])
    (src / "dog" / "notes.txt").write_text("not an image")
    (src / "empty").mkdir()
    (src / ".cache").mkdir()
    _save(src / ".cache" / "x.png", IMAGES[0])
    return src


def _tree(root: Path) -> dict[str, bytes]:
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_corrupt_folder_keeps_layout(tmp_path):
    src = _make_folder(tmp_path)
    dst = tmp_path / "out"
    calls = []
    n = corrupt_folder(src, dst, "gaussian_noise", 2, progress=lambda i, t: calls.append((i, t)))
    assert n == 5
    assert calls == [(i, 5) for i in range(1, 6)]
    assert sorted(_tree(dst)) == [
        "cat/a.png",
        "cat/b.png",
        "cat/sub/c.bmp",
        "dog/d.png",
        "dog/e.png",
    ]
    assert (dst / "empty").is_dir()  # the class list is kept
    assert not (dst / ".cache").exists()
    with Image.open(dst / "dog" / "d.png") as img:
        assert img.mode == "L" and img.size == (32, 32)
    with Image.open(dst / "cat" / "sub" / "c.bmp") as img:
        assert img.mode == "RGB" and img.size == (28, 20)
    with Image.open(dst / "cat" / "a.png") as img:
        out = np.asarray(img)
    assert out.shape == IMAGES[0].shape and not np.array_equal(out, IMAGES[0])
    assert {p.name for p in tmp_path.iterdir()} == {"src", "out"}  # no temp folder left


def test_corrupt_folder_seed_determinism(tmp_path):
    src = _make_folder(tmp_path)
    corrupt_folder(src, tmp_path / "a", "impulse_noise", 3, seed=1)
    corrupt_folder(src, tmp_path / "b", "impulse_noise", 3, seed=1)
    corrupt_folder(src, tmp_path / "c", "impulse_noise", 3, seed=2)
    a, b, c = (_tree(tmp_path / x) for x in "abc")
    assert a == b
    assert a.keys() == c.keys() and all(a[k] != c[k] for k in a)


def test_corrupt_folder_flat_folder_and_str_paths(tmp_path):
    src = tmp_path / "flat"
    _save(src / "one.png", IMAGES[0])
    _save(src / "two.tiff", IMAGES[1])
    assert corrupt_folder(str(src), str(tmp_path / "o"), "pixelate", 5) == 2
    assert sorted(_tree(tmp_path / "o")) == ["one.png", "two.tiff"]


def test_corrupt_folder_refuses_non_empty_dst(tmp_path):
    src = _make_folder(tmp_path)
    dst = tmp_path / "out"
    dst.mkdir()
    corrupt_folder(src, dst, "contrast", 1)  # an empty folder is fine
    (dst / "old.txt").write_text("keep me")
    before = _tree(dst)
    with pytest.raises(UsageError, match="not empty"):
        corrupt_folder(src, dst, "contrast", 2)
    assert _tree(dst) == before
    assert corrupt_folder(src, dst, "contrast", 2, force=True) == 5
    assert "old.txt" not in _tree(dst)
    assert {p.name for p in tmp_path.iterdir()} == {"src", "out"}


def test_corrupt_folder_refuses_dst_file_and_overlap(tmp_path):
    src = _make_folder(tmp_path)
    (tmp_path / "file").write_text("x")
    with pytest.raises(UsageError):
        corrupt_folder(src, tmp_path / "file", "contrast", 1, force=True)
    with pytest.raises(UsageError, match="overlaps"):
        corrupt_folder(src, src / "inside", "contrast", 1)
    with pytest.raises(UsageError, match="overlaps"):
        corrupt_folder(src, tmp_path, "contrast", 1, force=True)
    with pytest.raises(UsageError):
        corrupt_folder(src, tmp_path / "o", "contrast", 1, seed=-1)
    with pytest.raises(UsageError):
        corrupt_folder(src, tmp_path / "o", "nope", 1)
    assert not (tmp_path / "o").exists()


def test_corrupt_folder_missing_or_empty_src(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        corrupt_folder(tmp_path / "missing", tmp_path / "o", "contrast", 1)
    empty = tmp_path / "empty"
    (empty / "cls").mkdir(parents=True)
    (empty / "cls" / "readme.txt").write_text("x")
    with pytest.raises(DataError, match="no images"):
        corrupt_folder(empty, tmp_path / "o", "contrast", 1)
    (tmp_path / "f.png").write_bytes(b"x")
    with pytest.raises(DataError, match="not a folder"):
        corrupt_folder(tmp_path / "f.png", tmp_path / "o", "contrast", 1)
    assert not (tmp_path / "o").exists()


def test_corrupt_folder_name_collision(tmp_path):
    src = tmp_path / "src"
    _save(src / "a.png", IMAGES[0])
    _save(src / "a.jpg", IMAGES[1])
    with pytest.raises(DataError, match="both be written"):
        corrupt_folder(src, tmp_path / "o", "contrast", 1)


def test_corrupt_folder_unreadable_image(tmp_path):
    src = _make_folder(tmp_path)
    (src / "cat" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match="broken.png"):
        corrupt_folder(src, tmp_path / "out", "contrast", 1)
    assert {p.name for p in tmp_path.iterdir()} == {"src"}


@pytest.mark.parametrize("exc", [RuntimeError("boom"), KeyboardInterrupt()])
@pytest.mark.parametrize("existing", [False, True])
def test_corrupt_folder_failure_leaves_nothing(tmp_path, monkeypatch, exc, existing):
    src = _make_folder(tmp_path)
    dst = tmp_path / "out"
    if existing:
        _save(dst / "old.png", IMAGES[0])
    before = _tree(dst) if existing else None
    real = bc.corrupt
    calls = []

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise exc
        return real(*args, **kwargs)

    monkeypatch.setattr(bc, "corrupt", flaky)
    with pytest.raises(type(exc)):
        corrupt_folder(src, dst, "gaussian_noise", 1, force=True)
    assert len(calls) == 3
    expected = {"src", "out"} if existing else {"src"}
    assert {p.name for p in tmp_path.iterdir()} == expected  # no temp folder either
    if existing:
        assert _tree(dst) == before


# --------------------------------------------------------------------------------------------
# bnscope corrupt (the one command line for corrupt_folder)


def _corrupt_cli(*args: object):
    return run("corrupt", *args)


def test_cli_writes_the_folder_and_reports_one_line(tmp_path):
    src = _make_folder(tmp_path)
    dst = tmp_path / "out"
    res = _corrupt_cli(src, dst, "--corruption", "gaussian_noise", "--severity", "3")
    assert res.exit_code == 0, res.stderr
    assert res.stderr == ""
    assert len(res.stdout.strip().splitlines()) == 1 and "5 images" in res.stdout
    assert len(_tree(dst)) == 5

    res = _corrupt_cli(src, tmp_path / "o2", "--corruption", "fog", "--severity", "3")
    assert res.exit_code == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("bnscope: error: unknown corruption 'fog'")
    assert not (tmp_path / "o2").exists()


def test_cli_errors_are_one_line(tmp_path):
    src = _make_folder(tmp_path)
    out = tmp_path / "o"
    cases = [
        ((src, out, "--corruption", "contrast", "--severity", "x"), "--severity"),
        ((src, out, "--corruption", "contrast", "--severity", "9"), "severity 9"),
        ((tmp_path / "nope", out, "--corruption", "contrast", "--severity", "1"), "nope"),
    ]
    for argv, fragment in cases:
        one_error_line(_corrupt_cli(*argv), fragment)
    assert not out.exists()
    args = (src, out, "--corruption", "contrast", "--severity", "1")
    assert _corrupt_cli(*args, "--seed", "4").exit_code == 0
    one_error_line(_corrupt_cli(*args), "not empty")  # now non-empty
    assert _corrupt_cli(*args, "--force").exit_code == 0
