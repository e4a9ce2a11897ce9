r"""``F.linear`` for float32 CPU tensors through oneDNN's matmul, forward and backward.

Math, for ``x`` (..., K), ``weight`` W (N, K) and optional ``bias`` b (N,), with the rows of x
flattened to X (M, K) and the output gradient to dY (M, N)::

    Y  = X W^T + b
    dX = dY W,   dW = dY^T X,   db = sum_rows dY

Why: PyTorch's CPU ``F.linear`` / ``torch.mm`` call MKL's sgemm, which on AMD CPUs runs its
AVX2 code (MKL dispatches on the CPU vendor); oneDNN, which PyTorch already uses for its
convolutions, runs AVX-512 there. On this project's 2-core AMD EPYC (AVX-512), the
cross-attention projections (M = 800-1344, K = 256, N = 256-512): forward 0.21 -> 0.44 TFLOP/s,
dX 2.3x and dW 1.4x faster (one micro-benchmark, oneDNN's ``torch.ops.mkldnn._linear_pointwise``
against ``F.linear`` and ``torch.mm``; ``bharnet bench`` measures the layer).

``linear(x, weight, bias)`` takes that path for non-empty float32 CPU tensors outside autocast
and outside ``torch.compile`` (which picks its own CPU GEMMs), when PyTorch was built with
oneDNN; every other call is ``F.linear`` itself (also a bias that is not an (N,) vector, which
``F.linear`` broadcasts and oneDNN would not). The three products are oneDNN matmuls, on
transposed views where they need them (oneDNN copies a source that is not row-major; a
strided bias is made contiguous first: oneDNN ignores a bias's strides), except dW, which the
C++ kernel ``bharnet::linear_weight_grad_cpp`` (``csrc/linear_weight_grad.cpp``) computes from dY
and X in place (oneDNN would first copy dY^T: 1.25-1.44x faster at the projections' shapes,
one micro-benchmark; oneDNN when the extension cannot load); dW and db come back in the
parameters' dtype (float32). Results equal ``F.linear``'s up to float32
rounding of the summation order. Double backward is not supported. Used by the cpp backend of
``bharnet.ops.cross_attention``.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .._ext import cpp_availability


@functools.cache
def _onednn_matmul():
    """``torch.ops.mkldnn._linear_pointwise`` (X, W, b) -> X W^T + b, or None without oneDNN."""
    if not torch.backends.mkldnn.is_available():
        return None
    try:
        op = torch.ops.mkldnn._linear_pointwise.default
    except (AttributeError, RuntimeError):
        return None
    return lambda x, w, b=None: op(x, w, b, "none", [], "")


@functools.cache
def _cpp_weight_grad():
    """``torch.ops.bharnet.linear_weight_grad_cpp`` (dy, x) -> dy^T x, or None when the C++
    extension cannot load."""
    if cpp_availability("cpu") is not None:
        return None
    torch.library.register_fake("bharnet::linear_weight_grad_cpp")(
        lambda dy, x: x.new_empty((dy.shape[1], x.shape[1])))
    return torch.ops.bharnet.linear_weight_grad_cpp.default


def onednn_linear_applies(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> bool:
    """Whether ``linear`` takes the oneDNN path for these tensors (see the module docstring)."""
    return (x.device.type == "cpu" and x.dtype == torch.float32 and weight.dtype == torch.float32
            and (bias is None or (bias.dtype == torch.float32 and bias.shape == weight.shape[:1]))
            and weight.dim() == 2
            and x.dim() >= 1 and x.shape[-1] == weight.shape[1] and x.numel() > 0 and weight.numel() > 0
            and not torch.is_autocast_enabled("cpu") and not torch.compiler.is_compiling()
            and _onednn_matmul() is not None)


class _OneDnnLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias):
        matmul = _onednn_matmul()
        rows = x.reshape(-1, x.shape[-1])
        ctx.save_for_backward(rows, weight)
        ctx.has_bias = bias is not None
        ctx.x_shape = x.shape
        # oneDNN reads the bias as contiguous whatever its strides (a strided bias gave wrong sums)
        bias = bias.contiguous() if bias is not None else None
        return matmul(rows, weight, bias).reshape(*x.shape[:-1], weight.shape[0])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        matmul = _onednn_matmul()
        rows, weight = ctx.saved_tensors
        dy_rows = dy.reshape(-1, weight.shape[0])
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            dx = matmul(dy_rows, weight.t()).reshape(ctx.x_shape)
        if ctx.needs_input_grad[1]:
            weight_grad = _cpp_weight_grad()
            dw = weight_grad(dy_rows, rows) if weight_grad is not None else matmul(dy_rows.t(), rows.t())
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = dy_rows.sum(0)
        return dx, dw, db


def linear(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """``F.linear(x, weight, bias)``, through oneDNN for float32 CPU tensors (module docstring)."""
    if onednn_linear_applies(x, weight, bias):
        return _OneDnnLinear.apply(x, weight, bias)
    return F.linear(x, weight, bias)
