"""timm and torchvision, when they import here (``pip install --no-deps timm torchvision``):
the package depends on neither. torchvision's CUDA wheel imports on a CPU torch once its
``nms``/``qnms`` operator schemas exist, so they are defined first (timm imports torchvision)."""

from __future__ import annotations

import functools
import importlib.util
import subprocess
import sys
from pathlib import Path

import torch

NMS_SCHEMA = "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor"


def real_libraries() -> tuple[object, object] | None:
    """``(timm, torchvision)``, or None when either does not import."""
    for name in ("torchvision::nms", "torchvision::qnms"):
        try:
            torch.library.define(name, NMS_SCHEMA)
        except RuntimeError:
            pass  # defined already (by torchvision itself, or by an earlier import here)
    try:
        import timm
        import torchvision
    except Exception:  # noqa: BLE001 - absent or not importable: skip
        return None
    return timm, torchvision


#: a folder whose ``sitecustomize.py`` defines the schemas in a subprocess before torchvision
#: is imported (for README blocks and examples that import lightning)
SITEFIX = Path(__file__).resolve().parent / "sitefix"


@functools.cache
def torchvision_needs_schemas() -> bool:
    """Whether torchvision is installed and fails to import for want of its operator
    schemas (this environment's CUDA wheel on a CPU torch): checked once, in a subprocess,
    so that subprocesses get :data:`SITEFIX` only where it is needed (a working torchvision
    registers the operators itself, and defining them first would clash)."""
    if importlib.util.find_spec("torchvision") is None:
        return False
    res = subprocess.run([sys.executable, "-c", "import torchvision"], capture_output=True,
                         text=True, timeout=300, check=False)  # fmt: skip
    return res.returncode != 0 and "torchvision::nms" in res.stderr


def subprocess_path() -> list[str]:
    """What to add to ``PYTHONPATH`` of a subprocess that may import torchvision:
    :data:`SITEFIX` where :func:`torchvision_needs_schemas`, else nothing."""
    return [str(SITEFIX)] if torchvision_needs_schemas() else []
