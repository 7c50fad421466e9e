"""Tests for bnscope.io.data, images, tensorfiles, factories and batches: --data specs, batches,
errors. All data is generated in tmp_path."""

from __future__ import annotations

import gc
import sys
import textwrap
from collections import namedtuple
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from bnscope.errors import DataError
from bnscope.io.batches import move_to, split_batch
from bnscope.io.data import DataSource
from bnscope.io.data import load_data as library_load_data
from bnscope.io.images import IMAGENET_MEAN, IMAGENET_STD, ImageFolderDataset, ImageOptions

MEAN = torch.tensor(IMAGENET_MEAN, dtype=torch.float32)
STD = torch.tensor(IMAGENET_STD, dtype=torch.float32)


# ---------------------------------------------------------------------------------------------
# helpers


def load_data(spec: Any, **kwargs: Any) -> DataSource:
    """The reader in file order with every sample kept: these tests check reading, decoding
    and batching sample by sample (the library's defaults, shuffled as the commands read,
    are tested in test_load_data_defaults_are_the_commands)."""
    kwargs.setdefault("shuffle", False)
    kwargs.setdefault("drop_single", False)
    return library_load_data(spec, **kwargs)


def one_line(err: DataError) -> DataError:
    """Every DataError is one line for the message and one for the fix, and a fix is given."""
    assert isinstance(err, DataError)
    assert "\n" not in str(err)
    assert "\n" not in err.message
    assert err.fix and "\n" not in err.fix
    return err


def raises(fn, *args, **kwargs) -> DataError:
    with pytest.raises(DataError) as info:
        fn(*args, **kwargs)
    return one_line(info.value)


def first_error(source: DataSource) -> DataError:
    with pytest.raises(DataError) as info:
        for _ in source:
            pass
    return one_line(info.value)


def solid(path: Path, size: tuple[int, int], color, mode: str = "RGB") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path)
    return path


