"""timm and torchvision, when they import here (``pip install --no-deps timm torchvision``):
the package depends on neither. torchvision's CUDA wheel imports on a CPU torch once its
``nms``/``qnms`` operator schemas exist, so they are defined first (timm imports torchvision)."""

from __future__ import annotations

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
