"""The Triton kernels of ctr_graph_conv, deformable_temporal_conv, cross_attention, layer_norm
and batch_norm compile for an H100.

Every other Triton test on this machine runs the kernels in the interpreter
(tests/conftest.py sets TRITON_INTERPRET=1), which accepts code that the compiler rejects
(e.g. a tensor whose shape differs between the branches of an ``if``, or ``.to()`` on an
argument that Triton turned into a constexpr); such a kernel would first fail on the GPU
machine. These tests compile each kernel for sm_90 without a GPU
(``op_testing.compile_for_sm90``, one subprocess per kernels module) with the signatures the
op wrappers launch it with:

* pointers in the dtypes the wrappers pass: float16/bfloat16 activations with float32
  parameters (the autocast case) or with 16-bit parameters, float32, float64; scratch and
  statistics buffers in the accumulation dtype (float32, float64 for float64 inputs);
* constexpr flags and block sizes from the wrappers' launch-configuration functions at the
  model's shapes (DESIGN.md section 5: V = 25 body, 42 hand and 67 unified joints; attention
  dim 256 with 8 heads in frame and sequence mode);
* shapes whose sizes, strides or program counts are 1 (one sample, subset, group, frame,
  query, key, row or feature), with exactly those integer arguments passed as the constexpr
  1 that Triton specialises them into at launch.

Each kernel compiles in the dtype/shape combinations of the ``*_CASES`` lists below, chosen so
that every dtype, tile configuration and size of 1 occurs, not in all combinations (one
compile takes 0.2-1 s here; the file about 70 s with an empty Triton cache). Not covered:
the launch options ``num_warps`` and ``num_stages`` (compiled with Triton's defaults) and the
divisibility-by-16 hints Triton adds for some integer arguments.
"""
import importlib

import torch
import triton.language as tl

from op_testing import compile_for_sm90

batch_norm_ops = importlib.import_module("bharnet.ops.batch_norm")
ctr_ops = importlib.import_module("bharnet.ops.ctr_graph_conv")
detgc_ops = importlib.import_module("bharnet.ops.deformable_temporal_conv")
attention_ops = importlib.import_module("bharnet.ops.cross_attention")
layer_norm_ops = importlib.import_module("bharnet.ops.layer_norm")

TORCH_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32, "fp64": torch.float64}
# (activations, parameters): 16-bit activations with float32 parameters (autocast), float32,
# float64; and 16-bit activations with parameters of their own dtype (a model cast to 16 bits).
MAIN_DTYPES = [("bf16", "fp32"), ("fp16", "fp32"), ("fp32", "fp32"), ("fp64", "fp64")]
OWN_16BIT_DTYPES = [("bf16", "bf16"), ("fp16", "fp16")]


def _acc(dtype):
    return "fp64" if dtype == "fp64" else "fp32"


def _kernel_names(kernels):
    """The kernels a module launches (the helpers they call are not named ``*_kernel``)."""
    return {name for name, obj in vars(kernels).items() if name.endswith("_kernel") and hasattr(obj, "arg_names")}


def _job(kernels, name, tensors, constexprs, ints):
    """(name, pointers, constexprs) for ``compile_for_sm90``: the kernel's pointer dtypes
    (every ``*_ptr`` argument must have one), its constexprs, and the integer arguments of
    ``ints`` that equal 1 as constexpr 1 (as Triton specialises them at launch)."""
    arg_names = getattr(kernels, name).arg_names
    pointers = {arg: t for arg, t in tensors.items() if arg in arg_names}
    assert {arg for arg in arg_names if arg.endswith("_ptr")} == set(pointers), name
    ones = {arg: 1 for arg, value in ints.items() if value == 1}
    return name, pointers, {arg: v for arg, v in {**constexprs, **ones}.items() if arg in arg_names}


