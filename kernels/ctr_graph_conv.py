r"""Triton kernels for ``bharnet.ops.ctr_graph_conv`` (CTR-GC, and ST-GC as its static case).

Notation as in ``bharnet/ops/ctr_graph_conv.py``: ``v`` (B, H, C, T, V), groups ``G`` with
``CG = C / G`` channels each, ``q``/``k`` (B, H, R, V), ``W`` (H, G, R), ``bias`` (H, G),
``alpha`` a scalar, ``A`` (H, V, V)::

    Aref[b, h, g, i, j] = alpha * (sum_r W[h, g, r] * tanh(q[b, h, r, i] - k[b, h, r, j]) + bias[h, g])
                          + A[h, i, j]                      (static mode: Aref = A[h])
    y[b, c, t, i]       = sum_h sum_j Aref[b, h, g(c), i, j] * v[b, h, c, t, j]

Inside one (b, g) the rows ``m = c_local * T + t`` of ``v[b, h, group g]`` and of ``y[b, group g]``
are contiguous (CG * T rows of V joints), so the aggregation is, per (b, h, g), a GEMM
``y_g (CG*T, V) += v_hg (CG*T, V) @ Aref^T (V, V)``. The kernels never write the
(B, H, G, V, V) topology nor any (B, H, C, T, V) intermediate in the forward pass: every
program recomputes the topology tile it needs from q, k, W, bias, alpha and A.

Cost of the recomputation: R tanh (an exp and a division each, on CUDA cores) per topology
element per row tile, against BLOCK_M multiply-adds of the GEMM (on tensor cores for 16-bit
inputs). For wide layers (R = C_in / 8 = 32, C/G * T = 1024 rows) the forward's tanh work
outweighs its GEMM; the backward computes each topology tile once per (b, h, g, j-tile).

Backward (``dy`` = dL/dy, ``dAref`` = dL/dAref)::

    dv[b, h, c, t, j]    = sum_i Aref[b, h, g(c), i, j] * dy[b, c, t, i]
    dAref[b, h, g, i, j] = sum_{c in g, t} dy[b, c, t, i] * v[b, h, c, t, j]
    dA[h, i, j]          = sum_{b, g} dAref[b, h, g, i, j]
    with th_r = tanh(q[b, h, r, i] - k[b, h, r, j]) and D_r = sum_g W[h, g, r] * dAref[b, h, g]:
    dq[b, h, r, i]       =  alpha * sum_j D_r[i, j] * (1 - th_r[i, j]^2)
    dk[b, h, r, j]       = -alpha * sum_i D_r[i, j] * (1 - th_r[i, j]^2)
    P[b, h, g, r]        = sum_{i, j} dAref[b, h, g, i, j] * th_r[i, j]
    S[b, h, g]           = sum_{i, j} dAref[b, h, g, i, j]
    dW[h, g, r] = alpha * sum_b P,   dbias[h, g] = alpha * sum_b S,
    dalpha      = sum_{h, g, r} W * sum_b P + sum_{h, g} bias * sum_b S

``topology_grad_kernel`` produces ``dv`` and the small (B, H, G, V, V) ``dAref`` (one GEMM
reduction over the CG * T rows); ``refinement_grad_kernel`` turns ``dAref`` into ``dq``,
partial ``dk`` and partial ``P`` (one program per (i-tile, h, b)); the op wrapper finishes
the tiny sums over b, g and i-tiles with torch.

All accumulation is in float32 (float64 for float64 inputs); matrix products use ``tl.dot``.
"""
import triton
import triton.language as tl


@triton.jit
def _tanh(x):
    """tanh(x) = sign(x) * (1 - e) / (1 + e) with e = exp(-2|x|) in (0, 1]: never overflows."""
    e = tl.exp(-2.0 * tl.abs(x))
    magnitude = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -magnitude, magnitude)


