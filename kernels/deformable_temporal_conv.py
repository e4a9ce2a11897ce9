r"""Triton kernels for the deformable temporal convolution (DeTGC), forward and backward.

Notation (see ``bharnet/ops/deformable_temporal_conv.py``): ``x`` (B, C, T, V), offsets
``tau`` (E,), ``weight`` W (O, C, E), stride ``s``, ``T_out = (T - 1) // s + 1``, ``N = T_out·V``
flattened as ``n = t'·V + v``, and the flattened tap index ``k = c·E + e`` (K = C·E).
Sampling positions are shared by every (b, c, v)::

    r[t', e] = t'·s + tau[e];   p = clamp(r, 0, T-1);   p0 = floor(p);   p1 = min(p0+1, T-1);
    w = p - p0;   xs[b, k, n] = (1-w)·x[b, c, p0, v] + w·x[b, c, p1, v]

The clamp's derivative at exactly r = 0 or r = T-1 follows the installed torch's
``torch.clamp`` (1 in older releases, 0 after pytorch#191142's minimum-norm subgradient; torch
2.14.1 gives 0), probed once at import, so that the kernel matches the reference everywhere;
``BOUNDS_PASS_GRAD`` selects it.

Kernels (all accumulate in fp32, or fp64 for fp64 inputs; tensor-core operands in x's dtype,
fp32 operands with ``input_precision=DOT_PRECISION``):

- ``_forward_kernel``: ``y[b, o, n] = bias[o] + Σ_k W[o, k]·xs[b, k, n]``, a GEMM per b whose
  B-operand tile is gathered and interpolated from x while loading. Grid (n-blocks, o-blocks, B).
- ``_param_grad_kernel``: split-K GEMMs over the reduction index (b, n)::

      dW[o, k] = Σ_{b,n} dy[b, o, n]·xs[b, k, n]
      D[o, k]  = Σ_{b,n} dy[b, o, n]·dxs[b, k, n],   dxs = 1[0 ≤ r ≤ T-1]·(x[p1] - x[p0])
                 (strict inequalities where torch's clamp has derivative 0 at its bounds)
      dbias[o] = Σ_{b,n} dy[b, o, n]

  and then ``dtau[e] = Σ_{o,c} W[o, c, e]·D[o, c, e]``. This equals the chain rule
  ``Σ_{b,c,t',v} g[b,c,t',e,v]·dxs`` with ``g = Wᵀ·dy`` but reorders the sums so that g never
  exists and the x gathers are shared with dW. Each program writes its partial sums to a
  ``(splits, O, K)`` fp32 buffer (deterministic; no atomics) that the launcher sums.
- ``_input_grad_kernel``: dx as a gather. Each (t', e) sends ``(1-w)·g`` to row p0 and
  ``w·g`` to row p1 of dx, where ``g[b, c, t', e, v] = Σ_o W[o, c, e]·dy[b, o, t', v]``. A small
  table lists, for every input row t, the (t', e, coefficient) entries that land on it (CSR,
  ``2·T_out·E`` entries); the program for (b, t) walks its entries and accumulates
  ``coef·(W[:, :, e]ᵀ·dy[b, :, t', :])``. Every dx element is written exactly once, in x's
  dtype: deterministic, no zero-fill, no fp32 scratch copy of dx, no atomics. g is recomputed
  about twice (once for p0, once for p1), which is cheap next to the traffic it saves.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from bharnet.ops.deformable_temporal_conv import clamp_passes_gradient_at_bounds

TARGET_PROGRAMS = 256  # enough programs along the split-K axis to fill a large GPU
_DOT_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16,
               torch.float32: tl.float32, torch.float64: tl.float64}


CLAMP_PASSES_GRADIENT_AT_BOUNDS = clamp_passes_gradient_at_bounds()


@triton.jit
def _sample_positions(t_out, e, tau_ptr, stride, T, POS_DTYPE: tl.constexpr):
    """(p0, p1, w, r) for broadcastable index tensors ``t_out`` and ``e``; r = t'·s + tau[e]."""
    tau = tl.load(tau_ptr + e).to(POS_DTYPE)
    r = (t_out * stride).to(POS_DTYPE) + tau
    p = tl.minimum(tl.maximum(r, 0.0), T - 1.0)
    p0 = p.to(tl.int32)  # p >= 0, so truncation is floor
    w = p - p0.to(POS_DTYPE)
    p0 = tl.minimum(tl.maximum(p0, 0), T - 1)  # keeps NaN offsets from reading out of bounds
    p1 = tl.minimum(p0 + 1, T - 1)
    return p0, p1, w, r


