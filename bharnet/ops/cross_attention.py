r"""Pre-LayerNorm multi-head cross-attention with residual (the body-hand attention layer).

Math, for queries ``x_q`` (N, Lq, D), keys/values ``x_kv`` (N, Lk, D), ``heads`` heads of
``d = D / heads`` features, and an optional boolean ``key_mask`` (N, Lk), True where a key may
be attended (a missing hand detection is False)::

    a_q  = LN_q(x_q),  a_kv = LN_kv(x_kv)          (identity when pre_norm=False)
    q    = a_q W_q^T + b_q                          (N, Lq, D)
    kv   = a_kv W_kv^T + b_kv = [k | v]             (N, Lk, 2D): k = kv[..., :D], v = kv[..., D:]
    per (n, h):  o_h = softmax(q_h k_h^T / sqrt(d) + log(mask)) v_h
                 (a query whose keys are all masked gets o_h = 0)
    y    = x_q + o W_o^T + b_o                      (N, Lq, D)

so a fully masked query row gives ``y = x_q + b_o``. The reference below computes exactly
this with pure-PyTorch ops and works in float64.

Gradients of the attention core (``scale = 1/sqrt(d)``, P the attention weights, dO = dL/do)::

    dV = P^T dO,  dP = dO V^T,  delta = rowsum(dO * O),  dS = P * (dP - delta),
    dQ = scale dS K,  dK = scale dS^T Q

the rest (projections, LayerNorm, residual) by the chain rule through ``F.linear`` and
``F.layer_norm`` (``bharnet.ops.layer_norm`` gives the LayerNorm gradients in the triton
backend).

Backends: ``reference`` (below), ``triton`` and ``cpp`` (the attention core is a C++ kernel: on
CPU ``csrc/cross_attention.cpp``, float32/float64, parallel over (n, head) with the SIMD
micro-kernel of ``csrc/cpu_simd.h``; on CUDA, head dims up to 128: float16/bfloat16 on sm_80+
in the tensor-core flash-attention kernels of ``csrc/cross_attention_mma_kernels.cu``, float32,
float64 and older GPUs in a SIMT kernel of ``csrc/cross_attention_kernels.cu`` (one warp per
query row, online softmax); LayerNorms, projections and residual are torch ops, the projections
through oneDNN on non-Intel CPUs in float32 (``bharnet.ops.cpu_linear``); see the cpp section
below). What the triton backend fuses, and why:

* the attention core is one Triton kernel per direction (``bharnet.kernels.cross_attention``):
  it reads q and the fused [k | v] projection output in their (N, L, heads * d) layouts (no
  head split, no chunk, no copies), applies the key mask, a numerically stable base-2 online
  softmax (fp32 accumulation) and writes the attention output already merged as (N, Lq, D)
  plus the per-row log-sum-exp; the backward recomputes P from the log-sum-exp and writes dq
  and d[k | v] in the same layouts (so no concatenation of dk and dv either);
* the two LayerNorms are the fused ``bharnet.ops.layer_norm`` (for dim <= 1024, else
  ``F.layer_norm``): one kernel each way that reads x in its own dtype, keeps float32
  statistics and writes the normalised tokens directly in the compute dtype (under autocast
  the dtype ``F.linear`` would cast torch's float32 LayerNorm output to, so the numbers are
  the same); this removes torch's float32 LayerNorm kernels and the casts around them, which
  cost more than the attention core under bf16 autocast (H100 profile, frame mode);
* the three projections and the residual stay torch ops (one cuBLAS GEMM per projection, K
  and V in a single GEMM; ``F.linear`` fuses the biases): at the model's D = 256 they are
  GEMMs of 256 to 512 columns over 10^4 to 10^5 token rows, which cuBLAS already runs well,
  while fusing a projection into the attention kernel would make every (n, head) program
  stream the whole (D, D) weight, and LayerNorm-into-GEMM-prologue fusion is not available
  around cuBLAS. The residual add is one elementwise kernel, and folding it into the output
  GEMM (``addmm``) would still leave the bias add; under autocast the float32 weights are cast
  to the compute dtype by ``F.linear`` as in the reference.

The attention core is the custom op ``torch.ops.bharnet.cross_attention_core(q, kv, key_mask,
heads) -> (o, lse)`` (a ``triton_op`` when Triton compiles for a GPU, so ``torch.compile`` sees
its kernels; an opaque ``custom_op`` under ``TRITON_INTERPRET=1``), with autograd through
``torch.ops.bharnet.cross_attention_core_backward``. Plain eager calls (nothing tracing, plain
tensors, dtypes that F.linear accepts) run the whole triton layer as one autograd node,
``_TritonLayerDirect``, over the same kernels and torch ops: a node-by-node layer is about 20
autograd nodes and weight casts, whose host time dominates on a slow host. Results are the
node path's (bitwise in the tested cases; for self-attention, ``x_q is x_kv``, the input
gradient may differ in the last bit: its three parts are added in another order). Double
backward is not supported.
"""
from __future__ import annotations

