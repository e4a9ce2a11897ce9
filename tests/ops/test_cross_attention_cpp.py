"""The ``cpp`` backend of ``bharnet.ops.cross_attention`` (the C++ CPU attention core,
``bharnet::cross_attention_core_cpp`` and its backward, inside the shared torch layer) against
the float64 reference: the output and every gradient (x_q, x_kv, the projection weights and
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
"""
import importlib

import pytest
import torch

from bharnet.nn import TokenCrossAttention
from bharnet.ops import cross_attention, cross_attention_reference
from bharnet.ops._backend import resolve
from cross_attention_cases import (NAMES, assert_core_reads_strided_views,
                                   assert_low_precision_layer, assert_matches,
                                   assert_matches_without_affine_and_biases, core_inputs,
                                   make_inputs, names_for, noncontiguous_layer_inputs,
                                   random_mask)
from op_testing import as_float64, assert_independent_of_thread_count, run
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
    mask = random_mask(3, 42, fully_masked=(0, 2))
    inputs = make_inputs(3, 25, 42, 24, 2, mask=mask)
    x_q, out_bias = inputs[0], inputs[8]
    y, dx_q, dx_kv, dq_weight = run(cpp_fn, inputs)[:4]
    torch.testing.assert_close(y[0], x_q[0] + out_bias, rtol=0, atol=1e-6)
    torch.testing.assert_close(y[2], x_q[2] + out_bias, rtol=0, atol=1e-6)
    assert (dx_kv[0] == 0).all() and (dx_kv[2] == 0).all()  # masked keys get no gradient
    assert (dx_kv[1][~mask[1]] == 0).all() and (dx_kv[1][mask[1]] != 0).any()
    assert torch.isfinite(dx_q).all() and torch.isfinite(dq_weight).all()

    q, kv, mask = core_inputs(N=3, dtype=torch.float32)
    ops_module._register_cpp_ops()
    o, lse = torch.ops.bharnet.cross_attention_core_cpp(q, kv, mask, 2)
    assert lse.shape == (3, 2, 5) and lse.dtype == torch.float32
    assert (o[2] == 0).all() and (lse[2] == float("inf")).all()  # sequence 2: no valid key
    assert torch.isfinite(lse[:2]).all()


def test_every_key_masked_everywhere():
    """No key anywhere: the attention output and the q/kv-side gradients are exactly zero."""
    mask = torch.zeros(3, 7, dtype=torch.bool)
    inputs = make_inputs(3, 5, 7, 16, 2, mask=mask)
    expected = run(cross_attention_reference, as_float64(inputs))
    got = run(cpp_fn, inputs)
    assert_matches(got, expected, TOLERANCE[torch.float32])
    for name, g in zip(NAMES, got):
        if name in ("dx_kv", "dq_weight", "dq_bias", "dkv_weight", "dkv_bias"):
            assert (g == 0).all(), name


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


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_low_precision_inputs_are_computed_in_float32(dtype):
    """bf16/fp16 q and kv go through the core in float32 and come back in their dtype: results in
    the input dtype, within DESIGN.md section 6's bound; also under CPU autocast."""
    assert_low_precision_layer(cpp_fn, dtype)

    torch.manual_seed(0)
    layer = TokenCrossAttention(24, heads=2, impl="cpp")
    x_q, x_kv = torch.randn(3, 5, 24), torch.randn(3, 7, 24)
    with torch.autocast("cpu", dtype=dtype):
        y = layer(x_q, x_kv)
        layer.impl = "reference"
        y_ref = layer(x_q, x_kv)
    assert y.dtype == y_ref.dtype
    torch.testing.assert_close(y.float(), y_ref.float(), rtol=0, atol=0.05)


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


def test_auto_picks_cpp_on_cpu_and_cuda_is_refused_with_a_reason():
    assert resolve("cross_attention", "auto", "cpu") == "cpp"
    assert ops_module._cpp_availability("cuda") == (
        "the cpp backend of cross_attention has no CUDA kernels (use 'triton' on a GPU)")
    with pytest.raises(RuntimeError, match="backend 'cpp' cannot run cross_attention on cuda: "
                                           "the cpp backend of cross_attention has no CUDA kernels"):
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
