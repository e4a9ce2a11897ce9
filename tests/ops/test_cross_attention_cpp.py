"""The ``cpp`` backend of ``bharnet.ops.cross_attention`` (the C++ attention core,
``bharnet::cross_attention_core_cpp`` and its backward, inside the shared torch layer: CPU kernels
here, CUDA kernels in the GPU tests at the end) against the float64 reference: the output and every gradient (x_q, x_kv, the projection weights and
biases, the LayerNorm parameters), as relative errors ``||out - ref|| / ||ref||`` (absolute where
the reference is exactly zero, e.g. the query-side gradients when one key makes the softmax
constant).

Shapes: N = 3, Lq in {1, 5, 25, 70, 130} (70 and 130 span two and three of the kernel's
64-query blocks), Lk in {1, 7, 42, 67, 150}, head dims 8 to 64, with and without LayerNorm, key
masks with a fully masked sequence.

Tolerances: float64 kernels 1e-12 (the same sums in another order; measured ~1e-15). float32
kernels 1e-5: the core computes in float32 (scores, softmax, and the products P V, dO V^T,
P^T dO, dS^T Q, dS K as float32 dot products over d <= 64, Lk <= 150 or 64-query blocks), and
the layer's float32 torch parts (LayerNorm, projections over D <= 128 features and N * L <= 450
tokens) add a few unit roundoffs (6e-8) times sqrt(reduction length) each, so about 1e-6 in the
worst case; measured <= 7e-7. float16/bfloat16 inputs are computed in float32 in the core and
follow DESIGN.md section 6 (at most 2x, 3x for gradients, the error of the reference run in that
dtype, plus the rounding of the exact result).

The CUDA kernels (GPU tests): the same tolerances for float32/float64 (the same sums in another
order; expf/logf are within 2 ulp), DESIGN.md section 6 for float16/bfloat16 (computed in those
dtypes with float32 accumulation).
"""
import importlib

import pytest
import torch

from bharnet.nn import TokenCrossAttention
from bharnet.ops import cross_attention, cross_attention_reference
from bharnet.ops._backend import resolve
from cross_attention_cases import (NAMES, assert_core_reads_strided_views,
                                   assert_every_key_masked_everywhere,
                                   assert_fully_masked_rows_pass_the_residual,
                                   assert_low_precision_layer, assert_matches,
                                   assert_matches_without_affine_and_biases, core_inputs,
                                   make_inputs, names_for, noncontiguous_layer_inputs,
                                   random_mask)
from op_testing import (as_float64, assert_independent_of_thread_count, assert_low_precision_rule,
                        run, to_device)
from op_testing import rel_or_abs_err as err

ops_module = importlib.import_module("bharnet.ops.cross_attention")

TOLERANCE = {torch.float64: 1e-12, torch.float32: 1e-5}


def cpp_fn(*args, **kwargs):
    return cross_attention(*args, backend="cpp", **kwargs)


def core(q, kv, mask, heads):
    """The C++ core's output o (fake impls and autograd registered on first use)."""
    ops_module._register_cpp_ops()
    return torch.ops.bharnet.cross_attention_core_cpp(q, kv, mask, heads)[0]


def core_reference(q, kv, mask, heads):
    return ops_module._reference_attend(q, kv, mask, heads)


# (Lq, Lk, D, heads, pre_norm, masked): head dims 8, 8, 12, 16, 24, 32, 64, 48, 64
CASES = [
    (1, 1, 16, 2, True, False), (1, 42, 24, 3, True, True), (5, 1, 36, 3, True, True),
    (5, 67, 64, 4, False, True), (25, 7, 48, 2, True, False), (25, 42, 64, 2, True, True),
    (25, 67, 128, 2, True, True), (70, 42, 96, 2, False, True), (130, 150, 64, 1, True, True),
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "Lq{}_Lk{}_D{}_h{}_ln{}_mask{}".format(*c))
def test_matches_float64_reference(case, dtype):
    Lq, Lk, D, heads, pre_norm, masked = case
    mask = random_mask(3, Lk) if masked else None
    inputs = make_inputs(3, Lq, Lk, D, heads, dtype=dtype, mask=mask)
    if not pre_norm:
        inputs[10:] = [None] * 4  # no LayerNorm, no LayerNorm parameters
    expected = run(cross_attention_reference, as_float64(inputs), pre_norm=pre_norm)
    got = run(cpp_fn, inputs, pre_norm=pre_norm)
    assert_matches(got, expected, TOLERANCE[dtype], names_for(inputs))


