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

Kernels accumulate in fp32 (fp64 for fp64 x) and use the weights rounded to x's dtype, as
the reference does. Dot operands are in x's dtype, except dx's (accumulation dtype); fp32
operands are multiplied exactly ("ieee") for fp32 x and in TF32 for 16-bit x (whose weights
TF32 holds exactly). Inputs are read through their strides (no copies); outputs are
contiguous. A forward + backward is three launches and no other torch op (allocations aside):

- ``_forward_kernel``: ``y[b, o, n] = bias[o] + Σ_k W[o, k]·xs[b, k, n]``, a GEMM per b whose
  B-operand tile is gathered and interpolated from x while loading. Grid (n-blocks, o-blocks, B).
- ``_param_grad_kernel``: split-K GEMMs over the reduction index (b, n)::

      dW[o, k] = Σ_{b,n} dy[b, o, n]·xs[b, k, n]
      D[o, k]  = Σ_{b,n} dy[b, o, n]·dxs[b, k, n],   dxs = 1[0 ≤ r ≤ T-1]·(x[p1] - x[p0])
                 (strict inequalities where torch's clamp has derivative 0 at its bounds)
      dbias[o] = Σ_{b,n} dy[b, o, n]
      dtau[e]  = Σ_{o,c} W[o, c, e]·D[o, c, e]

  This equals the chain rule ``Σ_{b,c,t',v} g[b,c,t',e,v]·dxs`` with ``g = Wᵀ·dy`` but reorders
  the sums so that g never exists and the x gathers are shared with dW. D never leaves the
  program: each folds its (o, k) tile of D into E partial sums of dtau. Each program writes its
  partial sums over its slice of (b, n) to a scratch buffer (deterministic; no atomics).
- ``_input_grad_kernel``: a few programs sum those partials over the slices into dW, dbias and
  dtau (the previous launch on the stream has completed them); the others compute dx, the
  transposed interpolation of dy followed by the transposed channel mix::

      dyi[b, o, e, t, v] = Σ_{t' ∈ S(t, e)} coef·dy[b, o, t', v]
      coef               = (1-w)·1[p0 = t] + w·1[p1 = t]
      dx[b, c, t, v]     = Σ_e Σ_o W[o, c, e]·dyi[b, o, e, t, v]

  where ``S(t, e) = {t' : p0[t', e] ∈ {t-1, t}}`` holds every output time whose sample touches
  row t. p0 is non-decreasing in t' (so is the rounded r: t'·s is exact), so S(t, e) is the
  range ``[first(t-1), first(t+1))`` with ``first(q) = min{t' : p0 ≥ q}`` (T_out if none):
  0 for q ≤ 0, which puts every t' clamped to row 0 in S(0, e); T_out for q ≥ T, which puts
  every t' clamped to row T-1 in S(T-1, e); otherwise ``ceil((q - tau)/s)``, moved by at most
  one step where rounding misplaced it, checked with the kernels' own p0
  (``_first_output_reaching``). The program for (b, t) walks these ranges (no table, no sort),
  accumulates dyi in the accumulation dtype and multiplies it by Wᵀ once per (e, o-block);
  every dx element is written once, in x's dtype.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from bharnet.ops._checks import accumulation_dtype
from bharnet.ops._custom_op import MAX_GRID_YZ, cdiv, new_output, next_pow2
from bharnet.ops.deformable_temporal_conv import clamp_passes_gradient_at_bounds

TARGET_PROGRAMS = 256  # enough programs along the split-K axis to fill a large GPU
SUM_BLOCK_S, SUM_BLOCK_R = 32, 128  # (splits, columns) tile of the partial-sum reduction
_DOT_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16,
               torch.float32: tl.float32, torch.float64: tl.float64}


CLAMP_PASSES_GRADIENT_AT_BOUNDS = clamp_passes_gradient_at_bounds()


