r"""Deformable temporal convolution (DeTGC): learnable fractional sampling offsets in time.

Math (E offsets ``tau``, stride ``s``, ``T_out = (T - 1) // s + 1``)::

    p[t', e]       = clamp(t' * s + tau[e], 0, T - 1)
    p0, w          = floor(p), p - floor(p);   p1 = min(p0 + 1, T - 1)
    xs[b, c, t', e, v] = (1 - w) * x[b, c, p0, v] + w * x[b, c, p1, v]
    y[b, o, t', v] = bias[o] + sum_c sum_e weight[o, c, e] * xs[b, c, t', e, v]

The (E, 1, 1) convolution over the E samples is the channel mix with ``weight``. Gradients
reach ``tau`` through ``w`` (``dxs/dp = x[p1] - x[p0]`` inside the clamp range, 0 outside).

Backward (``dy`` = dL/dy, ``g[b, c, t', e, v] = sum_o weight[o, c, e] * dy[b, o, t', v]``)::

    dbias[o]        = sum_{b, t', v} dy[b, o, t', v]
    dweight[o, c, e] = sum_{b, t', v} dy[b, o, t', v] * xs[b, c, t', e, v]
    dx[b, c, t, v]  = sum_{t', e: p0 = t} (1 - w) * g  +  sum_{t', e: p1 = t} w * g
    doffsets[e]     = sum_{b, c, t', v} g * 1[0 <= t' * s + tau[e] <= T - 1] * (x[p1] - x[p0])

The indicator's value at exactly r = 0 or r = T-1 follows the installed torch's
``torch.clamp`` (as the reference does): 1 in older releases, 0 after pytorch#191142
(minimum-norm subgradient; torch 2.14.1 gives 0). Only the lower bound matters (at p = T-1,
x[p1] - x[p0] = 0), and integer offsets such as the DeTGC initialisation
``linspace(-2, 2, 4)`` hit it exactly.

Backends: ``reference`` (below), ``triton`` (``bharnet.kernels.deformable_temporal_conv``,
registered as the custom ops ``bharnet::deformable_temporal_conv`` and
``bharnet::deformable_temporal_conv_backward`` with autograd and fake impls, so that
``torch.compile(fullgraph=True)`` traces callers without graph breaks; a forward + backward
is three kernel launches and no host sync, see the kernels' docstring) and ``cpp``
(``csrc/deformable_temporal_conv.cpp`` on CPU, float32/float64/bfloat16, OpenMP + SIMD;
``csrc/deformable_temporal_conv_kernels.cu`` on CUDA; custom ops ``bharnet::deformable_temporal_conv_cpp``
and ``..._cpp_backward``, see the cpp section below). On CPU the ``cpp`` forward also takes
channels-last ``x`` natively and then returns a channels-last ``y`` (the layout of a model fused
for CPU inference, see ``bharnet.fast``); the backward takes a contiguous copy of it. Both read
in place an ``x`` whose samples' (C, T, V) values are contiguous, such as a slice of a contiguous
tensor's channels (the MSTCN's stacked branches); other layouts are copied.

Shapes: ``x`` (B, C_in, T, V); ``offsets`` (E,); ``weight`` (C_out, C_in, E); ``bias``
(C_out,) or None. Output (B, C_out, T_out, V).
"""
from __future__ import annotations

import functools
import operator
from typing import Optional

import torch

from .._ext import cpp_backend_availability, registered_after_loading
from ._backend import register_backend, resolve, triton_availability
from ._checks import expect_triton_dtype, is_channels_last, is_int
from ._custom_op import (as_dtype, cpu_kernel_dtype, opaque_custom_op, refuse_double_backward, saved_tensors,
                         with_autograd)

OP_NAME = "deformable_temporal_conv"


def clamp_passes_gradient_at_bounds() -> bool:
    """Whether ``torch.clamp(r, lo, hi)`` has derivative 1 (not 0) at ``r == lo`` and ``r == hi``.

    The reference inherits this convention, so the Triton and C++ kernels follow it."""
    with torch.inference_mode(False), torch.enable_grad():
        r = torch.tensor([0.0, 1.0], requires_grad=True)
        r.clamp(0, 1).sum().backward()
    return bool((r.grad == 1).all())


# Read by the cpp backend's backward at each call (tests flip it to check both conventions).
CLAMP_PASSES_GRADIENT_AT_BOUNDS = clamp_passes_gradient_at_bounds()


def output_length(T: int, stride: int) -> int:
    return (T - 1) // stride + 1