def test_one_key_gives_exactly_zero_query_gradients():
    """With one valid key the softmax is constant: like the reference, every gradient through
    the queries is exactly zero (the backward takes delta from the recomputed P, so dS = 0) and
    dx_q is the residual's upstream gradient."""
    mask = torch.tensor([[True, False, False], [False, False, True], [False, True, False]])
    inputs = make_inputs(3, 5, 3, 16, 2, mask=mask)
    got = dict(zip(NAMES, run(cpp_fn, inputs, seed=1)))
    assert torch.equal(got["dx_q"], torch.randn(3, 5, 16, generator=torch.Generator().manual_seed(1)))
    for name in ("dq_weight", "dq_bias", "dnorm_q_weight", "dnorm_q_bias"):
        assert (got[name] == 0).all(), name


def test_fully_masked_rows_give_residual_plus_bias_and_zero_attention_grads():
    assert_fully_masked_rows_pass_the_residual(cpp_fn)

    q, kv, mask = core_inputs(N=3, dtype=torch.float32)
    ops_module._register_cpp_ops()
    o, lse = torch.ops.bharnet.cross_attention_core_cpp(q, kv, mask, 2)
    assert lse.shape == (3, 2, 5) and lse.dtype == torch.float32
    assert (o[2] == 0).all() and (lse[2] == float("inf")).all()  # sequence 2: no valid key
    assert torch.isfinite(lse[:2]).all()


def test_a_nan_score_gives_nan_not_zero():
    """A row whose valid scores are all NaN (a diverged weight) or -inf gives NaN, as the
    reference does: the max skips NaN, and the row had been taken for one without valid keys
    (o = 0, lse = inf), hiding the NaN from the loss while the gradients were NaN."""
    q, kv, mask = core_inputs(N=3, dtype=torch.float32)
    q[0, 0, :] = float("nan")  # every head of query 0 of sequence 0
    q[1, 1, :] = float("-inf")
    ops_module._register_cpp_ops()
    o, lse = torch.ops.bharnet.cross_attention_core_cpp(q, kv, mask, 2)
    assert o[0, 0].isnan().all() and lse[0, :, 0].isnan().all()
    assert o[1, 1].isnan().all() and lse[1, :, 1].isnan().all()
    assert (o[2] == 0).all() and (lse[2] == float("inf")).all()  # no valid key: still zero
    others = torch.ones(3, 5, dtype=torch.bool)
    others[0, 0] = others[1, 1] = others[2] = False
    assert torch.isfinite(o[others]).all()


def test_every_key_masked_everywhere():
    """No key anywhere: the attention output and the q/kv-side gradients are exactly zero."""
    assert_every_key_masked_everywhere(cpp_fn, TOLERANCE[torch.float32])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_large_score_differences(dtype):
    """Scores spread over hundreds: exp underflows for most keys (the float32 exp clamps its
    argument at -87) and the softmax is nearly one-hot. The backward recomputes P as
    exp(s - lse), and lse, stored in the input dtype, carries a rounding error of up to
    u |lse| (u = 2^-24 for float32; |lse| <= 163 here), a relative error of P that the gradients
    inherit (measured 2-3x), as in the Triton kernels and FlashAttention: the tolerance adds
    4 u max|lse| (4e-5 for float32, 1e-13 for float64)."""
    q, kv, mask = core_inputs(N=3, Lq=25, Lk=42, D=32, dtype=dtype)
    q = 40 * q
    ops_module._register_cpp_ops()
    lse = torch.ops.bharnet.cross_attention_core_cpp(q, kv, mask, 2)[1]
    max_lse = lse[torch.isfinite(lse)].abs().max().item()
    assert max_lse > 100
    expected = run(core_reference, (q.double(), kv.double(), mask, 2))
    got = run(core, (q, kv, mask, 2))
    tolerance = TOLERANCE[dtype] + 4 * torch.finfo(dtype).eps / 2 * max_lse
    assert_matches(got, expected, tolerance, ("o", "dq", "dkv"))