@triton.jit
def _sample_positions(t_out, tau, stride, T):
    """(p0, p1, w, r) for broadcastable ``t_out`` (int) and ``tau`` (position dtype)."""
    r = (t_out * stride).to(tau.dtype) + tau
    # NaN-propagating clamp: a NaN offset (a diverged run) gives NaN outputs, as in the reference
    p = tl.minimum(tl.maximum(r, 0.0, propagate_nan=tl.PropagateNan.ALL), T - 1.0, propagate_nan=tl.PropagateNan.ALL)
    p0 = p.to(tl.int32)  # p >= 0, so truncation is floor
    w = p - p0.to(tau.dtype)
    p0 = tl.minimum(tl.maximum(p0, 0), T - 1)  # keeps NaN offsets from reading out of bounds
    p1 = tl.minimum(p0 + 1, T - 1)
    return p0, p1, w, r


@triton.jit
def _load_offsets(tau_ptr, e, s_tau, POS_DTYPE: tl.constexpr):
    return tl.load(tau_ptr + e * s_tau).to(POS_DTYPE)


@triton.jit
def _clamp_passes(r, T, BOUNDS_PASS_GRAD: tl.constexpr):
    """Where clamp(r, 0, T-1) has derivative 1: [0, T-1] if ``BOUNDS_PASS_GRAD``, else (0, T-1)."""
    if BOUNDS_PASS_GRAD:
        inside = (r >= 0.0) & (r <= T - 1.0)
    else:
        inside = (r > 0.0) & (r < T - 1.0)
    return inside


@triton.jit
def _gather_rows(x_b_ptr, c, p0, p1, v, mask, sx_c, sx_t, sx_v, ACC_DTYPE: tl.constexpr):
    """x[b, c, p0, v] and x[b, c, p1, v] (zero where masked) in the accumulation dtype."""
    row = x_b_ptr + c * sx_c + v * sx_v
    x0 = tl.load(row + p0 * sx_t, mask=mask, other=0.0).to(ACC_DTYPE)
    x1 = tl.load(row + p1 * sx_t, mask=mask, other=0.0).to(ACC_DTYPE)
    return x0, x1


@triton.jit
def _weight_tile(w_ptr, offs_o, offs_k, O, K, sw_o, sw_c, sw_e, E: tl.constexpr):
    """W[o, k] for an (o, k) tile (broadcast index tensors), zero outside (O, K)."""
    ptrs = w_ptr + offs_o * sw_o + (offs_k // E) * sw_c + (offs_k % E) * sw_e
    return tl.load(ptrs, mask=(offs_o < O) & (offs_k < K), other=0.0)


@triton.jit
def _forward_kernel(x_ptr, tau_ptr, w_ptr, bias_ptr, y_ptr,
                    sx_b, sx_c, sx_t, sx_v, s_tau, sw_o, sw_c, sw_e, s_bias,
                    C, T, V, O, T_out, stride,
                    E: tl.constexpr, HAS_BIAS: tl.constexpr,
                    BLOCK_O: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                    DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
                    ACC_DTYPE: tl.constexpr, POS_DTYPE: tl.constexpr):
    """y[b, o, n] = bias[o] + Σ_k W[o, k]·xs[b, k, n] (xs gathered on the fly, never stored).

    Inputs are read through their strides (s*); y is contiguous."""
    pid_n = tl.program_id(0)
    pid_o = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    N = T_out * V
    K = C * E
    offs_o = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    t_out = (offs_n // V)[None, :]
    v = (offs_n % V)[None, :]
    x_b_ptr = x_ptr + b * sx_b
    acc = tl.zeros((BLOCK_O, BLOCK_N), dtype=ACC_DTYPE)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        w_tile = _weight_tile(w_ptr, offs_o[:, None], offs_k[None, :], O, K, sw_o, sw_c, sw_e, E)
        tau = _load_offsets(tau_ptr, (offs_k % E)[:, None], s_tau, POS_DTYPE)
        p0, p1, frac, _ = _sample_positions(t_out, tau, stride, T)
        mask = (offs_k[:, None] < K) & (offs_n[None, :] < N)
        x0, x1 = _gather_rows(x_b_ptr, (offs_k // E)[:, None], p0, p1, v, mask, sx_c, sx_t, sx_v,
                              ACC_DTYPE)
        frac = frac.to(ACC_DTYPE)
        xs = (1.0 - frac) * x0 + frac * x1
        acc = tl.dot(w_tile.to(DOT_DTYPE), xs.to(DOT_DTYPE), acc, input_precision=DOT_PRECISION,
                     out_dtype=ACC_DTYPE)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_o * s_bias, mask=offs_o < O, other=0.0).to(ACC_DTYPE)[:, None]
    y_ptrs = y_ptr + b * O * N + offs_o[:, None] * N + offs_n[None, :]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty),
             mask=(offs_o[:, None] < O) & (offs_n[None, :] < N))


