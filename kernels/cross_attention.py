r"""Triton kernels for the attention core of ``bharnet.ops.cross_attention``.

Layout (no head split or merge copies): ``q`` and ``o`` are (N, Lq, D) token tensors and ``kv``
is the (N, Lk, 2D) output of the fused K/V projection, ``D = heads * d``. Head ``h`` of a token
is the feature slice ``[h d, (h + 1) d)``; its key is ``kv[n, j, h d : (h + 1) d]`` and its value
``kv[n, j, D + h d : D + (h + 1) d]``. Per (n, h), with ``valid[j]`` = key j exists and is allowed
by the key mask::

    s[i, j]   = (q_i . k_j) / sqrt(d)                     (-inf where not valid[j])
    lse[i]    = log sum_j exp(s[i, j])                      (+inf when no key is valid)
    P[i, j]   = exp(s[i, j] - lse[i])                       (= softmax_j s[i, j])
    o_i       = sum_j P[i, j] v_j                           (0 when no key is valid)

so a query whose keys are all masked gets a zero output and, with lse = +inf, zero gradients; a
query whose scores are NaN gets o = NaN and lse = NaN (so NaN gradients), as in the CUDA kernels.

Backward (``dO`` = dL/do; ``scale = 1/sqrt(d)``)::

    dV = P^T dO,   dP = dO V^T,   delta_i = sum_j P[i, j] dP[i, j] = dO_i . o_i
    dS = P * (dP - delta),   dQ = scale * dS K,   dK = scale * dS^T Q

Kernels (fp32 accumulation, fp64 for fp64 inputs; ``tl.dot`` with exact "ieee" products for
fp32 inputs, never TF32; the running max is replaced by 0 for rows with no valid key yet, so
no ``-inf - (-inf)`` ever occurs; ``tl.exp`` is the hardware ``ex2`` of ``x log2(e)`` for
fp32, so natural units cost nothing over base 2; ``1/sqrt(d)`` is computed in-kernel in the
accumulation dtype because host floats reach a kernel as fp32, too coarse for fp64):

* ``cross_attention_fwd_kernel``: grid (N H, cdiv(Lq, BLOCK_Q)). A program owns BLOCK_Q
  queries of one (n, h) and streams the keys in BLOCK_K blocks with an online softmax (one
  block when Lk fits: the frame-mode case). Writes ``o`` and ``lse`` (N, H, Lq).
* ``cross_attention_bwd_fused_kernel``: grid (N H,), used when all Lq queries and Lk keys fit
  one block each: recomputes P from ``lse`` and produces dQ, dK and dV in one pass, with
  ``delta`` taken as ``rowsum(P * dP)`` (``o`` is not read).
* otherwise ``cross_attention_bwd_dq_kernel`` (grid (N H, cdiv(Lq, BLOCK_Q)): ``delta`` from
  ``o`` and ``dO``, then dQ over all key blocks) followed by ``cross_attention_bwd_dkdv_kernel``
  (grid (N H, cdiv(Lk, BLOCK_K)): dK and dV over all query blocks). No atomics: deterministic.

The (n, h) index is grid axis 0 (CUDA allows 2^31 - 1 programs there, 65535 on axis 1), and
neighbouring programs are the heads of one token sequence, which share cache lines.
"""
import triton
import triton.language as tl


@triton.jit
def _load_rows(ptr, base, rows, length, stride_row, cols, head_dim):
    """Tile ``ptr[base + rows * stride_row + cols]`` with zeros outside (length, head_dim)."""
    inside = (rows[:, None] < length) & (cols[None, :] < head_dim)
    return tl.load(ptr + base + rows[:, None] * stride_row + cols[None, :], mask=inside, other=0.0)


@triton.jit
def _store_rows(ptr, base, rows, length, stride_row, cols, head_dim, value):
    """``ptr[base + rows * stride_row + cols] = value`` inside (length, head_dim)."""
    inside = (rows[:, None] < length) & (cols[None, :] < head_dim)
    tl.store(ptr + base + rows[:, None] * stride_row + cols[None, :],
             value.to(ptr.dtype.element_ty), mask=inside)


@triton.jit
def _valid_keys(mask_ptr, n, keys, Lk, stride_mn, stride_ml, HAS_MASK: tl.constexpr):
    """valid[j]: key j exists (j < Lk) and, with a key mask, mask[n, j] is nonzero."""
    valid = keys < Lk
    if HAS_MASK:
        allowed = tl.load(mask_ptr + n * stride_mn + keys * stride_ml, mask=valid, other=0)
        valid = valid & (allowed != 0)
    return valid