@triton.jit
def _clamp_passes(r, T, BOUNDS_PASS_GRAD: tl.constexpr):
    """Where clamp(r, 0, T-1) has derivative 1: [0, T-1] if ``BOUNDS_PASS_GRAD``, else (0, T-1)."""
    if BOUNDS_PASS_GRAD:
        inside = (r >= 0.0) & (r <= T - 1.0)
    else:
        inside = (r > 0.0) & (r < T - 1.0)
    return inside


@triton.jit
def _gather_rows(x_b_ptr, c, p0, p1, v, mask, T, V, ACC_DTYPE: tl.constexpr):
    """x[b, c, p0, v] and x[b, c, p1, v] (zero where masked) in the accumulation dtype."""
    row = x_b_ptr + c * (T * V) + v
    x0 = tl.load(row + p0 * V, mask=mask, other=0.0).to(ACC_DTYPE)
    x1 = tl.load(row + p1 * V, mask=mask, other=0.0).to(ACC_DTYPE)
    return x0, x1


@triton.jit
def _forward_kernel(x_ptr, tau_ptr, w_ptr, bias_ptr, y_ptr,
                    C, T, V, O, T_out, stride,
                    E: tl.constexpr, HAS_BIAS: tl.constexpr,
                    BLOCK_O: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                    DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
                    ACC_DTYPE: tl.constexpr, POS_DTYPE: tl.constexpr):
    """y[b, o, n] = bias[o] + Σ_k W[o, k]·xs[b, k, n] (xs gathered on the fly, never stored)."""
    pid_n = tl.program_id(0)
    pid_o = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    N = T_out * V
    K = C * E
    offs_o = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    t_out = (offs_n // V)[None, :]
    v = (offs_n % V)[None, :]
    x_b_ptr = x_ptr + b * C * T * V
    acc = tl.zeros((BLOCK_O, BLOCK_N), dtype=ACC_DTYPE)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        c = (offs_k // E)[:, None]
        e = (offs_k % E)[:, None]
        w_tile = tl.load(w_ptr + offs_o[:, None] * K + offs_k[None, :],
                         mask=(offs_o[:, None] < O) & (offs_k[None, :] < K), other=0.0)
        p0, p1, frac, _ = _sample_positions(t_out, e, tau_ptr, stride, T, POS_DTYPE)
        mask = (offs_k[:, None] < K) & (offs_n[None, :] < N)
        x0, x1 = _gather_rows(x_b_ptr, c, p0, p1, v, mask, T, V, ACC_DTYPE)
        frac = frac.to(ACC_DTYPE)
        xs = (1.0 - frac) * x0 + frac * x1
        acc = tl.dot(w_tile.to(DOT_DTYPE), xs.to(DOT_DTYPE), acc, input_precision=DOT_PRECISION,
                     out_dtype=ACC_DTYPE)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_o, mask=offs_o < O, other=0.0).to(ACC_DTYPE)[:, None]
    y_ptrs = y_ptr + b * O * N + offs_o[:, None] * N + offs_n[None, :]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty),
             mask=(offs_o[:, None] < O) & (offs_n[None, :] < N))


