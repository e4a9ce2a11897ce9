r"""Channel-wise topology refinement graph convolution (CTR-GC), with ST-GC as its static case.

Math (H adjacency subsets, G channel groups, R relation channels; channel ``c`` belongs to
group ``g(c) = c // (C / G)``; ``G = C`` is CTR-GCN's per-channel topology)::

    Aref[b, h, g, i, j] = alpha * (sum_r W[h, g, r] * tanh(q[b, h, r, i] - k[b, h, r, j]) + b[h, g])
                          + A[h, i, j]
    y[b, c, t, i]       = sum_h sum_j Aref[b, h, g(c), i, j] * v[b, h, c, t, j]

Row ``i`` of an adjacency is the output joint (the CTR-GCN einsum ``'ncuv,nctv->nctu'``).
Static mode (``q = k = weight = bias = alpha = None``) is ST-GC: ``y = sum_h A[h] · v[:, h]``.

Shapes: ``v`` (B, H, C, T, V); ``A`` (H, V, V); ``q``, ``k`` (B, H, R, V); ``weight`` (H, G, R);
``bias`` (H, G); ``alpha`` a one-element tensor. Output ``y`` (B, C, T, V).
"""
from __future__ import annotations

from typing import Optional

import torch

from ._backend import resolve

OP_NAME = "ctr_graph_conv"


def ctr_graph_conv_reference(v, A, q=None, k=None, weight=None, bias=None, alpha=None):
    """Pure-PyTorch ground truth (materialises the (B, H, G, V, V) topology)."""
    B, H, C, T, V = v.shape
    if q is None:
        return torch.einsum("hij,bhctj->bcti", A.to(v.dtype), v)
    G = weight.shape[1]
    rel = torch.tanh(q.unsqueeze(-1) - k.unsqueeze(-2))  # (B, H, R, V, V): [.., i, j]
    refine = torch.einsum("hgr,bhrij->bhgij", weight, rel) + bias[None, :, :, None, None]
    topo = alpha.reshape(()) * refine + A[None, :, None]  # (B, H, G, V, V)
    vg = v.reshape(B, H, G, C // G, T, V)
    return torch.einsum("bhgij,bhgctj->bgcti", topo.to(v.dtype), vg).reshape(B, C, T, V)


_IMPLS = {"reference": ctr_graph_conv_reference}


def _expect(name, t, shape, ref):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"ctr_graph_conv: {name} must be a torch.Tensor, got {type(t).__name__}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"ctr_graph_conv: {name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
    if t.device != ref.device:
        raise ValueError(f"ctr_graph_conv: {name} is on {t.device}, expected {ref.device} like v")
    if not t.is_floating_point():
        raise TypeError(f"ctr_graph_conv: {name} must be floating point, got {t.dtype}")


def validate(v, A, q, k, weight, bias, alpha):
    if not isinstance(v, torch.Tensor) or v.dim() != 5:
        got = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
        raise ValueError(f"ctr_graph_conv: v must have shape (B, H, C, T, V), got {got}")
    B, H, C, T, V = v.shape
    _expect("v", v, v.shape, v)
    _expect("A", A, (H, V, V), v)
    dynamic = [x is not None for x in (q, k, weight, bias, alpha)]
    if any(dynamic) and not all(dynamic):
        raise ValueError("ctr_graph_conv: q, k, weight, bias and alpha are given together (CTR-GC) "
                         "or all None (static ST-GC)")
    if not any(dynamic):
        return
    if q.dim() != 4:
        raise ValueError(f"ctr_graph_conv: q must have shape (B, H, R, V), got {tuple(q.shape)}")
    R = q.shape[2]
    _expect("q", q, (B, H, R, V), v)
    _expect("k", k, (B, H, R, V), v)
    if weight.dim() != 3:
        raise ValueError(f"ctr_graph_conv: weight must have shape (H, G, R), got {tuple(weight.shape)}")
    G = weight.shape[1]
    _expect("weight", weight, (H, G, R), v)
    if C % G != 0:
        raise ValueError(f"ctr_graph_conv: channels C={C} must be a multiple of the groups G={G}")
    _expect("bias", bias, (H, G), v)
    if alpha.numel() != 1:
        raise ValueError(f"ctr_graph_conv: alpha must have one element, got shape {tuple(alpha.shape)}")
    _expect("alpha", alpha, alpha.shape, v)


def ctr_graph_conv(v: torch.Tensor, A: torch.Tensor, q: Optional[torch.Tensor] = None,
                   k: Optional[torch.Tensor] = None, weight: Optional[torch.Tensor] = None,
                   bias: Optional[torch.Tensor] = None, alpha: Optional[torch.Tensor] = None,
                   *, backend: Optional[str] = None) -> torch.Tensor:
    """CTR-GC / ST-GC aggregation (see the module docstring for the math and shapes)."""
    validate(v, A, q, k, weight, bias, alpha)
    impl = _IMPLS[resolve(OP_NAME, backend, v.device.type)]
    return impl(v, A, q, k, weight, bias, alpha)
