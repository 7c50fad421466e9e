"""Tests for the demo building blocks: model, synthetic data, training loop."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset

from bnscope.demo import model as demo_model
from bnscope.demo.synthetic import CLASSES, make_image, write_dataset, write_image_folder
from bnscope.demo.train import evaluate, lr_at, train

MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


class _PngFolder(Dataset):
    """Minimal ImageFolder stand-in: PNG -> float32/255 -> ImageNet-normalised CHW tensor."""

    def __init__(self, root: Path) -> None:
        self.items = [
            (p, label)
            for label, cls in enumerate(CLASSES)
            for p in sorted((root / cls).glob("*.png"))
        ]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        path, label = self.items[i]
        with Image.open(path) as im:
            arr = np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0
        arr = (arr - MEAN) / STD
        return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1))), label


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tiny") / "train"
    write_image_folder(root, per_class=6, seed=3)
    return root


def _bn_layers(m: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [x for x in m.modules() if isinstance(x, nn.modules.batchnorm._BatchNorm)]


# --------------------------------------------------------------------------- model


def test_model_forward_shape_and_bn_layers() -> None:
    torch.manual_seed(0)
    m = demo_model.make_model()
    assert isinstance(m, demo_model.SmallCNN)
    out = m(torch.randn(5, 3, 32, 32))
    assert out.shape == (5, 4)
    kinds = [type(x) for x in m.modules()]
    assert kinds.count(nn.BatchNorm2d) >= 3
    assert kinds.count(nn.BatchNorm1d) == 1
    n_params = sum(p.numel() for p in m.parameters())
    assert 20_000 <= n_params <= 70_000
    assert all(bn.momentum == 0.01 for bn in _bn_layers(m))
    m.eval()
    assert m(torch.randn(1, 3, 32, 32)).shape == (1, 4)


def test_model_options() -> None:
    m = demo_model.make_model(num_classes=7, width=8, bn_momentum=None)
    assert m(torch.randn(2, 3, 32, 32)).shape == (2, 7)
    assert all(bn.momentum is None for bn in _bn_layers(m))
    with pytest.raises(ValueError):
        demo_model.make_model(num_classes=0)


def test_model_module_imports_only_torch() -> None:
    src = Path(demo_model.__file__).read_text()
    imports = [
        line.split()[1]
        for line in src.splitlines()
        if line.startswith(("import ", "from ")) and not line.startswith("from __future__")
    ]
    assert imports and all(name.split(".")[0] == "torch" for name in imports), imports


# ------------------------------------------------------------------------- synthetic


@pytest.mark.parametrize("cls", CLASSES)
def test_make_image_deterministic_rgb_size(cls: str) -> None:
    a = make_image(cls, np.random.default_rng(42))
    b = make_image(cls, np.random.default_rng(42))
    c = make_image(cls, np.random.default_rng(43))
    assert a.mode == "RGB" and a.size == (32, 32)
    assert np.array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(np.asarray(a), np.asarray(c))
    assert make_image(cls, np.random.default_rng(0), size=48).size == (48, 48)


def test_make_image_rejects_unknown_class() -> None:
    with pytest.raises(ValueError):
        make_image("hexagon", np.random.default_rng(0))


def test_classes() -> None:
    assert len(CLASSES) == 4 and len(set(CLASSES)) == 4


def test_write_image_folder_layout(tmp_path: Path) -> None:
    n = write_image_folder(tmp_path / "a", per_class=3, seed=7)
    assert n == 3 * len(CLASSES)
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == sorted(CLASSES)
    for cls in CLASSES:
        files = sorted((tmp_path / "a" / cls).glob("*.png"))
        assert len(files) == 3
        with Image.open(files[0]) as im:
            assert im.mode == "RGB" and im.size == (32, 32)
    # Deterministic for a seed.
    write_image_folder(tmp_path / "b", per_class=3, seed=7)
    for cls in CLASSES:
        for f in sorted((tmp_path / "a" / cls).glob("*.png")):
            with Image.open(f) as x, Image.open(tmp_path / "b" / cls / f.name) as y:
                assert np.array_equal(np.asarray(x), np.asarray(y))


def test_write_dataset_counts(tmp_path: Path) -> None:
    counts = write_dataset(tmp_path, train_per_class=2, val_per_class=1, seed=0)
    assert counts == {"train": 2 * len(CLASSES), "val": len(CLASSES)}
    for split, k in (("train", 2), ("val", 1)):
        for cls in CLASSES:
            assert len(list((tmp_path / split / cls).glob("*.png"))) == k
    # The two splits are drawn from different seeds.
    with (
        Image.open(tmp_path / "train" / CLASSES[0] / "00000.png") as a,
        Image.open(tmp_path / "val" / CLASSES[0] / "00000.png") as b,
    ):
        assert not np.array_equal(np.asarray(a), np.asarray(b))


# -------------------------------------------------------------------------- training


def test_lr_schedule() -> None:
    assert lr_at(0, 10, lr=0.1, final_lr=0.0) == pytest.approx(0.1)
    assert lr_at(9, 10, lr=0.1, final_lr=0.0) == pytest.approx(0.0, abs=1e-12)
    assert lr_at(9, 10, lr=0.1, final_lr=0.02) == pytest.approx(0.02)
    mid = lr_at(5, 11, lr=0.1, final_lr=0.0)
    assert mid == pytest.approx(0.05)
    assert all(lr_at(s, 10, lr=0.1, final_lr=None) == 0.1 for s in range(10))
    assert lr_at(0, 10, lr=0.1, warmup_steps=4) == pytest.approx(0.025)
    assert lr_at(4, 10, lr=0.1, warmup_steps=4) == pytest.approx(0.1)


def test_train_one_epoch(tiny_folder: Path) -> None:
    torch.manual_seed(0)
    m = demo_model.make_model()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    bns = _bn_layers(m)
    loader = DataLoader(_PngFolder(tiny_folder), batch_size=8, shuffle=True, drop_last=True)
    rng_state = torch.get_rng_state()
    lines: list[str] = []
    recs = train(m, loader, epochs=1, lr=0.05, seed=0, progress=lines.append, bn_momentum=0.5)
    assert torch.equal(torch.get_rng_state(), rng_state)  # global RNG untouched
    assert len(recs) == 1 and len(lines) == 1
    rec = recs[0]
    assert set(rec) >= {"epoch", "loss", "accuracy"}
    assert rec["epoch"] == 1 and math.isfinite(rec["loss"]) and 0.0 <= rec["accuracy"] <= 1.0
    after = m.state_dict()
    assert not torch.equal(before["features.0.0.weight"], after["features.0.0.weight"])
    assert not torch.equal(before["head.1.running_mean"], after["head.1.running_mean"])
    assert all(bn.momentum == 0.01 for bn in bns)  # override restored
    assert m.training


def test_train_is_deterministic(tiny_folder: Path) -> None:
    def run() -> dict[str, torch.Tensor]:
        torch.manual_seed(1)
        m = demo_model.make_model()
        loader = DataLoader(_PngFolder(tiny_folder), batch_size=8, shuffle=True)
        train(m, loader, epochs=1, lr=0.05, seed=5, optimizer="adam", final_lr=None)
        return m.state_dict()

    a, b = run(), run()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_evaluate_restores_per_module_flags(tiny_folder: Path) -> None:
    torch.manual_seed(0)
    m = demo_model.make_model()
    m.head.eval()  # deliberately mixed modes
    loader = DataLoader(_PngFolder(tiny_folder), batch_size=10)
    flags = {name: mod.training for name, mod in m.named_modules()}
    state = {k: v.clone() for k, v in m.state_dict().items()}
    res = evaluate(m, loader)
    assert res["count"] == len(CLASSES) * 6
    assert 0.0 <= res["accuracy"] <= 1.0 and math.isfinite(res["loss"])
    assert {name: mod.training for name, mod in m.named_modules()} == flags
    assert m.training and not m.head.training and not m.head[1].training
    # Evaluation must not touch the running statistics.
    assert all(torch.equal(state[k], v) for k, v in m.state_dict().items())


def test_train_restores_per_module_flags(tiny_folder: Path) -> None:
    m = demo_model.make_model()
    m.eval()
    m.features[0].train()
    flags = {name: mod.training for name, mod in m.named_modules()}
    loader = DataLoader(_PngFolder(tiny_folder), batch_size=8)
    train(m, loader, epochs=1, lr=0.01, seed=0)
    assert {name: mod.training for name, mod in m.named_modules()} == flags


def test_train_rejects_bad_arguments(tiny_folder: Path) -> None:
    m = demo_model.make_model()
    loader = DataLoader(_PngFolder(tiny_folder), batch_size=8)
    with pytest.raises(ValueError):
        train(m, loader, epochs=1, lr=0.0, seed=0)
    with pytest.raises(ValueError):
        train(m, loader, epochs=1, lr=0.1, seed=0, optimizer="lbfgs")


def test_demo_build_does_not_depend_on_the_thread_count(tmp_path: Path) -> None:
    """Training sums float32 reductions in an order that depends on the thread count; the demo
    trains on DEMO_THREADS threads whatever the process uses, so its numbers are the same with
    OMP_NUM_THREADS=1 or 2 (or any other). The thread count is restored afterwards."""
    from bnscope.demo.run import build_demo

    before = torch.get_num_threads()
    weights = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            folder = tmp_path / f"threads{threads}"
            folder.mkdir()
            built = build_demo(folder, train_per_class=40, val_per_class=1, epochs=1)
            assert torch.get_num_threads() == threads
            weights.append(torch.load(built.checkpoint)["state_dict"])
    finally:
        torch.set_num_threads(before)
    assert weights[0].keys() == weights[1].keys()
    for name in weights[0]:
        assert torch.equal(weights[0][name], weights[1][name]), name
    # byte for byte: no temporary file name inside the archive
    assert (tmp_path / "threads1" / "ckpt.pt").read_bytes() == (
        tmp_path / "threads2" / "ckpt.pt"
    ).read_bytes()