# --- ctr_graph_conv -----------------------------------------------------------------------------
# (B, H, C, T, V, R, G): DESIGN.md section 5 (H = 3, G = 4, R = C_in / 8) at V = 25, 42 and 67
# (32-, 64- and 128-joint tiles); one sample, subset, frame, relation channel and group (then
# CHUNKS, ROW_TILES_PER_CHUNK, I_TILES and dk_programs are 1 as well).
BODY, HAND, UNIFIED = (8, 3, 64, 64, 25, 8, 4), (8, 3, 256, 16, 42, 32, 4), (8, 3, 64, 16, 67, 8, 4)
ONES = (1, 1, 4, 1, 25, 1, 1)
# (v, q and k dtype; A, weight, bias and alpha dtype; shape): every joint count with 16-bit
# (tensor-core) and float32/float64 (FMA) tiles, the sizes of 1 in every main dtype.
CTR_CASES = ([("bf16", "fp32", BODY), ("fp16", "fp32", HAND), ("bf16", "bf16", UNIFIED), ("fp16", "fp16", BODY),
              ("fp32", "fp32", UNIFIED), ("fp64", "fp64", HAND)]
             + [(x, p, ONES) for x, p in MAIN_DTYPES])


def _ctr_jobs(kernels, x, p, shape):
    """The CTR-GC launches (topology, forward, topology_grad, refinement_grad, parameter_grad)
    and the ST-GC ones (forward and topology_grad reading A with G = 1, column_sum) of
    ``bharnet.ops.ctr_graph_conv`` for v, q, k in ``x`` and A, weight, bias, alpha in ``p``."""
    B, H, C, T, V, R, G = shape
    acc = _acc(x)
    fma = x in ("fp32", "fp64")
    flags = dict(ACC_FP64=x == "fp64", EXACT_DOT=fma)
    refinement, params = kernels.refinement_config(V), kernels.parameter_config(H * G * R)
    dalpha = p if H * G * R <= params["BLOCK_PARAMS"] else acc  # else partial sums, one per parameter block
    tensors = dict(a_ptr=p, q_ptr=x, k_ptr=x, w_ptr=p, bias_ptr=p, alpha_ptr=p, topo_ptr=x, v_ptr=x, y_ptr=x,
                   dy_ptr=x, dv_ptr=x, dtopo_ptr=acc, dq_ptr=x, dk_part_ptr=acc, p_part_ptr=acc, s_part_ptr=acc,
                   da_part_ptr=acc, da_ptr=p, dk_ptr=x, dw_ptr=p, db_ptr=p, dalpha_ptr=dalpha)
    static_tensors = dict(tensors, topo_ptr=p, src_ptr=acc, dst_ptr=p)  # A itself is read, dA summed into it
    jobs = []
    for static in (False, True):
        groups = 1 if static else G
        rows = C // groups * T
        grad_launch, _, chunks = kernels.grad_config(V, rows, fma, H * groups * B)
        ints = dict(B=B, H=H, C=C, T=T, V=V, R=R, G=groups, ROW_TILES_PER_CHUNK=grad_launch["ROW_TILES_PER_CHUNK"],
                    CHUNKS=chunks, I_TILES=-(-V // refinement["BLOCK_I"]), HG=H * G, HVV=H * V * V,
                    BHRV=B * H * R * V, da_programs=-(-H * V * V // params["BLOCK_COLS"]),
                    dk_programs=-(-B * H * R * V // params["BLOCK_COLS"]), rows=chunks * B, cols=H * V * V,
                    topo_batch_stride=0 if static else H * G * V * V)
        launches = [("ctr_graph_conv_fwd_kernel", kernels.forward_config(V, rows, fma)),
                    ("topology_grad_kernel", {k: v for k, v in grad_launch.items() if k != "ROW_TILES_PER_CHUNK"})]
        if static:
            launches.append(("column_sum_kernel", kernels.SUM_LAUNCH))
        else:
            launches += [("topology_kernel", kernels.topology_config(V)), ("refinement_grad_kernel", refinement),
                         ("parameter_grad_kernel", params)]
        jobs += [_job(kernels, name, static_tensors if static else tensors, {**flags, **launch}, ints)
                 for name, launch in launches]
    return jobs


def test_ctr_graph_conv_kernels_compile_for_the_h100():
    """Every ctr_graph_conv kernel compiles for sm_90 in every input dtype, at the model's
    joint counts, and with B = H = T = R = G = 1 (and the program counts that follow)."""
    kernels = ctr_ops._kernels()
    jobs = [job for x, p, shape in CTR_CASES for job in _ctr_jobs(kernels, x, p, shape)]
    assert {name for name, _, _ in jobs} == _kernel_names(kernels)
    compile_for_sm90("bharnet.kernels.ctr_graph_conv", jobs)


# --- deformable_temporal_conv -------------------------------------------------------------------
# (B, C, O, T, V, E, stride): the MSTCN branches' shapes at V = 25 and 42, stride 1 and 2, and
# every size 1.
DETGC_BODY, DETGC_STRIDED = (8, 64, 64, 64, 25, 4, 1), (8, 64, 128, 64, 25, 4, 2)
DETGC_HAND = (8, 256, 256, 16, 42, 4, 1)
DETGC_ONES = (1, 1, 1, 1, 1, 1, 1)
# (x dtype, offsets dtype, weight and bias dtype, shape, bias).
DETGC_CASES = ([("bf16", "fp32", "fp32", DETGC_BODY, True), ("fp16", "fp32", "fp32", DETGC_STRIDED, True),
                ("bf16", "bf16", "bf16", DETGC_HAND, True), ("fp32", "fp32", "fp32", DETGC_STRIDED, True),
                ("fp64", "fp64", "fp64", DETGC_HAND, True), ("fp32", "fp64", "fp32", DETGC_BODY, True),
                ("bf16", "fp32", "fp32", DETGC_BODY, False)]
               + [(x, p, p, DETGC_ONES, True) for x, p in MAIN_DTYPES])
TRITON_DTYPE_ATTRIBUTES = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32", "fp64": "float64"}


def _constexpr(value):
    """A Triton dtype as "tl.<name>" (how compile_for_sm90 takes them); other values as they are."""
    return "tl." + TRITON_DTYPE_ATTRIBUTES[str(value)] if isinstance(value, tl.dtype) else value


def _detgc_jobs(kernels, x, offsets, w, shape, has_bias):
    """The forward, parameter-gradient and input-gradient launches of
    ``bharnet.ops.deformable_temporal_conv`` for contiguous x, offsets, weight, bias and dy."""
    B, C, O, T, V, E, stride = shape
    T_out = (T - 1) // stride + 1
    acc = _acc(x)
    dtypes = {name: _constexpr(value)
              for name, value in kernels._dtype_args(TORCH_DTYPES[x], TORCH_DTYPES[offsets]).items()}
    _, forward_blocks = kernels._forward_launch(B, C, V, O, E, T_out)
    launch = kernels._backward_launch(B, C, T, V, O, E, T_out)
    tensors = dict(x_ptr=x, tau_ptr=offsets, w_ptr=w, bias_ptr=w, y_ptr=x, dy_ptr=x, part_ptr=acc, dx_ptr=x,
                   dweight_ptr=w, dbias_ptr=w, doffsets_ptr=offsets)
    flags = dict(E=E, HAS_BIAS=has_bias, BOUNDS_PASS_GRAD=kernels.CLAMP_PASSES_GRADIENT_AT_BOUNDS, **dtypes)
    ints = dict(sx_b=C * T * V, sx_c=T * V, sx_t=V, sx_v=1, s_tau=1, sw_o=C * E, sw_c=E, sw_e=1,
                s_bias=1 if has_bias else 0, sd_b=O * T_out * V, sd_o=T_out * V, sd_t=V, sd_v=1,
                B=B, C=C, T=T, V=V, O=O, T_out=T_out, stride=stride, splits=launch.splits,
                tiles_per_split=launch.tiles_per_split, offset_rows=launch.offset_rows)
    return [_job(kernels, "_forward_kernel", tensors, {**flags, **forward_blocks}, ints),
            _job(kernels, "_param_grad_kernel", tensors, {**flags, **launch.param_blocks}, ints),
            _job(kernels, "_input_grad_kernel", tensors, {**flags, **launch.input_blocks}, ints)]


def test_deformable_temporal_conv_kernels_compile_for_the_h100():
    """Every deformable_temporal_conv kernel compiles for sm_90 in every input dtype (offsets
    in float32 next to 16-bit x, or in x's dtype), with stride 1 and 2, without bias, and with
    every size 1."""
    kernels = detgc_ops._kernels()
    jobs = [job for x, offsets, w, shape, bias in DETGC_CASES
            for job in _detgc_jobs(kernels, x, offsets, w, shape, bias)]
    assert {name for name, _, _ in jobs} == _kernel_names(kernels)
    compile_for_sm90("bharnet.kernels.deformable_temporal_conv", jobs)


# --- cross_attention ----------------------------------------------------------------------------
# (Lq, Lk, head_dim, heads): frame mode (25 body joints attend 42 hand joints: one tile, the
# fused backward), sequence mode (16 frames: 400 queries, 672 keys in blocks: the dq and dk/dv
# kernels), one query of one head over many keys, one key.
FRAME, SEQUENCE, ONE_QUERY, ONE_KEY = (25, 42, 32, 8), (400, 672, 32, 8), (1, 672, 32, 1), (25, 1, 32, 1)
# (q and kv dtype, shape, key mask): both modes in every dtype with a mask, without one in frame
# mode (and once in sequence mode), the sizes of 1 in two dtypes each.
ATTENTION_CASES = ([(x, shape, True) for x in TORCH_DTYPES for shape in (FRAME, SEQUENCE)]
                   + [(x, FRAME, False) for x in TORCH_DTYPES]
                   + [("bf16", SEQUENCE, False), ("bf16", ONE_QUERY, True), ("fp64", ONE_QUERY, True),
                      ("fp16", ONE_KEY, True), ("fp32", ONE_KEY, True)])


def _attention_jobs(kernels, x, shape, has_mask):
    """The launches of ``bharnet.ops.cross_attention``'s core (forward, then the fused backward
    or the dq and dk/dv kernels) for q and kv in ``x``, with a contiguous uint8 key mask
    (int32 next to float64 data) or none (kv stands in)."""
    Lq, Lk, head_dim, heads = shape
    D = heads * head_dim
    acc = _acc(x)
    block_q, block_k, block_d, fused, _ = attention_ops._config(Lq, Lk, head_dim, TORCH_DTYPES[x].itemsize)
    mask = ("i32" if x == "fp64" else "u8") if has_mask else x
    tensors = dict(q_ptr=x, kv_ptr=x, mask_ptr=mask, o_ptr=x, lse_ptr=acc, do_ptr=x, delta_ptr=acc, dq_ptr=x,
                   dkv_ptr=x)
    constexprs = dict(HAS_MASK=has_mask, ACC_FP64=x == "fp64",
                      DOT_PRECISION="ieee" if x in ("fp32", "fp64") else "tf32",
                      BLOCK_Q=block_q, BLOCK_K=block_k, BLOCK_D=block_d)
    # contiguous q, kv and dO; the mask's strides are 0 without one
    ints = dict(H=heads, Lq=Lq, Lk=Lk, D=D, HEAD_DIM=head_dim, stride_qn=Lq * D, stride_ql=D,
                stride_kvn=Lk * 2 * D, stride_kvl=2 * D, stride_mn=Lk if has_mask else 0,
                stride_ml=1 if has_mask else 0, stride_don=Lq * D, stride_dol=D)
    names = ["cross_attention_fwd_kernel"]
    names += (["cross_attention_bwd_fused_kernel"] if fused
              else ["cross_attention_bwd_dq_kernel", "cross_attention_bwd_dkdv_kernel"])
    return [_job(kernels, name, tensors, constexprs, ints) for name in names]


def test_cross_attention_kernels_compile_for_the_h100():
    """Every cross_attention kernel compiles for sm_90 in every input dtype, with a key mask
    (whose unit stride is a constexpr) and without, in frame and sequence mode, and with
    Lq = heads = 1 or Lk = 1."""
    kernels = attention_ops._kernels()
    jobs = [job for x, shape, has_mask in ATTENTION_CASES for job in _attention_jobs(kernels, x, shape, has_mask)]
    assert {name for name, _, _ in jobs} == _kernel_names(kernels)
    compile_for_sm90("bharnet.kernels.cross_attention", jobs)


# --- layer_norm ---------------------------------------------------------------------------------
# (M rows, D features): the attention layer's tokens (D = 256), one row, one feature (unit row
# strides), MAX_DIM features (2 rows per block, 1 for float64).
TOKENS, ONE_ROW, ONE_FEATURE, WIDEST = (51200, 256), (1, 256), (7, 1), (9, layer_norm_ops.MAX_DIM)
# (x dtype, weight and bias dtype or None, y and dy dtype = the compute dtype, shape).
LAYER_NORM_CASES = ([(x, p, x, TOKENS) for x, p in MAIN_DTYPES + OWN_16BIT_DTYPES]
                    + [("fp32", "fp32", "bf16", TOKENS), ("fp32", "fp32", "fp16", TOKENS)]  # autocast, float32 x
                    + [(x, None, x, TOKENS) for x, _ in MAIN_DTYPES]
                    + [(x, p, x, shape) for x, p in MAIN_DTYPES for shape in (ONE_ROW, ONE_FEATURE)]
                    + [("fp32", "fp32", "fp32", WIDEST), ("fp64", "fp64", "fp64", WIDEST)])


def _layer_norm_jobs(kernels, x, p, out, shape):
    """The forward and backward launches of ``bharnet.ops.layer_norm`` for x in ``x``, weight
    and bias in ``p`` (None: no affine parameters, x stands in), y and dy in ``out``."""
    M, D = shape
    block_m, block_d = layer_norm_ops._config(D, torch.empty(0, dtype=TORCH_DTYPES[x]))
    acc = _acc(x)
    tensors = dict(x_ptr=x, w_ptr=p or x, b_ptr=p or x, y_ptr=out, mean_ptr=acc, rstd_ptr=acc, dy_ptr=out,
                   dx_ptr=x, part_ptr=acc)
    constexprs = dict(EPS=1e-5, HAS_WEIGHT=p is not None, HAS_BIAS=p is not None, ACC_FP64=x == "fp64",
                      BLOCK_M=block_m, BLOCK_D=block_d)
    ints = dict(M=M, D=D, stride_x=D, stride_dy=D)  # contiguous rows of x and dy
    return [_job(kernels, name, tensors, constexprs, ints)
            for name in ("layer_norm_fwd_kernel", "layer_norm_bwd_kernel")]


def test_layer_norm_kernels_compile_for_the_h100():
    """Both layer_norm kernels compile for sm_90 for every x dtype, with y in x's dtype or in
    the autocast dtype (float32 x, 16-bit y), with and without weight and bias, with M = 1 or
    D = 1, and at the widest D."""
    kernels = layer_norm_ops._kernels()
    jobs = [job for x, p, out, shape in LAYER_NORM_CASES for job in _layer_norm_jobs(kernels, x, p, out, shape)]
    assert {name for name, _, _ in jobs} == _kernel_names(kernels)
    compile_for_sm90("bharnet.kernels.layer_norm", jobs)


# --- batch_norm ---------------------------------------------------------------------------------
# (N, C, P): the graph convolution's output at B = 32 clips x 2 persons (P = T x V = 64 x 25),
# and one sample with one position (both integer sizes turn into the constexpr 1).
BATCH_NORM_SHAPES = [(64, 64, 1600), (1, 3, 1)]


def _batch_norm_jobs(kernels, x, p, shape):
    """The forward (stats, then y) and backward (partial sums, then dx) launches of
    ``bharnet.ops.batch_norm``'s triton backend for x and dy in ``x``, weight and bias in ``p``."""
    N, C, P = shape
    acc = _acc(x)
    tile = batch_norm_ops.TILE // 2 if x == "fp64" else batch_norm_ops.TILE
    block_n, block_p, programs, block_s = batch_norm_ops._triton_config(N, P, tile, batch_norm_ops.MAX_ROW_PROGRAMS)
    tensors = dict(x_ptr=x, dy_ptr=x, y_ptr=x, dx_ptr=x, w_ptr=p, b_ptr=p, part_ptr=acc, stats_ptr=acc,
                   dparams_ptr=acc)
    constexprs = dict(ACC_FP64=x == "fp64", BLOCK_N=block_n, BLOCK_P=block_p, BLOCK_S=block_s, EPS=1e-5,
                      HAS_WEIGHT=True, HAS_BIAS=True)
    ints = dict(N=N, C=C, P=P, S=programs)
    return [_job(kernels, name, tensors, constexprs, ints)
            for name in ("batch_norm_stats_kernel", "batch_norm_forward_kernel", "batch_norm_backward_reduce_kernel",
                         "batch_norm_backward_kernel")]


def test_batch_norm_kernels_compile_for_the_h100():
    """Every batch_norm kernel compiles for sm_90 for every x dtype (16-bit x with float32 or
    16-bit parameters), at the model's shape and with N = P = 1."""
    kernels = batch_norm_ops._kernels()
    jobs = [job for x, p in MAIN_DTYPES + OWN_16BIT_DTYPES for shape in BATCH_NORM_SHAPES
            for job in _batch_norm_jobs(kernels, x, p, shape)]
    assert {name for name, _, _ in jobs} == _kernel_names(kernels)
    compile_for_sm90("bharnet.kernels.batch_norm", jobs)
