"""Precise BN under ``torch.distributed``: every process reads its own share of the data, and
bnscope pools the exact statistics of all of it.

    torchrun --standalone --nproc-per-node 2 examples/torchrun/precise_ddp.py

The processes run on the CPU and talk over gloo. (On GPUs: ``init_process_group("nccl")``,
``device=f"cuda:{LOCAL_RANK}"``, one process per GPU.) ``bnscope.precise_bn`` all-reduces
float64 sufficient statistics once per layer, so every rank ends with the same running
statistics: those of the union of the shards, as one process on all of the batches computes
them (checked below on rank 0). A DataLoader works the same way (``DistributedSampler``, or a
dataset of this rank's samples); here each rank takes every second batch of a list.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

import bnscope
from bnscope.engine.distributed import LOCAL


def make_model() -> nn.Module:
    torch.manual_seed(0)  # the same weights on every rank
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4),
    )  # fmt: skip


def main() -> None:
    dist.init_process_group("gloo")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    images = torch.randn(1000, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 + 1
    batches = list(images.split(32))  # 32 batches (the last of 8 samples)
    shard = batches[rank::world_size]  # this rank's share: every batch on exactly one rank

    model = make_model()
    result = bnscope.precise_bn(model, shard)

    # every rank holds the same statistics ...
    stats = torch.cat([b for name, b in model.named_buffers() if name.endswith(("mean", "var"))])
    gathered = [torch.empty_like(stats) for _ in range(world_size)]
    dist.all_gather(gathered, stats)
    if rank == 0:
        identical = all(torch.equal(gathered[0], other) for other in gathered)
        # ... and they are one process's statistics on all of the batches
        alone = make_model()
        bnscope.precise_bn(alone, batches, process_group=LOCAL)
        ref = torch.cat([b for name, b in alone.named_buffers() if name.endswith(("mean", "var"))])
        print(f"{world_size} ranks, {result.extra['samples']} samples in "
              f"{result.extra['batches']} batches")  # fmt: skip
        print(f"statistics identical on every rank: {identical}")
        print(f"the same as one process on all the batches: {torch.equal(stats, ref)}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
