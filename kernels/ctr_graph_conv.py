r"""Triton kernels for ``bharnet.ops.ctr_graph_conv`` (CTR-GC, and ST-GC as its static case).

Notation as in ``bharnet/ops/ctr_graph_conv.py``: ``v`` (B, H, C, T, V), groups ``G`` with
``CG = C / G`` channels each, ``q``/``k`` (B, H, R, V), ``W`` (H, G, R), ``bias`` (H, G),
``alpha`` a scalar, ``A`` (H, V, V)::

    Aref[b, h, g, i, j] = alpha * (sum_r W[h, g, r] * tanh(q[b, h, r, i] - k[b, h, r, j]) + bias[h, g])
                          + A[h, i, j]                      (static mode: Aref = A[h])
    y[b, c, t, i]       = sum_h sum_j Aref[b, h, g(c), i, j] * v[b, h, c, t, j]

Inside one (b, g) the rows ``m = c_local * T + t`` of ``v[b, h, group g]`` and of ``y[b, group g]``
are contiguous (CG * T rows of V joints), so the aggregation is, per (b, g), a GEMM
``y_g (CG*T, V) = sum_h v_hg (CG*T, V) @ Aref[b, h, g]^T (V, V)``.

``topology_kernel`` evaluates the refined topologies once per call into a (B, H, G, V, V)
buffer in the compute dtype (the reference casts its float32 topology to v's dtype before the
product, so do the kernels): R tanh per topology element, B*H*G*R*V^2 in all, instead of once
per row tile of every GEMM program. The buffer is small (G topologies per (b, h), not C) and
L2-resident; no (B, H, C, V, V) or (B, H, C, T, V) intermediate is ever written. The static
mode reads A directly (batch stride 0, G = 1).

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

``topology_grad_kernel`` produces ``dv`` and ``dAref`` (the latter as per-chunk partial sums
over the CG * T rows when the rows are split over several programs);
``refinement_grad_kernel`` turns ``dAref`` into ``dq`` and partials of ``dk``, ``P``, ``S`` and
``dA`` (one program per (i-tile, h, b)); ``parameter_grad_kernel`` finishes the sums over b and
the tiles, so a backward is four launches and (for large H * G * R) one torch sum. In static
mode ``column_sum_kernel`` sums dA over the chunk x b partials.

All accumulation is in float32 (float64 for float64 inputs); matrix products use ``tl.dot``.
"""
from typing import Tuple

import triton
import triton.language as tl

from bharnet.ops._custom_op import launch_config, next_pow2


@triton.jit
def _tanh(x):
    """tanh(x) = sign(x) * (1 - e) / (1 + e) with e = exp(-2|x|) in (0, 1]: never overflows."""
    e = tl.exp(-2.0 * tl.abs(x))
    magnitude = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -magnitude, magnitude)


@triton.jit
def topology_kernel(a_ptr, q_ptr, k_ptr, w_ptr, bias_ptr, alpha_ptr, topo_ptr, H, V, R, G,
                    ACC_FP64: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_V: tl.constexpr):
    """topo[b, h, g, i-tile, :] = Aref[b, h, g, i-tile, :] (module docstring), stored in the
    buffer's dtype. Grid (cdiv(V, BLOCK_I), H * G, B)."""
    ACC_DTYPE: tl.constexpr = tl.float64 if ACC_FP64 else tl.float32
    pid_i = tl.program_id(0)
    h = tl.program_id(1) // G
    g = tl.program_id(1) % G
    b = tl.program_id(2)
    rows_i = pid_i * BLOCK_I + tl.arange(0, BLOCK_I)
    cols_j = tl.arange(0, BLOCK_V)
    inside = (rows_i[:, None] < V) & (cols_j[None, :] < V)
    qk_base = (b * H + h).to(tl.int64) * R * V
    refine = tl.zeros((BLOCK_I, BLOCK_V), ACC_DTYPE)
    for r in range(R):
        q_r = tl.load(q_ptr + qk_base + r * V + rows_i, mask=rows_i < V, other=0.0).to(ACC_DTYPE)
        k_r = tl.load(k_ptr + qk_base + r * V + cols_j, mask=cols_j < V, other=0.0).to(ACC_DTYPE)
        w_r = tl.load(w_ptr + (h * G + g) * R + r).to(ACC_DTYPE)
        refine += w_r * _tanh(q_r[:, None] - k_r[None, :])
    alpha = tl.load(alpha_ptr).to(ACC_DTYPE)
    bias = tl.load(bias_ptr + h * G + g).to(ACC_DTYPE)
    offsets = rows_i[:, None] * V + cols_j[None, :]
    topo = tl.load(a_ptr + h * V * V + offsets, mask=inside, other=0.0).to(ACC_DTYPE)
    topo += alpha * (refine + bias)
    topo_base = ((b * H + h).to(tl.int64) * G + g) * V * V
    tl.store(topo_ptr + topo_base + offsets, topo.to(topo_ptr.dtype.element_ty), mask=inside)