import functools
import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .._ext import cpp_backend_availability, registered_after_loading
from . import cpu_linear
from ._backend import register_backend, resolve, triton_availability
from ._checks import accumulation_dtype, expect_tensor, expect_triton_dtype
from ._custom_op import (as_dtype, cdiv, differentiable_once, direct_call_allowed, launcher, new_output, next_pow2,
                         refuse_double_backward, saved_tensors, triton_custom_op, with_autograd)
from .layer_norm import MAX_DIM as MAX_LAYER_NORM_DIM
from .layer_norm import (AUTOCAST_CAST_DTYPES, _layer_norm_backward_op, _layer_norm_op, compute_dtype,
                         layer_norm)

OP_NAME = "cross_attention"


def masked_softmax_attention(q, k, v, key_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``softmax(q kᵀ / sqrt(d)) v`` over (N, heads, L, d) tensors.

    ``key_mask`` (N, Lk) is True for keys that may be attended. A query whose keys are all
    masked gets a zero output (so the residual passes its input through unchanged).
    """
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if key_mask is None:
        return scores.softmax(dim=-1) @ v
    allowed = key_mask[:, None, None, :]
    scores = scores.masked_fill(~allowed, float("-inf"))
    any_allowed = allowed.any(dim=-1, keepdim=True)
    weights = torch.where(any_allowed, scores, torch.zeros_like(scores)).softmax(dim=-1)
    return (weights * any_allowed) @ v


def _torch_layer_norm(x, weight, bias, eps):
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


def _layer(attend, norm, x_q, x_kv, heads, q_weight, q_bias, kv_weight, kv_bias, out_weight,
           out_bias, key_mask, norm_q_weight, norm_q_bias, norm_kv_weight, norm_kv_bias, pre_norm,
           eps, linear=F.linear):
    """``norm(x, weight, bias, eps)`` (LN), projections (``linear``), ``attend(q, kv, key_mask,
    heads) -> o (N, Lq, D)``, output projection and residual: the part every backend shares."""
    a_q, a_kv = x_q, x_kv
    if pre_norm:
        a_q = norm(x_q, norm_q_weight, norm_q_bias, eps)
        a_kv = norm(x_kv, norm_kv_weight, norm_kv_bias, eps)
    q = linear(a_q, q_weight, q_bias)
    kv = linear(a_kv, kv_weight, kv_bias)
    return x_q + linear(attend(q, kv, key_mask, heads), out_weight, out_bias)


def _split_heads(x, heads):
    N, L, D = x.shape
    return x.reshape(N, L, heads, D // heads).transpose(1, 2)


def _reference_attend(q, kv, key_mask, heads):
    k, v = kv.chunk(2, dim=-1)
    attended = masked_softmax_attention(_split_heads(q, heads), _split_heads(k, heads),
                                        _split_heads(v, heads), key_mask)
    N, _, Lq, _ = attended.shape
    return attended.transpose(1, 2).reshape(N, Lq, q.shape[-1])


def cross_attention_reference(x_q, x_kv, heads, q_weight, q_bias, kv_weight, kv_bias, out_weight,
                              out_bias, key_mask=None, norm_q_weight=None, norm_q_bias=None,
                              norm_kv_weight=None, norm_kv_bias=None, pre_norm=True, eps=1e-5):
    """Pure-PyTorch ground truth (materialises the (N, heads, Lq, Lk) attention weights)."""
    return _layer(_reference_attend, _torch_layer_norm, x_q, x_kv, heads, q_weight, q_bias,
                  kv_weight, kv_bias, out_weight, out_bias, key_mask, norm_q_weight, norm_q_bias,
                  norm_kv_weight, norm_kv_bias, pre_norm, eps)


# --- triton backend -------------------------------------------------------------------------

TRITON_MAX_HEAD_DIM = 128
# Block sizes (module attributes so tests can shrink them to reach every code path on tiny
# shapes). Keys up to SINGLE_BLOCK_MAX_KEYS sit in one register tile per program (frame mode,
# PAM); longer key sequences stream in KEY_BLOCK blocks. Queries come in QUERY_BLOCK blocks.
# Both shrink for wide elements and large head dims (see _config).
SINGLE_BLOCK_MAX_KEYS = 128
KEY_BLOCK = 64
QUERY_BLOCK = 64
MIN_DOT = 16  # tl.dot needs every tile dimension >= 16


@functools.cache
def _kernels():
    """The Triton kernels, imported on first use (after TRITON_INTERPRET has been chosen)."""
    from bharnet.kernels import cross_attention as kernels
    return kernels


def _pow2(n: int) -> int:
    return max(MIN_DOT, next_pow2(n))


def _config(Lq: int, Lk: int, head_dim: int, element_size: int):
    """Tile sizes: (BLOCK_Q, BLOCK_K, BLOCK_D, fused_backward, num_warps).

    Chosen so that the kernels keep their tiles in registers on an H100 (checked offline with
    ptxas for sm_90, head dims 8 to 128): an operand tile holds at most 8192 elements, and a
    program's work BLOCK_Q * BLOCK_K * BLOCK_D is at most 64^3 for 16-bit inputs (tensor
    cores), 32 * 64 * 32 for float32 and 32^3 for float64, whose exact products run on the FMA
    units. Four warps for small work (16-bit up to 64 * 64 * 32, float32 up to 32^3, head dims
    <= 64), else eight. No 16-bit or float32 configuration spills more than 8 bytes; float64,
    a validation dtype, spills in a few. Keys come first: the whole key range is one tile
    when it fits (frame mode, PAM), else KEY_BLOCK keys stream; the backward is one fused
    pass when every query and every key of an (n, head) fits one tile."""
    block_d = _pow2(head_dim)
    rows = 8192 // block_d
    budget = {2: 64 * 64 * 64, 4: 32 * 64 * 32}.get(element_size, 32 * 32 * 32)
    max_keys = max(MIN_DOT, min(SINGLE_BLOCK_MAX_KEYS, rows, budget // (MIN_DOT * block_d)))
    block_k = _pow2(Lk) if Lk <= max_keys else max(MIN_DOT, min(KEY_BLOCK, max_keys))
    block_q = max(MIN_DOT, min(_pow2(Lq), QUERY_BLOCK, rows, budget // (block_k * block_d)))
    fused = Lq <= block_q and Lk <= block_k
    four_warps = {2: 64 * 64 * 32, 4: 32 * 32 * 32}.get(element_size, 0)
    num_warps = 4 if block_q * block_k * block_d <= four_warps and block_d <= 64 else 8
    return block_q, block_k, block_d, fused, num_warps


def _kernel_flags(x: Tensor, has_mask: bool):
    """Constexpr flags shared by every kernel: fp64 accumulation only for fp64 inputs, exact
    fp32 products (no TF32) for fp32 inputs."""
    return dict(HAS_MASK=has_mask,
                ACC_FP64=x.dtype == torch.float64,
                DOT_PRECISION="ieee" if x.dtype in (torch.float32, torch.float64) else "tf32")


def _rows_last(t: Tensor) -> Tensor:
    """The kernels take any (n, l) strides but need unit stride along the features."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _mask_args(key_mask: Optional[Tensor], kv: Tensor):
    """(pointer tensor, stride_n, stride_l); the kernels never read the pointer without a mask.

    The bool mask is passed as a uint8 copy (N·Lk bytes): a ``view(torch.uint8)`` would avoid
    the copy, but inductor cannot trace a bool→uint8 view inside the ``triton_op`` (``torch.iinfo``
    rejects bool; seen on the H100 under ``torch.compile``). Next to float64 data the copy is
    int32: Triton 3.8 fails to compile (an MMAv2 lowering assertion for sm_90) a kernel that
    loads 8-bit values and runs an fp64 ``tl.dot``."""
    if key_mask is None:
        return kv, 0, 0
    mask = key_mask.to(torch.int32) if kv.dtype == torch.float64 else key_mask.to(torch.uint8)
    return mask, mask.stride(0), mask.stride(1)


