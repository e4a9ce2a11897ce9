r"""Triton kernels for ``bharnet.ops.batch_norm``: training-mode batch normalisation of a
contiguous ``x`` (N, C, P) (P = the flattened spatial positions), per channel c over its
M = N x P values::

    mean_c = sum x / M,   var_c = sum (x - mean_c)^2 / M,   invstd_c = 1 / sqrt(var_c + eps)
    y = (x - mean_c) * invstd_c * w_c + b_c

Backward (``dy`` = dL/dy, xhat = (x - mean_c) invstd_c)::

    dx = w_c invstd_c (dy - sum dy / M - xhat sum(dy xhat) / M)
    dw_c = sum dy xhat,   db_c = sum dy

Each pass is a grid (C, S) of programs: program (c, s) owns the row blocks s, s + S, s + 2S, ...
(BLOCK_N rows each) of channel c and loops over P in BLOCK_P columns, so every load is a run of
contiguous positions. Reductions go through a (2, C, S) buffer of per-program partial sums (no
atomics: deterministic), which the second kernel of each pair sums again in every program of
the channel (S is capped, so that costs little next to a third launch).

* ``batch_norm_stats_kernel``: partial sums of d = x - shift_c and d^2, shift_c the mean of the
  channel's first SHIFT_SAMPLES values (in (n, p) order), so that sum d^2 / M - (sum d / M)^2
  does not cancel when the mean is far from zero, nor when one value is far from the rest.
* ``batch_norm_forward_kernel``: mean, var, invstd from the partials; y; program s = 0 also
  stores ``stats`` (3, C): mean, invstd and the unbiased variance (for the running statistics).
* ``batch_norm_backward_reduce_kernel``: partial sums of dy and dy xhat.
* ``batch_norm_backward_kernel``: dx; program s = 0 also stores dw and db.

Arithmetic in the accumulation dtype (fp32; fp64 for fp64 x), loads in each tensor's dtype
(e.g. bf16 x with fp32 parameters under autocast), stores in the output's; element offsets in
int64 and M as a float (a channel may hold 2^31 values or more). ``EPS`` is a constexpr so that
fp64 kernels add it in fp64.
"""
import triton
import triton.language as tl

from bharnet.kernels.layer_norm import reciprocal_sqrt

SHIFT_SAMPLES = tl.constexpr(256)


@triton.jit
def _tile(ptr, c, row0, p0, N, C, P, BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr):
    """Pointers to the (BLOCK_N, BLOCK_P) tile at rows row0.., columns p0.. of channel c, and
    its in-bounds mask."""
    rows = row0 + tl.arange(0, BLOCK_N)
    cols = p0 + tl.arange(0, BLOCK_P)
    inside = (rows < N)[:, None] & (cols < P)[None, :]
    offsets = (rows.to(tl.int64) * C + c) * P
    return ptr + offsets[:, None] + cols[None, :], inside


@triton.jit
def _count(N, P, ACC_DTYPE: tl.constexpr):
    """M = N P as a float (N or P may arrive as the constexpr 1)."""
    return (tl.zeros([], ACC_DTYPE) + N) * P


