r"""Triton kernels for ``bharnet.ops.layer_norm``: LayerNorm over the last dimension.

Rows ``x[r, :]`` of an (M, D) view (any row stride, unit feature stride), ``w``/``b`` the
optional affine parameters (D,)::

    mean[r] = sum_c x[r, c] / D,   var[r] = sum_c (x[r, c] - mean[r])^2 / D
    rstd[r] = 1 / sqrt(var[r] + eps),   xhat = (x - mean) * rstd
    y       = xhat * w + b

Backward (``dy`` = dL/dy, ``g = dy * w``)::

    dx[r, :] = rstd[r] * (g - xhat * sum_c(g xhat) / D - sum_c(g) / D)
    dw       = sum_r dy * xhat,   db = sum_r dy

Statistics and arithmetic in the accumulation dtype (fp32; fp64 for fp64 inputs); loads in
each tensor's own dtype, stores in the output's (so y can be written directly in a lower
compute dtype). ``eps`` is a constexpr: Triton materialises a constexpr float in the dtype of
the operation it meets, so fp64 kernels see eps in fp64 (a runtime float would arrive as fp32).

* ``layer_norm_fwd_kernel``: grid (cdiv(M, BLOCK_M),); a program normalises BLOCK_M rows of
  BLOCK_D >= D features (one tile) and writes y, mean and rstd.
* ``layer_norm_bwd_kernel``: grid (P,) with P <= cdiv(M, BLOCK_M); program p handles the row
  blocks p, p + P, p + 2P, ..., writes dx and accumulates dw and db in registers, then stores
  its partial sums as ``part[0, p, :]`` (dw) and ``part[1, p, :]`` (db) for one small torch
  reduction over p. No atomics: deterministic.
"""
import triton
import triton.language as tl


@triton.jit
def reciprocal_sqrt(v, ACC_FP64: tl.constexpr):
    """1 / sqrt(v), correctly rounded square root and division (IEEE for fp64)."""
    if ACC_FP64:
        r = 1.0 / tl.sqrt(v)
    else:
        r = tl.div_rn(tl.full(v.shape, 1.0, tl.float32), tl.sqrt_rn(v))
    return r


@triton.jit
def layer_norm_fwd_kernel(x_ptr, w_ptr, b_ptr, y_ptr, mean_ptr, rstd_ptr, M, D, stride_x,
                          EPS: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
                          ACC_FP64: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """y = (x - mean) * rstd * w + b for BLOCK_M rows; y is (M, D) contiguous."""
    ACC_DTYPE: tl.constexpr = tl.float64 if ACC_FP64 else tl.float32
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_D)
    row_ok = rows < M
    col_ok = cols < D
    inside = row_ok[:, None] & col_ok[None, :]
    rows = rows.to(tl.int64)
    x = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=inside, other=0.0)
    x = x.to(ACC_DTYPE)
    mean = tl.sum(x, axis=1) / D
    diff = tl.where(inside, x - mean[:, None], 0.0)
    rstd = reciprocal_sqrt(tl.sum(diff * diff, axis=1) / D + EPS, ACC_FP64)
    y = diff * rstd[:, None]
    if HAS_WEIGHT:
        y = y * tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(ACC_DTYPE)[None, :]
    if HAS_BIAS:
        y = y + tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(ACC_DTYPE)[None, :]
    tl.store(y_ptr + rows[:, None] * D + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=inside)
    tl.store(mean_ptr + rows, mean, mask=row_ok)
    tl.store(rstd_ptr + rows, rstd, mask=row_ok)


@triton.jit
def layer_norm_bwd_kernel(dy_ptr, x_ptr, w_ptr, mean_ptr, rstd_ptr, dx_ptr, part_ptr,
                          M, D, stride_dy, stride_x,
                          HAS_WEIGHT: tl.constexpr, ACC_FP64: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """dx for the row blocks pid, pid + P, ... and this program's partial dw, db (docstring)."""
    ACC_DTYPE: tl.constexpr = tl.float64 if ACC_FP64 else tl.float32
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    cols = tl.arange(0, BLOCK_D)
    col_ok = cols < D
    if HAS_WEIGHT:
        w = tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(ACC_DTYPE)
    dw = tl.zeros([BLOCK_M, BLOCK_D], ACC_DTYPE)
    db = tl.zeros([BLOCK_M, BLOCK_D], ACC_DTYPE)
    for start in range(pid * BLOCK_M, M, programs * BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        row_ok = rows < M
        inside = row_ok[:, None] & col_ok[None, :]
        rows = rows.to(tl.int64)
        x = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=inside, other=0.0)
        dy = tl.load(dy_ptr + rows[:, None] * stride_dy + cols[None, :], mask=inside, other=0.0)
        dy = dy.to(ACC_DTYPE)
        mean = tl.load(mean_ptr + rows, mask=row_ok, other=0.0)
        rstd = tl.load(rstd_ptr + rows, mask=row_ok, other=0.0)
        xhat = tl.where(inside, (x.to(ACC_DTYPE) - mean[:, None]) * rstd[:, None], 0.0)
        g = dy * w[None, :] if HAS_WEIGHT else dy
        c1 = tl.sum(g * xhat, axis=1) / D
        c2 = tl.sum(g, axis=1) / D
        dx = (g - xhat * c1[:, None] - c2[:, None]) * rstd[:, None]
        tl.store(dx_ptr + rows[:, None] * D + cols[None, :], dx.to(dx_ptr.dtype.element_ty),
                 mask=inside)
        dw += dy * xhat
        db += dy
    tl.store(part_ptr + pid * D + cols, tl.sum(dw, axis=0), mask=col_ok)
    tl.store(part_ptr + (programs + pid) * D + cols, tl.sum(db, axis=0), mask=col_ok)
