r"""1x1 convolution: ``F.conv2d(x, weight, bias, stride=(stride, 1))`` with a (C_out, C_in, 1, 1)
weight.

Math, ``x`` (N, C_in, T, V) with its frames t = 0, s, 2s, ... (stride s) kept and their
positions flattened to P, ``weight`` W (C_out, C_in, 1, 1) read as (C_out, C_in), optional
``bias`` b (C_out,)::

    y[n, o, p]  = sum_i W[o, i] x[n, i, p] + b[o]
    dx[n, i, p] = sum_o W[o, i] dy[n, o, p]
    dW[o, i]    = sum_{n, p} dy[n, o, p] x[n, i, p]      db[o] = sum_{n, p} dy[n, o, p]

Why: every convolution of the BHaRNet models is 1x1 (CTR-GC's q/k/v, the MSTCN branch inputs,
the residual projections), half of a CPU training step. On NCHW tensors PyTorch's CPU
convolution (oneDNN) reorders its operands into a blocked layout at each call; the C++ kernel
(``csrc/pointwise_conv.cpp``) multiplies them in place as per-sample GEMMs with T x V as the
vector dimension (measured in ``bharnet bench``; about 1.1-2.8x per call at the models' shapes
on this project's 2-core EPYC, most for the thin convolutions).

Backends: ``reference`` (``F.conv2d``) and ``cpp``: the C++ kernel for non-empty float32/
float64 CPU tensors whose channels are not the innermost dimension. bfloat16/float16 CPU
convolutions on such tensors (also float32 ``x`` under CPU autocast, which computes in its
dtype as ``F.conv2d`` does) run as one batched GEMM over the samples (``torch.baddbmm``;
ATen's autograd): oneDNN's convolution reorders these operands at each call, 3-12x
slower at the models' shapes on a 2-core Xeon with AMX (half of a bfloat16 autocast training
step). Everything else runs ``F.conv2d`` under ``cpp`` too: other devices (cuDNN), other
dtypes, float64 calls under CPU autocast, inside ``torch.func`` transforms or
forward-mode AD, empty tensors, and channels-last ``x`` (or a view of one), for which oneDNN's
own layout is already the fast one (``bharnet.fast`` makes the inference path channels-last). A
backend the op does not have (``triton``) counts as ``auto``. Autograd is registered in C++
(``csrc/autograd.cpp``); under ``create_graph`` the gradients are computed by differentiable
ATen products, so double backward works as through ``F.conv2d``. The ops are
``torch.ops.bharnet.pointwise_conv_cpp(x, weight (C_out, C_in), bias)`` and
``pointwise_conv_cpp_backward(dy, x, weight, bias_grad) -> (dx, dweight, dbias)``.
"""
from __future__ import annotations

import operator
from typing import Optional

import torch
import torch.nn.functional as F

from .._ext import cpp_on_cpu_availability, registered_after_loading
from ._backend import register_backend, resolve_missing_as_auto
from ._checks import channels_innermost, is_int, nn_layer_kernel_applies

OP_NAME = "pointwise_conv"


def pointwise_conv_reference(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                             stride: int = 1) -> torch.Tensor:
    """Pure-PyTorch ground truth."""
    return F.conv2d(x, weight, bias, stride=(stride, 1))


def _register_cpp_ops_now() -> None:
    """Fake kernels of the C++ ops (run once, after loading; autograd is registered in C++)."""
    @torch.library.register_fake("bharnet::pointwise_conv_cpp")
    def _(x, weight, bias):
        return x.new_empty((x.shape[0], weight.shape[0], *x.shape[2:]))

    @torch.library.register_fake("bharnet::pointwise_conv_cpp_backward")
    def _(dy, x, weight, bias_grad):
        return x.new_empty(x.shape), weight.new_empty(weight.shape), (
            weight.new_empty(weight.shape[:1]) if bias_grad else None)


_register_cpp_ops = registered_after_loading(_register_cpp_ops_now)