@triton.jit
def _softmax_scale(HEAD_DIM, ACC_DTYPE: tl.constexpr):
    """1 / sqrt(d), correctly rounded in the accumulation dtype."""
    d = tl.zeros([], ACC_DTYPE) + HEAD_DIM
    if ACC_DTYPE == tl.float64:
        scale = 1.0 / tl.sqrt(d)  # float64 sqrt and division are IEEE round-to-nearest
    else:
        scale = tl.div_rn(tl.zeros([], ACC_DTYPE) + 1.0, tl.sqrt_rn(d))
    return scale


@triton.jit
def _scores(q, k, valid, scale, ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """s = q k^T * scale in ACC_DTYPE, -inf at invalid keys: (rows of q, rows of k)."""
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE) * scale
    return tl.where(valid[None, :], s, float("-inf"))


@triton.jit
def cross_attention_fwd_kernel(q_ptr, kv_ptr, mask_ptr, o_ptr, lse_ptr,
                               H, Lq, Lk, D, HEAD_DIM,
                               stride_qn, stride_ql, stride_kvn, stride_kvl, stride_mn, stride_ml,
                               HAS_MASK: tl.constexpr, ACC_FP64: tl.constexpr,
                               DOT_PRECISION: tl.constexpr, BLOCK_Q: tl.constexpr,
                               BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    """o[n, i, h] = sum_j softmax_j(q_i . k_j / sqrt(d)) v_j and lse[n, h, i] (module docstring)."""
    ACC_DTYPE: tl.constexpr = tl.float64 if ACC_FP64 else tl.float32
    scale = _softmax_scale(HEAD_DIM, ACC_DTYPE)
    pid_nh = tl.program_id(0)
    pid_q = tl.program_id(1)
    n = (pid_nh // H).to(tl.int64)
    h = pid_nh % H
    rows = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    cols = tl.arange(0, BLOCK_D)
    q = _load_rows(q_ptr, n * stride_qn + h * HEAD_DIM, rows, Lq, stride_ql, cols, HEAD_DIM)
    k_base = n * stride_kvn + h * HEAD_DIM
    m = tl.full([BLOCK_Q], float("-inf"), ACC_DTYPE)
    m_ref = tl.zeros([BLOCK_Q], ACC_DTYPE)
    denom = tl.zeros([BLOCK_Q], ACC_DTYPE)
    acc = tl.zeros([BLOCK_Q, BLOCK_D], ACC_DTYPE)
    for start in range(0, Lk, BLOCK_K):
        keys = start + tl.arange(0, BLOCK_K)
        k = _load_rows(kv_ptr, k_base, keys, Lk, stride_kvl, cols, HEAD_DIM)
        v = _load_rows(kv_ptr, k_base + D, keys, Lk, stride_kvl, cols, HEAD_DIM)
        valid = _valid_keys(mask_ptr, n, keys, Lk, stride_mn, stride_ml, HAS_MASK)
        s = _scores(q, k, valid, scale, ACC_DTYPE, DOT_PRECISION)
        m_new = tl.maximum(m, tl.max(s, 1))
        m_new_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp(s - m_new_ref[:, None])
        # 0 until the row has a valid key (acc and denom are 0 then): exp(0 - m_new) overflows to
        # inf for a first row maximum below about -88 (float32), and 0 * inf made the row NaN
        correction = tl.exp(tl.where(m == float("-inf"), float("-inf"), m_ref - m_new_ref))
        denom = denom * correction + tl.sum(p, 1)
        acc = acc * correction[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION,
                                                 out_dtype=ACC_DTYPE)
        m = m_new
        m_ref = m_new_ref
    # denom == 0, not `not denom > 0`: a row whose scores are NaN (diverged weights) keeps NaN in
    # lse, so that its gradients come out NaN too instead of the zeros of a row without keys
    no_keys = denom == 0
    denom_safe = tl.where(no_keys, 1.0, denom)
    o_base = n * Lq * D + h * HEAD_DIM
    _store_rows(o_ptr, o_base, rows, Lq, D, cols, HEAD_DIM, acc / denom_safe[:, None])
    lse = tl.where(no_keys, float("inf"), m_ref + tl.log(denom_safe))
    tl.store(lse_ptr + pid_nh * Lq + rows, lse, mask=rows < Lq)


@triton.jit
def cross_attention_bwd_fused_kernel(q_ptr, kv_ptr, mask_ptr, do_ptr, lse_ptr, dq_ptr, dkv_ptr,
                                     H, Lq, Lk, D, HEAD_DIM,
                                     stride_qn, stride_ql, stride_kvn, stride_kvl,
                                     stride_mn, stride_ml, stride_don, stride_dol,
                                     HAS_MASK: tl.constexpr, ACC_FP64: tl.constexpr,
                                     DOT_PRECISION: tl.constexpr, BLOCK_Q: tl.constexpr,
                                     BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    """dQ, dK, dV of one (n, h) whose Lq <= BLOCK_Q queries and Lk <= BLOCK_K keys fit one tile:
    P = exp(s - lse), dV = P^T dO, dP = dO V^T, delta = rowsum(P dP), dS = P (dP - delta),
    dQ = scale dS K, dK = scale dS^T Q."""
    ACC_DTYPE: tl.constexpr = tl.float64 if ACC_FP64 else tl.float32
    scale = _softmax_scale(HEAD_DIM, ACC_DTYPE)
    pid_nh = tl.program_id(0)
    n = (pid_nh // H).to(tl.int64)
    h = pid_nh % H
    rows = tl.arange(0, BLOCK_Q)
    keys = tl.arange(0, BLOCK_K)
    cols = tl.arange(0, BLOCK_D)
    q = _load_rows(q_ptr, n * stride_qn + h * HEAD_DIM, rows, Lq, stride_ql, cols, HEAD_DIM)
    do = _load_rows(do_ptr, n * stride_don + h * HEAD_DIM, rows, Lq, stride_dol, cols, HEAD_DIM)
    k_base = n * stride_kvn + h * HEAD_DIM
    k = _load_rows(kv_ptr, k_base, keys, Lk, stride_kvl, cols, HEAD_DIM)
    v = _load_rows(kv_ptr, k_base + D, keys, Lk, stride_kvl, cols, HEAD_DIM)
    lse = tl.load(lse_ptr + pid_nh * Lq + rows, mask=rows < Lq, other=float("inf"))
    valid = _valid_keys(mask_ptr, n, keys, Lk, stride_mn, stride_ml, HAS_MASK)
    p = tl.exp(_scores(q, k, valid, scale, ACC_DTYPE, DOT_PRECISION) - lse[:, None])
    dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)
    delta = tl.sum(p * dp, 1)
    ds = p * (dp - delta[:, None])
    dv = tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)
    dq = tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)
    dk = tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)
    _store_rows(dq_ptr, n * Lq * D + h * HEAD_DIM, rows, Lq, D, cols, HEAD_DIM, dq * scale)
    dk_base = n * Lk * 2 * D + h * HEAD_DIM
    _store_rows(dkv_ptr, dk_base, keys, Lk, 2 * D, cols, HEAD_DIM, dk * scale)
    _store_rows(dkv_ptr, dk_base + D, keys, Lk, 2 * D, cols, HEAD_DIM, dv)


