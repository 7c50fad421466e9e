"""Build the demo folder: model file, synthetic data, a briefly trained checkpoint, project file.

Computation only: it reports progress through a callback and returns a record; the CLI renders.
"""

from __future__ import annotations

import contextlib
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import UsageError

MODEL_SOURCE = Path(__file__).with_name("model.py")
PROJECT_FILE = """# bnscope project file written by `bnscope demo`: flags override these values.
checkpoint = "ckpt.pt"
model = "model.py:make_model"
data = "data/train"
eval_data = "data/val"
batch_size = 32
"""


#: CPU threads the demo runs on, whatever the machine or ``OMP_NUM_THREADS`` says. Training is
#: chaotic: another thread count sums float32 reductions in another order, which changes the
#: trained weights and with them every number the demo prints. With a fixed count they are the
#: same on every run (for this seed, torch version and CPU type). One thread: the model is
#: small, and a busy machine does not stall it at thread barriers.
DEMO_THREADS = 1

#: images per class the demo writes: 800 x 4 training images make 100 batches of 32, so
#: ``bnscope precise --batches 100`` works in the demo folder; 100 x 4 validation images
DEMO_TRAIN_PER_CLASS = 800
DEMO_VAL_PER_CLASS = 100


@contextlib.contextmanager
def demo_threads() -> Iterator[None]:
    """Run the block on :data:`DEMO_THREADS` CPU threads; the thread count is restored after."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(DEMO_THREADS)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@dataclass
class DemoBuild:
    """What ``build_demo`` made and measured."""

    folder: Path
    checkpoint: Path
    model_file: Path
    train_dir: Path
    val_dir: Path
    counts: dict[str, int]
    history: list[dict[str, float]]
    seconds: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "folder": str(self.folder),
            "checkpoint": str(self.checkpoint),
            "model_file": str(self.model_file),
            "train": str(self.train_dir),
            "val": str(self.val_dir),
            "counts": dict(self.counts),
            "history": list(self.history),
            "seconds": dict(self.seconds),
        }


def default_folder(cwd: Path) -> Path:
    """``./bnscope-demo``, or ``./bnscope-demo-2``, ... : the first that does not exist."""
    candidate = cwd / "bnscope-demo"
    i = 2
    while candidate.exists():
        candidate = cwd / f"bnscope-demo-{i}"
        i += 1
    return candidate


def prepare_folder(folder: Path, force: bool) -> Path:
    """Create the demo folder; a non-empty one is refused unless ``force``."""
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"{folder} exists and is not a folder", "choose another DIR")
    if folder.exists() and any(folder.iterdir()):
        if not force:
            raise UsageError(
                f"{folder} is not empty", "choose a new folder, or pass force=True to reuse it"
            )
        for sub in ("data",):
            shutil.rmtree(folder / sub, ignore_errors=True)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(
            f"cannot create {folder} ({exc.strerror or exc})", "choose a folder you can write to"
        ) from exc
    return folder


def build_demo(
    folder: Path,
    *,
    seed: int = 0,
    train_per_class: int = DEMO_TRAIN_PER_CLASS,
    val_per_class: int = DEMO_VAL_PER_CLASS,
    epochs: int | None = None,
    progress: Callable[[str], None] | None = None,
) -> DemoBuild:
    """Write model.py, data/train, data/val, train the model (on :data:`DEMO_THREADS` threads),
    save ckpt.pt and bnscope.toml.

    The checkpoint is ``{"state_dict": ..., "epoch": ..., "history": [...]}``: a wrapped state
    dict, as training scripts write them.
    """
    import torch

    from ..io.data import load_data
    from ..io.outputs import atomic_path, write_text
    from . import synthetic
    from .model import make_model
    from .train import DEMO_BATCH_SIZE, DEMO_EPOCHS, DEMO_FINAL_LR, DEMO_LR, train

    def say(msg: str) -> None:
        if progress is not None:
            progress(msg)

    seconds: dict[str, float] = {}
    model_file = folder / "model.py"
    shutil.copyfile(MODEL_SOURCE, model_file)

    t0 = time.perf_counter()
    say("writing synthetic images (circle, triangle, cross, stripes)")
    counts = synthetic.write_dataset(folder / "data", train_per_class, val_per_class, seed)
    seconds["data"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    n_epochs = DEMO_EPOCHS if epochs is None else epochs
    say(f"training the demo CNN for {n_epochs} epochs on {counts['train']} images")
    loader = load_data(
        folder / "data" / "train",
        batch_size=DEMO_BATCH_SIZE,
        shuffle=True,
        drop_last=True,
        seed=seed,
        same_order=False,  # training: a new order every epoch
    )
    with demo_threads():
        torch.manual_seed(seed)
        model = make_model(num_classes=len(synthetic.CLASSES))
        history = train(
            model,
            loader.loader,
            epochs=n_epochs,
            lr=DEMO_LR,
            final_lr=DEMO_FINAL_LR,
            seed=seed,
            progress=say,
        )
    seconds["train"] = time.perf_counter() - t0

    ckpt = folder / "ckpt.pt"
    # through a file object: the archive's inner folder is then "archive", not the temporary
    # file's random name, so the same training gives the same bytes; the class names in label
    # order: evaluation folders are matched to them by name
    with atomic_path(ckpt) as tmp, open(tmp, "wb") as fh:
        torch.save(
            {
                "state_dict": model.state_dict(),
                "classes": loader.classes,
                "epoch": n_epochs,
                "history": history,
            },
            fh,
        )
    write_text(folder / "bnscope.toml", PROJECT_FILE)
    return DemoBuild(
        folder,
        ckpt,
        model_file,
        folder / "data" / "train",
        folder / "data" / "val",
        counts,
        history,
        seconds,
    )


#: ghost sizes the demo analyses (the demo trains with batches of 32)
DEMO_GHOST_SIZES = (2, 4, 8, 16, 32)

#: test-time priors N the demo sweeps on its corrupted data (PriorBatchNorm; adapt
#: --online-priors): 0 = test-batch statistics, larger N leans on the source statistics
DEMO_ONLINE_PRIORS = (0, 16, 64, 256)

#: the demo's target domain: CIFAR-10-C Gaussian noise at severity 3
DEMO_CORRUPTION = ("gaussian_noise", 3)


def write_corrupted(folder: Path, seed: int = 0) -> dict[str, Path]:
    """``corrupted/train`` (unlabeled target data for adapt) and ``corrupted/val`` (labelled
    target evaluation data), copies of the demo data with :data:`DEMO_CORRUPTION`."""
    from ..ops.corruptions import corrupt_folder

    name, severity = DEMO_CORRUPTION
    out = {}
    for i, split in enumerate(("train", "val")):
        dst = folder / "corrupted" / split
        corrupt_folder(folder / "data" / split, dst, name, severity, seed=2 * seed + i, force=True)
        out[split] = dst
    return out