def test_core_op_gradients_match_finite_differences():
    """gradcheck (fast mode) of the float64 C++ attention core itself."""
    q, kv, mask = core_inputs()
    assert torch.autograd.gradcheck(lambda q, kv: core(q, kv, mask, 2),
                                    (q.requires_grad_(), kv.requires_grad_()),
                                    fast_mode=True, eps=1e-6, atol=1e-7)


def test_noncontiguous_inputs():
    """Transposed-storage x_q, x_kv and weights, a strided key mask; q/kv views with row strides
    that are not their width at the core op."""
    inputs, nc = noncontiguous_layer_inputs()
    expected = run(cross_attention_reference, as_float64(inputs))
    assert_matches(run(cpp_fn, nc), expected, TOLERANCE[torch.float32])

    assert_core_reads_strided_views(lambda q, kv, mask: core(q, kv, mask, 2))


def test_without_layer_norm_affine_and_biases():
    assert_matches_without_affine_and_biases(cpp_fn, TOLERANCE[torch.float32])


def assert_autocast_layer_matches_reference(device, dtype, dim, heads, Lq, Lk):
    """TokenCrossAttention on the cpp backend under autocast to ``dtype``: the reference layer's
    output dtype, and its values within 0.05."""
    torch.manual_seed(0)
    layer = TokenCrossAttention(dim, heads=heads, impl="cpp").to(device)
    x_q, x_kv = torch.randn(3, Lq, dim, device=device), torch.randn(3, Lk, dim, device=device)
    with torch.autocast(torch.device(device).type, dtype=dtype):
        y = layer(x_q, x_kv)
        layer.impl = "reference"
        y_ref = layer(x_q, x_kv)
    assert y.dtype == y_ref.dtype
    torch.testing.assert_close(y.float(), y_ref.float(), rtol=0, atol=0.05)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_low_precision_inputs_are_computed_in_float32(dtype):
    """bf16/fp16 q and kv go through the core in float32 and come back in their dtype: results in
    the input dtype, within DESIGN.md section 6's bound; also under CPU autocast."""
    assert_low_precision_layer(cpp_fn, dtype)

    assert_autocast_layer_matches_reference("cpu", dtype, dim=24, heads=2, Lq=5, Lk=7)


def test_results_do_not_depend_on_the_thread_count():
    """Every element of o, lse, dq and dkv is written by one task in a fixed order: bitwise
    identical (checked on the core: torch's own LayerNorm backward reduces its parameter
    gradients over threads)."""
    q, kv, mask = core_inputs(N=4, Lq=70, Lk=42, D=64, dtype=torch.float32)
    ops_module._register_cpp_ops()

    def compute():
        o, lse = torch.ops.bharnet.cross_attention_core_cpp(q, kv, mask, 4)
        grad_o = torch.randn(o.shape, generator=torch.Generator().manual_seed(1))
        return [o, lse, *torch.ops.bharnet.cross_attention_core_cpp_backward(grad_o, q, kv, lse, mask, 4)]

    assert_independent_of_thread_count(compute, ("o", "lse", "dq", "dkv"))


def test_empty_batch():
    inputs = make_inputs(3, 5, 7, 16, 2)
    inputs[:2] = [inputs[0][:0], inputs[1][:0]]
    y, dx_q, dx_kv, dq_weight = run(cpp_fn, inputs)[:4]
    assert y.shape == (0, 5, 16) and dx_kv.shape == (0, 7, 16) and not dq_weight.any()


