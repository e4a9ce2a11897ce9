"""Argument checks shared by the op wrappers (one wording for every op)."""
from __future__ import annotations

import torch


def expect_tensor(op: str, name: str, t, shape, ref: torch.Tensor, ref_name: str,
                  floating: bool = True) -> None:
    """Raise unless ``t`` is a tensor of ``shape`` on ``ref``'s device (and floating point)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{op}: {name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
    if t.device != ref.device:
        raise ValueError(f"{op}: {name} is on {t.device}, expected {ref.device} like {ref_name}")
    if floating and not t.is_floating_point():
        raise TypeError(f"{op}: {name} must be floating point, got {t.dtype}")
