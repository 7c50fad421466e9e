"""bnscope inside training loops: :class:`~bnscope.integrations.hook.PreciseBNHook` for plain
PyTorch loops (``bnscope.PreciseBNHook``) and a Lightning callback
(:mod:`bnscope.integrations.lightning`, which needs ``pip install "bnscope[lightning]"``)."""