@triton.jit
def _topology_tile(a_ptr, q_ptr, k_ptr, w_ptr, bias_ptr, alpha, rows_i, cols_j, b, h, g,
                   H, V, R, G, DYNAMIC: tl.constexpr, ACC_DTYPE: tl.constexpr):
    """Aref[b, h, g, i, j] at the broadcast of the 2-D index tensors ``rows_i`` and ``cols_j``
    (e.g. (BI, 1) and (1, BJ) for a tile, (1, BI) and (BJ, 1) for its transpose); zero
    outside the V x V range so padded rows/columns contribute nothing."""
    inside = (rows_i < V) & (cols_j < V)
    topo = tl.load(a_ptr + h * V * V + rows_i * V + cols_j, mask=inside, other=0.0).to(ACC_DTYPE)
    if DYNAMIC:
        qk_base = (b * H + h).to(tl.int64) * R * V
        refine = tl.zeros(topo.shape, ACC_DTYPE)
        for r in range(R):
            q_r = tl.load(q_ptr + qk_base + r * V + rows_i, mask=rows_i < V, other=0.0).to(ACC_DTYPE)
            k_r = tl.load(k_ptr + qk_base + r * V + cols_j, mask=cols_j < V, other=0.0).to(ACC_DTYPE)
            w_r = tl.load(w_ptr + (h * G + g) * R + r).to(ACC_DTYPE)
            refine += w_r * _tanh(q_r - k_r)
        bias = tl.load(bias_ptr + h * G + g).to(ACC_DTYPE)
        topo = tl.where(inside, topo + alpha * (refine + bias), 0.0)
    return topo


@triton.jit
def _load_alpha(alpha_ptr, DYNAMIC: tl.constexpr, ACC_DTYPE: tl.constexpr):
    """alpha in the accumulation dtype (unused, 0, in static mode)."""
    if DYNAMIC:
        alpha = tl.load(alpha_ptr).to(ACC_DTYPE)
    else:
        alpha = 0.0
    return alpha


