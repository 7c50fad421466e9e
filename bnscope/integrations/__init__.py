"""bnscope inside training loops: :class:`~bnscope.integrations.hook.PreciseBNHook` for plain
PyTorch loops (``bnscope.PreciseBNHook``)."""
