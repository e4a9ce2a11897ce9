r"""Fused LayerNorm over the last dimension that writes its output in the compute dtype.

Math, for ``x`` (..., D) and optional affine parameters ``weight`` w and ``bias`` b (D,)::

    mean = sum_c x_c / D,   var = sum_c (x_c - mean)^2 / D   (biased, like nn.LayerNorm)
    rstd = 1 / sqrt(var + eps),   xhat = (x - mean) * rstd
    y    = xhat * w + b                                       (w = 1, b = 0 when None)

Gradients (``dy = dL/dy``, ``g = dy * w``, sums over the D features of a row and over all
rows for the parameters)::

    dx = rstd * (g - xhat * mean_c(g * xhat) - mean_c(g))
    dw = sum_rows dy * xhat,   db = sum_rows dy

Output dtype: the *compute dtype*, i.e. the autocast dtype when autocast is enabled for x's
device (and x is float32/float16/bfloat16), else x's dtype. Under autocast ``F.layer_norm``
runs in float32 and returns float32, which the next ``F.linear`` casts to the autocast dtype;
writing that dtype directly gives the same numbers (one rounding of the float32 result)
without the float32 output, the casts around it, or float32 gradients. dx comes back in x's
dtype, dw and db in the parameters' dtypes.

Why fuse: in the cross-attention layer under bf16 autocast (H100, N = 2048 frames, D = 256),
torch's LayerNorm forward/backward kernels plus the casts around them took about twice the
time of the attention core. These kernels read x (and dy) once in their own dtype, keep the
statistics in float32 (float64 for float64 x) and save only mean and rstd (one value per row).

The op is ``torch.ops.bharnet.layer_norm(x, weight, bias, eps, out_dtype) -> (y, mean, rstd)``
(a ``triton_op`` when Triton compiles for a GPU; an opaque ``custom_op`` under
``TRITON_INTERPRET=1``), with autograd through ``torch.ops.bharnet.layer_norm_backward(dy, x,
weight, mean, rstd) -> (dx, dparams)``, ``dparams`` = [dw; db] (2, D) in the accumulation dtype;
plain eager calls run the same functions without the dispatcher (``_custom_op.with_autograd``).
Kernels: ``bharnet.kernels.layer_norm``; D up to ``MAX_DIM`` = 1024, float16, bfloat16,
float32 and float64. Double backward is not supported. An internal building block of the
Triton backends (no backend registry entry); the reference is ``layer_norm_reference``.
"""
from __future__ import annotations

import functools
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ._checks import TRITON_DTYPES, accumulation_dtype, expect_tensor
from ._custom_op import as_dtype, cdiv, launcher, new_output, saved_tensors, triton_custom_op, with_autograd

OP_NAME = "layer_norm"
MAX_DIM = 1024  # one BLOCK_D >= D tile of features per row
TILE = 2048  # elements of one (BLOCK_M rows, BLOCK_D features) tile (half that for float64)
# Backward programs at most (each loops over row blocks and keeps partial dw, db in registers);
# enough to fill an H100 (132 SMs) several times over. Tests shrink it to reach the loop.
BACKWARD_PROGRAMS = 1024
NUM_WARPS = 4


@functools.cache
def _kernels():
    """The Triton kernels, imported on first use (after TRITON_INTERPRET has been chosen)."""
    from bharnet.kernels import layer_norm as kernels
    return kernels


# The dtypes autocast casts to its compute dtype (float64 tensors keep theirs).
AUTOCAST_CAST_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def compute_dtype(x: Tensor) -> torch.dtype:
    """The autocast dtype if autocast is on for x's device and x is float32/16-bit, else x's."""
    device = x.device.type
    if x.dtype in AUTOCAST_CAST_DTYPES and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return x.dtype


def layer_norm_reference(x: Tensor, weight: Optional[Tensor] = None, bias: Optional[Tensor] = None,
                         eps: float = 1e-5) -> Tensor:
    """Pure-PyTorch ground truth: ``F.layer_norm`` (float64-capable) in the compute dtype."""
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps).to(compute_dtype(x))


def _rows(t: Tensor) -> Tensor:
    """(M, D) view of t (a copy only if no such view with unit feature stride exists)."""
    rows = t.reshape(-1, t.shape[-1])
    return rows if rows.stride(-1) == 1 else rows.contiguous()


def _params(t: Optional[Tensor], rows: Tensor) -> Tensor:
    """A contiguous parameter, or ``rows`` as a stand-in pointer the kernels never read."""
    return rows if t is None else t.contiguous()