@triton.jit
def ctr_graph_conv_fwd_kernel(v_ptr, a_ptr, q_ptr, k_ptr, w_ptr, bias_ptr, alpha_ptr, y_ptr,
                              H, C, T, V, R, G,
                              DYNAMIC: tl.constexpr, ACC_FP64: tl.constexpr,
                              EXACT_DOT: tl.constexpr, BLOCK_M: tl.constexpr,
                              BLOCK_V: tl.constexpr, BLOCK_J: tl.constexpr):
    """y[b, group g, rows m-tile, :] = sum_h sum_{j-tiles} v_hg[m, j] @ Aref[b, h, g]^T[j, :].

    Grid (cdiv(CG*T, BLOCK_M), G, B). The (BLOCK_J, BLOCK_V) tile of Aref^T is recomputed per
    (h, j-tile) and used at once by ``tl.dot``; the (BLOCK_M, BLOCK_V) accumulator sums over h."""
    ACC_DTYPE: tl.constexpr = tl.float64 if ACC_FP64 else tl.float32
    DOT_PRECISION: tl.constexpr = "ieee" if EXACT_DOT else "tf32"
    pid_m = tl.program_id(0)
    g = tl.program_id(1)
    b = tl.program_id(2)
    group_channels = C // G
    group_rows = group_channels * T
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    joints_i = tl.arange(0, BLOCK_V)
    alpha = _load_alpha(alpha_ptr, DYNAMIC, ACC_DTYPE)
    acc = tl.zeros((BLOCK_M, BLOCK_V), ACC_DTYPE)
    for h in range(H):
        v_base = ((b * H + h).to(tl.int64) * C + g * group_channels) * T * V
        for j0 in range(0, V, BLOCK_J):
            joints_j = j0 + tl.arange(0, BLOCK_J)
            v_tile = tl.load(v_ptr + v_base + rows[:, None] * V + joints_j[None, :],
                             mask=(rows[:, None] < group_rows) & (joints_j[None, :] < V), other=0.0)
            topo_t = _topology_tile(a_ptr, q_ptr, k_ptr, w_ptr, bias_ptr, alpha,
                                    joints_i[None, :], joints_j[:, None], b, h, g,
                                    H, V, R, G, DYNAMIC, ACC_DTYPE)
            acc = tl.dot(v_tile, topo_t.to(v_tile.dtype), acc, input_precision=DOT_PRECISION,
                         out_dtype=ACC_DTYPE)
    y_base = (b.to(tl.int64) * C + g * group_channels) * T * V
    tl.store(y_ptr + y_base + rows[:, None] * V + joints_i[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=(rows[:, None] < group_rows) & (joints_i[None, :] < V))


@triton.jit
def topology_grad_kernel(dy_ptr, v_ptr, a_ptr, q_ptr, k_ptr, w_ptr, bias_ptr, alpha_ptr,
                         dv_ptr, dtopo_ptr, H, C, T, V, R, G,
                         DYNAMIC: tl.constexpr, ACC_FP64: tl.constexpr,
                         EXACT_DOT: tl.constexpr, BLOCK_M: tl.constexpr,
                         BLOCK_V: tl.constexpr, BLOCK_J: tl.constexpr):
    """For one (b, h, g) and a tile of BLOCK_J columns j, loop over the CG*T rows in tiles:

        dv_hg[m, j]   = dy_g[m, :] @ Aref[b, h, g][:, j]
        dAref[:, j]  += dy_g[m-tile, :]^T @ v_hg[m-tile, j]

    Grid (cdiv(V, BLOCK_J), H * G, B). The (BLOCK_V, BLOCK_J) Aref tile is computed once per
    program. ``dtopo`` is (B, H, G, V, V) in the accumulation dtype."""
    ACC_DTYPE: tl.constexpr = tl.float64 if ACC_FP64 else tl.float32
    DOT_PRECISION: tl.constexpr = "ieee" if EXACT_DOT else "tf32"
    pid_j = tl.program_id(0)
    h = tl.program_id(1) // G
    g = tl.program_id(1) % G
    b = tl.program_id(2)
    group_channels = C // G
    group_rows = group_channels * T
    joints_i = tl.arange(0, BLOCK_V)
    joints_j = pid_j * BLOCK_J + tl.arange(0, BLOCK_J)
    alpha = _load_alpha(alpha_ptr, DYNAMIC, ACC_DTYPE)
    topo = _topology_tile(a_ptr, q_ptr, k_ptr, w_ptr, bias_ptr, alpha,
                          joints_i[:, None], joints_j[None, :], b, h, g, H, V, R, G, DYNAMIC, ACC_DTYPE)
    topo = topo.to(dy_ptr.dtype.element_ty)
    dy_base = (b.to(tl.int64) * C + g * group_channels) * T * V
    v_base = ((b * H + h).to(tl.int64) * C + g * group_channels) * T * V
    dtopo = tl.zeros((BLOCK_V, BLOCK_J), ACC_DTYPE)
    for m0 in range(0, group_rows, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        dy_tile = tl.load(dy_ptr + dy_base + rows[:, None] * V + joints_i[None, :],
                          mask=(rows[:, None] < group_rows) & (joints_i[None, :] < V), other=0.0)
        tile_mask = (rows[:, None] < group_rows) & (joints_j[None, :] < V)
        v_tile = tl.load(v_ptr + v_base + rows[:, None] * V + joints_j[None, :], mask=tile_mask,
                         other=0.0)
        dv_tile = tl.dot(dy_tile, topo, input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)
        tl.store(dv_ptr + v_base + rows[:, None] * V + joints_j[None, :],
                 dv_tile.to(dv_ptr.dtype.element_ty), mask=tile_mask)
        dtopo = tl.dot(tl.trans(dy_tile), v_tile, dtopo, input_precision=DOT_PRECISION,
                       out_dtype=ACC_DTYPE)
    dtopo_base = ((b * H + h).to(tl.int64) * G + g) * V * V
    tl.store(dtopo_ptr + dtopo_base + joints_i[:, None] * V + joints_j[None, :], dtopo,
             mask=(joints_i[:, None] < V) & (joints_j[None, :] < V))


@triton.jit
def refinement_grad_kernel(dtopo_ptr, q_ptr, k_ptr, w_ptr, alpha_ptr, dq_ptr, dk_part_ptr, p_part_ptr,
                           B, H, V, R, G, ACC_FP64: tl.constexpr,
                           BLOCK_I: tl.constexpr, BLOCK_V: tl.constexpr):
    """For one (b, h) and a tile of BLOCK_I rows i, for each r (th_r = tanh(q_r[i] - k_r[j])):

        D_r               = sum_g W[h, g, r] * dAref[b, h, g, i-tile, :]
        dq[b, h, r, i]    =  alpha * sum_j D_r * (1 - th_r^2)           (complete)
        dk_part[it, b, h, r, j] = -alpha * sum_{i in tile} D_r * (1 - th_r^2)
        p_part[it, b, h, g, r]  = sum_{i in tile, j} dAref[b, h, g] * th_r

    Grid (cdiv(V, BLOCK_I), H, B); the caller sums the partials over the i-tiles ``it``."""
    ACC_DTYPE: tl.constexpr = tl.float64 if ACC_FP64 else tl.float32
    pid_i = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    joints_i = pid_i * BLOCK_I + tl.arange(0, BLOCK_I)
    joints_j = tl.arange(0, BLOCK_V)
    inside = (joints_i[:, None] < V) & (joints_j[None, :] < V)
    alpha = tl.load(alpha_ptr).to(ACC_DTYPE)
    qk_base = (b * H + h).to(tl.int64) * R * V
    dtopo_base = (b * H + h).to(tl.int64) * G * V * V
    part_row = (pid_i * B + b) * H + h
    for r in range(R):
        q_r = tl.load(q_ptr + qk_base + r * V + joints_i, mask=joints_i < V, other=0.0).to(ACC_DTYPE)
        k_r = tl.load(k_ptr + qk_base + r * V + joints_j, mask=joints_j < V, other=0.0).to(ACC_DTYPE)
        th = _tanh(q_r[:, None] - k_r[None, :])
        weighted = tl.zeros((BLOCK_I, BLOCK_V), ACC_DTYPE)
        for g in range(G):
            d_g = tl.load(dtopo_ptr + dtopo_base + g * V * V + joints_i[:, None] * V + joints_j[None, :],
                          mask=inside, other=0.0)
            weighted += tl.load(w_ptr + (h * G + g) * R + r).to(ACC_DTYPE) * d_g
            tl.store(p_part_ptr + (part_row * G + g) * R + r, tl.sum(d_g * th))
        slope = alpha * weighted * (1.0 - th * th)
        tl.store(dq_ptr + qk_base + r * V + joints_i, tl.sum(slope, axis=1).to(dq_ptr.dtype.element_ty),
                 mask=joints_i < V)
        tl.store(dk_part_ptr + (part_row * R + r) * V + joints_j, -tl.sum(slope, axis=0),
                 mask=joints_j < V)


def gemm_config(V: int, rows: int, fma_dot: bool) -> dict:
    """Launch parameters of ``ctr_graph_conv_fwd_kernel`` and ``topology_grad_kernel``.

    ``rows`` = CG * T rows per group; ``fma_dot`` for fp32/fp64 inputs, whose exact ("ieee")
    ``tl.dot`` runs on FMA units and needs more registers than 16-bit tensor-core products.
    With 8 warps these tiles compile for sm_90 at every V <= 128 without register spills
    (12 bytes at most, fp32 static forward; checked with ptxas); larger row tiles mean fewer
    recomputations of the topology in the forward kernel."""
    block_v = joint_block(V)
    return dict(BLOCK_M=min(_row_tile_cap(block_v, fma_dot), max(16, triton.next_power_of_2(rows))),
                BLOCK_V=block_v, BLOCK_J=min(block_v, 32), num_warps=8,
                num_stages=1 if fma_dot else 3)


def _row_tile_cap(block_v: int, fma_dot: bool) -> int:
    if fma_dot:
        return 32 if block_v > 64 else 64
    return 128 if block_v <= 64 else 64


def refinement_config(V: int) -> dict:
    """Launch parameters of ``refinement_grad_kernel``: tiles of 32 rows i by all V columns j
    (8 warps for V > 64 keep the three (32, BLOCK_V) tiles free of spills)."""
    block_v = joint_block(V)
    return dict(BLOCK_I=min(block_v, 32), BLOCK_V=block_v, num_warps=8 if block_v > 64 else 4)


def joint_block(V: int) -> int:
    """Padded joint count: a power of two, at least 16 (the smallest ``tl.dot`` side)."""
    return max(16, triton.next_power_of_2(V))