@triton.jit
def _sum_by_tap(values, offs_k, E: tl.constexpr, BLOCK_E: tl.constexpr):
    """out[e] = Σ_{k : k % E = e} values[k], a (BLOCK_E,) vector (zero for e ≥ E)."""
    taps = tl.arange(0, BLOCK_E)
    return tl.sum(tl.where((offs_k % E)[:, None] == taps[None, :], values[:, None], 0.0), axis=0)


@triton.jit
def _param_grad_kernel(x_ptr, tau_ptr, dy_ptr, w_ptr, part_ptr,
                       sx_b, sx_c, sx_t, sx_v, s_tau, sd_b, sd_o, sd_t, sd_v, sw_o, sw_c, sw_e,
                       B, C, T, V, O, T_out, stride, splits, tiles_per_split,
                       E: tl.constexpr, BOUNDS_PASS_GRAD: tl.constexpr,
                       BLOCK_O: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                       BLOCK_E: tl.constexpr,
                       DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
                       ACC_DTYPE: tl.constexpr, POS_DTYPE: tl.constexpr):
    """Partial sums of dW = dy·xsᵀ, dbias = Σ dy and dtau = Σ W ⊙ (dy·dxsᵀ) over a slice of
    (b, n)-tiles.

    Grid (k-blocks, o-blocks, splits); program ``split`` reduces tiles
    ``[split·tiles_per_split, (split+1)·tiles_per_split)`` of the flattened (b, n-block) index.
    ``part`` holds ``splits`` rows of ``O·K + O`` (dW then dbias, the latter from the k-block-0
    programs), then ``splits·#o-blocks·#k-blocks`` rows of E (dtau)."""
    pid_k = tl.program_id(0)
    pid_o = tl.program_id(1)
    split = tl.program_id(2)
    N = T_out * V
    K = C * E
    offs_o = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    c = (offs_k // E)[None, :]
    tau = _load_offsets(tau_ptr, (offs_k % E)[None, :], s_tau, POS_DTYPE)
    n_blocks = tl.cdiv(N, BLOCK_N)
    first = split * tiles_per_split
    stop = tl.minimum(first + tiles_per_split, B * n_blocks)
    acc_w = tl.zeros((BLOCK_O, BLOCK_K), dtype=ACC_DTYPE)
    acc_d = tl.zeros((BLOCK_O, BLOCK_K), dtype=ACC_DTYPE)
    acc_b = tl.zeros((BLOCK_O,), dtype=ACC_DTYPE)
    for tile in range(first, stop):
        b = (tile // n_blocks).to(tl.int64)
        offs_n = (tile % n_blocks) * BLOCK_N + tl.arange(0, BLOCK_N)
        t_out = offs_n // V
        v = offs_n % V
        dy_tile = tl.load(dy_ptr + b * sd_b + offs_o[:, None] * sd_o + (t_out * sd_t + v * sd_v)[None, :],
                          mask=(offs_o[:, None] < O) & (offs_n[None, :] < N), other=0.0)
        p0, p1, frac, r = _sample_positions(t_out[:, None], tau, stride, T)
        mask = (offs_n[:, None] < N) & (offs_k[None, :] < K)
        x0, x1 = _gather_rows(x_ptr + b * sx_b, c, p0, p1, v[:, None], mask, sx_c, sx_t, sx_v,
                              ACC_DTYPE)
        frac = frac.to(ACC_DTYPE)
        xs_t = (1.0 - frac) * x0 + frac * x1
        dxs_t = tl.where(_clamp_passes(r, T, BOUNDS_PASS_GRAD), x1 - x0, 0.0)
        dy_dot = dy_tile.to(DOT_DTYPE)
        acc_w = tl.dot(dy_dot, xs_t.to(DOT_DTYPE), acc_w, input_precision=DOT_PRECISION,
                       out_dtype=ACC_DTYPE)
        acc_d = tl.dot(dy_dot, dxs_t.to(DOT_DTYPE), acc_d, input_precision=DOT_PRECISION,
                       out_dtype=ACC_DTYPE)
        acc_b += tl.sum(dy_tile.to(ACC_DTYPE), axis=1)
    L = O * K + O
    mask_ok = (offs_o[:, None] < O) & (offs_k[None, :] < K)
    tl.store(part_ptr + split.to(tl.int64) * L + offs_o[:, None] * K + offs_k[None, :], acc_w,
             mask=mask_ok)
    if pid_k == 0:
        tl.store(part_ptr + split.to(tl.int64) * L + O * K + offs_o, acc_b, mask=offs_o < O)
    # dtau: W in x's dtype, as the forward used it
    w_tile = _weight_tile(w_ptr, offs_o[:, None], offs_k[None, :], O, K, sw_o, sw_c, sw_e, E)
    w_tile = w_tile.to(DOT_DTYPE).to(ACC_DTYPE)
    dtau = _sum_by_tap(tl.sum(w_tile * acc_d, axis=0), offs_k, E, BLOCK_E)
    row = (split * tl.num_programs(1) + pid_o) * tl.num_programs(0) + pid_k
    taps = tl.arange(0, BLOCK_E)
    tl.store(part_ptr + splits * L + row * E + taps, dtau, mask=taps < E)


@triton.jit
def _first_output_reaching(q, tau, stride, T, T_out):
    """min{t' ∈ [0, T_out) : p0[t'] ≥ q}, or T_out if there is none (q an int, tau one offset).

    For 1 ≤ q ≤ T-1, p0 ≥ q iff r ≥ q, so the answer is ceil((q - tau)/s) up to the rounding
    of r and of this estimate (at most one step); the kernels' own p0 decides that step.
    q ≤ 0: every t' (p0 ≥ 0). q ≥ T: none (p0 ≤ T-1)."""
    est = tl.minimum(tl.maximum(tl.ceil((q - tau) / stride), 0.0), T_out * 1.0)
    est = tl.minimum(tl.maximum(est.to(tl.int32), 0), T_out)  # NaN offsets: stay in range
    first = tl.where(q <= 0, 0, tl.where(q >= T, T_out, est))
    before = _sample_positions(first - 1, tau, stride, T)[0]
    first = tl.where((first > 0) & (before >= q), first - 1, first)
    at = _sample_positions(first, tau, stride, T)[0]
    return tl.where((first < T_out) & (at < q), first + 1, first)


@triton.jit
def _input_grad_tile(pid, dy_ptr, w_ptr, tau_ptr, dx_ptr,
                     sd_b, sd_o, sd_t, sd_v, sw_o, sw_c, sw_e, s_tau,
                     C, T, V, O, T_out, stride,
                     E: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_V: tl.constexpr,
                     BLOCK_O: tl.constexpr, DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
                     ACC_DTYPE: tl.constexpr, POS_DTYPE: tl.constexpr):
    """dx[b, c-block, t, v-block] = Σ_e W[:, c-block, e]ᵀ · dyi[b, :, e, t, v-block] (module
    docstring), for ``pid`` = ((b·T + t)·#c-blocks + c-block)·#v-blocks + v-block."""
    n_v = tl.cdiv(V, BLOCK_V)
    n_c = tl.cdiv(C, BLOCK_C)
    pid_v = pid % n_v
    pid_c = (pid // n_v) % n_c
    bt = pid // (n_v * n_c)
    b = (bt // T).to(tl.int64)
    t = bt % T
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    offs_v = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    dy_b_ptr = dy_ptr + b * sd_b + offs_v[None, :] * sd_v
    acc = tl.zeros((BLOCK_C, BLOCK_V), dtype=ACC_DTYPE)
    for e in range(E):
        tau = _load_offsets(tau_ptr, e, s_tau, POS_DTYPE)
        lo = _first_output_reaching(t - 1, tau, stride, T, T_out)
        hi = _first_output_reaching(t + 1, tau, stride, T, T_out)
        for o0 in range(0, O, BLOCK_O):
            offs_o = o0 + tl.arange(0, BLOCK_O)
            dyi = tl.zeros((BLOCK_O, BLOCK_V), dtype=ACC_DTYPE)
            for t_out in range(lo, hi):
                p0, p1, frac, _ = _sample_positions(t_out, tau, stride, T)
                coef = tl.where(p0 == t, 1.0 - frac, 0.0) + tl.where(p1 == t, frac, 0.0)
                dy_tile = tl.load(dy_b_ptr + offs_o[:, None] * sd_o + t_out * sd_t,
                                  mask=(offs_o[:, None] < O) & (offs_v[None, :] < V), other=0.0)
                dyi += coef.to(ACC_DTYPE) * dy_tile.to(ACC_DTYPE)
            # Wᵀ in x's dtype (as the forward used it), multiplied in the accumulation dtype
            w_t = tl.load(w_ptr + offs_o[None, :] * sw_o + offs_c[:, None] * sw_c + e * sw_e,
                          mask=(offs_c[:, None] < C) & (offs_o[None, :] < O), other=0.0)
            acc = tl.dot(w_t.to(DOT_DTYPE).to(ACC_DTYPE), dyi, acc, input_precision=DOT_PRECISION,
                         out_dtype=ACC_DTYPE)
    dx_ptrs = dx_ptr + b * C * T * V + offs_c[:, None] * (T * V) + t * V + offs_v[None, :]
    tl.store(dx_ptrs, acc.to(dx_ptr.dtype.element_ty),
             mask=(offs_c[:, None] < C) & (offs_v[None, :] < V))


@triton.jit
def _sum_weight_bias_partials(pid, part_ptr, dweight_ptr, dbias_ptr, splits, O, K,
                              BLOCK_S: tl.constexpr, BLOCK_R: tl.constexpr,
                              ACC_DTYPE: tl.constexpr):
    """Columns [pid·BLOCK_R, (pid+1)·BLOCK_R) of Σ_split part[split, :O·K+O] into dW, dbias."""
    L = O * K + O
    cols = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    acc = tl.zeros((BLOCK_R,), dtype=ACC_DTYPE)
    for s0 in range(0, splits, BLOCK_S):
        rows = s0 + tl.arange(0, BLOCK_S)
        acc += tl.sum(tl.load(part_ptr + rows[:, None] * L + cols[None, :],
                              mask=(rows[:, None] < splits) & (cols[None, :] < L), other=0.0), axis=0)
    tl.store(dweight_ptr + cols, acc.to(dweight_ptr.dtype.element_ty), mask=cols < O * K)
    tl.store(dbias_ptr + (cols - O * K), acc.to(dbias_ptr.dtype.element_ty),
             mask=(cols >= O * K) & (cols < L))


@triton.jit
def _sum_offset_partials(part_ptr, doffsets_ptr, rows, E: tl.constexpr,
                         BLOCK_S: tl.constexpr, BLOCK_E: tl.constexpr, ACC_DTYPE: tl.constexpr):
    """dtau[e] = Σ_row part[row, e] over the ``rows`` rows of E."""
    taps = tl.arange(0, BLOCK_E)
    acc = tl.zeros((BLOCK_S, BLOCK_E), dtype=ACC_DTYPE)
    for r0 in range(0, rows, BLOCK_S):
        offs_r = r0 + tl.arange(0, BLOCK_S)
        acc += tl.load(part_ptr + offs_r[:, None] * E + taps[None, :],
                       mask=(offs_r[:, None] < rows) & (taps[None, :] < E), other=0.0)
    tl.store(doffsets_ptr + taps, tl.sum(acc, axis=0).to(doffsets_ptr.dtype.element_ty),
             mask=taps < E)


@triton.jit
def _input_grad_kernel(dy_ptr, w_ptr, tau_ptr, dx_ptr, part_ptr, dweight_ptr, dbias_ptr,
                       doffsets_ptr,
                       sd_b, sd_o, sd_t, sd_v, sw_o, sw_c, sw_e, s_tau,
                       C, T, V, O, T_out, stride, splits, offset_rows,
                       E: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_V: tl.constexpr,
                       BLOCK_O: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_R: tl.constexpr,
                       BLOCK_E: tl.constexpr,
                       DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
                       ACC_DTYPE: tl.constexpr, POS_DTYPE: tl.constexpr):
    """1-D grid: programs [0, R) sum ``_param_grad_kernel``'s partials (R - 1 column blocks of
    dW|dbias, then dtau), the rest compute dx tiles (``_input_grad_tile``). The reductions come
    first so that they overlap the dx work instead of trailing it."""
    pid = tl.program_id(0)
    n_sum = tl.cdiv(O * C * E + O, BLOCK_R)
    if pid < n_sum:
        _sum_weight_bias_partials(pid, part_ptr, dweight_ptr, dbias_ptr, splits, O, C * E,
                                  BLOCK_S, BLOCK_R, ACC_DTYPE)
    elif pid == n_sum:
        _sum_offset_partials(part_ptr + splits * (O * C * E + O), doffsets_ptr,
                             offset_rows, E, BLOCK_S, BLOCK_E, ACC_DTYPE)
    else:
        _input_grad_tile(pid - n_sum - 1, dy_ptr, w_ptr, tau_ptr, dx_ptr,
                         sd_b, sd_o, sd_t, sd_v, sw_o, sw_c, sw_e, s_tau,
                         C, T, V, O, T_out, stride,
                         E, BLOCK_C, BLOCK_V, BLOCK_O, DOT_DTYPE, DOT_PRECISION, ACC_DTYPE, POS_DTYPE)


def _block(n: int, lo: int, hi: int) -> int:
    """Power-of-two block for a dimension of size n, within [lo, hi] (tl.dot needs >= 16)."""
    return min(max(next_pow2(n), lo), hi)


@functools.lru_cache(maxsize=None)
def _dtype_args(x_dtype: torch.dtype, offsets_dtype: torch.dtype) -> dict:
    """Kernel dtype arguments (module docstring): dot operands in x's dtype, fp32 dot precision
    ("ieee" for fp32/fp64 x, "tf32" for 16-bit x), accumulation in fp32 (fp64 for fp64 x),
    sampling positions in fp32 (fp64 if x or offsets is fp64)."""
    wide = x_dtype in (torch.float32, torch.float64)
    fp64_positions = torch.float64 in (x_dtype, offsets_dtype)
    return dict(DOT_DTYPE=_DOT_DTYPES[x_dtype],
                DOT_PRECISION="ieee" if wide else "tf32",
                ACC_DTYPE=tl.float64 if x_dtype == torch.float64 else tl.float32,
                POS_DTYPE=tl.float64 if fp64_positions else tl.float32)


@functools.lru_cache(maxsize=1024)
def _forward_launch(B: int, C: int, V: int, O: int, E: int, T_out: int):
    """(grid, block sizes) of ``_forward_kernel``, cached per shape to keep host time low."""
    blocks = dict(BLOCK_O=_block(O, 16, 64), BLOCK_N=_block(T_out * V, 16, 64),
                  BLOCK_K=_block(C * E, 16, 32))
    return (cdiv(T_out * V, blocks["BLOCK_N"]), cdiv(O, blocks["BLOCK_O"]), B), blocks


class _BackwardLaunch(NamedTuple):
    param_grid: tuple
    param_blocks: dict
    splits: int  # slices of the (b, n)-tiles, one partial sum each
    tiles_per_split: int
    offset_rows: int  # rows of E partial sums of dtau: one per _param_grad_kernel program
    scratch: int  # elements of the partial-sum buffer
    input_grid: tuple
    input_blocks: dict


@functools.lru_cache(maxsize=1024)
def _backward_launch(B: int, C: int, T: int, V: int, O: int, E: int, T_out: int) -> _BackwardLaunch:
    """Grids, block sizes and split-K slicing of the two backward kernels, cached per shape.

    Scratch: ``splits·(O·C·E + O) + offset_rows·E`` elements with
    ``splits <= max(1, TARGET_PROGRAMS // (#o-blocks·#k-blocks))``, i.e. for dW at most about
    ``max(TARGET_PROGRAMS, #o-blocks·#k-blocks)·BLOCK_O·BLOCK_K``: ≤ 2 MB in fp32
    (256·64·32·4 B), or about the size of dW itself when dW is larger."""
    K = C * E
    param_blocks = dict(BLOCK_O=_block(O, 16, 64), BLOCK_N=_block(T_out * V, 16, 64),
                        BLOCK_K=_block(K, 16, 32), BLOCK_E=next_pow2(E))
    # at least one k-block, so that C = 0 still sums dbias
    tiles_ok = max(1, cdiv(K, param_blocks["BLOCK_K"])), cdiv(O, param_blocks["BLOCK_O"])
    n_tiles = B * cdiv(T_out * V, param_blocks["BLOCK_N"])
    tiles_per_split = cdiv(n_tiles, min(n_tiles, max(1, TARGET_PROGRAMS // (tiles_ok[0] * tiles_ok[1]))))
    splits = cdiv(n_tiles, tiles_per_split)
    offset_rows = splits * tiles_ok[0] * tiles_ok[1]
    input_blocks = dict(BLOCK_C=_block(C, 16, 64), BLOCK_V=_block(V, 16, 64), BLOCK_O=_block(O, 16, 64),
                        BLOCK_S=SUM_BLOCK_S, BLOCK_R=SUM_BLOCK_R, BLOCK_E=next_pow2(E))
    n_sum = cdiv(O * K + O, SUM_BLOCK_R) + 1
    n_dx = B * T * cdiv(C, input_blocks["BLOCK_C"]) * cdiv(V, input_blocks["BLOCK_V"])
    return _BackwardLaunch((*tiles_ok, splits), param_blocks, splits, tiles_per_split, offset_rows,
                           splits * (O * K + O) + offset_rows * E, (n_sum + n_dx,), input_blocks)


def forward(x, offsets, weight, bias, stride: int) -> torch.Tensor:
    """Launch the forward kernel (inputs read through their strides); y is contiguous, x's dtype."""
    B, C, T, V = x.shape
    O, E = weight.shape[0], offsets.shape[0]
    T_out = (T - 1) // stride + 1
    y = new_output((B, O, T_out, V), x.dtype, x.device)
    if y.numel() == 0:
        return y
    for b0 in range(0, B, MAX_GRID_YZ):  # B is the grid's third axis: launch in slices of B
        count = min(MAX_GRID_YZ, B - b0)
        xs, ys = (x, y) if count == B else (x[b0:b0 + count], y[b0:b0 + count])  # no views per usual call
        grid, blocks = _forward_launch(count, C, V, O, E, T_out)
        _forward_kernel[grid](
            xs, offsets, weight, weight if bias is None else bias, ys,
            *x.stride(), offsets.stride(0), *weight.stride(), 0 if bias is None else bias.stride(0),
            C, T, V, O, T_out, stride,
            E=E, HAS_BIAS=bias is not None, **blocks, **_dtype_args(x.dtype, offsets.dtype))
    return y


def _zero_grads(x, offsets, weight):
    return (torch.zeros_like(x), torch.zeros_like(offsets), torch.zeros_like(weight),
            weight.new_zeros(weight.shape[:1]))


def backward(dy, x, offsets, weight, stride: int):
    """(dx, doffsets, dweight, dbias) in the dtypes of x, offsets, weight and weight; inputs are
    read through their strides. Two launches: ``_param_grad_kernel`` writes partial sums to a
    scratch buffer, ``_input_grad_kernel`` computes dx and sums them."""
    if dy.numel() == 0:
        return _zero_grads(x, offsets, weight)
    B, C, T, V = x.shape
    O, E = weight.shape[0], offsets.shape[0]
    T_out = dy.shape[2]
    launch = _backward_launch(B, C, T, V, O, E, T_out)
    args = _dtype_args(x.dtype, offsets.dtype)
    part = new_output((launch.scratch,), accumulation_dtype(x), x.device)
    _param_grad_kernel[launch.param_grid](
        x, offsets, dy, weight, part,
        *x.stride(), offsets.stride(0), *dy.stride(), *weight.stride(),
        B, C, T, V, O, T_out, stride, launch.splits, launch.tiles_per_split,
        E=E, BOUNDS_PASS_GRAD=CLAMP_PASSES_GRADIENT_AT_BOUNDS, **launch.param_blocks, **args)
    dx = new_output(x.shape, x.dtype, x.device)
    dweight = new_output(weight.shape, weight.dtype, x.device)
    dbias = new_output((O,), weight.dtype, x.device)
    doffsets = new_output((E,), offsets.dtype, x.device)
    _input_grad_kernel[launch.input_grid](
        dy, weight, offsets, dx, part, dweight, dbias, doffsets,
        *dy.stride(), *weight.stride(), offsets.stride(0),
        C, T, V, O, T_out, stride, launch.splits, launch.offset_rows,
        E=E, **launch.input_blocks, **args)
    return dx, doffsets, dweight, dbias