@pytest.mark.parametrize("masked", [False, True])
def test_opcheck_core(masked):
    ops_module._register_cpp_ops()
    q, kv, mask = core_inputs(dtype=torch.float32, masked=masked)
    torch.library.opcheck(torch.ops.bharnet.cross_attention_core_cpp.default,
                          (q.requires_grad_(), kv.requires_grad_(), mask, 2))


def test_opcheck_core_backward():
    ops_module._register_cpp_ops()
    q, kv, mask = core_inputs(dtype=torch.float32)
    o, lse = torch.ops.bharnet.cross_attention_core_cpp(q, kv, mask, 2)
    torch.library.opcheck(torch.ops.bharnet.cross_attention_core_cpp_backward.default,
                          (torch.randn_like(o), q, kv, lse, mask, 2))


def test_torch_compile_fullgraph():
    """Inductor compiles a TokenCrossAttention caller on the C++ core without graph breaks."""
    torch.manual_seed(0)
    layer = TokenCrossAttention(16, heads=2, impl="cpp")
    x_q, x_kv = torch.randn(3, 5, 16), torch.randn(3, 7, 16)
    mask = random_mask(3, 7)

    def loss(x_q, x_kv):
        return layer(x_q, x_kv, mask).square().sum()

    torch._dynamo.reset()
    expected = run(loss, (x_q, x_kv))
    got = run(torch.compile(loss, fullgraph=True), (x_q, x_kv))
    for name, g, r in zip(("loss", "dx_q", "dx_kv"), got, expected):
        assert err(g, r) < 1e-6, name


def test_auto_picks_cpp_on_cpu_and_cuda_needs_the_cuda_kernels():
    """On CUDA the cpp backend runs when the extension has the op's CUDA kernels, else it is
    refused with the reason (here: a CPU-only build without a GPU)."""
    assert resolve("cross_attention", "auto", "cpu") == "cpp"
    reason = ops_module._cpp_availability("cuda")
    if torch._C._dispatch_has_kernel_for_dispatch_key("bharnet::cross_attention_core_cpp", "CUDA"):
        assert reason is None
        assert resolve("cross_attention", "cpp", "cuda") == "cpp"
        return
    assert "built without CUDA kernels" in reason
    with pytest.raises(RuntimeError, match="backend 'cpp' cannot run cross_attention on cuda: "
                                           r"the C\+\+ extension was built without CUDA kernels"):
        resolve("cross_attention", "cpp", "cuda")


@pytest.mark.parametrize("index, value, error, match", [
    (1, torch.randn(2, 7, 16), ValueError, r"x_kv must have shape \(3, 7, 16\)"),
    (2, 3, ValueError, "heads must be a positive int dividing dim=16"),
    (9, torch.ones(3, 7), TypeError, "key_mask must be a bool tensor"),
])
def test_bad_layer_input_raises_clear_error(index, value, error, match):
    inputs = make_inputs(3, 5, 7, 16, 2)
    inputs[index] = value
    with pytest.raises(error, match=match):
        cpp_fn(*inputs)


def test_bad_core_input_raises_clear_error():
    ops_module._register_cpp_ops()
    op = torch.ops.bharnet.cross_attention_core_cpp
    q, kv, mask = core_inputs(dtype=torch.float32)
    cases = [
        ((q.half(), kv.half(), mask, 2), "the CPU kernels take float32 or float64, got q in Half"),
        ((q, kv.double(), mask, 2), "kv must have q's dtype and device"),
        ((q, kv[..., :16], mask, 2), r"kv must have shape \(2, Lk, 32\) = \[k \| v\]"),
        ((q[0], kv, mask, 2), r"q must have shape \(N, Lq, D\)"),
        ((q, kv, mask, 3), "heads must be a positive divisor of D = 16, got 3"),
        ((q, kv, mask.float(), 2), "key_mask must be bool"),
        ((q, kv, mask[:, :6], 2), r"key_mask must have shape \(2, 7\)"),
    ]
    for args, match in cases:
        with pytest.raises(RuntimeError, match=match):
            op(*args)
    o, lse = op(q, kv, mask, 2)
    with pytest.raises(RuntimeError, match=r"lse must have shape \[2, 2, 5\] and q's dtype"):
        torch.ops.bharnet.cross_attention_core_cpp_backward(o, q, kv, lse[:, :1], mask, 2)
    with pytest.raises(RuntimeError, match=r"grad_o must have shape \[2, 5, 16\] and q's dtype"):
        torch.ops.bharnet.cross_attention_core_cpp_backward(o.double(), q, kv, lse, mask, 2)


