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

On an Intel CPU, where MKL runs its AVX-512 code, the opposite holds: on a 2-core Intel Xeon
(family 6 model 167) ``F.linear`` took 0.83 / 2.94 ms (forward / forward+backward) at
M = 1600, K = N = 256 against oneDNN's 1.06 / 3.97 ms, and 9.1 against 10.8 ms fwd+bwd at
M = 2688, N = 512 (one micro-benchmark, 2026-11-28); through oneDNN, the cross-attention layer's
fwd+bwd in frame mode ran at 0.87x of SDPA with ``F.linear`` projections (``bharnet bench``).

``linear(x, weight, bias)`` takes that path for non-empty float32 CPU tensors outside autocast,
when PyTorch was built with oneDNN and the CPU is not an Intel one (``/proc/cpuinfo``'s
``vendor_id`` is not GenuineIntel; an unknown vendor keeps oneDNN); every other call is
``F.linear`` itself (also a bias that is
not an (N,) vector, which ``F.linear`` broadcasts and oneDNN would not). The path is the custom
op ``bharnet::onednn_linear`` (2-D x), which ``torch.compile`` keeps as it is: traced through,
the projections became Inductor's CPU GEMM, MKL's again, and the compiled cross-attention layer
ran 2x slower than the eager one (``bharnet bench``, frame mode, 2-core EPYC: 11.2 vs 5.7 ms
fwd+bwd; with the op 5.9 ms, as eager in the same run). The three products are oneDNN
matmuls, on transposed views where they need them (oneDNN copies a source that is not
row-major; a strided bias is made contiguous first: oneDNN ignores a bias's strides), except
dW, which the C++ kernel
``bharnet::linear_weight_grad_cpp`` (``csrc/linear_weight_grad.cpp``) computes from dY and X in
place (oneDNN would first copy dY^T: 1.25-1.44x faster at the projections' shapes, one
micro-benchmark; oneDNN when the extension cannot load, and under ``create_graph``, so that
double backward works). dW and db come back in the parameters' dtype (float32). Results equal
``F.linear``'s up to float32 rounding of the summation order. The op's Python dispatch costs
about 25 us more per linear (forward and backward) than a plain autograd Function did, ~1.5%
of the layer. Used by the cpp backend of ``bharnet.ops.cross_attention``.
"""
from __future__ import annotations

import functools
import platform
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


@torch.compiler.assume_constant_result
def _weight_grad_ready() -> bool:
    """Loads the extension and registers its weight-gradient op (when it can) as ``linear`` runs,
    also while ``torch.compile`` traces it (run eagerly, not traced): a compiled backward that
    comes from the compile cache calls the op without tracing ``_backward`` again."""
    return _cpp_weight_grad() is not None


@functools.cache
def _cpu_vendor() -> Optional[str]:
    """The CPU's ``vendor_id`` in ``/proc/cpuinfo`` (GenuineIntel, AuthenticAMD); without that
    file, the vendor named in ``platform.processor()`` (as on Windows); else None."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("vendor_id"):
                    return line.partition(":")[2].strip()
        return None
    except OSError:
        return next((v for v in ("GenuineIntel", "AuthenticAMD") if v in platform.processor()), None)


@torch.compiler.assume_constant_result
def _prefer_onednn() -> bool:
    """Whether oneDNN's matmul exists and is the faster product here: not on an Intel CPU,
    where MKL is (module docstring). Run eagerly, not traced, under ``torch.compile``."""
    return _onednn_matmul() is not None and _cpu_vendor() != "GenuineIntel"


def onednn_linear_applies(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> bool:
    """Whether ``linear`` takes the oneDNN path for these tensors (see the module docstring)."""
    return (x.device.type == "cpu" and x.dtype == torch.float32 and weight.dtype == torch.float32
            and (bias is None or (bias.dtype == torch.float32 and bias.shape == weight.shape[:1]))
            and weight.dim() == 2
            and x.dim() >= 1 and x.shape[-1] == weight.shape[1] and x.numel() > 0 and weight.numel() > 0
            and not torch.is_autocast_enabled("cpu")
            and _prefer_onednn())


@torch.library.custom_op("bharnet::onednn_linear", mutates_args=())
def _onednn_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """X W^T + b for 2-D float32 CPU tensors through oneDNN's matmul (an opaque op, so that
    ``torch.compile`` keeps it instead of lowering to its own CPU GEMM)."""
    # oneDNN reads the bias as contiguous whatever its strides (a strided bias gave wrong sums)
    return _onednn_matmul()(x, weight, bias.contiguous() if bias is not None else None)


@_onednn_linear.register_fake
def _(x, weight, bias):
    return x.new_empty((x.shape[0], weight.shape[0]))


def _setup_context(ctx, inputs, output):
    x, weight, bias = inputs
    ctx.save_for_backward(x, weight)
    ctx.has_bias = bias is not None


def _backward(ctx, dy):
    """dX = dY W, dW = dY^T X, db = sum_rows dY, each only when needed. dW comes from the C++
    kernel, except under ``create_graph``: then from this op (differentiable, so that double
    backward works), as it does without the extension."""
    x, weight = ctx.saved_tensors
    dx = dw = db = None
    if ctx.needs_input_grad[0]:
        dx = _onednn_linear(dy, weight.t(), None)
    if ctx.needs_input_grad[1]:
        weight_grad = _cpp_weight_grad()
        use_cpp = weight_grad is not None and not torch.is_grad_enabled()
        dw = weight_grad(dy, x) if use_cpp else _onednn_linear(dy.t(), x.t(), None)
    if ctx.has_bias and ctx.needs_input_grad[2]:
        db = dy.sum(0)
    return dx, dw, db


_onednn_linear.register_autograd(_backward, setup_context=_setup_context)


def linear(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """``F.linear(x, weight, bias)``, through oneDNN for float32 tensors on a CPU where it is the
    faster product (module docstring)."""
    if onednn_linear_applies(x, weight, bias):
        _weight_grad_ready()
        rows = _onednn_linear(x.reshape(-1, x.shape[-1]), weight, bias)
        return rows.reshape(*x.shape[:-1], weight.shape[0])
    return F.linear(x, weight, bias)