def _core_fake(q, kv, key_mask, heads):
    N, Lq, _ = q.shape
    return q.new_empty(q.shape), q.new_empty((N, heads, Lq), dtype=accumulation_dtype(q))


def _core_backward_fake(grad_o, q, kv, o, lse, key_mask, heads):
    return q.new_empty(q.shape), kv.new_empty(kv.shape)


@triton_custom_op("cross_attention_core", _core_fake)
def _core_op(q: Tensor, kv: Tensor, key_mask: Optional[Tensor], heads: int) -> Tuple[Tensor, Tensor]:
    """Attention core: ``o`` (N, Lq, D) with head h in features [h d, (h+1) d) and ``lse``
    (N, heads, Lq), the log-sum-exp of each row's scaled scores (+inf for a fully
    masked row). Grid (N * heads, cdiv(Lq, BLOCK_Q)); see ``bharnet.kernels.cross_attention``."""
    kernels = _kernels()
    q, kv = _rows_last(q), _rows_last(kv)
    N, Lq, D = q.shape
    Lk = kv.shape[1]
    head_dim = D // heads
    block_q, block_k, block_d, _, num_warps = _config(Lq, Lk, head_dim, q.element_size())
    o = new_output((N, Lq, D), q.dtype, q.device)
    lse = new_output((N, heads, Lq), accumulation_dtype(q), q.device)
    mask, stride_mn, stride_ml = _mask_args(key_mask, kv)
    launcher(kernels.cross_attention_fwd_kernel)[(N * heads, cdiv(Lq, block_q))](
        q, kv, mask, o, lse, heads, Lq, Lk, D, head_dim,
        q.stride(0), q.stride(1), kv.stride(0), kv.stride(1), stride_mn, stride_ml,
        **_kernel_flags(q, key_mask is not None),
        BLOCK_Q=block_q, BLOCK_K=block_k, BLOCK_D=block_d, num_warps=num_warps)
    return o, lse


