"""Run by test_lightning.py as ``python lightning_ddp_worker.py OUT``: one epoch of the tiny
module with ``strategy="ddp"`` on 2 CPU processes (Lightning starts the second by running
this script again) and PreciseBN before validation; each rank saves, to OUT/rank<R>.pt, the
module's state as PreciseBN left it, the report's extra keys, the samples and batches of its
shard and the logged metrics."""

from __future__ import annotations

import sys
from datetime import timedelta
from pathlib import Path

import torch

from tests.reallibs import NMS_SCHEMA

for _op in ("torchvision::nms", "torchvision::qnms"):
    try:
        torch.library.define(_op, NMS_SCHEMA)
    except RuntimeError:
        pass

from lightning.pytorch.strategies import DDPStrategy  # noqa: E402

from bnscope.integrations.lightning import PreciseBN  # noqa: E402
from tests.integrations.lightning_models import Module, Probe, loader, trainer  # noqa: E402


def main(out: Path) -> None:
    torch.manual_seed(0)
    module = Module()
    probe = Probe()
    cb = PreciseBN(batches=None)
    strategy = DDPStrategy(process_group_backend="gloo", timeout=timedelta(seconds=120))
    t = trainer(out, [cb, probe], devices=2, strategy=strategy, max_epochs=1)
    t.fit(module, loader(shuffle=True), loader())
    (seen,) = [s for s in probe.seen if s["hook"] == "validation"]
    assert cb.last_report is not None
    torch.save(
        {
            "state": seen["state"],
            "extra": dict(cb.last_report.extra),
            "shard_samples": len(t.train_dataloader.sampler),
            # what PreciseBN read: the sampler's order depends on its seed and epoch only
            "batches": list(t.train_dataloader),
            "metrics": {k: float(v) for k, v in t.callback_metrics.items()},
        },
        out / f"rank{t.global_rank}.pt",
    )


if __name__ == "__main__":
    main(Path(sys.argv[1]))
