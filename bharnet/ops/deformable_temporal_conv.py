r"""Deformable temporal convolution (DeTGC): learnable fractional sampling offsets in time.

Math (E offsets ``tau``, stride ``s``, ``T_out = (T - 1) // s + 1``)::

    p[t', e]       = clamp(t' * s + tau[e], 0, T - 1)
    p0, w          = floor(p), p - floor(p);   p1 = min(p0 + 1, T - 1)
    xs[b, c, t', e, v] = (1 - w) * x[b, c, p0, v] + w * x[b, c, p1, v]
    y[b, o, t', v] = bias[o] + sum_c sum_e weight[o, c, e] * xs[b, c, t', e, v]

The (E, 1, 1) convolution over the E samples is the channel mix with ``weight``. Gradients
reach ``tau`` through ``w`` (``dxs/dp = x[p1] - x[p0]`` inside the clamp range, 0 outside).

Shapes: ``x`` (B, C_in, T, V); ``offsets`` (E,); ``weight`` (C_out, C_in, E); ``bias``
(C_out,) or None. Output (B, C_out, T_out, V).
"""
from __future__ import annotations

from typing import Optional

import torch

from ._backend import resolve

OP_NAME = "deformable_temporal_conv"


def output_length(T: int, stride: int) -> int:
    return (T - 1) // stride + 1


def deformable_temporal_conv_reference(x, offsets, weight, bias=None, stride=1):
    """Pure-PyTorch ground truth (materialises the E-fold sampled tensor)."""
    B, C, T, V = x.shape
    t = torch.arange(output_length(T, stride), device=x.device, dtype=offsets.dtype) * stride
    p = (t[:, None] + offsets[None, :]).clamp(0, T - 1)  # (T_out, E)
    p0 = p.detach().floor()
    w = (p - p0).to(x.dtype)[None, None, :, :, None]
    i0 = p0.long()
    i1 = (i0 + 1).clamp(max=T - 1)
    xs = x[:, :, i0, :] * (1 - w) + x[:, :, i1, :] * w  # (B, C, T_out, E, V)
    y = torch.einsum("oce,bctev->botv", weight.to(x.dtype), xs)
    if bias is not None:
        y = y + bias.to(x.dtype)[None, :, None, None]
    return y


_IMPLS = {"reference": deformable_temporal_conv_reference}


def validate(x, offsets, weight, bias, stride):
    for name, t in (("x", x), ("offsets", offsets), ("weight", weight)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"deformable_temporal_conv: {name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"deformable_temporal_conv: {name} must be floating point, got {t.dtype}")
    if x.dim() != 4:
        raise ValueError(f"deformable_temporal_conv: x must have shape (B, C_in, T, V), got {tuple(x.shape)}")
    if offsets.dim() != 1:
        raise ValueError(f"deformable_temporal_conv: offsets must have shape (E,), got {tuple(offsets.shape)}")
    C, E = x.shape[1], offsets.shape[0]
    if weight.dim() != 3 or weight.shape[1:] != (C, E):
        raise ValueError(f"deformable_temporal_conv: weight must have shape (C_out, {C}, {E}), "
                         f"got {tuple(weight.shape)}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"deformable_temporal_conv: bias must have shape ({weight.shape[0]},), "
                         f"got {tuple(bias.shape)}")
    for name, t in (("offsets", offsets), ("weight", weight), ("bias", bias)):
        if t is not None and t.device != x.device:
            raise ValueError(f"deformable_temporal_conv: {name} is on {t.device}, expected {x.device} like x")
    if not isinstance(stride, int) or stride < 1:
        raise ValueError(f"deformable_temporal_conv: stride must be a positive int, got {stride!r}")


def deformable_temporal_conv(x: torch.Tensor, offsets: torch.Tensor, weight: torch.Tensor,
                             bias: Optional[torch.Tensor] = None, stride: int = 1,
                             *, backend: Optional[str] = None) -> torch.Tensor:
    """DeTGC sampling + interpolation + E-tap channel mix (see the module docstring)."""
    validate(x, offsets, weight, bias, stride)
    impl = _IMPLS[resolve(OP_NAME, backend, x.device.type)]
    return impl(x, offsets, weight, bias, stride)
