#!/usr/bin/env bash
# bnscope precise on 2 CPU processes (gloo) with the project example's model and data; each
# rank reads every second sample, rank 0 prints the report and writes the checkpoint:
#
#     bash examples/torchrun/precise_cli.sh
#
# On one machine with GPUs: --nproc-per-node <GPUs> and --device cuda (each rank its own GPU).
set -euo pipefail
cd "$(dirname "$0")/../project"
[ -f runs/ckpt.pt ] || python prepare.py
torchrun --standalone --nproc-per-node 2 -m bnscope precise --device cpu \
    -o runs/ckpt.ddp.pt --force
