"""Inputs: checkpoints (load, fit keys, save), data specs, model specs, the project file,
atomic outputs."""