@triton_custom_op("cross_attention_core_backward", _core_backward_fake)
def _core_backward_op(grad_o: Tensor, q: Tensor, kv: Tensor, o: Tensor, lse: Tensor,
                      key_mask: Optional[Tensor], heads: int) -> Tuple[Tensor, Tensor]:
    """(dq (N, Lq, D), dkv (N, Lk, 2D)) of the attention core, from P recomputed with ``lse``.

    One fused kernel (grid (N * heads,)) when an (n, head) fits one tile; else a dq kernel
    (grid (N * heads, cdiv(Lq, BLOCK_Q)), also writing delta = rowsum(dO * O)) then a dk/dv
    kernel (grid (N * heads, cdiv(Lk, BLOCK_K)))."""
    kernels = _kernels()
    grad_o, q, kv = (_rows_last(t) for t in (as_dtype(grad_o, q.dtype), q, kv))
    o, lse = o.contiguous(), lse.contiguous()
    N, Lq, D = q.shape
    Lk = kv.shape[1]
    head_dim = D // heads
    block_q, block_k, block_d, fused, num_warps = _config(Lq, Lk, head_dim, q.element_size())
    dq = new_output(q.shape, q.dtype, q.device)
    dkv = new_output((N, Lk, 2 * D), kv.dtype, kv.device)
    mask, stride_mn, stride_ml = _mask_args(key_mask, kv)
    strides = (q.stride(0), q.stride(1), kv.stride(0), kv.stride(1), stride_mn, stride_ml,
               grad_o.stride(0), grad_o.stride(1))
    meta = dict(**_kernel_flags(q, key_mask is not None), BLOCK_Q=block_q, BLOCK_K=block_k,
                BLOCK_D=block_d, num_warps=num_warps)
    if fused:
        launcher(kernels.cross_attention_bwd_fused_kernel)[(N * heads,)](
            q, kv, mask, grad_o, lse, dq, dkv, heads, Lq, Lk, D, head_dim, *strides, **meta)
        return dq, dkv
    delta = new_output((N, heads, Lq), lse.dtype, q.device)
    launcher(kernels.cross_attention_bwd_dq_kernel)[(N * heads, cdiv(Lq, block_q))](
        q, kv, mask, o, grad_o, lse, delta, dq, heads, Lq, Lk, D, head_dim, *strides, **meta)
    launcher(kernels.cross_attention_bwd_dkdv_kernel)[(N * heads, cdiv(Lk, block_k))](
        q, kv, mask, grad_o, lse, delta, dkv, heads, Lq, Lk, D, head_dim, *strides, **meta)
    return dq, dkv


def _setup_context(ctx, inputs, output):
    q, kv, key_mask, heads = inputs
    o, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(q, kv, o, lse, key_mask)
    ctx.heads = heads


def _autograd_backward(core_backward):
    """The autograd backward of an attention-core op whose gradients are
    ``core_backward(grad_o, q, kv, o, lse, key_mask, heads) -> (dq, dkv)``. Only q, kv, o and
    lse are saved (o is also the output projection's saved input)."""
    def backward(ctx, grad_o, _grad_lse):
        q, kv, o, lse, key_mask = saved_tensors(ctx)
        if grad_o is None:
            return None, None, None, None
        dq, dkv = core_backward(grad_o, q, kv, o, lse, key_mask, ctx.heads)
        return dq, dkv, None, None
    return backward


_core_call = with_autograd(
    _core_op, lambda run: _autograd_backward(lambda *args: run(_core_backward_op, *args)),
    _setup_context, (_core_backward_op,))