@triton.jit
def _param_grad_kernel(x_ptr, tau_ptr, dy_ptr, dw_part_ptr, dpos_part_ptr, dbias_part_ptr,
                       B, C, T, V, O, T_out, stride, tiles_per_split,
                       E: tl.constexpr, BOUNDS_PASS_GRAD: tl.constexpr,
                       BLOCK_O: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                       DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
                       ACC_DTYPE: tl.constexpr, POS_DTYPE: tl.constexpr):
    """Partial sums of dW = dy·xsᵀ, D = dy·dxsᵀ and dbias = Σ dy over a slice of (b, n)-tiles.

    Grid (k-blocks, o-blocks, splits); program ``split`` reduces tiles
    ``[split·tiles_per_split, (split+1)·tiles_per_split)`` of the flattened (b, n-block) index and
    writes ``dw_part[split]``, ``dpos_part[split]`` (O, K) and, from the k-block-0 programs,
    ``dbias_part[split]`` (O,)."""
    pid_k = tl.program_id(0)
    pid_o = tl.program_id(1)
    split = tl.program_id(2)
    N = T_out * V
    K = C * E
    offs_o = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    c = (offs_k // E)[None, :]
    e = (offs_k % E)[None, :]
    n_blocks = tl.cdiv(N, BLOCK_N)
    first = split * tiles_per_split
    stop = tl.minimum(first + tiles_per_split, B * n_blocks)
    acc_w = tl.zeros((BLOCK_O, BLOCK_K), dtype=ACC_DTYPE)
    acc_d = tl.zeros((BLOCK_O, BLOCK_K), dtype=ACC_DTYPE)
    acc_b = tl.zeros((BLOCK_O,), dtype=ACC_DTYPE)
    for tile in range(first, stop):
        b = (tile // n_blocks).to(tl.int64)
        offs_n = (tile % n_blocks) * BLOCK_N + tl.arange(0, BLOCK_N)
        t_out = (offs_n // V)[:, None]
        v = (offs_n % V)[:, None]
        dy_tile = tl.load(dy_ptr + b * O * N + offs_o[:, None] * N + offs_n[None, :],
                          mask=(offs_o[:, None] < O) & (offs_n[None, :] < N), other=0.0)
        p0, p1, frac, r = _sample_positions(t_out, e, tau_ptr, stride, T, POS_DTYPE)
        mask = (offs_n[:, None] < N) & (offs_k[None, :] < K)
        x0, x1 = _gather_rows(x_ptr + b * C * T * V, c, p0, p1, v, mask, T, V, ACC_DTYPE)
        frac = frac.to(ACC_DTYPE)
        xs_t = (1.0 - frac) * x0 + frac * x1
        dxs_t = tl.where(_clamp_passes(r, T, BOUNDS_PASS_GRAD), x1 - x0, 0.0)
        dy_dot = dy_tile.to(DOT_DTYPE)
        acc_w = tl.dot(dy_dot, xs_t.to(DOT_DTYPE), acc_w, input_precision=DOT_PRECISION,
                       out_dtype=ACC_DTYPE)
        acc_d = tl.dot(dy_dot, dxs_t.to(DOT_DTYPE), acc_d, input_precision=DOT_PRECISION,
                       out_dtype=ACC_DTYPE)
        acc_b += tl.sum(dy_tile.to(ACC_DTYPE), axis=1)
    part = split.to(tl.int64) * O * K + offs_o[:, None] * K + offs_k[None, :]
    mask_ok = (offs_o[:, None] < O) & (offs_k[None, :] < K)
    tl.store(dw_part_ptr + part, acc_w, mask=mask_ok)
    tl.store(dpos_part_ptr + part, acc_d, mask=mask_ok)
    if pid_k == 0:
        tl.store(dbias_part_ptr + split * O + offs_o, acc_b, mask=offs_o < O)


@triton.jit
def _input_grad_kernel(dy_ptr, w_ptr, row_start_ptr, entry_src_ptr, entry_coef_ptr, dx_ptr,
                       C, T, V, O, T_out,
                       E: tl.constexpr,
                       BLOCK_C: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_O: tl.constexpr,
                       DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
                       ACC_DTYPE: tl.constexpr):
    """dx[b, c, t, v] = Σ_{(t', e, coef) ∈ entries(t)} coef · Σ_o W[o, c, e]·dy[b, o, t', v].

    Grid (B·T, c-blocks, v-blocks). ``entries(t)`` are rows ``row_start[t] .. row_start[t+1]`` of
    the CSR table: ``entry_src = t'·E + e`` and ``entry_coef`` = 1-w (t = p0) or w (t = p1)."""
    pid_bt = tl.program_id(0)
    pid_c = tl.program_id(1)
    pid_v = tl.program_id(2)
    b = (pid_bt // T).to(tl.int64)
    t = pid_bt % T
    N = T_out * V
    K = C * E
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    offs_v = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    dy_b_ptr = dy_ptr + b * O * N
    acc = tl.zeros((BLOCK_C, BLOCK_V), dtype=ACC_DTYPE)
    for i in range(tl.load(row_start_ptr + t), tl.load(row_start_ptr + t + 1)):
        src = tl.load(entry_src_ptr + i)
        coef = tl.load(entry_coef_ptr + i).to(ACC_DTYPE)
        t_out = src // E
        e = src % E
        for o0 in range(0, O, BLOCK_O):
            offs_o = o0 + tl.arange(0, BLOCK_O)
            w_t = tl.load(w_ptr + offs_o[None, :] * K + offs_c[:, None] * E + e,
                          mask=(offs_c[:, None] < C) & (offs_o[None, :] < O), other=0.0)
            dy_tile = tl.load(dy_b_ptr + offs_o[:, None] * N + t_out * V + offs_v[None, :],
                              mask=(offs_o[:, None] < O) & (offs_v[None, :] < V), other=0.0)
            g = tl.dot(w_t.to(DOT_DTYPE), dy_tile.to(DOT_DTYPE), input_precision=DOT_PRECISION,
                       out_dtype=ACC_DTYPE)
            acc += coef * g
    dx_ptrs = dx_ptr + b * C * T * V + offs_c[:, None] * (T * V) + t * V + offs_v[None, :]
    tl.store(dx_ptrs, acc.to(dx_ptr.dtype.element_ty),
             mask=(offs_c[:, None] < C) & (offs_v[None, :] < V))


def _empty(shape, device, dtype) -> torch.Tensor:
    """Allocation of every output and scratch buffer (tests poison it to catch unwritten cells)."""
    return torch.empty(shape, device=device, dtype=dtype)


def _block(n: int, lo: int, hi: int) -> int:
    """Power-of-two block for a dimension of size n, within [lo, hi] (tl.dot needs >= 16)."""
    return min(max(triton.next_power_of_2(n), lo), hi)


def _accumulation_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _position_dtype(x: torch.Tensor, offsets: torch.Tensor) -> torch.dtype:
    return torch.float64 if torch.float64 in (x.dtype, offsets.dtype) else torch.float32


def _dot_args(x: torch.Tensor) -> dict:
    """Kernel dtype arguments: dot operands in x's dtype, fp32 operands multiplied exactly
    ("ieee", not TF32; the setting is ignored for 16-bit operands), accumulation in fp32
    (fp64 for fp64 x)."""
    return dict(DOT_DTYPE=_DOT_DTYPES[x.dtype],
                DOT_PRECISION="ieee" if x.dtype in (torch.float32, torch.float64) else "tf32",
                ACC_DTYPE=_DOT_DTYPES[_accumulation_dtype(x)])


def _pos_arg(x: torch.Tensor, offsets: torch.Tensor) -> tl.dtype:
    """Sampling positions in fp32 (fp64 if x or offsets is fp64)."""
    return _DOT_DTYPES[_position_dtype(x, offsets)]


def forward(x, offsets, weight, bias, stride: int) -> torch.Tensor:
    """Launch the forward kernel; inputs are made contiguous, output has x's dtype."""
    x, offsets, weight = x.contiguous(), offsets.contiguous(), weight.contiguous()
    B, C, T, V = x.shape
    O, E = weight.shape[0], offsets.shape[0]
    T_out = (T - 1) // stride + 1
    y = _empty((B, O, T_out, V), x.device, x.dtype)
    if y.numel() == 0:
        return y
    BLOCK_O, BLOCK_N = _block(O, 16, 64), _block(T_out * V, 16, 64)
    BLOCK_K = _block(C * E, 16, 32)
    grid = (triton.cdiv(T_out * V, BLOCK_N), triton.cdiv(O, BLOCK_O), B)
    _forward_kernel[grid](
        x, offsets, weight, bias.contiguous() if bias is not None else weight, y,
        C, T, V, O, T_out, stride,
        E=E, HAS_BIAS=bias is not None, BLOCK_O=BLOCK_O, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K,
        POS_DTYPE=_pos_arg(x, offsets), **_dot_args(x))
    return y


def _param_grads(dy, x, offsets, weight, stride: int):
    """(doffsets, dweight, dbias) in the accumulation dtype, via ``_param_grad_kernel``.

    Temporaries: two ``(splits, O, C·E)`` partial buffers and one ``(splits, O)`` in the
    accumulation dtype, with ``splits <= max(1, TARGET_PROGRAMS // (#o-blocks·#k-blocks))``:
    at most ``max(TARGET_PROGRAMS, #o-blocks·#k-blocks)·BLOCK_O·BLOCK_K`` elements each, i.e.
    ≤ 2 MB in fp32 (256·64·32·4 B), or about the size of dW itself when dW is larger."""
    B, C, T, V = x.shape
    O, E = weight.shape[0], offsets.shape[0]
    T_out = dy.shape[2]
    K = C * E
    BLOCK_O, BLOCK_N, BLOCK_K = _block(O, 16, 64), _block(T_out * V, 16, 64), _block(K, 16, 32)
    grid_ok = triton.cdiv(K, BLOCK_K) * triton.cdiv(O, BLOCK_O)
    n_tiles = B * triton.cdiv(T_out * V, BLOCK_N)
    tiles_per_split = triton.cdiv(n_tiles, min(n_tiles, max(1, TARGET_PROGRAMS // grid_ok)))
    splits = triton.cdiv(n_tiles, tiles_per_split)
    acc = _accumulation_dtype(x)
    dw_part = _empty((splits, O, K), x.device, acc)
    dpos_part = _empty((splits, O, K), x.device, acc)
    dbias_part = _empty((splits, O), x.device, acc)
    grid = (triton.cdiv(K, BLOCK_K), triton.cdiv(O, BLOCK_O), splits)
    _param_grad_kernel[grid](
        x, offsets, dy, dw_part, dpos_part, dbias_part,
        B, C, T, V, O, T_out, stride, tiles_per_split,
        E=E, BOUNDS_PASS_GRAD=CLAMP_PASSES_GRADIENT_AT_BOUNDS,
        BLOCK_O=BLOCK_O, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K,
        POS_DTYPE=_pos_arg(x, offsets), **_dot_args(x))
    dweight = dw_part.sum(0).view(O, C, E)
    doffsets = (weight.to(acc) * dpos_part.sum(0).view(O, C, E)).sum((0, 1))
    return doffsets, dweight, dbias_part.sum(0)


def scatter_table(offsets: torch.Tensor, T: int, stride: int, pos_dtype: torch.dtype):
    """CSR table of the interpolation scatter, on offsets' device, without host syncs.

    Returns ``(row_start (T+1,) int32, entry_src (2·T_out·E,) int32, entry_coef (2·T_out·E,))``:
    entries ``row_start[t] .. row_start[t+1]`` are the (t'·E + e, coefficient) pairs whose
    sample lands on input row t, coefficient 1-w for row p0 and w for row p1. The positions are
    computed exactly as in the kernels (``t'·s`` exact, one rounding for ``+ tau``, clamp,
    floor), so each entry matches the forward's sample bit for bit."""
    E = offsets.shape[0]
    T_out = (T - 1) // stride + 1
    t_out = torch.arange(T_out, device=offsets.device, dtype=pos_dtype) * stride
    p = (t_out[:, None] + offsets.to(pos_dtype)[None, :]).clamp(0, T - 1).flatten()
    p0 = p.floor()
    w = p - p0
    i0 = p0.long()
    rows = torch.cat([i0, (i0 + 1).clamp(max=T - 1)])
    coef = torch.cat([1 - w, w])
    src = torch.arange(T_out * E, device=offsets.device, dtype=torch.int32).repeat(2)
    sorted_rows, order = torch.sort(rows, stable=True)
    row_ids = torch.arange(T + 1, device=offsets.device)
    row_start = torch.searchsorted(sorted_rows, row_ids, out_int32=True)
    return row_start, src[order].contiguous(), coef[order].contiguous()


def _input_grad(dy, x, offsets, weight, stride: int) -> torch.Tensor:
    """dx in x's dtype via ``_input_grad_kernel``."""
    B, C, T, V = x.shape
    O, E = weight.shape[0], offsets.shape[0]
    T_out = dy.shape[2]
    table = scatter_table(offsets, T, stride, _position_dtype(x, offsets))
    dx = _empty(x.shape, x.device, x.dtype)
    BLOCK_C, BLOCK_V, BLOCK_O = _block(C, 16, 64), _block(V, 16, 64), _block(O, 16, 64)
    grid = (B * T, triton.cdiv(C, BLOCK_C), triton.cdiv(V, BLOCK_V))
    _input_grad_kernel[grid](
        dy, weight, *table, dx,
        C, T, V, O, T_out,
        E=E, BLOCK_C=BLOCK_C, BLOCK_V=BLOCK_V, BLOCK_O=BLOCK_O,
        **_dot_args(x))
    return dx


def backward(dy, x, offsets, weight, stride: int):
    """(dx, doffsets, dweight, dbias): dx in x's dtype, the others in the accumulation dtype
    (fp32, fp64 for fp64 x); inputs are made contiguous."""
    dy, x = dy.contiguous(), x.contiguous()
    offsets, weight = offsets.contiguous(), weight.contiguous()
    if dy.numel() == 0 or x.numel() == 0:
        acc = _accumulation_dtype(x)
        return (torch.zeros_like(x), offsets.new_zeros(offsets.shape, dtype=acc),
                weight.new_zeros(weight.shape, dtype=acc),
                weight.new_zeros(weight.shape[:1], dtype=acc))
    dx = _input_grad(dy, x, offsets, weight, stride)
    doffsets, dweight, dbias = _param_grads(dy, x, offsets, weight, stride)
    return dx, doffsets, dweight, dbias