# --- CUDA kernels (run by bench/gpu_check.sh) ---------------------------------------------------
GPU = "cuda"


@pytest.fixture
def poisoned_cuda():
    """Best effort: the CUDA caching allocator's free blocks are filled with NaN before the test,
    so outputs that a kernel leaves unwritten (they come from at::empty) show as NaN."""
    blocks = [torch.full((1 << 18,), float("nan"), device=GPU) for _ in range(16)]  # small pool
    blocks.append(torch.full((1 << 26,), float("nan"), device=GPU))                  # large pool
    del blocks
    torch.cuda.synchronize()


def gpu_core_inputs(N, Lq, Lk, D, heads, dtype, masked, seed=3):
    """q, kv on the GPU and a key mask (sequence 0 fully masked, random keys masked elsewhere)."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(N, Lq, D, generator=gen).to(GPU, dtype)
    kv = torch.randn(N, Lk, 2 * D, generator=gen).to(GPU, dtype)
    mask = random_mask(N, Lk, seed=seed, fully_masked=(0,)).to(GPU) if masked else None
    return q, kv, mask


def reference_lse(q, kv, mask, heads):
    """log sum_j exp(s_ij) over the valid keys in float64 on the CPU (+inf without valid keys)."""
    q, kv = q.double().cpu(), kv.double().cpu()
    k = kv[..., :q.shape[-1]]
    split = ops_module._split_heads
    scores = split(q, heads) @ split(k, heads).transpose(-1, -2) / (q.shape[-1] // heads) ** 0.5
    if mask is not None:
        scores = scores.masked_fill(~mask.cpu()[:, None, None, :], float("-inf"))
    lse = scores.logsumexp(-1)
    return torch.where(torch.isneginf(lse), torch.full_like(lse, float("inf")), lse)


# (N, Lq, Lk, D, heads): head dims 8, 24, 40, 72 and 128 (the kernels' 1, 2 and 4 features per
# lane, 72 with partly idle lanes), Lq = 1, Lk = 1, Lk = 1000, several 16-row blocks and 32-row
# tiles on both sides, ragged at both ends (Lq 17 and 33, Lk 33 and 70).
GPU_CORE_SHAPES = [(3, 25, 42, 64, 8), (3, 1, 42, 48, 2), (3, 25, 1, 48, 2), (2, 67, 1000, 256, 2),
                   (2, 33, 70, 120, 3), (2, 17, 33, 72, 1), (2, 1, 1, 128, 1)]


@pytest.mark.gpu
@pytest.mark.parametrize("masked", [True, False], ids=["mask", "nomask"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("shape", GPU_CORE_SHAPES, ids=lambda s: "N{}_Lq{}_Lk{}_D{}_h{}".format(*s))
def test_gpu_core_matches_float64_reference(shape, dtype, masked, poisoned_cuda):
    """o, lse, dq and dkv of the CUDA core against the float64 reference; bitwise repeatable."""
    heads = shape[-1]
    q, kv, mask = gpu_core_inputs(*shape, dtype=dtype, masked=masked)
    expected = run(core_reference, as_float64([q, kv, mask, heads]))  # float64 on the GPU
    got = run(core, (q, kv, mask, heads))
    assert all(t.device.type == "cuda" for t in got)
    assert_matches(got, expected, TOLERANCE[dtype], ("o", "dq", "dkv"))
    assert torch.equal(got[0], run(core, (q, kv, mask, heads))[0])

    lse = torch.ops.bharnet.cross_attention_core_cpp(q, kv, mask, heads)[1]
    assert lse.dtype == dtype and lse.shape == (shape[0], heads, shape[1])
    lse_ref = reference_lse(q, kv, mask, heads)
    assert torch.equal(torch.isinf(lse.cpu()), torch.isinf(lse_ref))
    finite = torch.isfinite(lse_ref)
    assert err(lse.cpu()[finite], lse_ref[finite]) < TOLERANCE[dtype]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_gpu_fully_masked_rows_are_zero_with_zero_grads(dtype, poisoned_cuda):
    """A sequence without valid keys: o = 0 exactly, lse = +inf, dq = 0 and dkv = 0 (finite);
    masked keys of the other sequences get dkv = 0 exactly, valid ones do not."""
    q, kv, mask = gpu_core_inputs(3, 25, 42, 48, 2, dtype=dtype, masked=True)
    mask[2] = False
    ops_module._register_cpp_ops()
    o, lse = torch.ops.bharnet.cross_attention_core_cpp(q, kv, mask, 2)
    assert (o[0] == 0).all() and (o[2] == 0).all() and torch.isfinite(o).all()
    assert (lse[0] == float("inf")).all() and (lse[2] == float("inf")).all() and torch.isfinite(lse[1]).all()
    grad_o = torch.randn_like(o)
    dq, dkv = torch.ops.bharnet.cross_attention_core_cpp_backward(grad_o, q, kv, lse, mask, 2)
    assert torch.isfinite(dq).all() and torch.isfinite(dkv).all()
    for n in (0, 2):
        assert (dq[n] == 0).all() and (dkv[n] == 0).all()
    assert (dkv[1][~mask[1]] == 0).all() and (dkv[1][mask[1]] != 0).any() and (dq[1] != 0).any()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_gpu_leading_key_tiles_fully_masked(dtype, poisoned_cuda):
    """Keys masked up to past the first 32-key tile (and a whole second tile in one row), valid
    keys only later: the online softmax starts from -inf maxima and must recover."""
    heads = 2
    q, kv, _ = gpu_core_inputs(2, 17, 100, 48, heads, dtype=dtype, masked=False)
    mask = torch.zeros(2, 100, dtype=torch.bool, device=GPU)
    mask[0, 40:] = True
    mask[1, 70:90] = True
    expected = run(core_reference, as_float64([q, kv, mask, heads]))
    got = run(core, (q, kv, mask, heads))
    assert_matches(got, expected, TOLERANCE[dtype], ("o", "dq", "dkv"))


# The layer on the GPU: the torch parts (cuBLAS projections over up to 2000 tokens, LayerNorm)
# add their own float32 rounding, as in the Triton GPU tests.
GPU_LAYER_TOLERANCE = {torch.float64: 1e-12, torch.float32: 2e-5}


def gpu_layer_inputs(N, Lq, Lk, D, heads, dtype, masked=True):
    mask = random_mask(N, Lk, fully_masked=(0,)) if masked else None
    return to_device(make_inputs(N, Lq, Lk, D, heads, dtype=dtype, mask=mask), GPU)


# (N, Lq, Lk, dim, heads): the model's frame mode (25 body joints attend 42 hand joints, 8 heads
# of 32), head dim 8 with Lq = 1, head dim 128 with long keys, Lk = 1.
GPU_LAYER_SHAPES = [(64, 25, 42, 256, 8), (3, 1, 42, 64, 8), (2, 67, 1000, 256, 2), (3, 25, 1, 48, 2)]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("shape", GPU_LAYER_SHAPES, ids=lambda s: "N{}_Lq{}_Lk{}_D{}_h{}".format(*s))
def test_gpu_layer_matches_float64_reference(shape, dtype, poisoned_cuda):
    """The whole layer on CUDA with the cpp backend: output and every gradient (x_q, x_kv,
    projection weights and biases, LayerNorm parameters)."""
    inputs = gpu_layer_inputs(*shape, dtype)
    expected = run(cross_attention_reference, as_float64(inputs))
    got = run(cpp_fn, inputs)
    assert got[0].device.type == "cuda"
    assert_matches(got, expected, GPU_LAYER_TOLERANCE[dtype], names_for(inputs))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", GPU_CORE_SHAPES[:5], ids=lambda s: "N{}_Lq{}_Lk{}_D{}_h{}".format(*s))
def test_gpu_low_precision_core(shape, dtype, poisoned_cuda):
    """DESIGN.md section 6 on the core itself: 16-bit q, kv in, o, dq, dkv out in that dtype
    (lse in float32), errors at most 2x / 3x the reference's own in that dtype."""
    heads = shape[-1]
    q, kv, mask = gpu_core_inputs(*shape, dtype=dtype, masked=True)
    expected = run(core_reference, as_float64([q, kv, mask, heads]))
    same_precision = run(core_reference, (q, kv, mask, heads))
    got = run(core, (q, kv, mask, heads))
    assert all(g.dtype == dtype for g in got)
    assert torch.ops.bharnet.cross_attention_core_cpp(q, kv, mask, heads)[1].dtype == torch.float32
    assert_low_precision_rule(got, same_precision, expected, ("o", "dq", "dkv"), err=err)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", GPU_LAYER_SHAPES[:3], ids=lambda s: "N{}_Lq{}_Lk{}_D{}_h{}".format(*s))