@triton.jit
def ctr_graph_conv_fwd_kernel(v_ptr, topo_ptr, y_ptr, topo_batch_stride, H, C, T, V, G,
                              ACC_FP64: tl.constexpr, EXACT_DOT: tl.constexpr,
                              BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_J: tl.constexpr):
    """y[b, group g, rows m-tile, :] = sum_h sum_{j-tiles} v_hg[m, j] @ topo[b, h, g]^T[j, :].

    Grid (cdiv(CG*T, BLOCK_M), G, B); ``topo`` is the (B, H, G, V, V) buffer of
    ``topology_kernel`` (``topo_batch_stride`` = H*G*V*V), or A itself in static mode (stride
    0, G = 1). The (BLOCK_M, BLOCK_V) accumulator sums over h and the j-tiles."""
    ACC_DTYPE: tl.constexpr = tl.float64 if ACC_FP64 else tl.float32
    DOT_PRECISION: tl.constexpr = "ieee" if EXACT_DOT else "tf32"
    pid_m = tl.program_id(0)
    g = tl.program_id(1)
    b = tl.program_id(2)
    group_channels = C // G
    group_rows = group_channels * T
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    joints_i = tl.arange(0, BLOCK_V)
    acc = tl.zeros((BLOCK_M, BLOCK_V), ACC_DTYPE)
    for h in range(H):
        v_base = ((b * H + h).to(tl.int64) * C + g * group_channels) * T * V
        topo_base = b.to(tl.int64) * topo_batch_stride + (h * G + g) * V * V
        for j0 in range(0, V, BLOCK_J):
            joints_j = j0 + tl.arange(0, BLOCK_J)
            v_tile = tl.load(v_ptr + v_base + rows[:, None] * V + joints_j[None, :],
                             mask=(rows[:, None] < group_rows) & (joints_j[None, :] < V), other=0.0)
            topo_t = tl.load(topo_ptr + topo_base + joints_i[None, :] * V + joints_j[:, None],
                             mask=(joints_i[None, :] < V) & (joints_j[:, None] < V), other=0.0)
            acc = tl.dot(v_tile, topo_t.to(v_tile.dtype), acc, input_precision=DOT_PRECISION,
                         out_dtype=ACC_DTYPE)
    y_base = (b.to(tl.int64) * C + g * group_channels) * T * V
    tl.store(y_ptr + y_base + rows[:, None] * V + joints_i[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=(rows[:, None] < group_rows) & (joints_i[None, :] < V))


@triton.jit
def topology_grad_kernel(dy_ptr, v_ptr, topo_ptr, dv_ptr, dtopo_ptr, topo_batch_stride,
                         B, H, C, T, V, G, ROW_TILES_PER_CHUNK,
                         ACC_FP64: tl.constexpr, EXACT_DOT: tl.constexpr, BLOCK_M: tl.constexpr,
                         BLOCK_V: tl.constexpr, BLOCK_J: tl.constexpr):
    """For one (b, h, g), a tile of BLOCK_J columns j and one chunk of row tiles:

        dv_hg[m, j]               = dy_g[m, :] @ topo[b, h, g][:, j]
        dtopo[chunk, b, h, g][:, j] = sum_{m in chunk} dy_g[m, :]^T @ v_hg[m, j]

    Grid (cdiv(V, BLOCK_J) * chunks, H * G, B); ``dtopo`` is (chunks, B, H, G, V, V) in the
    accumulation dtype (the caller sums over chunks). The (BLOCK_V, BLOCK_J) topology tile is
    loaded once per program."""
    ACC_DTYPE: tl.constexpr = tl.float64 if ACC_FP64 else tl.float32
    DOT_PRECISION: tl.constexpr = "ieee" if EXACT_DOT else "tf32"
    j_tiles = tl.cdiv(V, BLOCK_J)
    pid_j = tl.program_id(0) % j_tiles
    chunk = tl.program_id(0) // j_tiles
    h = tl.program_id(1) // G
    g = tl.program_id(1) % G
    b = tl.program_id(2)
    group_channels = C // G
    group_rows = group_channels * T
    joints_i = tl.arange(0, BLOCK_V)
    joints_j = pid_j * BLOCK_J + tl.arange(0, BLOCK_J)
    topo_mask = (joints_i[:, None] < V) & (joints_j[None, :] < V)
    topo_base = b.to(tl.int64) * topo_batch_stride + (h * G + g) * V * V
    topo = tl.load(topo_ptr + topo_base + joints_i[:, None] * V + joints_j[None, :], mask=topo_mask,
                   other=0.0).to(dy_ptr.dtype.element_ty)
    dy_base = (b.to(tl.int64) * C + g * group_channels) * T * V
    v_base = ((b * H + h).to(tl.int64) * C + g * group_channels) * T * V
    dtopo = tl.zeros((BLOCK_V, BLOCK_J), ACC_DTYPE)
    first_row = chunk * ROW_TILES_PER_CHUNK * BLOCK_M
    last_row = tl.minimum(first_row + ROW_TILES_PER_CHUNK * BLOCK_M, group_rows)
    for m0 in range(first_row, last_row, BLOCK_M):
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
    dtopo_base = (((chunk * B + b) * H + h).to(tl.int64) * G + g) * V * V
    tl.store(dtopo_ptr + dtopo_base + joints_i[:, None] * V + joints_j[None, :], dtopo, mask=topo_mask)


@triton.jit
def refinement_grad_kernel(dtopo_ptr, q_ptr, k_ptr, w_ptr, alpha_ptr, dq_ptr, dk_part_ptr, p_part_ptr,
                           s_part_ptr, da_part_ptr, B, H, V, R, G, CHUNKS, ACC_FP64: tl.constexpr,
                           BLOCK_I: tl.constexpr, BLOCK_V: tl.constexpr):
    """For one (b, h) and a tile of BLOCK_I rows i. First, for each g::

        dAref[b, h, g, i-tile, :] = sum over the CHUNKS partials of ``topology_grad_kernel``
                                    (written back to chunk 0 when CHUNKS > 1)
        s_part[it, b, h, g]       = sum_{i in tile, j} dAref[b, h, g]
        da_part[b, h, i-tile, :]  = sum_g dAref[b, h, g, i-tile, :]

    then for each r (th_r = tanh(q_r[i] - k_r[j])):

        D_r               = sum_g W[h, g, r] * dAref[b, h, g, i-tile, :]
        dq[b, h, r, i]    =  alpha * sum_j D_r * (1 - th_r^2)           (complete)
        dk_part[it, b, h, r, j] = -alpha * sum_{i in tile} D_r * (1 - th_r^2)
        p_part[it, b, h, g, r]  = sum_{i in tile, j} dAref[b, h, g] * th_r

    Grid (cdiv(V, BLOCK_I), H, B); ``parameter_grad_kernel`` sums the partials over the
    i-tiles ``it`` and b."""
    ACC_DTYPE: tl.constexpr = tl.float64 if ACC_FP64 else tl.float32
    pid_i = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    joints_i = pid_i * BLOCK_I + tl.arange(0, BLOCK_I)
    joints_j = tl.arange(0, BLOCK_V)
    inside = (joints_i[:, None] < V) & (joints_j[None, :] < V)
    tile = joints_i[:, None] * V + joints_j[None, :]
    alpha = tl.load(alpha_ptr).to(ACC_DTYPE)
    qk_base = (b * H + h).to(tl.int64) * R * V
    dtopo_base = (b * H + h).to(tl.int64) * G * V * V
    chunk_stride = tl.cast(B, tl.int64) * H * G * V * V  # tl.cast: B may be a constexpr 1
    part_row = (pid_i * B + b) * H + h
    da = tl.zeros((BLOCK_I, BLOCK_V), ACC_DTYPE)
    for g in range(G):
        d_g = tl.load(dtopo_ptr + dtopo_base + g * V * V + tile, mask=inside, other=0.0)
        if CHUNKS > 1:
            for chunk in range(1, CHUNKS):
                d_g += tl.load(dtopo_ptr + chunk * chunk_stride + dtopo_base + g * V * V + tile,
                               mask=inside, other=0.0)
            tl.store(dtopo_ptr + dtopo_base + g * V * V + tile, d_g, mask=inside)
        tl.store(s_part_ptr + part_row * G + g, tl.sum(d_g))
        da += d_g
    tl.store(da_part_ptr + (b * H + h).to(tl.int64) * V * V + tile, da, mask=inside)
    tl.debug_barrier()  # the chunk sums stored above are read back below, by other threads
    for r in range(R):
        q_r = tl.load(q_ptr + qk_base + r * V + joints_i, mask=joints_i < V, other=0.0).to(ACC_DTYPE)
        k_r = tl.load(k_ptr + qk_base + r * V + joints_j, mask=joints_j < V, other=0.0).to(ACC_DTYPE)
        th = _tanh(q_r[:, None] - k_r[None, :])
        weighted = tl.zeros((BLOCK_I, BLOCK_V), ACC_DTYPE)
        for g in range(G):
            d_g = tl.load(dtopo_ptr + dtopo_base + g * V * V + tile, mask=inside, other=0.0)
            weighted += tl.load(w_ptr + (h * G + g) * R + r).to(ACC_DTYPE) * d_g
            tl.store(p_part_ptr + (part_row * G + g) * R + r, tl.sum(d_g * th))
        slope = alpha * weighted * (1.0 - th * th)
        tl.store(dq_ptr + qk_base + r * V + joints_i, tl.sum(slope, axis=1).to(dq_ptr.dtype.element_ty),
                 mask=joints_i < V)
        tl.store(dk_part_ptr + (part_row * R + r) * V + joints_j, -tl.sum(slope, axis=0),
                 mask=joints_j < V)


@triton.jit
def _column_sums(block, src_ptr, dst_ptr, rows, cols, ACC_DTYPE: tl.constexpr,
                 BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr):
    """dst[c] = sum_r src[r, c] over a row-major (rows, cols) src, for one block of columns."""
    columns = block * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
    acc = tl.zeros((BLOCK_ROWS, BLOCK_COLS), ACC_DTYPE)
    for r0 in range(0, rows, BLOCK_ROWS):
        row = r0 + tl.arange(0, BLOCK_ROWS)
        acc += tl.load(src_ptr + row[:, None].to(tl.int64) * cols + columns[None, :],
                       mask=(row[:, None] < rows) & (columns[None, :] < cols), other=0.0)
    tl.store(dst_ptr + columns, tl.sum(acc, axis=0).to(dst_ptr.dtype.element_ty), mask=columns < cols)


@triton.jit
def column_sum_kernel(src_ptr, dst_ptr, rows, cols, ACC_FP64: tl.constexpr,
                      BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr):
    """dst[c] = sum_r src[r, c]: the static mode's dA[h, i, j] from the (chunks x B, H*V*V)
    partial sums of ``topology_grad_kernel``. Grid (cdiv(cols, BLOCK_COLS),)."""
    ACC_DTYPE: tl.constexpr = tl.float64 if ACC_FP64 else tl.float32
    _column_sums(tl.program_id(0), src_ptr, dst_ptr, rows, cols, ACC_DTYPE, BLOCK_ROWS, BLOCK_COLS)


@triton.jit
def parameter_grad_kernel(da_part_ptr, da_ptr, dk_part_ptr, dk_ptr, p_part_ptr, s_part_ptr,
                          w_ptr, bias_ptr, alpha_ptr, dw_ptr, db_ptr, dalpha_ptr,
                          B, HVV, BHRV, I_TILES, HG, R, da_programs, dk_programs,
                          ACC_FP64: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr,
                          PARAM_ROWS: tl.constexpr, BLOCK_PARAMS: tl.constexpr):
    """The last sums of the CTR-GC backward, in one launch of three kinds of programs:

        dA[h, i, j] = sum_b da_part[b, h, i, j]                      programs [0, da_programs)
        dk          = sum over the i-tiles of dk_part                the next dk_programs
        dW[h, g, r] = alpha * P,  dbias[h, g] = alpha * S,           the rest, BLOCK_PARAMS
        dalpha[block] = sum W * P + bias * S over the block            (h, g, r) each
        with P = sum over (i-tile, b) of p_part, S likewise of s_part.

    Grid (da_programs + dk_programs + cdiv(HG * R, BLOCK_PARAMS),); the caller adds the
    dalpha partials when there is more than one parameter block. Every pointer is its own
    buffer: torch.compile treats each stored-to argument as a separate output."""
    ACC_DTYPE: tl.constexpr = tl.float64 if ACC_FP64 else tl.float32
    pid = tl.program_id(0)
    if pid < da_programs:
        _column_sums(pid, da_part_ptr, da_ptr, B, HVV, ACC_DTYPE, BLOCK_ROWS, BLOCK_COLS)
    elif pid < da_programs + dk_programs:
        _column_sums(pid - da_programs, dk_part_ptr, dk_ptr, I_TILES, BHRV, ACC_DTYPE,
                     BLOCK_ROWS, BLOCK_COLS)
    else:
        block = pid - da_programs - dk_programs
        part_rows = I_TILES * B
        hgr = block * BLOCK_PARAMS + tl.arange(0, BLOCK_PARAMS)  # flat (h, g, r)
        used = hgr < HG * R
        hg = hgr // R
        owns_hg = used & (hgr % R == 0)  # the r = 0 column of each (h, g) carries S and dbias
        p_acc = tl.zeros((PARAM_ROWS, BLOCK_PARAMS), ACC_DTYPE)
        s_acc = tl.zeros((PARAM_ROWS, BLOCK_PARAMS), ACC_DTYPE)
        for r0 in range(0, part_rows, PARAM_ROWS):
            row = r0 + tl.arange(0, PARAM_ROWS)
            row_used = row[:, None] < part_rows
            p_acc += tl.load(p_part_ptr + row[:, None] * HG * R + hgr[None, :],
                             mask=row_used & used[None, :], other=0.0)
            s_acc += tl.load(s_part_ptr + row[:, None] * HG + hg[None, :],
                             mask=row_used & owns_hg[None, :], other=0.0)
        p_sum = tl.sum(p_acc, axis=0)
        s_sum = tl.sum(s_acc, axis=0)
        alpha = tl.load(alpha_ptr).to(ACC_DTYPE)
        tl.store(dw_ptr + hgr, (alpha * p_sum).to(dw_ptr.dtype.element_ty), mask=used)
        tl.store(db_ptr + hg, (alpha * s_sum).to(db_ptr.dtype.element_ty), mask=owns_hg)
        w = tl.load(w_ptr + hgr, mask=used, other=0.0).to(ACC_DTYPE)
        bias = tl.load(bias_ptr + hg, mask=owns_hg, other=0.0).to(ACC_DTYPE)
        tl.store(dalpha_ptr + block, tl.sum(w * p_sum + bias * s_sum).to(dalpha_ptr.dtype.element_ty))


# Programs wanted per topology_grad_kernel launch: several per SM of the largest GPUs, so that
# small batches split a group's rows over programs and keep every SM busy (132 SMs on an
# H100). At B = 128 the groups alone give enough: on the H100, splitting them further (2048
# programs) was slower (bench/tune_ctr_graph_conv.py).
TARGET_PROGRAMS = 1024


@launch_config
def forward_config(V: int, rows: int, fma_dot: bool) -> dict:
    """Launch parameters of ``ctr_graph_conv_fwd_kernel``; ``rows`` = CG * T rows per group.

    ``fma_dot`` for fp32/fp64 inputs, whose exact ("ieee") ``tl.dot`` runs on FMA units and
    needs more registers than 16-bit tensor-core products. The topology is read from the
    buffer, so the j-tiles are wide (few loop trips). 16-bit row tiles: 128 rows up to V = 64
    (H100 sweep, bf16: 86 vs 92 us at C64 T64 V25, 227 vs 297 us at C256 T16 V42 against 64)."""
    block_v = joint_block(V)
    block_m = 32 if fma_dot else (128 if block_v <= 64 else 64)
    return dict(BLOCK_M=min(block_m, max(16, next_pow2(rows))),
                BLOCK_V=block_v, BLOCK_J=min(block_v, 32 if fma_dot else 64),
                num_warps=4 if block_v <= 32 else 8, num_stages=1 if fma_dot else 3)


@launch_config
def grad_config(V: int, rows: int, fma_dot: bool, groups: int) -> Tuple[dict, int, int]:
    """Launch parameters of ``topology_grad_kernel`` for ``groups`` = H * G * B groups of
    ``rows`` rows: (kernel arguments, j_tiles, chunks). The arguments set the row tiles, the
    j-tiles (``j_tiles`` of ``BLOCK_J`` columns) and how many row tiles each program walks
    (``ROW_TILES_PER_CHUNK``; ``chunks`` programs share a group's rows and write partial dAref
    sums)."""
    block_v = joint_block(V)
    block_j = min(block_v, 32 if fma_dot else 64)
    j_tiles = -(-V // block_j)
    block_m = min(_grad_row_tile_cap(block_v, fma_dot), max(16, next_pow2(rows)))
    row_tiles = -(-rows // block_m)
    wanted_chunks = max(1, -(-TARGET_PROGRAMS // (j_tiles * groups)))
    per_chunk = -(-row_tiles // min(wanted_chunks, max(1, row_tiles // 2)))
    warps = 8 if fma_dot or block_v > 64 else 4
    launch = dict(BLOCK_M=block_m, BLOCK_V=block_v, BLOCK_J=block_j, ROW_TILES_PER_CHUNK=per_chunk,
                  num_warps=warps, num_stages=1 if fma_dot else 3)
    return launch, j_tiles, -(-row_tiles // per_chunk)


def _grad_row_tile_cap(block_v: int, fma_dot: bool) -> int:
    """16-bit: four warps on (128 | 64, BLOCK_V) tiles, measured on the H100 (bf16, B = 128):
    120 us at C64 T64 V25 and 215 us at C256 T16 V42, against 246 and 289 us with 8 warps."""
    if fma_dot:
        return 32 if block_v > 64 else 64
    return 128 if block_v <= 32 else 64


@launch_config
def topology_config(V: int) -> dict:
    """Launch parameters of ``topology_kernel``: tiles of up to 32 rows i by all V columns j."""
    block_v = joint_block(V)
    return dict(BLOCK_I=min(block_v, 32), BLOCK_V=block_v, num_warps=8 if block_v > 64 else 4)


@launch_config
def refinement_config(V: int) -> dict:
    """Launch parameters of ``refinement_grad_kernel``: tiles of 32 rows i by all V columns j
    (8 warps for V > 64 keep the three (32, BLOCK_V) tiles free of spills)."""
    block_v = joint_block(V)
    return dict(BLOCK_I=min(block_v, 32), BLOCK_V=block_v, num_warps=8 if block_v > 64 else 4)


def joint_block(V: int) -> int:
    """Padded joint count: a power of two, at least 16 (the smallest ``tl.dot`` side)."""
    return max(16, next_pow2(V))


# column_sum_kernel and the sums of parameter_grad_kernel: (8, 256) tiles; the parameter
# programs' two accumulators hold PARAM_TILE elements each.
SUM_LAUNCH = dict(BLOCK_ROWS=8, BLOCK_COLS=256, num_warps=4)
PARAM_TILE = 2048


@launch_config
def parameter_config(params: int) -> dict:
    """Launch parameters of ``parameter_grad_kernel`` for ``params`` = H * G * R weights."""
    block_params = min(next_pow2(params), PARAM_TILE)
    return dict(SUM_LAUNCH, BLOCK_PARAMS=block_params, PARAM_ROWS=PARAM_TILE // block_params)
