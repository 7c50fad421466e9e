from __future__ import annotations

import hashlib
import signal
from pathlib import Path

import pytest
import torch

# A shell starts a background job (`cmd &`, no job control) with SIGINT and SIGQUIT ignored, and
# every process it starts inherits that: Python then installs no KeyboardInterrupt handler, and
# a test that sends SIGINT to a `python -m bnscope` child waits for an exit that never comes
# (the child, rightly, ignores Ctrl-C as under nohup). The tests that send signals expect the
# disposition of a terminal's foreground job, so the suite restores it for its children.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

TESTS = Path(__file__).parent
MODELS = TESTS / "models.py"


def tiny_spec(name: str = "make_tiny") -> str:
    return f"{MODELS}:{name}"


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def trained_tiny(seed: int = 0, steps: int = 3):
    """A tiny model whose BN buffers moved away from their init (a few train-mode forwards)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("_test_models", MODELS)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    torch.manual_seed(seed)
    model = mod.make_tiny()
    model.train()
    with torch.no_grad():
        for _ in range(steps):
            model(torch.randn(8, 3, 8, 8) * 2 + 1)
    return model


@pytest.fixture
def tiny_ckpt(tmp_path: Path) -> Path:
    """A plain state_dict checkpoint of a tiny model after 60 updates (no warm-up finding)."""
    model = trained_tiny(steps=60)
    path = tmp_path / "tiny.pt"
    torch.save(model.state_dict(), path)
    return path


@pytest.fixture(autouse=True)
def _wide_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "160")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--regen-golden",
        action="store_true",
        default=False,
        help="rewrite the golden files under tests/golden from the current output",
    )


@pytest.fixture
def golden(request: pytest.FixtureRequest):
    """Compare text with tests/golden/NAME (rewrite it with --regen-golden)."""
    regen = request.config.getoption("--regen-golden")

    def check(name: str, text: str) -> None:
        path = TESTS / "golden" / name
        if regen or not path.exists():
            path.parent.mkdir(exist_ok=True)
            path.write_text(text, encoding="utf-8")
            if not regen:
                pytest.fail(f"golden file {name} was missing and has been written; rerun")
        assert text == path.read_text(encoding="utf-8"), (
            f"output differs from tests/golden/{name}; if intended, rerun with --regen-golden"
        )

    return check


@pytest.fixture
def precise_env(tmp_path):
    model = trained_tiny(steps=5)
    sd = {f"module.{k}": v for k, v in model.state_dict().items()}
    ckpt = tmp_path / "ck.pt"
    torch.save({"model": sd, "epoch": 7, "optimizer": {"lr": torch.tensor(0.1)}}, ckpt)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(90, 3, 8, 8, generator=g) * 2 + 1
    y = torch.randint(0, 3, (90,), generator=g)
    data = tmp_path / "d.pt"
    torch.save({"x": x, "y": y}, data)
    return tmp_path, ckpt, data, model, x


#: the classes of :func:`color_folder`, in label order (the red value of class i is
#: ``tests.models.class_red(i)``: ``tests.models.ColorClassifier`` predicts them exactly)
COLOR_CLASSES = ("circle", "cross", "stripes", "triangle")


def color_folder(root: Path, classes=COLOR_CLASSES, per_class: int = 2) -> Path:
    """An image folder with one class folder per name: solid 4x4 images whose red value is
    that of the name's position in :data:`COLOR_CLASSES` (a name outside them: the next
    positions)."""
    from PIL import Image

    from .models import class_red

    extra = [c for c in classes if c not in COLOR_CLASSES]
    order = list(COLOR_CLASSES) + extra
    for name in classes:
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.new("RGB", (4, 4), (class_red(order.index(name)), 0, 0)).save(
                folder / f"{i}.png"
            )
    return root


def color_ckpt(path: Path, *, classes: bool) -> Path:
    """The state dict of ``ColorClassifier(4)``, with the class names (``classes``) or not."""
    from .models import ColorClassifier

    state = ColorClassifier(4).state_dict()
    torch.save({"state_dict": state, **({"classes": list(COLOR_CLASSES)} if classes else {})},
               path)  # fmt: skip
    return path


def color_spec() -> str:
    return f"{MODELS}:ColorClassifier"