def test_gpu_low_precision_layer(shape, dtype, poisoned_cuda):
    """The whole layer in bf16/fp16 on CUDA (the core takes 16-bit inputs directly), under
    DESIGN.md section 6's rule; also under CUDA autocast through TokenCrossAttention."""
    inputs = gpu_layer_inputs(*shape, dtype)
    expected = run(cross_attention_reference, as_float64(inputs))
    same_precision = run(cross_attention_reference, inputs)
    got = run(cpp_fn, inputs)
    assert all(g.dtype == dtype for g in got)
    assert_low_precision_rule(got, same_precision, expected, NAMES, err=err)

    assert_autocast_layer_matches_reference(GPU, dtype, dim=64, heads=4, Lq=25, Lk=42)


@pytest.mark.gpu
def test_gpu_noncontiguous_inputs(poisoned_cuda):
    """Transposed-storage x_q, x_kv and weights and a strided key mask through the layer; q/kv
    views with row strides that are not their width at the core op (bitwise the same results)."""
    inputs, _ = noncontiguous_layer_inputs()
    gpu = to_device(inputs, GPU)
    nc = list(gpu)
    nc[0] = gpu[0].transpose(0, 1).contiguous().transpose(0, 1)
    nc[1] = gpu[1].transpose(1, 2).contiguous().transpose(1, 2)
    for i in (3, 5, 7):
        nc[i] = gpu[i].t().contiguous().t()
    wide_mask = torch.zeros(3, 14, dtype=torch.bool, device=GPU)
    wide_mask[:, ::2] = gpu[9]
    nc[9] = wide_mask[:, ::2]
    assert not any(t.is_contiguous() for t in (nc[0], nc[1], nc[3], nc[5], nc[7], nc[9]))
    expected = run(cross_attention_reference, as_float64(gpu))
    assert_matches(run(cpp_fn, nc), expected, GPU_LAYER_TOLERANCE[torch.float32])

    q, kv, mask = gpu_core_inputs(2, 5, 7, 16, 2, dtype=torch.float32, masked=True)
    D = q.shape[-1]
    q_view = torch.cat([q, torch.randn_like(q)], dim=-1)[..., :D]
    kv_view = torch.cat([torch.randn_like(kv), kv], dim=1)[:, 7:]
    assert q_view.stride(1) == 2 * D and kv_view.storage_offset() == 7 * 2 * D
    for a, b in zip(run(core, (q, kv, mask, 2)), run(core, (q_view, kv_view, mask, 2))):
        assert torch.equal(a, b)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
