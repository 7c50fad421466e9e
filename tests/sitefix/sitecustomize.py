"""Put on ``PYTHONPATH`` of subprocesses (README blocks, examples) only where
:func:`tests.reallibs.torchvision_needs_schemas` says so: before ``torchvision`` is first
imported, define its ``nms``/``qnms`` operator schemas, as ``tests/reallibs.py`` does in the
test process. torchmetrics (a lightning dependency) imports torchvision whenever it is
installed, and the CUDA torchvision wheel of this environment imports on a CPU torch only
then. Nothing happens in a process that never imports torchvision."""

from __future__ import annotations

import importlib.abc
import sys

SCHEMA = "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor"


class _TorchvisionSchemas(importlib.abc.MetaPathFinder):
    """Finds nothing; on the first look-up of ``torchvision`` it defines the schemas and
    leaves ``sys.meta_path``."""

    def find_spec(self, fullname, path=None, target=None):  # type: ignore[no-untyped-def]
        if fullname == "torchvision":
            sys.meta_path.remove(self)
            import torch

            for op in ("torchvision::nms", "torchvision::qnms"):
                try:
                    torch.library.define(op, SCHEMA)
                except RuntimeError:
                    pass  # defined already
        return None


sys.meta_path.insert(0, _TorchvisionSchemas())