def deformable_temporal_conv_reference(x, offsets, weight, bias=None, stride=1):
    """Pure-PyTorch ground truth (materialises the E-fold sampled tensor). Sampling positions
    are computed in the offsets' dtype; the kernels use float64 when x is float64 too, so give
    float64 offsets with float64 x to compare them (the tests use float32 offsets with float64
    x to sample at the float32 kernels' rounded positions)."""
    B, C, T, V = x.shape
    t = torch.arange(output_length(T, stride), device=x.device, dtype=offsets.dtype) * stride
    p = (t[:, None] + offsets[None, :]).clamp(0, T - 1)  # (T_out, E)
    p0 = p.detach().floor()
    w = (p - p0).to(x.dtype)[None, None, :, :, None]
    i0 = p0.nan_to_num(0).long()  # a NaN offset samples row 0 with a NaN weight: NaN out, as the kernels give
    i1 = (i0 + 1).clamp(max=T - 1)
    xs = x[:, :, i0, :] * (1 - w) + x[:, :, i1, :] * w  # (B, C, T_out, E, V)
    y = torch.einsum("oce,bctev->botv", weight.to(x.dtype), xs)
    if bias is not None:
        y = y + bias.to(x.dtype)[None, :, None, None]
    return y


# --- triton backend -------------------------------------------------------------------------
# An opaque custom op rather than a triton_op (torch.compile does not look inside): the kernels
# module launches its kernels itself, not through wrap_triton.


@functools.cache  # an import statement per call costs microseconds of host time
def _kernels():
    from bharnet.kernels import deformable_temporal_conv as kernels  # imports triton lazily
    return kernels


def _triton_forward_fake(x, offsets, weight, bias, stride):
    B, _, T, V = x.shape
    return x.new_empty((B, weight.shape[0], output_length(T, stride), V))


def _triton_backward_fake(grad_y, x, offsets, weight, stride):
    return (x.new_empty(x.shape), offsets.new_empty(offsets.shape), weight.new_empty(weight.shape),
            weight.new_empty(weight.shape[:1]))


@opaque_custom_op("deformable_temporal_conv", _triton_forward_fake)
def _triton_forward(x: torch.Tensor, offsets: torch.Tensor, weight: torch.Tensor,
                    bias: Optional[torch.Tensor], stride: int) -> torch.Tensor:
    """Forward with the fused Triton kernel; output (B, C_out, T_out, V) in x's dtype."""
    return _kernels().forward(x, offsets, weight, bias, stride)


@opaque_custom_op("deformable_temporal_conv_backward", _triton_backward_fake)
def _triton_backward(grad_y: torch.Tensor, x: torch.Tensor, offsets: torch.Tensor,
                     weight: torch.Tensor, stride: int
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, doffsets, dweight, dbias) with the Triton kernels (math in the module docstring).

    dx has x's dtype, doffsets offsets', dweight and dbias weight's (the kernels write them so)."""
    return _kernels().backward(grad_y, x, offsets, weight, stride)


def _setup_context(ctx, inputs, output):
    x, offsets, weight, bias, stride = inputs
    ctx.save_for_backward(x, offsets, weight)
    ctx.stride = stride
    ctx.bias_dtype = None if bias is None else bias.dtype


def _make_backward(run):
    def backward(ctx, grad_y):
        x, offsets, weight = saved_tensors(ctx)
        dx, doffsets, dweight, dbias = run(_triton_backward, grad_y, x, offsets, weight, ctx.stride)
        dbias = None if ctx.bias_dtype is None else as_dtype(dbias, ctx.bias_dtype)
        return dx, doffsets, dweight, dbias, None
    return backward


_triton_call = with_autograd(_triton_forward, _make_backward, _setup_context, (_triton_backward,))


def deformable_temporal_conv_triton(x, offsets, weight, bias=None, stride=1):
    """The ``triton`` backend: the custom op ``bharnet::deformable_temporal_conv`` (with autograd).

    x may be float16/bfloat16/float32/float64 (bfloat16 only on CUDA: the CPU interpreter's bf16
    ``tl.dot`` is wrong); offsets, weight and bias any float dtype (weight is used in x's
    dtype as in the reference, positions in float32, float64 if x or offsets is float64)."""
    expect_triton_dtype(OP_NAME, "x", x)
    return _triton_call(x, offsets, weight, bias, stride)


# --- cpp backend ------------------------------------------------------------------------------
# The C++ (CPU, csrc/deformable_temporal_conv.cpp) and CUDA
# (csrc/deformable_temporal_conv_kernels.cu) kernels are the custom ops bharnet::deformable_temporal_conv_cpp and
# bharnet::deformable_temporal_conv_cpp_backward. Issue 7 asked for the same op names for every
# backend, but an op name has one schema and one kernel per dispatch key, and
# bharnet::deformable_temporal_conv is the Triton op (defined from Python; on CPU it runs the
# Triton interpreter, which the Triton tests rely on), so the C++ kernels get names of their own.