def test_gpu_opcheck(masked, dtype):
    ops_module._register_cpp_ops()
    q, kv, mask = gpu_core_inputs(2, 5, 7, 16, 2, dtype=dtype, masked=masked)
    torch.library.opcheck(torch.ops.bharnet.cross_attention_core_cpp.default,
                          (q.requires_grad_(), kv.requires_grad_(), mask, 2))
    q, kv = q.detach(), kv.detach()
    o, lse = torch.ops.bharnet.cross_attention_core_cpp(q, kv, mask, 2)
    torch.library.opcheck(torch.ops.bharnet.cross_attention_core_cpp_backward.default,
                          (torch.randn_like(o), q, kv, lse, mask, 2))


# One test per case: a crash (the first H100 run of this file died with SIGSEGV somewhere in
# these five calls) then names its case in pytest -v output.
BAD_CORE_INPUTS = {
    "int": (lambda q, kv, mask: (q.int(), kv.int(), mask, 2),
            "the CUDA kernels take float16, bfloat16, float32 or float64 q, got Int"),
    "kv_double": (lambda q, kv, mask: (q, kv.double(), mask, 2), "kv must have q's dtype and device"),
    "kv_on_cpu": (lambda q, kv, mask: (q, kv.cpu(), mask, 2), "kv must have q's dtype and device"),
    "mask_on_cpu": (lambda q, kv, mask: (q, kv, mask.cpu(), 2), r"key_mask must have shape \(2, 7\) on q's device"),
    "head_dim_132": (lambda q, kv, mask: (q[..., :8].repeat(1, 1, 33), kv[..., :8].repeat(1, 1, 66), mask, 2),
                     "the CUDA kernels take head dims up to 128, got D / heads = 264 / 2 = 132"),
}


