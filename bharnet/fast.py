"""Switch a built model's fused layers between backends in place."""
from __future__ import annotations

from torch import nn

from .ops._backend import BACKENDS


def swap_layers(model: nn.Module, backend: str = "auto") -> nn.Module:
    """Make every layer of ``model`` that has fused ops (an ``impl`` attribute) use ``backend``.

    Parameters, buffers and state-dict keys are untouched, so a checkpoint trained with one
    backend loads into a model running another. ``backend=None`` returns the layers to the
    global default (``bharnet.ops.use_backend``). Returns ``model``.
    """
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or None, got {backend!r}")
    for module in model.modules():
        if hasattr(module, "impl"):
            module.impl = backend
    return model