def _kernel_applies(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> bool:
    return (nn_layer_kernel_applies(x) and weight.dtype == x.dtype and (bias is None or bias.dtype == x.dtype)
            and x.numel() > 0 and weight.numel() > 0)


def _half_precision(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> Optional[torch.dtype]:
    """bfloat16/float16 when a non-empty CPU convolution computes in it (x, weight and bias in
    that dtype, or under CPU autocast to it) and x's channels are not innermost; else None."""
    dtype = x.dtype
    if torch.is_autocast_enabled("cpu"):
        if x.dtype != torch.float64:  # (which autocast leaves alone)
            dtype = torch.get_autocast_dtype("cpu")
    elif weight.dtype != dtype or (bias is not None and bias.dtype != dtype):
        return None  # F.conv2d's error
    if (x.device.type == "cpu" and dtype in (torch.bfloat16, torch.float16) and not channels_innermost(x)
            and x.numel() > 0 and weight.numel() > 0):
        return dtype
    return None


def _pointwise_conv_bmm(x, weight, bias, stride, dtype):
    """``y[n] = W x[n] + b`` in ``dtype`` as one batched GEMM over the samples (``torch.baddbmm``,
    ATen's autograd; the operands are cast before the weight is broadcast over the batch, which
    would otherwise cast each broadcast copy)."""
    x = (x[:, :, ::stride] if stride > 1 else x).to(dtype)
    N, C_in, T, V = x.shape
    w, x = weight.flatten(1).to(dtype).expand(N, -1, -1), x.reshape(N, C_in, T * V)
    if bias is None:
        return torch.bmm(w, x).view(N, -1, T, V)
    # the bias broadcast per sample: its gradient sums each sample's row, then the samples (a
    # bfloat16 sum over both dims at once takes ~4x as long)
    return torch.baddbmm(bias.to(dtype).expand(N, -1)[:, :, None], w, x).view(N, -1, T, V)


def _pointwise_conv_cpp(x, weight, bias, stride):
    half = _half_precision(x, weight, bias)
    if half is not None:  # module docstring
        return _pointwise_conv_bmm(x, weight, bias, stride, half)
    if not _kernel_applies(x, weight, bias):  # F.conv2d (module docstring), on the kept frames: the backward of
        # a strided 1x1 F.conv2d of a channels-last x corrupted the heap at some shapes (torch 2.14.1, oneDNN;
        # e.g. (3, 4, 16, 13) -> 6 channels, stride 2: "corrupted size vs. prev_size")
        return F.conv2d(x[:, :, ::stride] if stride > 1 else x, weight, bias)
    _register_cpp_ops()
    return torch.ops.bharnet.pointwise_conv_cpp(x[:, :, ::stride] if stride > 1 else x, weight.flatten(1), bias)


_IMPLS = {"reference": pointwise_conv_reference, "cpp": _pointwise_conv_cpp}
register_backend(OP_NAME, "cpp", cpp_on_cpu_availability, forward_ad=True)


def pointwise_conv(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                   stride: int = 1, *, backend: Optional[str] = None) -> torch.Tensor:
    """``F.conv2d(x, weight, bias, stride=(stride, 1))`` for a (C_out, C_in, 1, 1) ``weight`` and
    ``x`` (N, C_in, T, V) (see the module docstring)."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() != 4:
        raise TypeError(f"pointwise_conv: x must be a (N, C_in, T, V) floating-point tensor, got "
                        f"{getattr(x, 'dtype', type(x).__name__)} of shape {tuple(getattr(x, 'shape', ()))}")
    if isinstance(weight, torch.Tensor) and not weight.is_floating_point():
        raise TypeError(f"pointwise_conv: weight must be floating point, got {weight.dtype}")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 4 or tuple(weight.shape[1:]) != (x.shape[1], 1, 1):
        raise ValueError(f"pointwise_conv: weight must have shape (C_out, C_in={x.shape[1]}, 1, 1), got "
                         f"{tuple(getattr(weight, 'shape', ()))}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"pointwise_conv: bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
    if not is_int(stride) or stride < 1:
        raise ValueError(f"pointwise_conv: stride must be a positive int, got {stride!r}")
    return _IMPLS[resolve_missing_as_auto(OP_NAME, backend, x.device.type)](x, weight, bias, operator.index(stride))