@triton.jit
def _shift(x_ptr, c, N, C, P, ACC_DTYPE: tl.constexpr):
    """The mean of channel c's first min(M, SHIFT_SAMPLES) values."""
    m = tl.arange(0, SHIFT_SAMPLES)
    ok = m // P < N  # m < M without forming N P in int32
    n = (m // P).to(tl.int64)
    values = tl.load(x_ptr + (n * C + c) * P + m % P, mask=ok, other=0.0).to(ACC_DTYPE)
    return tl.sum(values, axis=0) / tl.sum(ok.to(ACC_DTYPE), axis=0)


@triton.jit
def _channel_sums(part_ptr, c, C, S, BLOCK_S: tl.constexpr):
    """The two sums over the S partials of channel c."""
    idx = tl.arange(0, BLOCK_S)
    ok = idx < S
    first = tl.sum(tl.load(part_ptr + c * S + idx, mask=ok, other=0.0), axis=0)
    second = tl.sum(tl.load(part_ptr + (C + c) * S + idx, mask=ok, other=0.0), axis=0)
    return first, second


@triton.jit
def _store_partials(part_ptr, c, s, C, S, first, second):
    tl.store(part_ptr + c * S + s, tl.sum(tl.sum(first, axis=1), axis=0))
    tl.store(part_ptr + (C + c) * S + s, tl.sum(tl.sum(second, axis=1), axis=0))


@triton.jit
def batch_norm_stats_kernel(x_ptr, part_ptr, N, C, P, ACC_FP64: tl.constexpr,
                            BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr):
    """part[0, c, s] = sum d, part[1, c, s] = sum d^2 over the program's rows, d = x - shift_c."""
    ACC_DTYPE: tl.constexpr = tl.float64 if ACC_FP64 else tl.float32
    c = tl.program_id(0)
    s = tl.program_id(1)
    S = tl.num_programs(1)
    shift = _shift(x_ptr, c, N, C, P, ACC_DTYPE)
    total = tl.zeros([BLOCK_N, BLOCK_P], ACC_DTYPE)
    squares = tl.zeros([BLOCK_N, BLOCK_P], ACC_DTYPE)
    for row0 in range(s * BLOCK_N, N, S * BLOCK_N):
        for p0 in range(0, P, BLOCK_P):
            ptrs, inside = _tile(x_ptr, c, row0, p0, N, C, P, BLOCK_N, BLOCK_P)
            d = tl.where(inside, tl.load(ptrs, mask=inside, other=0.0).to(ACC_DTYPE) - shift, 0.0)
            total += d
            squares += d * d
    _store_partials(part_ptr, c, s, C, S, total, squares)


@triton.jit
def batch_norm_forward_kernel(x_ptr, part_ptr, w_ptr, b_ptr, y_ptr, stats_ptr, N, C, P, S,
                              EPS: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
                              ACC_FP64: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr,
                              BLOCK_S: tl.constexpr):
    """y for the program's rows of channel c; program s = 0 stores the channel's statistics."""
    ACC_DTYPE: tl.constexpr = tl.float64 if ACC_FP64 else tl.float32
    c = tl.program_id(0)
    s = tl.program_id(1)
    shift = _shift(x_ptr, c, N, C, P, ACC_DTYPE)
    total, squares = _channel_sums(part_ptr, c, C, S, BLOCK_S)
    count = _count(N, P, ACC_DTYPE)
    shifted_mean = total / count
    var = tl.maximum(squares / count - shifted_mean * shifted_mean, 0.0)
    mean = shift + shifted_mean
    invstd = reciprocal_sqrt(var + EPS, ACC_FP64)
    scale = invstd
    if HAS_WEIGHT:
        scale = scale * tl.load(w_ptr + c).to(ACC_DTYPE)
    offset = tl.zeros([], ACC_DTYPE)
    if HAS_BIAS:
        offset = tl.load(b_ptr + c).to(ACC_DTYPE)
    if s == 0:
        tl.store(stats_ptr + c, mean)
        tl.store(stats_ptr + C + c, invstd)
        tl.store(stats_ptr + 2 * C + c, var * count / (count - 1.0))
    for row0 in range(s * BLOCK_N, N, S * BLOCK_N):
        for p0 in range(0, P, BLOCK_P):
            ptrs, inside = _tile(x_ptr, c, row0, p0, N, C, P, BLOCK_N, BLOCK_P)
            x = tl.load(ptrs, mask=inside, other=0.0).to(ACC_DTYPE)
            y = (x - mean) * scale + offset
            out_ptrs, _ = _tile(y_ptr, c, row0, p0, N, C, P, BLOCK_N, BLOCK_P)
            tl.store(out_ptrs, y.to(y_ptr.dtype.element_ty), mask=inside)


@triton.jit
def batch_norm_backward_reduce_kernel(dy_ptr, x_ptr, stats_ptr, part_ptr, N, C, P,
                                      ACC_FP64: tl.constexpr, BLOCK_N: tl.constexpr,
                                      BLOCK_P: tl.constexpr):
    """part[0, c, s] = sum dy, part[1, c, s] = sum dy xhat over the program's rows."""
    ACC_DTYPE: tl.constexpr = tl.float64 if ACC_FP64 else tl.float32
    c = tl.program_id(0)
    s = tl.program_id(1)
    S = tl.num_programs(1)
    mean = tl.load(stats_ptr + c)
    invstd = tl.load(stats_ptr + C + c)
    total = tl.zeros([BLOCK_N, BLOCK_P], ACC_DTYPE)
    projected = tl.zeros([BLOCK_N, BLOCK_P], ACC_DTYPE)
    for row0 in range(s * BLOCK_N, N, S * BLOCK_N):
        for p0 in range(0, P, BLOCK_P):
            ptrs, inside = _tile(x_ptr, c, row0, p0, N, C, P, BLOCK_N, BLOCK_P)
            dy_ptrs, _ = _tile(dy_ptr, c, row0, p0, N, C, P, BLOCK_N, BLOCK_P)
            x = tl.load(ptrs, mask=inside, other=0.0).to(ACC_DTYPE)
            dy = tl.load(dy_ptrs, mask=inside, other=0.0).to(ACC_DTYPE)
            total += dy
            projected += dy * tl.where(inside, (x - mean) * invstd, 0.0)
    _store_partials(part_ptr, c, s, C, S, total, projected)


@triton.jit
def batch_norm_backward_kernel(dy_ptr, x_ptr, stats_ptr, w_ptr, part_ptr, dx_ptr, dparams_ptr,
                               N, C, P, S, HAS_WEIGHT: tl.constexpr, ACC_FP64: tl.constexpr,
                               BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_S: tl.constexpr):
    """dx for the program's rows of channel c; program s = 0 stores dparams[0, c] = dw_c and
    dparams[1, c] = db_c."""
    ACC_DTYPE: tl.constexpr = tl.float64 if ACC_FP64 else tl.float32
    c = tl.program_id(0)
    s = tl.program_id(1)
    mean = tl.load(stats_ptr + c)
    invstd = tl.load(stats_ptr + C + c)
    sum_dy, sum_dy_xhat = _channel_sums(part_ptr, c, C, S, BLOCK_S)
    if s == 0:
        tl.store(dparams_ptr + c, sum_dy_xhat)
        tl.store(dparams_ptr + C + c, sum_dy)
    count = _count(N, P, ACC_DTYPE)
    mean_dy = sum_dy / count
    mean_dy_xhat = sum_dy_xhat / count
    scale = invstd
    if HAS_WEIGHT:
        scale = scale * tl.load(w_ptr + c).to(ACC_DTYPE)
    for row0 in range(s * BLOCK_N, N, S * BLOCK_N):
        for p0 in range(0, P, BLOCK_P):
            ptrs, inside = _tile(x_ptr, c, row0, p0, N, C, P, BLOCK_N, BLOCK_P)
            dy_ptrs, _ = _tile(dy_ptr, c, row0, p0, N, C, P, BLOCK_N, BLOCK_P)
            dx_ptrs, _ = _tile(dx_ptr, c, row0, p0, N, C, P, BLOCK_N, BLOCK_P)
            xhat = (tl.load(ptrs, mask=inside, other=0.0).to(ACC_DTYPE) - mean) * invstd
            dy = tl.load(dy_ptrs, mask=inside, other=0.0).to(ACC_DTYPE)
            dx = scale * (dy - mean_dy - xhat * mean_dy_xhat)
            tl.store(dx_ptrs, dx.to(dx_ptr.dtype.element_ty), mask=inside)