@triton.jit
def cross_attention_bwd_dq_kernel(q_ptr, kv_ptr, mask_ptr, o_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr,
                                  H, Lq, Lk, D, HEAD_DIM,
                                  stride_qn, stride_ql, stride_kvn, stride_kvl,
                                  stride_mn, stride_ml, stride_don, stride_dol,
                                  HAS_MASK: tl.constexpr, ACC_FP64: tl.constexpr,
                                  DOT_PRECISION: tl.constexpr, BLOCK_Q: tl.constexpr,
                                  BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    """delta_i = dO_i . o_i (stored for the dK/dV kernel) and dQ_i = scale sum_j dS[i, j] k_j,
    dS = P (dO V^T - delta), over the key blocks of one (n, h) for BLOCK_Q queries."""
    ACC_DTYPE: tl.constexpr = tl.float64 if ACC_FP64 else tl.float32
    scale = _softmax_scale(HEAD_DIM, ACC_DTYPE)
    pid_nh = tl.program_id(0)
    pid_q = tl.program_id(1)
    n = (pid_nh // H).to(tl.int64)
    h = pid_nh % H
    rows = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    cols = tl.arange(0, BLOCK_D)
    q = _load_rows(q_ptr, n * stride_qn + h * HEAD_DIM, rows, Lq, stride_ql, cols, HEAD_DIM)
    do = _load_rows(do_ptr, n * stride_don + h * HEAD_DIM, rows, Lq, stride_dol, cols, HEAD_DIM)
    o = _load_rows(o_ptr, n * Lq * D + h * HEAD_DIM, rows, Lq, D, cols, HEAD_DIM)
    lse = tl.load(lse_ptr + pid_nh * Lq + rows, mask=rows < Lq, other=float("inf"))
    delta = tl.sum(do.to(ACC_DTYPE) * o.to(ACC_DTYPE), 1)
    tl.store(delta_ptr + pid_nh * Lq + rows, delta, mask=rows < Lq)
    k_base = n * stride_kvn + h * HEAD_DIM
    dq = tl.zeros([BLOCK_Q, BLOCK_D], ACC_DTYPE)
    for start in range(0, Lk, BLOCK_K):
        keys = start + tl.arange(0, BLOCK_K)
        k = _load_rows(kv_ptr, k_base, keys, Lk, stride_kvl, cols, HEAD_DIM)
        v = _load_rows(kv_ptr, k_base + D, keys, Lk, stride_kvl, cols, HEAD_DIM)
        valid = _valid_keys(mask_ptr, n, keys, Lk, stride_mn, stride_ml, HAS_MASK)
        p = tl.exp(_scores(q, k, valid, scale, ACC_DTYPE, DOT_PRECISION) - lse[:, None])
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)
    _store_rows(dq_ptr, n * Lq * D + h * HEAD_DIM, rows, Lq, D, cols, HEAD_DIM, dq * scale)


@triton.jit
def cross_attention_bwd_dkdv_kernel(q_ptr, kv_ptr, mask_ptr, do_ptr, lse_ptr, delta_ptr, dkv_ptr,
                                    H, Lq, Lk, D, HEAD_DIM,
                                    stride_qn, stride_ql, stride_kvn, stride_kvl,
                                    stride_mn, stride_ml, stride_don, stride_dol,
                                    HAS_MASK: tl.constexpr, ACC_FP64: tl.constexpr,
                                    DOT_PRECISION: tl.constexpr, BLOCK_Q: tl.constexpr,
                                    BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    """dV_j = sum_i P[i, j] dO_i and dK_j = scale sum_i dS[i, j] q_i over the query blocks of one
    (n, h) for BLOCK_K keys, in transposed form (P^T = exp(k q^T / sqrt(d) - lse), dP^T = V dO^T)."""
    ACC_DTYPE: tl.constexpr = tl.float64 if ACC_FP64 else tl.float32
    scale = _softmax_scale(HEAD_DIM, ACC_DTYPE)
    pid_nh = tl.program_id(0)
    pid_k = tl.program_id(1)
    n = (pid_nh // H).to(tl.int64)
    h = pid_nh % H
    keys = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    cols = tl.arange(0, BLOCK_D)
    k_base = n * stride_kvn + h * HEAD_DIM
    k = _load_rows(kv_ptr, k_base, keys, Lk, stride_kvl, cols, HEAD_DIM)
    v = _load_rows(kv_ptr, k_base + D, keys, Lk, stride_kvl, cols, HEAD_DIM)
    valid = _valid_keys(mask_ptr, n, keys, Lk, stride_mn, stride_ml, HAS_MASK)
    dk = tl.zeros([BLOCK_K, BLOCK_D], ACC_DTYPE)
    dv = tl.zeros([BLOCK_K, BLOCK_D], ACC_DTYPE)
    for start in range(0, Lq, BLOCK_Q):
        rows = start + tl.arange(0, BLOCK_Q)
        q = _load_rows(q_ptr, n * stride_qn + h * HEAD_DIM, rows, Lq, stride_ql, cols, HEAD_DIM)
        do = _load_rows(do_ptr, n * stride_don + h * HEAD_DIM, rows, Lq, stride_dol, cols, HEAD_DIM)
        lse = tl.load(lse_ptr + pid_nh * Lq + rows, mask=rows < Lq, other=float("inf"))
        delta = tl.load(delta_ptr + pid_nh * Lq + rows, mask=rows < Lq, other=0.0)
        s_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE) * scale
        p_t = tl.exp(tl.where(valid[:, None], s_t, float("-inf")) - lse[None, :])
        dv += tl.dot(p_t.to(do.dtype), do, input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)
        dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)
        ds_t = p_t * (dp_t - delta[None, :])
        dk += tl.dot(ds_t.to(q.dtype), q, input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)
    dk_base = n * Lk * 2 * D + h * HEAD_DIM
    _store_rows(dkv_ptr, dk_base, keys, Lk, 2 * D, cols, HEAD_DIM, dk * scale)
    _store_rows(dkv_ptr, dk_base + D, keys, Lk, 2 * D, cols, HEAD_DIM, dv)