def _check_projections(q, kv):
    for name, t in (("q", q), ("kv", kv)):
        expect_triton_dtype(OP_NAME, f"{name} (the projection output)", t)
    if q.dtype != kv.dtype:
        raise TypeError(f"cross_attention: the projected q ({q.dtype}) and kv ({kv.dtype}) must "
                        "share a dtype")


def _triton_attend(q, kv, key_mask, heads):
    _check_projections(q, kv)
    return _core_call(q, kv, key_mask, heads)[0]


def _triton_layer_norm(x, weight, bias, eps):
    """The fused LayerNorm (output in the compute dtype) where its kernels apply, else torch's."""
    if x.shape[-1] <= MAX_LAYER_NORM_DIM:
        return layer_norm(x, weight, bias, eps)
    return _torch_layer_norm(x, weight, bias, eps)


def _direct_layer_dtype(x_q: Tensor, x_kv: Tensor, projections) -> Optional[torch.dtype]:
    """The dtype the projections compute in when ``_TritonLayerDirect`` computes exactly what
    the node-by-node layer does, else None (then the node path runs and raises its own errors,
    e.g. F.linear's dtype mismatch): under autocast, its dtype when every tensor is one that
    autocast casts; without, x's dtype when x_q, x_kv and every projection parameter share it."""
    tensors = [x_q, x_kv, *(t for t in projections if t is not None)]
    device = x_q.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device) if all(t.dtype in AUTOCAST_CAST_DTYPES for t in tensors) else None
    return x_q.dtype if all(t.dtype == x_q.dtype for t in tensors) else None


def _linear_grads(g2d: Tensor, a2d: Tensor, weight_c: Tensor, weight: Tensor, bias: Optional[Tensor]):
    """(dL/da, dL/dweight, dL/dbias) of ``a W^T + b`` as autograd computes them (in the compute
    dtype of ``weight_c``, parameter gradients cast back to their parameters' dtypes)."""
    return (g2d.mm(weight_c), as_dtype(g2d.t().mm(a2d), weight.dtype),
            None if bias is None else as_dtype(g2d.sum(0), bias.dtype))


class _TritonLayerDirect(torch.autograd.Function):
    """The whole triton layer (module docstring) as one autograd node, for plain eager calls:
    the same kernels and torch ops as ``_layer(_triton_attend, _triton_layer_norm, ...)``, but
    the backward is written out (projection GEMMs, bias sums, the core and LayerNorm backward
    kernels) instead of a dozen autograd nodes, weight casts and their cast-backs, each of
    which costs host time on a slow host. Saves what the node-by-node path saves: the
    LayerNorm inputs and statistics, the normalised tokens, q, kv, o, lse and the weights in
    the compute dtype."""

    @staticmethod
    def forward(ctx, x_q, x_kv, q_weight, q_bias, kv_weight, kv_bias, out_weight, out_bias, key_mask,
                norm_q_weight, norm_q_bias, norm_kv_weight, norm_kv_bias, heads, pre_norm, eps, c):
        a_q, a_kv, stats = x_q, x_kv, (None,) * 4
        if pre_norm:
            a_q, mean_q, rstd_q = _layer_norm_op.body(x_q, norm_q_weight, norm_q_bias, float(eps), compute_dtype(x_q))
            a_kv, mean_kv, rstd_kv = _layer_norm_op.body(x_kv, norm_kv_weight, norm_kv_bias, float(eps),
                                                      compute_dtype(x_kv))
            stats = (mean_q, rstd_q, mean_kv, rstd_kv)
        a_q, a_kv = as_dtype(a_q, c), as_dtype(a_kv, c)
        weights = [as_dtype(w, c) for w in (q_weight, kv_weight, out_weight)]
        q = F.linear(a_q, weights[0], as_dtype(q_bias, c))
        kv = F.linear(a_kv, weights[1], as_dtype(kv_bias, c))
        _check_projections(q, kv)
        o, lse = _core_op.body(q, kv, key_mask, heads)
        y = x_q + F.linear(o, weights[2], as_dtype(out_bias, c))
        ln_inputs = (x_q, x_kv) if pre_norm else (None, None)  # else only their dtypes are needed
        ctx.save_for_backward(*ln_inputs, a_q, a_kv, q, kv, o, lse, key_mask, *weights, q_weight, q_bias,
                              kv_weight, kv_bias, out_weight, out_bias, norm_q_weight, norm_q_bias,
                              norm_kv_weight, norm_kv_bias, *stats)
        ctx.heads, ctx.pre_norm, ctx.x_dtypes = heads, pre_norm, (x_q.dtype, x_kv.dtype)
        return y

    @staticmethod
    @functools.partial(differentiable_once, "cross_attention")
    def backward(ctx, dy):
        (x_q, x_kv, a_q, a_kv, q, kv, o, lse, key_mask, q_w, kv_w, out_w, q_weight, q_bias, kv_weight,
         kv_bias, out_weight, out_bias, nq_w, nq_b, nkv_w, nkv_b, mean_q, rstd_q, mean_kv, rstd_kv) = saved_tensors(ctx)
        D = a_q.shape[-1]
        g = as_dtype(dy, out_w.dtype).reshape(-1, D)
        d_o, d_out_w, d_out_b = _linear_grads(g, o.reshape(-1, D), out_w, out_weight, out_bias)
        dq, dkv = _core_backward_op.body(d_o.view(o.shape), q, kv, o, lse, key_mask, ctx.heads)
        da_q, d_q_w, d_q_b = _linear_grads(dq.reshape(-1, D), a_q.reshape(-1, D), q_w, q_weight, q_bias)
        da_kv, d_kv_w, d_kv_b = _linear_grads(dkv.reshape(-1, 2 * D), a_kv.reshape(-1, D), kv_w, kv_weight,
                                              kv_bias)
        da_q, da_kv = da_q.view(a_q.shape), da_kv.view(a_kv.shape)
        norm_grads = [None] * 4
        if ctx.pre_norm:
            dx_q, dparams_q = _layer_norm_backward_op.body(da_q, x_q, nq_w, mean_q, rstd_q)
            dx_kv, dparams_kv = _layer_norm_backward_op.body(da_kv, x_kv, nkv_w, mean_kv, rstd_kv)
            norm_grads = [None if p is None else as_dtype(dparams[row], p.dtype)
                          for p, dparams, row in ((nq_w, dparams_q, 0), (nq_b, dparams_q, 1),
                                                  (nkv_w, dparams_kv, 0), (nkv_b, dparams_kv, 1))]
        else:
            dx_q, dx_kv = (as_dtype(grad, dtype) for grad, dtype in zip((da_q, da_kv), ctx.x_dtypes))
        return (as_dtype(dy, ctx.x_dtypes[0]) + dx_q, dx_kv, d_q_w, d_q_b, d_kv_w, d_kv_b, d_out_w, d_out_b, None,
                *norm_grads, None, None, None, None)