def _config(D: int, x: Tensor):
    """(BLOCK_M, BLOCK_D): one power-of-two BLOCK_D >= D, rows to fill a TILE-element tile."""
    block_d = 1 << (D - 1).bit_length()
    tile = TILE // 2 if x.dtype == torch.float64 else TILE
    return max(1, tile // block_d), block_d


def _forward_fake(x, weight, bias, eps, out_dtype):
    stats = x.new_empty(x.shape[:-1], dtype=accumulation_dtype(x))
    return x.new_empty(x.shape, dtype=out_dtype), stats, stats.new_empty(stats.shape)


def _backward_fake(dy, x, weight, mean, rstd):
    return x.new_empty(x.shape), x.new_empty((2, x.shape[-1]), dtype=accumulation_dtype(x))


@triton_custom_op("layer_norm", _forward_fake)
def _layer_norm_op(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float,
                   out_dtype: torch.dtype) -> Tuple[Tensor, Tensor, Tensor]:
    """(y (x.shape, out_dtype), mean and rstd (x.shape[:-1], fp32; fp64 for fp64 x)).
    Grid (cdiv(M, BLOCK_M),)."""
    D = x.shape[-1]
    rows = _rows(x)
    M = rows.shape[0]
    block_m, block_d = _config(D, x)
    y = new_output(x.shape, out_dtype, x.device)
    mean = new_output(x.shape[:-1], accumulation_dtype(x), x.device)
    rstd = new_output(x.shape[:-1], accumulation_dtype(x), x.device)
    if M > 0:
        launcher(_kernels().layer_norm_fwd_kernel)[(cdiv(M, block_m),)](
            rows, _params(weight, rows), _params(bias, rows), y, mean, rstd,
            M, D, rows.stride(0), EPS=eps, HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
            ACC_FP64=x.dtype == torch.float64, BLOCK_M=block_m, BLOCK_D=block_d,
            num_warps=NUM_WARPS)
    return y, mean, rstd


@triton_custom_op("layer_norm_backward", _backward_fake)
def _layer_norm_backward_op(dy: Tensor, x: Tensor, weight: Optional[Tensor], mean: Tensor,
                            rstd: Tensor) -> Tuple[Tensor, Tensor]:
    """(dx (like x), [dw; db] (2, D) in the accumulation dtype). Grid (P,) with
    P = min(cdiv(M, BLOCK_M), BACKWARD_PROGRAMS); torch sums the (2, P, D) partials over P."""
    D = x.shape[-1]
    rows, dy_rows = _rows(x), _rows(dy)
    M = rows.shape[0]
    block_m, block_d = _config(D, x)
    programs = min(cdiv(M, block_m), BACKWARD_PROGRAMS)
    dx = new_output(x.shape, x.dtype, x.device)
    part = new_output((2, programs, D), accumulation_dtype(x), x.device)
    if M > 0:
        launcher(_kernels().layer_norm_bwd_kernel)[(programs,)](
            dy_rows, rows, _params(weight, rows), mean, rstd, dx, part,
            M, D, dy_rows.stride(0), rows.stride(0), HAS_WEIGHT=weight is not None,
            ACC_FP64=x.dtype == torch.float64, BLOCK_M=block_m, BLOCK_D=block_d,
            num_warps=NUM_WARPS)
    return dx, part.sum(dim=1)


def _setup_context(ctx, inputs, output):
    x, weight, bias, _eps, _out_dtype = inputs
    _y, mean, rstd = output
    ctx.mark_non_differentiable(mean, rstd)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(x, weight, mean, rstd)
    ctx.bias_dtype = None if bias is None else bias.dtype


def _make_backward(run):
    def backward(ctx, dy, _dmean, _drstd):
        """Only x, weight, mean and rstd are saved (not y, not xhat)."""
        if dy is None:
            return None, None, None, None, None
        x, weight, mean, rstd = saved_tensors(ctx)
        dx, dparams = run(_layer_norm_backward_op, dy, x, weight, mean, rstd)
        dw = None if weight is None else as_dtype(dparams[0], weight.dtype)
        db = None if ctx.bias_dtype is None else as_dtype(dparams[1], ctx.bias_dtype)
        return dx, dw, db, None, None
    return backward


_layer_norm_call = with_autograd(_layer_norm_op, _make_backward, _setup_context, (_layer_norm_backward_op,))


def validate(x, weight, bias) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() < 1:
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{OP_NAME}: x must have shape (..., dim), got {got}")
    D = x.shape[-1]
    expect_tensor(OP_NAME, "x", x, x.shape, x, "x")
    if not 1 <= D <= MAX_DIM:
        raise ValueError(f"{OP_NAME}: the triton kernels take 1 <= dim <= {MAX_DIM} features, "
                         f"got x of shape {tuple(x.shape)}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None:
            expect_tensor(OP_NAME, name, t, (D,), x, "x")
    for name, t in (("x", x), ("weight", weight), ("bias", bias)):
        if t is not None and t.dtype not in TRITON_DTYPES:
            raise TypeError(f"{OP_NAME}: {name} must be float16, bfloat16, float32 or float64, "
                            f"got {t.dtype}")


def layer_norm(x: Tensor, weight: Optional[Tensor] = None, bias: Optional[Tensor] = None,
               eps: float = 1e-5) -> Tensor:
    """LayerNorm of ``x`` (..., dim) over its last dimension with the Triton kernels; the
    result is in the compute dtype (module docstring). ``weight``, ``bias``: (dim,) or None."""
    validate(x, weight, bias)
    return _layer_norm_call(x, weight, bias, float(eps), compute_dtype(x))[0]
