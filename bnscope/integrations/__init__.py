"""Precise BN inside training loops: a plain-PyTorch hook and a Lightning callback
(:mod:`bnscope.integrations.lightning`, which needs ``pip install "bnscope[lightning]"``)."""