def cross_attention_triton(x_q, x_kv, heads, q_weight, q_bias, kv_weight, kv_bias, out_weight,
                           out_bias, key_mask=None, norm_q_weight=None, norm_q_bias=None,
                           norm_kv_weight=None, norm_kv_bias=None, pre_norm=True, eps=1e-5):
    """Triton backend: fused LayerNorms, torch projections/residual, fused attention core."""
    head_dim = x_q.shape[-1] // heads
    if head_dim > TRITON_MAX_HEAD_DIM:
        raise ValueError(f"cross_attention: the triton backend supports head dims <= "
                         f"{TRITON_MAX_HEAD_DIM}, got dim {x_q.shape[-1]} / heads {heads} = "
                         f"{head_dim}; backend 'auto' picks one that does")
    c = _direct_layer_dtype(x_q, x_kv, (q_weight, q_bias, kv_weight, kv_bias, out_weight, out_bias))
    if c is not None and x_q.shape[-1] <= MAX_LAYER_NORM_DIM and direct_call_allowed(x_q):
        return _TritonLayerDirect.apply(x_q, x_kv, q_weight, q_bias, kv_weight, kv_bias, out_weight,
                                        out_bias, key_mask, norm_q_weight, norm_q_bias, norm_kv_weight,
                                        norm_kv_bias, heads, pre_norm, eps, c)
    return _layer(_triton_attend, _triton_layer_norm, x_q, x_kv, heads, q_weight, q_bias,
                  kv_weight, kv_bias, out_weight, out_bias, key_mask, norm_q_weight, norm_q_bias,
                  norm_kv_weight, norm_kv_bias, pre_norm, eps)


# --- cpp backend ------------------------------------------------------------------------------
# The C++ CPU kernels (csrc/cross_attention.cpp) and CUDA kernels (csrc/cross_attention_kernels.cu,
# bound by csrc/cross_attention_cuda.cpp) are the custom ops bharnet::cross_attention_core_cpp
# and bharnet::cross_attention_core_cpp_backward, with the schemas, outputs (lse in the
# accumulation dtype: float64 for float64 inputs, else float32) and autograd of the Triton core
# op, except that the backward takes no o (it forms delta = rowsum(P * dP) from the recomputed
# P); they get names of their own because bharnet::cross_attention_core is the Triton op (on
# CPU it runs the Triton interpreter, which the Triton tests rely on). On CUDA, float16/bfloat16
# run flash-attention-style tensor-core kernels on sm_80+ (csrc/cross_attention_mma_kernels.cu,
# not yet timed on a GPU), float32/float64 a SIMT design (one warp per query row, or per key row
# for dk/dv); the triton backend is what ``auto`` picks on a GPU.

