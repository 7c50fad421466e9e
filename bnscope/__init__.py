"""bnscope: diagnose and fix BatchNorm statistics in PyTorch checkpoints."""

__version__ = "0.1.0"