def _register_cpp_ops_now() -> None:
    """Fake impls and autograd of the C++ ops (run once, after the extension is loaded)."""

    @torch.library.register_fake("bharnet::deformable_temporal_conv_cpp")
    def _(x, offsets, weight, bias, stride):
        y = _triton_forward_fake(x, offsets, weight, bias, stride)
        if x.device.type == "cpu" and is_channels_last(x):  # the CPU kernel keeps the layout
            return torch.empty(y.shape, dtype=y.dtype, device=y.device, memory_format=torch.channels_last)
        return y

    @torch.library.register_fake("bharnet::deformable_temporal_conv_cpp_backward")
    def _(grad_y, x, offsets, weight, stride, bounds_pass_grad):
        return _triton_backward_fake(grad_y, x, offsets, weight, stride)

    def backward(ctx, grad_y):
        x, offsets, weight = ctx.saved_tensors
        dx, doffsets, dweight, dbias = torch.ops.bharnet.deformable_temporal_conv_cpp_backward(
            grad_y.contiguous(), x, offsets, weight, ctx.stride, CLAMP_PASSES_GRADIENT_AT_BOUNDS)
        return dx, doffsets, dweight, None if ctx.bias_dtype is None else dbias, None

    torch.library.register_autograd("bharnet::deformable_temporal_conv_cpp", backward,
                                    setup_context=_setup_context)
    refuse_double_backward("bharnet::deformable_temporal_conv_cpp_backward", "deformable_temporal_conv_cpp")


_register_cpp_ops = registered_after_loading(_register_cpp_ops_now)


def deformable_temporal_conv_cpp(x, offsets, weight, bias=None, stride=1):
    """The ``cpp`` backend: the custom op ``bharnet::deformable_temporal_conv_cpp`` (with autograd).

    Kernels compute in x's dtype with weight and bias cast to it (as the reference does) and
    positions in float32 (float64 if x or offsets is float64); gradients flow back through the
    casts in each input's own dtype. On CPU the kernels compute in float32 or float64: bfloat16
    ``x`` is read as it is, forward and backward, with weight and bias in float32 (the kernels
    widen it and round ``y`` and ``dx``: the float32 kernels' values on the widened inputs);
    float16 ``x`` is computed in float32 and the output cast back (:func:`cpu_kernel_dtype`)."""
    _register_cpp_ops()
    ops = torch.ops.bharnet
    compute = params = x.dtype
    if x.device.type == "cpu":
        compute = cpu_kernel_dtype(x.dtype)
        params = torch.float32 if compute == torch.bfloat16 else compute
    positions = torch.float64 if torch.float64 in (compute, offsets.dtype) else torch.float32
    y = ops.deformable_temporal_conv_cpp(as_dtype(x, compute), as_dtype(offsets, positions),
                                         as_dtype(weight, params), as_dtype(bias, params), stride)
    return as_dtype(y, x.dtype)


_cpp_availability = cpp_backend_availability("deformable_temporal_conv_cpp")


_IMPLS = {"reference": deformable_temporal_conv_reference,
          "triton": deformable_temporal_conv_triton,
          "cpp": deformable_temporal_conv_cpp}
register_backend(OP_NAME, "triton", triton_availability)
register_backend(OP_NAME, "cpp", _cpp_availability)


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
    if bias is not None and not isinstance(bias, torch.Tensor):
        raise TypeError(f"deformable_temporal_conv: bias must be a torch.Tensor or None, got {type(bias).__name__}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"deformable_temporal_conv: bias must have shape ({weight.shape[0]},), "
                         f"got {tuple(bias.shape)}")
    for name, t in (("offsets", offsets), ("weight", weight), ("bias", bias)):
        if t is not None and t.device != x.device:
            raise ValueError(f"deformable_temporal_conv: {name} is on {t.device}, expected {x.device} like x")
    if not is_int(stride) or stride < 1:
        raise ValueError(f"deformable_temporal_conv: stride must be a positive int, got {stride!r}")


def deformable_temporal_conv(x: torch.Tensor, offsets: torch.Tensor, weight: torch.Tensor,
                             bias: Optional[torch.Tensor] = None, stride: int = 1,
                             *, backend: Optional[str] = None) -> torch.Tensor:
    """DeTGC sampling + interpolation + E-tap channel mix (see the module docstring)."""
    validate(x, offsets, weight, bias, stride)
    impl = _IMPLS[resolve(OP_NAME, backend, x.device.type)]
    return impl(x, offsets, weight, bias, operator.index(stride))  # a numpy int as a Python int (the ops' schema)