CPP_CPU_DTYPES = (torch.float32, torch.float64)
CPP_CUDA_MAX_HEAD_DIM = 128

def _register_cpp_ops_now() -> None:
    """Fake impls and autograd of the C++ ops (run once, after the extension is loaded)."""
    torch.library.register_fake("bharnet::cross_attention_core_cpp")(_core_fake)

    @torch.library.register_fake("bharnet::cross_attention_core_cpp_backward")
    def _(grad_o, q, kv, lse, key_mask, heads):
        return q.new_empty(q.shape), kv.new_empty(kv.shape)

    def core_backward(grad_o, q, kv, o, lse, key_mask, heads):
        return torch.ops.bharnet.cross_attention_core_cpp_backward(grad_o, q, kv, lse, key_mask, heads)

    torch.library.register_autograd("bharnet::cross_attention_core_cpp",
                                    _autograd_backward(core_backward), setup_context=_setup_context)
    refuse_double_backward("bharnet::cross_attention_core_cpp_backward", "cross_attention_core_cpp")


_register_cpp_ops = registered_after_loading(_register_cpp_ops_now)


def _cpp_attend(q, kv, key_mask, heads):
    """The C++ attention core in q's dtype (kv cast to it). The CPU kernels take float32/float64:
    on CPU, float16/bfloat16 q and kv (autocast) are computed in float32 and the output cast
    back (gradients flow back through the casts); the CUDA kernels take them as they are."""
    _register_cpp_ops()
    compute = q.dtype
    if q.device.type == "cpu" and compute not in CPP_CPU_DTYPES:
        compute = torch.float32
    o = torch.ops.bharnet.cross_attention_core_cpp(as_dtype(q, compute), as_dtype(kv, compute), key_mask, heads)[0]
    return as_dtype(o, q.dtype)


def cross_attention_cpp(x_q, x_kv, heads, q_weight, q_bias, kv_weight, kv_bias, out_weight,
                        out_bias, key_mask=None, norm_q_weight=None, norm_q_bias=None,
                        norm_kv_weight=None, norm_kv_bias=None, pre_norm=True, eps=1e-5):
    """C++ backend (CPU, or CUDA for head dims <= 128): torch LayerNorms and residual, the
    projections through oneDNN on a non-Intel CPU in float32 (``cpu_linear``; F.linear otherwise), C++/CUDA
    attention core."""
    head_dim = x_q.shape[-1] // heads
    if x_q.device.type == "cuda" and head_dim > CPP_CUDA_MAX_HEAD_DIM:
        raise ValueError(f"cross_attention: the cpp backend's CUDA kernels support head dims <= "
                         f"{CPP_CUDA_MAX_HEAD_DIM}, got dim {x_q.shape[-1]} / heads {heads} = "
                         f"{head_dim}; backend 'auto' picks one that does")
    return _layer(_cpp_attend, _torch_layer_norm, x_q, x_kv, heads, q_weight, q_bias, kv_weight,
                  kv_bias, out_weight, out_bias, key_mask, norm_q_weight, norm_q_bias,
                  norm_kv_weight, norm_kv_bias, pre_norm, eps, linear=cpu_linear.linear)


_cpp_availability = cpp_backend_availability("cross_attention_core_cpp")


_IMPLS = {"reference": cross_attention_reference, "triton": cross_attention_triton,
          "cpp": cross_attention_cpp}


def _backends_that_cannot_take(x_q: Tensor, heads: int) -> Tuple[str, ...]:
    """The backends whose kernels cannot take this head dim (``auto`` passes over them)."""
    head_dim = x_q.shape[-1] // heads
    refused = ("triton",) if head_dim > TRITON_MAX_HEAD_DIM else ()
    if x_q.device.type == "cuda" and head_dim > CPP_CUDA_MAX_HEAD_DIM:
        refused += ("cpp",)
    return refused


register_backend(OP_NAME, "triton", triton_availability)
register_backend(OP_NAME, "cpp", _cpp_availability)


def _expect(name, t, shape, ref, optional=False):
    if t is None and optional:
        return
    expect_tensor(OP_NAME, name, t, shape, ref, "x_q", floating=name != "key_mask")