@pytest.mark.gpu
@pytest.mark.parametrize("case", sorted(BAD_CORE_INPUTS))
def test_gpu_bad_core_inputs(case):
    """What the CUDA forward kernel cannot run raises a clear error."""
    ops_module._register_cpp_ops()
    make_args, match = BAD_CORE_INPUTS[case]
    q, kv, mask = gpu_core_inputs(2, 5, 7, 16, 2, dtype=torch.float32, masked=True)
    with pytest.raises(RuntimeError, match=match):
        torch.ops.bharnet.cross_attention_core_cpp(*make_args(q, kv, mask))


@pytest.mark.gpu
def test_gpu_backend_choice_and_bad_inputs():
    """cpp is available on CUDA (auto still prefers triton); what the CUDA kernels cannot run
    raises a clear error."""
    assert ops_module._cpp_availability("cuda") is None
    assert resolve("cross_attention", "cpp", "cuda") == "cpp"
    inputs = to_device(make_inputs(1, 2, 3, 258, 2), GPU)
    with pytest.raises(ValueError, match="CUDA kernels support head dims <= 128, got dim 258 / heads 2 = 129"):
        cpp_fn(*inputs)
    ops_module._register_cpp_ops()
    q, kv, mask = gpu_core_inputs(2, 5, 7, 16, 2, dtype=torch.float32, masked=True)
    o, lse = torch.ops.bharnet.cross_attention_core_cpp(q, kv, mask, 2)
    with pytest.raises(RuntimeError, match=r"lse must have shape \[2, 2, 5\] and the accumulation dtype Float"):
        torch.ops.bharnet.cross_attention_core_cpp_backward(o, q, kv, lse.double(), mask, 2)
    with pytest.raises(RuntimeError, match=r"grad_o must have shape \[2, 5, 16\] and q's dtype"):
        torch.ops.bharnet.cross_attention_core_cpp_backward(o.half(), q, kv, lse, mask, 2)