def noise(path: Path, size: tuple[int, int], seed: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


def collect(source) -> tuple[torch.Tensor, torch.Tensor | None]:
    xs, ys = [], []
    for batch in source:
        x, y = split_batch(batch)
        xs.append(x)
        if y is not None:
            ys.append(y)
    return torch.cat(xs), (torch.cat(ys) if ys else None)


def normalized(rgb) -> torch.Tensor:
    """Hand computation of ToTensor + Normalize for one pixel value per channel."""
    return (torch.tensor(rgb, dtype=torch.float32) / 255.0 - MEAN) / STD


@pytest.fixture
def labelled(tmp_path: Path) -> Path:
    root = tmp_path / "train"
    noise(root / "cat" / "a.png", (20, 12), 0)
    noise(root / "cat" / "b.jpg", (9, 16), 1)
    noise(root / "dog" / "nested" / "c.png", (11, 11), 2)
    noise(root / "dog" / "d.jpeg", (30, 14), 3)
    (root / "dog" / "notes.txt").write_text("not an image")
    (root / "dog" / ".hidden.png").write_bytes(b"not even a png")
    return root


# ---------------------------------------------------------------------------------------------
# image folders


def test_labelled_image_folder(labelled: Path) -> None:
    src = load_data(labelled, batch_size=3, image=ImageOptions(image_size=8))
    assert src.kind == "images"
    assert src.num_samples == 4
    assert src.has_labels is True
    assert src.classes == ["cat", "dog"]
    assert "2 classes" in src.description and "4 images" in src.description
    batches = list(src)
    assert [b[0].shape for b in batches] == [(3, 3, 8, 8), (1, 3, 8, 8)]
    x, y = collect(src)
    assert x.dtype == torch.float32
    assert y.tolist() == [0, 0, 1, 1]


def test_solid_color_exact_normalization(tmp_path: Path) -> None:
    solid(tmp_path / "imgs" / "a.png", (6, 4), (10, 200, 30))
    x, y = collect(load_data(tmp_path / "imgs"))
    assert y is None and x.shape == (1, 3, 4, 6)
    expected = normalized((10, 200, 30)).view(3, 1, 1).expand(3, 4, 6)
    assert torch.equal(x[0], expected)


def test_custom_mean_std(tmp_path: Path) -> None:
    solid(tmp_path / "imgs" / "a.png", (2, 2), (51, 102, 255))
    opts = ImageOptions(mean=(0.5,), std=(0.5,))
    x, _ = collect(load_data(tmp_path / "imgs", image=opts))
    assert torch.allclose(x[0, :, 0, 0], torch.tensor([-0.6, -0.2, 1.0]), atol=1e-6)


def test_flat_folder_has_no_labels(tmp_path: Path) -> None:
    for i in range(3):
        noise(tmp_path / "flat" / f"{i}.png", (5, 5), i)
    (tmp_path / "flat" / "empty_subdir").mkdir()
    src = load_data(tmp_path / "flat", batch_size=2)
    assert src.has_labels is False and src.classes is None
    assert "flat" in src.description
    batches = list(src)
    assert all(isinstance(b, torch.Tensor) for b in batches)
    assert [b.shape[0] for b in batches] == [2, 1]


def test_grayscale_to_three_and_one_channel(tmp_path: Path) -> None:
    solid(tmp_path / "g" / "a.png", (4, 3), 100, mode="L")
    x3, _ = collect(load_data(tmp_path / "g"))
    assert x3.shape == (1, 3, 3, 4)
    assert torch.equal(x3[0, :, 0, 0], normalized((100, 100, 100)))
    x1, _ = collect(load_data(tmp_path / "g", image=ImageOptions(channels=1)))
    assert x1.shape == (1, 1, 3, 4)
    mean1, std1 = sum(IMAGENET_MEAN) / 3, sum(IMAGENET_STD) / 3
    assert torch.allclose(x1[0, 0], torch.full((3, 4), (100 / 255 - mean1) / std1), atol=1e-6)


def test_rgb_image_with_one_channel_becomes_luminance(tmp_path: Path) -> None:
    solid(tmp_path / "c" / "a.png", (2, 2), (255, 0, 0))
    opts = ImageOptions(channels=1, mean=(0.0,), std=(1.0,))
    x, _ = collect(load_data(tmp_path / "c", image=opts))
    lum = Image.new("RGB", (1, 1), (255, 0, 0)).convert("L").getpixel((0, 0))
    assert torch.allclose(x[0, 0], torch.full((2, 2), lum / 255), atol=1e-7)


def test_rgba_and_palette_images_converted(tmp_path: Path) -> None:
    solid(tmp_path / "m" / "a_rgba.png", (3, 3), (10, 20, 30, 128), mode="RGBA")
    pal = Image.new("P", (3, 3), 1)
    pal.putpalette([0, 0, 0, 40, 50, 60] + [0] * (256 * 3 - 6))
    pal.save(tmp_path / "m" / "b_palette.png")
    x, _ = collect(load_data(tmp_path / "m", batch_size=2))
    assert x.shape == (2, 3, 3, 3)
    assert torch.equal(x[0, :, 1, 1], normalized((10, 20, 30)))
    assert torch.equal(x[1, :, 1, 1], normalized((40, 50, 60)))


def test_workers_decode_identically(labelled: Path) -> None:
    opts = ImageOptions(image_size=8)
    x0, y0 = collect(load_data(labelled, batch_size=2, image=opts))
    x2, y2 = collect(load_data(labelled, batch_size=2, workers=2, image=opts))
    assert torch.equal(x0, x2) and torch.equal(y0, y2)


@pytest.mark.parametrize("workers", [0, 2])
def test_an_unreadable_image_stops_the_reading_naming_it(tmp_path: Path, workers: int) -> None:
    # by default a damaged file is an error that names it, its position in the folder (in
    # name order, class folders in turn, whatever the reading order) and why: also when it
    # is decoded in a worker process; the batches before it were read
    for i in range(5):
        noise(tmp_path / "d" / "k" / f"{i}.png", (6, 6), i)
    broken = tmp_path / "d" / "k" / "2_broken.png"
    broken.write_bytes(b"\x89PNG this is not an image")
    for shuffle in (False, True):
        src = load_data(tmp_path / "d", batch_size=2, workers=workers, image=ImageOptions(6),
                        shuffle=shuffle)  # fmt: skip
        read: list[torch.Tensor] = []
        with pytest.raises(DataError) as info:
            for batch in src:
                read.append(batch[0])
        err = one_line(info.value)
        assert err.message == (
            f"image 4 of 6 cannot be read: {broken}: not an image, or a format Pillow cannot read"
        )
        assert err.fix == (
            "remove or replace the file, or pass skip_unreadable=True to leave unreadable "
            "images out (a warning names them)"
        )
        assert src.unreadable() == {}
        if not shuffle:
            assert [len(x) for x in read] == [2]  # files 1-2 were read, then 3-4 failed


@pytest.mark.parametrize("workers", [0, 2])
def test_unreadable_images_are_left_out_and_named(tmp_path: Path, workers: int) -> None:
    # with skip_unreadable a damaged file does not stop the run: it is left out of its batch
    # (also when decoded in a worker process) and named with the reason, once, however often
    # the data is read
    for i in range(3):
        noise(tmp_path / "d" / "k" / f"{i}.png", (6, 6), i)
    broken = tmp_path / "d" / "k" / "3_broken.png"
    broken.write_bytes(b"\x89PNG this is not an image")
    src = load_data(tmp_path / "d", batch_size=2, workers=workers, image=ImageOptions(6),
                    shuffle=False, skip_unreadable=True)  # fmt: skip
    assert src.unreadable() == {}
    x, y = collect(src)
    assert x.shape == (3, 3, 6, 6) and y.tolist() == [0, 0, 0]
    assert src.unreadable() == {
        str(broken): "not an image, or a format Pillow cannot read"
    }
    collect(src)
    assert len(src.unreadable()) == 1
    # the images that were read are exactly those of a folder without the broken file
    broken.unlink()
    ref, _ = collect(load_data(tmp_path / "d", batch_size=2, image=ImageOptions(6), shuffle=False))
    assert torch.equal(x, ref)


def test_truncated_image_is_named_or_left_out(tmp_path: Path) -> None:
    noise(tmp_path / "t" / "b.png", (16, 16), 1)
    path = noise(tmp_path / "t" / "a.png", (16, 16), 0)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    err = first_error(load_data(tmp_path / "t"))  # the size comes from b.png: a.png's is lost
    assert err.message.startswith(f"image 1 of 2 cannot be read: {path}: OSError: ")
    src = load_data(tmp_path / "t", skip_unreadable=True)
    x, _ = collect(src)
    assert x.shape == (1, 3, 16, 16)
    (reason,) = src.unreadable().values()
    assert list(src.unreadable()) == [str(path)] and reason.startswith("OSError: ")


@pytest.mark.parametrize("workers", [0, 2])
def test_no_readable_image_is_one_error(tmp_path: Path, workers: int) -> None:
    for name in ("a.png", "b.png", "c.png"):
        (tmp_path / "bad" / "k").mkdir(parents=True, exist_ok=True)
        (tmp_path / "bad" / "k" / name).write_bytes(b"broken")
    # without an image size, the first readable header is needed up front
    err = raises(load_data, tmp_path / "bad")
    assert err.message.startswith(f"none of the 3 images in {tmp_path / 'bad'} can be read")
    src = load_data(tmp_path / "bad", workers=workers, image=ImageOptions(4), skip_unreadable=True)
    err = first_error(src)
    assert err.message.startswith("none of the 3 images could be read (e.g. ")
    assert err.fix.startswith("remove or replace the unreadable files")


def test_worker_error_and_early_stop_do_not_stall(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # torch's own cleanup of an iterator caught in a reference cycle waits 5 s per worker; the
    # loader stops its workers itself, on an early stop and on an error, before any gc runs
    from torch.utils.data import dataloader

    stopped: list[bool] = []  # per call: every worker has exited (no reference kept)
    original = dataloader._MultiProcessingDataLoaderIter._shutdown_workers

    def spy(self: Any) -> None:
        original(self)
        stopped.append(self._shutdown and not any(w.is_alive() for w in self._workers))

    monkeypatch.setattr(dataloader._MultiProcessingDataLoaderIter, "_shutdown_workers", spy)
    for i in range(8):
        noise(tmp_path / "w" / f"{i}.png", (4, 4), i)
    noise(tmp_path / "w" / "9_other_size.png", (5, 5), 9)  # an error in a worker
    src = load_data(tmp_path / "w", batch_size=1, workers=2)
    gc.disable()
    try:
        iterator = iter(src)
        next(iterator)
        iterator.close()  # the consumer stops early
        assert stopped and all(stopped)
        del iterator
        stopped.clear()
        with pytest.raises(DataError):
            for _ in src:
                pass
        assert stopped and all(stopped)
    finally:
        gc.enable()


@pytest.mark.parametrize("workers", [0, 2])
def test_mixed_sizes_without_image_size(tmp_path: Path, workers: int) -> None:
    solid(tmp_path / "s" / "a.png", (4, 4), (1, 2, 3))
    solid(tmp_path / "s" / "b.png", (5, 3), (1, 2, 3))
    err = first_error(load_data(tmp_path / "s", workers=workers))
    assert err.message == (
        f"image 2 of 2 has a different size: {tmp_path / 's' / 'b.png'} is 5x3, "
        f"{tmp_path / 's' / 'a.png'} is 4x4"
    )
    assert err.fix == "pass image_size=N to resize and crop"
    # with an image size, the same folder loads
    x, _ = collect(load_data(tmp_path / "s", image=ImageOptions(image_size=3)))
    assert x.shape == (2, 3, 3, 3)


def test_loose_images_and_class_folders_mixed(tmp_path: Path) -> None:
    solid(tmp_path / "mix" / "loose.png", (2, 2), (0, 0, 0))
    solid(tmp_path / "mix" / "cls" / "a.png", (2, 2), (0, 0, 0))
    err = raises(load_data, tmp_path / "mix")
    assert "loose.png" in err.message and "cls" in err.message


def test_empty_folder(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("nothing here")
    err = raises(load_data, tmp_path / "empty")
    assert err.message == f"no images or tensor files found in {tmp_path / 'empty'}"


def test_nonexistent_path(tmp_path: Path) -> None:
    err = raises(load_data, tmp_path / "nope")
    assert err.message == f"data not found: {tmp_path / 'nope'}"
    err = raises(load_data, str(tmp_path / "nope.pt"))
    assert err.message.startswith("data not found")


def test_unsupported_file(tmp_path: Path) -> None:
    (tmp_path / "labels.txt").write_text("1 2 3")
    err = raises(load_data, tmp_path / "labels.txt")
    assert "labels.txt" in err.message
    assert all(s in err.fix for s in (".pt", ".pth", ".npy", ".npz"))
    image = solid(tmp_path / "one.png", (2, 2), (0, 0, 0))
    assert "folder" in raises(load_data, image).fix


def _grid_image(path: Path, w: int, h: int) -> Path:
    """R encodes the column, G the row, so a crop can be located exactly."""
    arr = np.zeros((h, w, 3), dtype=np.uint8)
    arr[:, :, 0] = (np.arange(w) * 10)[None, :]
    arr[:, :, 1] = (np.arange(h) * 10)[:, None]
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)
    return path


@pytest.mark.parametrize(
    ("w", "h", "size", "left", "top"),
    [
        (10, 5, 3, 4, 1),  # (10-3)/2 = 3.5 rounds to 4, (5-3)/2 = 1
        (9, 5, 4, 2, 0),  # (9-4)/2 = 2.5 rounds half to even: 2 (as torchvision)
        (5, 11, 5, 0, 3),  # tall image: top = 3
    ],
)
def test_center_crop_rounding_without_resampling(w, h, size, left, top, tmp_path: Path) -> None:
    # resize equals the shorter side, so no resampling: the crop is exact pixels
    _grid_image(tmp_path / "g" / "a.png", w, h)
    opts = ImageOptions(image_size=size, resize=min(w, h), mean=(0.0,), std=(1.0,))
    x, _ = collect(load_data(tmp_path / "g", image=opts))
    assert x.shape == (1, 3, size, size)
    cols = torch.round(x[0, 0] * 255 / 10)
    rows = torch.round(x[0, 1] * 255 / 10)
    assert cols[0].tolist() == list(range(left, left + size))
    assert rows[:, 0].tolist() == list(range(top, top + size))


def test_resize_then_crop_matches_hand_computation(tmp_path: Path) -> None:
    # 23x7 -> shorter side 5: long side int(5 * 23 / 7) = int(16.43) = 16, so 16x5;
    # crop 4: left = round(6.0) = 6, top = round(0.5) = 0 (half to even)
    path = noise(tmp_path / "r" / "a.png", (23, 7), 5)
    opts = ImageOptions(image_size=4, resize=5, mean=(0.0,), std=(1.0,))
    x, _ = collect(load_data(tmp_path / "r", image=opts))
    with Image.open(path) as img:
        ref = img.convert("RGB").resize((16, 5), Image.Resampling.BILINEAR).crop((6, 0, 10, 4))
    expected = torch.from_numpy(np.asarray(ref, dtype=np.float32) / 255).permute(2, 0, 1)
    assert torch.equal(x[0], expected)


def test_default_resize_and_option_errors(tmp_path: Path) -> None:
    assert ImageOptions(image_size=224).resize_to() == 256
    assert ImageOptions(image_size=32).resize_to() == 37
    assert ImageOptions().resize_to() is None
    solid(tmp_path / "o" / "a.png", (4, 4), (0, 0, 0))
    for opts in (
        ImageOptions(channels=2),
        ImageOptions(image_size=8, resize=4),
        ImageOptions(resize=8),
        ImageOptions(mean=(0.1, 0.2)),
        ImageOptions(std=(0.0,)),
    ):
        raises(load_data, tmp_path / "o", image=opts)


def test_image_folder_dataset_directly(labelled: Path) -> None:
    ds = ImageFolderDataset(labelled, ImageOptions(image_size=4))
    assert len(ds) == 4 and ds.classes == ["cat", "dog"]
    assert [p.name for p in ds.files] == ["a.png", "b.jpg", "d.jpeg", "c.png"]
    x, label = ds[3]
    assert x.shape == (3, 4, 4) and label == 1


def four_classes(root: Path, classes=("circle", "cross", "stripes", "triangle")) -> Path:
    for i, name in enumerate(classes):
        solid(root / name / "a.png", (2, 2), (10 * i, 0, 0))
    return root


def labels_by_class(source: DataSource) -> dict[int, float]:
    """label -> the red value (0..255) of that class's images, from the decoded batches."""
    x, y = collect(source)
    red = x[:, 0, 0, 0] * STD[0] + MEAN[0]
    return {int(label): round(float(r) * 255) for label, r in zip(y, red, strict=True)}


def test_class_folders_matched_to_given_classes_by_name(tmp_path: Path) -> None:
    train = ["circle", "cross", "stripes", "triangle"]
    val = four_classes(tmp_path / "val", ("circle", "stripes", "triangle"))  # no "cross"
    # alone, a folder numbers its class folders in name order: "stripes" would be label 1
    alone = load_data(val, shuffle=False)
    assert alone.classes == alone.label_names == ["circle", "stripes", "triangle"]
    assert not alone.matched and labels_by_class(alone) == {0: 0, 1: 10, 2: 20}
    # with the training classes, every folder keeps its training label
    src = load_data(val, classes=train, shuffle=False)
    assert src.matched and src.classes == ["circle", "stripes", "triangle"]
    assert src.label_names == train
    assert labels_by_class(src) == {0: 0, 2: 10, 3: 20}
    assert "3 of the 4 training classes" in src.description
    # the same classes in another order: labels follow the given order
    same = load_data(val, classes=["triangle", "stripes", "circle"], shuffle=False)
    assert labels_by_class(same) == {2: 0, 1: 10, 0: 20}
    assert "(3 classes, " in same.description


def test_class_folder_not_among_the_given_classes(tmp_path: Path) -> None:
    val = four_classes(tmp_path / "val", ("circle", "cross", "zebra"))
    err = raises(load_data, val, classes=["circle", "cross", "stripes", "triangle"])
    assert err.message == (
        f"{val} has a class folder that is not among the 4 training classes: zebra "
        "(training classes: circle, cross, stripes, triangle)"
    )
    assert err.fix == (
        "class folders are matched to the training classes by name: rename or remove it"
    )
    err = raises(load_data, val, classes=["stripes"])
    assert "has class folders that are not among the 1 training classes: circle, cross, zebra" in (
        err.message
    )
    # given classes do not apply to a flat folder or to tensors
    flat = solid(tmp_path / "flat" / "a.png", (2, 2), (0, 0, 0)).parent
    assert load_data(flat, classes=["x"]).has_labels is False


def test_folder_classes_matches_the_dataset(tmp_path: Path, labelled: Path) -> None:
    from bnscope.io.images import folder_classes

    assert folder_classes(labelled) == ImageFolderDataset(labelled).classes == ["cat", "dog"]
    (labelled / "empty").mkdir()  # an empty class folder is a class: it keeps its place
    (labelled / ".hidden").mkdir()
    assert folder_classes(labelled) == ImageFolderDataset(labelled).classes
    assert folder_classes(labelled) == ["cat", "dog", "empty"]
    flat = solid(tmp_path / "flat" / "a.png", (2, 2), (0, 0, 0)).parent
    assert folder_classes(flat) is None
    assert folder_classes(tmp_path / "missing") is None
    assert folder_classes(flat / "a.png") is None
    (tmp_path / "nothing" / "sub").mkdir(parents=True)
    assert folder_classes(tmp_path / "nothing") is None


def test_split_like_class_folders_are_listed(tmp_path: Path) -> None:
    four_classes(tmp_path / "ds", ("Train", "val", "zebra"))
    src = load_data(tmp_path / "ds")
    assert src.split_folders == ["Train", "val"]
    assert load_data(four_classes(tmp_path / "ok")).split_folders == []


# ---------------------------------------------------------------------------------------------
# tensor files


def test_pt_tensor(tmp_path: Path) -> None:
    x = torch.randn(10, 3, 4, 4, dtype=torch.float64)
    torch.save(x, tmp_path / "x.pt")
    src = load_data(tmp_path / "x.pt", batch_size=4)
    assert src.kind == "tensors" and src.num_samples == 10 and src.has_labels is False
    assert "10 samples" in src.description
    got, y = collect(src)
    assert y is None and got.dtype == torch.float32
    assert torch.equal(got, x.float())


def test_pt_pair_and_dicts(tmp_path: Path) -> None:
    x, y = torch.randn(7, 5), torch.arange(7)
    torch.save((x, y), tmp_path / "pair.pt")
    torch.save({"x": x, "y": y, "meta": torch.zeros(1)}, tmp_path / "dict.pth")
    torch.save({"inputs": x, "targets": y}, tmp_path / "alias.pt")
    for name in ("pair.pt", "dict.pth", "alias.pt"):
        src = load_data(tmp_path / name, batch_size=3)
        assert src.has_labels is True
        gx, gy = collect(src)
        assert torch.equal(gx, x) and torch.equal(gy, y)


def test_npy_keeps_integer_inputs(tmp_path: Path) -> None:
    arr = np.arange(2 * 3 * 2 * 2, dtype=np.uint8).reshape(2, 3, 2, 2)
    np.save(tmp_path / "x.npy", arr)
    gx, gy = collect(load_data(tmp_path / "x.npy"))
    assert gy is None and gx.dtype == torch.uint8
    assert torch.equal(gx, torch.from_numpy(arr))


def test_npz_with_labels_and_single_array(tmp_path: Path) -> None:
    x = np.random.default_rng(0).normal(size=(6, 4))
    y = np.array([0, 1, 0, 1, 1, 0])
    np.savez(tmp_path / "xy.npz", x=x, y=y)
    gx, gy = collect(load_data(tmp_path / "xy.npz", batch_size=4))
    assert gx.dtype == torch.float32 and torch.allclose(gx, torch.from_numpy(x).float())
    assert gy.tolist() == y.tolist()
    np.savez(tmp_path / "single.npz", x)
    gx, gy = collect(load_data(tmp_path / "single.npz"))
    assert gy is None and gx.shape == (6, 4)


def test_shard_folder_equals_concatenation(tmp_path: Path) -> None:
    folder = tmp_path / "shards"
    folder.mkdir()
    sizes = [5, 2, 7]
    xs = [torch.randn(n, 3) for n in sizes]
    ys = [torch.randint(0, 4, (n,)) for n in sizes]
    for i, (x, y) in enumerate(zip(xs, ys, strict=True)):
        torch.save({"x": x, "y": y}, folder / f"shard_{i}.pt")
    (folder / "README.md").write_text("ignored")
    src = load_data(folder, batch_size=4)
    assert src.num_samples == 14 and src.has_labels is True
    assert "3 files" in src.description
    assert [split_batch(b)[0].shape[0] for b in src] == [4, 4, 4, 2]
    gx, gy = collect(src)
    assert torch.equal(gx, torch.cat(xs)) and torch.equal(gy, torch.cat(ys))


def test_shard_shape_mismatch_names_shard(tmp_path: Path) -> None:
    folder = tmp_path / "shards"
    folder.mkdir()
    torch.save(torch.randn(3, 4), folder / "a.pt")
    np.save(folder / "b.npy", np.zeros((2, 5), dtype=np.float32))
    err = raises(load_data, folder)
    assert "b.npy" in err.message and "a.pt" in err.message


def test_shard_labels_in_some_only(tmp_path: Path) -> None:
    folder = tmp_path / "shards"
    folder.mkdir()
    torch.save((torch.randn(3, 4), torch.zeros(3, dtype=torch.long)), folder / "a.pt")
    torch.save(torch.randn(2, 4), folder / "b.pt")
    err = raises(load_data, folder)
    assert "b.pt" in err.message and "labels" in err.message


def test_label_length_mismatch(tmp_path: Path) -> None:
    torch.save({"x": torch.randn(5, 2), "y": torch.arange(4)}, tmp_path / "bad.pt")
    err = raises(load_data, tmp_path / "bad.pt")
    assert "bad.pt" in err.message and "5 samples" in err.message


def test_labels_must_be_1d(tmp_path: Path) -> None:
    torch.save((torch.randn(5, 2), torch.zeros(5, 2)), tmp_path / "bad.pt")
    raises(load_data, tmp_path / "bad.pt")


def test_label_only_file(tmp_path: Path) -> None:
    torch.save(torch.arange(10), tmp_path / "labels.pt")
    err = raises(load_data, tmp_path / "labels.pt")
    assert "looks like labels only" in err.message


def test_tensor_file_content_errors(tmp_path: Path) -> None:
    torch.save({"weight": torch.zeros(2), "bias": torch.zeros(2)}, tmp_path / "ckpt.pt")
    err = raises(load_data, tmp_path / "ckpt.pt")
    assert "'weight'" in err.message and "'bias'" in err.message
    torch.save(torch.tensor(3.0), tmp_path / "scalar.pt")
    assert "no samples" in raises(load_data, tmp_path / "scalar.pt").message
    torch.save((torch.zeros(2), torch.zeros(2), torch.zeros(2)), tmp_path / "triple.pt")
    raises(load_data, tmp_path / "triple.pt")
    torch.save(Fraction(1, 3), tmp_path / "pickled.pt")  # not allowed by weights_only
    assert "cannot load tensor file" in raises(load_data, tmp_path / "pickled.pt").message
    (tmp_path / "garbage.npy").write_bytes(b"garbage")
    assert "cannot load tensor file" in raises(load_data, tmp_path / "garbage.npy").message


# ---------------------------------------------------------------------------------------------
# factories

FACTORY_FILE = """
from helper import make_dataset  # sibling import must work
from torch.utils.data import DataLoader

def make(batch_size, num_workers=0, other=1):
    return DataLoader(make_dataset(), batch_size=batch_size, num_workers=num_workers)

def boom():
    raise RuntimeError("no data here\\nsecond line")

def not_iterable():
    return 42

def samples():
    return make_dataset()

loader = DataLoader(make_dataset(), batch_size=5)
"""

HELPER_FILE = """
import torch
from torch.utils.data import TensorDataset

def make_dataset():
    return TensorDataset(torch.arange(10.0).view(10, 1), torch.arange(10))
"""


@pytest.fixture
def factory_file(tmp_path: Path) -> Path:
    folder = tmp_path / "factories"
    folder.mkdir()
    (folder / "helper.py").write_text(HELPER_FILE)
    (folder / "datafile.py").write_text(FACTORY_FILE)
    yield folder / "datafile.py"
    sys.modules.pop("helper", None)


def test_file_factory(factory_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "path", list(sys.path))
    src = load_data(f"{factory_file}:make", batch_size=4)
    folder = str(factory_file.parent.resolve())  # stays for lazy imports of its siblings
    assert sys.path[0] == folder and sys.path.count(folder) == 1
    assert src.kind == "factory" and src.num_samples is None and src.has_labels is None
    assert src.description == f"factory {factory_file}:make"
    assert [b[0].shape[0] for b in src] == [4, 4, 2]  # batch_size was passed through
    src = load_data(f"{factory_file}:loader")  # a module-level iterable is used as is
    assert [b[0].shape[0] for b in src] == [5, 5]


@pytest.fixture
def package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    pkg = tmp_path / "pkgroot" / "bnscope_testpkg"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "loaders.py").write_text(
        textwrap.dedent(
            """
            import torch

            def make(*, seed, batch_size=2, **kwargs):
                assert not kwargs, kwargs
                g = torch.Generator().manual_seed(seed)
                return [torch.randn(batch_size, 3, generator=g) for _ in range(3)]
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path / "pkgroot"))
    yield "bnscope_testpkg"
    for name in [m for m in sys.modules if m.startswith("bnscope_testpkg")]:
        del sys.modules[name]


def test_module_factory(package: str) -> None:
    src = load_data(f"{package}.loaders:make", batch_size=6, seed=3)
    batches = list(src)
    assert len(batches) == 3 and batches[0].shape == (6, 3)
    expected = torch.randn(6, 3, generator=torch.Generator().manual_seed(3))
    assert torch.equal(batches[0], expected)


def test_factory_errors(factory_file: Path, package: str, tmp_path: Path) -> None:
    err = raises(load_data, "bnscope_no_such_module.sub:make")
    assert "bnscope_no_such_module.sub" in err.message and "not found" in err.message
    err = raises(load_data, f"{tmp_path / 'missing.py'}:make")
    assert "missing.py" in err.message and "not found" in err.message
    err = raises(load_data, f"{package}.loaders:nothing")
    assert "'nothing'" in err.message and "make" in err.fix
    err = raises(load_data, f"{factory_file}:boom")
    assert err.message.endswith("raised RuntimeError: no data here second line")
    assert "boom" in err.message
    err = raises(load_data, f"{factory_file}:not_iterable")
    assert "returned a int" in err.message
    err = raises(load_data, f"{factory_file}:samples")
    assert "TensorDataset" in err.message and "DataLoader" in err.fix


def test_factory_file_with_error(tmp_path: Path) -> None:
    (tmp_path / "broken.py").write_text("import bnscope_missing_dependency\n")
    err = raises(load_data, f"{tmp_path / 'broken.py'}:make")
    assert "broken.py" in err.message and "ModuleNotFoundError" in err.message


def test_existing_path_with_colon_is_not_a_factory(tmp_path: Path) -> None:
    torch.save(torch.randn(3, 2), tmp_path / "a:b.pt")
    assert load_data(str(tmp_path / "a:b.pt")).kind == "tensors"


# ---------------------------------------------------------------------------------------------
# loader options


def test_sharding_partitions_samples(tmp_path: Path, labelled: Path) -> None:
    x = torch.arange(11.0).view(11, 1)
    torch.save(x, tmp_path / "x.pt")
    parts = [load_data(tmp_path / "x.pt", rank=r, world_size=2, batch_size=3) for r in (0, 1)]
    assert [p.num_samples for p in parts] == [6, 5]
    assert "rank 1 of 2" in parts[1].description
    got = [collect(p)[0].view(-1).tolist() for p in parts]
    assert got[0] == [0, 2, 4, 6, 8, 10] and got[1] == [1, 3, 5, 7, 9]
    # images: every file on exactly one rank
    opts = ImageOptions(image_size=4)
    full, _ = collect(load_data(labelled, image=opts))
    shards = [collect(load_data(labelled, image=opts, rank=r, world_size=2))[0] for r in (0, 1)]
    assert torch.equal(torch.cat([shards[0], shards[1]])[[0, 2, 1, 3]], full)


def test_shuffle_is_seeded(tmp_path: Path) -> None:
    torch.save(torch.arange(50.0), tmp_path / "x.pt")
    torch.save(torch.arange(50.0).view(50, 1), tmp_path / "x.pt")

    def order(seed: int, shuffle: bool = True) -> list[float]:
        src = load_data(tmp_path / "x.pt", shuffle=shuffle, seed=seed, batch_size=7)
        return collect(src)[0].view(-1).tolist()

    assert order(0) == order(0)
    assert order(0) != order(1)
    assert sorted(order(0)) == order(0, shuffle=False) == list(range(50))


def test_drop_last(tmp_path: Path) -> None:
    torch.save(torch.randn(10, 2), tmp_path / "x.pt")
    src = load_data(tmp_path / "x.pt", batch_size=4, drop_last=True)
    assert [b.shape[0] for b in src] == [4, 4]


def test_bad_loader_arguments(tmp_path: Path) -> None:
    torch.save(torch.randn(4, 2), tmp_path / "x.pt")
    assert "batch size" in raises(load_data, tmp_path / "x.pt", batch_size=0).message
    assert "workers" in raises(load_data, tmp_path / "x.pt", workers=-1).message
    raises(load_data, tmp_path / "x.pt", rank=2, world_size=2)


# ---------------------------------------------------------------------------------------------
# batches


def test_split_batch_forms() -> None:
    x, y = torch.randn(2, 3), torch.tensor([1, 0])
    assert split_batch(x) == (x, None)
    assert split_batch((x, y))[1] is y
    assert split_batch([x])[1] is None
    assert split_batch((x, ["a", "b"]))[1] is None  # non-tensor labels are not labels
    assert split_batch({"image": x, "label": y}) == (x, y)
    assert split_batch({"pixel_values": x})[1] is None
    assert split_batch({"feat": x, "targets": y}, input_key="feat") == (x, y)


def test_split_batch_errors() -> None:
    x = torch.randn(2, 3)
    err = raises(split_batch, {"feat": x, "other": x})
    assert "'feat'" in err.message and "input_key=" in err.fix
    err = raises(split_batch, {"feat": x}, input_key="pixels")
    assert "'pixels'" in err.message and "'feat'" in err.message
    raises(split_batch, ())
    raises(split_batch, 3.0)


def test_move_to_recurses() -> None:
    Pair = namedtuple("Pair", "a b")
    batch = {"x": (torch.zeros(1), [torch.ones(1)]), "p": Pair(torch.zeros(1), "tag"), "n": 3}
    moved = move_to(batch, torch.device("meta"))
    assert moved["x"][0].is_meta and moved["x"][1][0].is_meta
    assert isinstance(moved["x"], tuple) and isinstance(moved["x"][1], list)
    assert isinstance(moved["p"], Pair) and moved["p"].a.is_meta and moved["p"].b == "tag"
    assert moved["n"] == 3


def test_default_call() -> None:
    from bnscope.engine.runner import default_call

    model = nn.Linear(3, 2)
    x = torch.randn(4, 3)
    assert torch.equal(default_call(model, (x, torch.zeros(4))), model(x))
    assert torch.equal(default_call(model, {"feat": x}, input_key="feat"), model(x))


def test_same_order_repeats_the_shuffle_and_a_new_order_on_request(tmp_path):
    x = torch.arange(40, dtype=torch.float32).reshape(40, 1)
    torch.save(x, tmp_path / "x.pt")
    same = library_load_data(str(tmp_path / "x.pt"), batch_size=8, seed=3)  # the defaults
    first, second = [b.clone() for b in same], [b.clone() for b in same]
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))
    assert not torch.equal(torch.cat(first), x)  # shuffled
    fresh = library_load_data(str(tmp_path / "x.pt"), batch_size=8, seed=3, same_order=False)
    a, b = torch.cat(list(fresh)), torch.cat(list(fresh))
    assert not torch.equal(a, b) and torch.equal(a.sort(0).values, b.sort(0).values)


def test_load_data_defaults_are_the_commands(labelled: Path, tmp_path: Path) -> None:
    """The issue: bnscope.load_data read in order where the commands shuffle. The library's
    defaults now give the batches a job (what the CLI runs) reads, sample for sample."""
    import bnscope

    opts = ImageOptions(image_size=6)
    torch.save({"x": torch.arange(65.0).view(65, 1), "y": torch.arange(65) % 3}, tmp_path / "t.pt")
    for spec in (str(tmp_path / "t.pt"), str(labelled)):
        job = bnscope.open(data=spec, image_size=6, batch_size=2)
        ours = library_load_data(spec, batch_size=2, image=opts)
        theirs = job.source(spec)
        got, want = list(ours), list(theirs)
        assert len(got) == len(want)
        for a, b in zip(got, want, strict=True):
            assert all(torch.equal(u, v) for u, v in zip(a, b, strict=True))
        assert ours.dropped_samples == theirs.dropped_samples
    src = library_load_data(str(tmp_path / "t.pt"), batch_size=8)
    x, y = collect(src)
    assert x.view(-1).tolist() != sorted(x.view(-1).tolist())  # shuffled
    assert x.shape[0] == 64 and src.dropped_samples == 1  # a last batch of 1 is left out
    assert [b[0].shape[0] for b in src] == [8] * 8


# ---------------------------------------------------------------------------------------------
# known_batches: the length of the data, when it is known without reading it


class _Unreadable(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 10

    def __getitem__(self, i: int) -> torch.Tensor:
        raise AssertionError("read")


class _Stream(torch.utils.data.IterableDataset):
    def __iter__(self):
        yield from (torch.zeros(2) for _ in range(10))


def test_known_batches(tmp_path: Path) -> None:
    from torch.utils.data import DataLoader

    from bnscope.io.data import known_batches

    path = tmp_path / "x.pt"
    torch.save(torch.randn(50, 3), path)
    assert known_batches(load_data(path, batch_size=16)) == (4, 16)
    assert known_batches(load_data(path, batch_size=16, drop_last=True)) == (3, 16)
    assert known_batches(load_data(path, batch_size=7, rank=1, world_size=2)) == (4, 7)  # 25
    assert known_batches(DataLoader(_Unreadable(), batch_size=3)) == (4, 3)
    assert known_batches(DataLoader(_Unreadable(), batch_size=3, drop_last=True)) == (3, 3)
    assert known_batches([torch.zeros(2)] * 5) == (5, None)
    assert known_batches(DataLoader(_Stream(), batch_size=3)) is None
    assert known_batches(iter([torch.zeros(2)])) is None
    assert known_batches(torch.zeros(2) for _ in range(3)) is None
    factory = tmp_path / "fac.py"
    factory.write_text(
        "import torch\n"
        "def loader(batch_size=4):\n"
        "    return torch.utils.data.DataLoader(list(torch.zeros(9, 2)), batch_size=batch_size)\n"
        "def gen():\n"
        "    return (torch.zeros(4, 2) for _ in range(3))\n"
    )
    assert known_batches(load_data(f"{factory}:loader", batch_size=4)) == (3, 4)
    assert known_batches(load_data(f"{factory}:gen")) is None