def validate(x_q, x_kv, heads, q_weight, q_bias, kv_weight, kv_bias, out_weight, out_bias,
             key_mask, norm_q_weight, norm_q_bias, norm_kv_weight, norm_kv_bias):
    if not isinstance(x_q, torch.Tensor) or x_q.dim() != 3:
        got = tuple(x_q.shape) if isinstance(x_q, torch.Tensor) else type(x_q).__name__
        raise ValueError(f"cross_attention: x_q must have shape (N, Lq, dim), got {got}")
    N, Lq, D = x_q.shape
    _expect("x_q", x_q, x_q.shape, x_q)
    if not isinstance(x_kv, torch.Tensor) or x_kv.dim() != 3:
        got = tuple(x_kv.shape) if isinstance(x_kv, torch.Tensor) else type(x_kv).__name__
        raise ValueError(f"cross_attention: x_kv must have shape ({N}, Lk, {D}), got {got}")
    Lk = x_kv.shape[1]
    _expect("x_kv", x_kv, (N, Lk, D), x_q)
    if Lq == 0 or Lk == 0:
        raise ValueError(f"cross_attention: x_q and x_kv need at least one token, got Lq={Lq}, Lk={Lk}")
    if not isinstance(heads, int) or isinstance(heads, bool) or heads < 1 or D % heads != 0:
        raise ValueError(f"cross_attention: heads must be a positive int dividing dim={D}, got {heads!r}")
    _expect("q_weight", q_weight, (D, D), x_q)
    _expect("q_bias", q_bias, (D,), x_q, optional=True)
    _expect("kv_weight", kv_weight, (2 * D, D), x_q)
    _expect("kv_bias", kv_bias, (2 * D,), x_q, optional=True)
    _expect("out_weight", out_weight, (D, D), x_q)
    _expect("out_bias", out_bias, (D,), x_q, optional=True)
    for name, t in (("norm_q_weight", norm_q_weight), ("norm_q_bias", norm_q_bias),
                    ("norm_kv_weight", norm_kv_weight), ("norm_kv_bias", norm_kv_bias)):
        _expect(name, t, (D,), x_q, optional=True)
    _expect("key_mask", key_mask, (N, Lk), x_q, optional=True)
    if not torch.is_autocast_enabled(x_q.device.type):  # (autocast casts the projections' operands)
        for name, t in (("x_kv", x_kv), ("q_weight", q_weight), ("q_bias", q_bias), ("kv_weight", kv_weight),
                        ("kv_bias", kv_bias), ("out_weight", out_weight), ("out_bias", out_bias)):
            if t is not None and t.dtype != x_q.dtype:
                raise TypeError(f"cross_attention: {name} is {t.dtype}, x_q {x_q.dtype}: the projections take "
                                "one dtype (cast them, or run under torch.autocast)")
    if key_mask is not None and key_mask.dtype != torch.bool:
        raise TypeError(f"cross_attention: key_mask must be a bool tensor (True = may be "
                        f"attended), got {key_mask.dtype}")


def cross_attention(x_q: Tensor, x_kv: Tensor, heads: int, q_weight: Tensor,
                    q_bias: Optional[Tensor], kv_weight: Tensor, kv_bias: Optional[Tensor],
                    out_weight: Tensor, out_bias: Optional[Tensor],
                    key_mask: Optional[Tensor] = None, norm_q_weight: Optional[Tensor] = None,
                    norm_q_bias: Optional[Tensor] = None, norm_kv_weight: Optional[Tensor] = None,
                    norm_kv_bias: Optional[Tensor] = None, pre_norm: bool = True, eps: float = 1e-5,
                    *, backend: Optional[str] = None) -> Tensor:
    """``x_q + MHA(LN_q(x_q), LN_kv(x_kv)) W_o^T + b_o`` (math and shapes in the module docstring).

    ``x_q`` (N, Lq, dim), ``x_kv`` (N, Lk, dim); weights as in ``nn.Linear``: ``q_weight``
    (dim, dim), ``kv_weight`` (2 dim, dim) producing [k | v], ``out_weight`` (dim, dim);
    biases (and LayerNorm affine parameters, shape (dim,)) may be None; ``key_mask`` (N, Lk)
    bool, True = may be attended. Returns (N, Lq, dim)."""
    validate(x_q, x_kv, heads, q_weight, q_bias, kv_weight, kv_bias, out_weight, out_bias,
             key_mask, norm_q_weight, norm_q_bias, norm_kv_weight, norm_kv_bias)
    impl = _IMPLS[resolve(OP_NAME, backend, x_q.device.type, _backends_that_cannot_take(x_q, heads))]
    return impl(x_q, x_kv, heads, q_weight, q_bias, kv_weight, kv_bias, out_weight, out_bias,
                key_mask, norm_q_weight, norm_q_bias, norm_kv_weight, norm_kv_bias, pre_norm, eps)
