"""Triton cross_attention vs the float64 reference: output and every gradient.

On CPU the kernels run in the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1),
so shapes are small and odd (N = 3, Lq in {1, 5, 25}, Lk in {1, 7, 42}, head dims 8 and 12);
block sizes are shrunk where a test must reach the multi-block (flash) code paths cheaply.
Errors are relative, ``‖out − ref‖ / ‖ref‖`` (absolute where the reference is exactly zero,
e.g. the query-side gradients when Lk = 1 makes the softmax constant).

Tolerances: float32 kernels accumulate in fp32 with exact ("ieee") products; the layer's
float32 torch parts (LayerNorm, projections) and the kernel each add a few ulps times
sqrt(reduction length), measured at <= 3e-6 here, hence 2e-5. float64 kernels: 1e-12.
float16 follows DESIGN.md §6: at most 2× (3× for gradients) the error of the reference run in
float16, plus the error of rounding the exact result to float16.
"""
import importlib

import pytest
import torch

from bharnet.nn import CrossAttention, PoolingAttention, TokenCrossAttention
from bharnet.ops import cross_attention, cross_attention_reference
from cross_attention_cases import (NAMES, assert_core_reads_strided_views,
                                   assert_every_key_masked_everywhere,
                                   assert_fully_masked_rows_pass_the_residual,
                                   assert_low_precision_layer, assert_matches,
                                   assert_matches_without_affine_and_biases, core_inputs,
                                   make_inputs, names_for, noncontiguous_layer_inputs,
                                   random_mask)
from op_testing import as_float64, assert_low_precision_rule, run
from op_testing import rel_or_abs_err as err

ops_module = importlib.import_module("bharnet.ops.cross_attention")
custom_op_module = importlib.import_module("bharnet.ops._custom_op")

TOLERANCE = {torch.float64: 1e-12, torch.float32: 2e-5}


def triton_fn(*args, **kwargs):
    return cross_attention(*args, backend="triton", **kwargs)


@pytest.fixture
def poisoned(monkeypatch):
    """Every kernel output and scratch buffer starts as NaN, so unwritten cells show."""
    monkeypatch.setattr(custom_op_module, "POISON_OUTPUTS", True)


@pytest.fixture
def small_blocks(monkeypatch):
    """16-wide blocks: Lq = 25, Lk = 42 then take the multi-block dq + dk/dv backward path and a
    3-step online softmax, which the default blocks reach only for Lk > 128 or Lq > 64."""
    monkeypatch.setattr(ops_module, "SINGLE_BLOCK_MAX_KEYS", 16)
    monkeypatch.setattr(ops_module, "KEY_BLOCK", 16)
    monkeypatch.setattr(ops_module, "QUERY_BLOCK", 16)


# (Lq, Lk, D, heads, pre_norm, masked): every Lq x Lk pair, head dims 8 and 12
CASES = [
    (1, 1, 16, 2, True, False), (1, 7, 24, 2, False, True), (1, 42, 24, 3, True, True),
    (5, 1, 36, 3, True, True), (5, 7, 16, 2, True, True), (5, 42, 24, 2, False, False),
    (25, 1, 24, 3, False, False), (25, 7, 36, 3, True, False), (25, 42, 24, 2, True, True),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "Lq{}_Lk{}_D{}_h{}_ln{}_mask{}".format(*c))
def test_float32_matches_float64_reference(case, poisoned):
    Lq, Lk, D, heads, pre_norm, masked = case
    mask = random_mask(3, Lk) if masked else None
    inputs = make_inputs(3, Lq, Lk, D, heads, mask=mask)
    if not pre_norm:
        inputs[10:] = [None] * 4  # no LayerNorm, no LayerNorm parameters
    expected = run(cross_attention_reference, as_float64(inputs), pre_norm=pre_norm)
    got = run(triton_fn, inputs, pre_norm=pre_norm)
    assert_matches(got, expected, TOLERANCE[torch.float32], names_for(inputs))


@pytest.mark.parametrize("Lq", [5, 70])
def test_long_keys_stream_in_blocks(Lq, poisoned):
    """Lk = 150 > SINGLE_BLOCK_MAX_KEYS: three 64-key blocks in the online softmax, the split
    dq / dk-dv backward; Lq = 70 adds a second query block (ragged in both directions)."""
    assert ops_module._config(Lq, 150, 8, 4)[1:4] == (64, 16, False)
    mask = random_mask(2, 150, fully_masked=(1,))
    inputs = make_inputs(2, Lq, 150, 16, 2, mask=mask)
    expected = run(cross_attention_reference, as_float64(inputs))
    assert_matches(run(triton_fn, inputs), expected, TOLERANCE[torch.float32])


@pytest.mark.parametrize("masked", [False, True])
def test_multi_block_paths_on_small_blocks(masked, small_blocks, poisoned):
    assert ops_module._config(25, 42, 12, 4)[:4] == (16, 16, 16, False)
    inputs = make_inputs(3, 25, 42, 24, 2, mask=random_mask(3, 42) if masked else None)
    expected = run(cross_attention_reference, as_float64(inputs))
    assert_matches(run(triton_fn, inputs), expected, TOLERANCE[torch.float32])


@pytest.mark.parametrize("use_small_blocks", [False, True])
def test_fully_masked_rows_give_residual_plus_bias_and_zero_attention_grads(use_small_blocks, request):
    if use_small_blocks:
        request.getfixturevalue("small_blocks")
    assert_fully_masked_rows_pass_the_residual(triton_fn)


def test_every_key_masked_everywhere():
    """No key anywhere: the attention output and the q/kv-side gradients are exactly zero."""
    assert_every_key_masked_everywhere(triton_fn, TOLERANCE[torch.float32])


@pytest.mark.parametrize("use_small_blocks", [False, True])
def test_float64_kernels(use_small_blocks, request):
    if use_small_blocks:
        request.getfixturevalue("small_blocks")
    inputs = as_float64(make_inputs(3, 25, 42, 24, 2, mask=random_mask(3, 42)))
    assert_matches(run(triton_fn, inputs), run(cross_attention_reference, inputs),
                   TOLERANCE[torch.float64])


def test_core_op_gradients_match_finite_differences():
    """gradcheck (fast mode) of the float64 attention-core custom op itself."""
    q, kv, mask = core_inputs(requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda q, kv: torch.ops.bharnet.cross_attention_core(q, kv, mask, 2)[0], (q, kv),
        fast_mode=True, eps=1e-6, atol=1e-7)


def test_noncontiguous_inputs(poisoned):
    """Transposed-storage x_q, x_kv and weights, a strided key mask, and q/kv views with row
    strides that are not their width (the kernels read those without a copy)."""
    inputs, nc = noncontiguous_layer_inputs()
    expected = run(cross_attention_reference, as_float64(inputs))
    assert_matches(run(triton_fn, nc), expected, TOLERANCE[torch.float32])

    assert_core_reads_strided_views(lambda q, kv, mask: torch.ops.bharnet.cross_attention_core(q, kv, mask, 2)[0])


def test_without_layer_norm_affine_and_biases():
    assert_matches_without_affine_and_biases(triton_fn, TOLERANCE[torch.float32])


def test_float16_in_interpreter_follows_low_precision_rule():
    assert_low_precision_layer(triton_fn, torch.float16)


@pytest.mark.parametrize("masked", [False, True])
def test_opcheck_core(masked):
    q, kv, mask = core_inputs(dtype=torch.float32, masked=masked, requires_grad=True)
    torch.library.opcheck(torch.ops.bharnet.cross_attention_core.default, (q, kv, mask, 2))


def test_opcheck_core_backward():
    q, kv, mask = core_inputs(dtype=torch.float32, requires_grad=True)
    with torch.no_grad():
        o, lse = torch.ops.bharnet.cross_attention_core(q, kv, mask, 2)
    grad_o = torch.randn_like(o)
    torch.library.opcheck(torch.ops.bharnet.cross_attention_core_backward.default,
                          (grad_o, q.detach(), kv.detach(), o, lse, mask, 2))


def test_torch_compile_fullgraph():
    """Inductor compiles a TokenCrossAttention caller without graph breaks (on CPU the custom op
    is opaque; on a GPU it is a triton_op whose kernels inductor sees)."""
    torch.manual_seed(0)
    layer = TokenCrossAttention(16, heads=2, impl="triton")
    x_q, x_kv = torch.randn(3, 5, 16), torch.randn(3, 7, 16)
    mask = random_mask(3, 7)

    def loss(x_q, x_kv):
        return layer(x_q, x_kv, mask).square().sum()

    torch._dynamo.reset()
    compiled = torch.compile(loss, fullgraph=True)
    expected = run(loss, (x_q, x_kv))
    got = run(compiled, (x_q, x_kv))
    for name, g, r in zip(("loss", "dx_q", "dx_kv"), got, expected):
        assert err(g, r) < 1e-6, name


def test_layers_route_through_impl():
    """impl picks the backend per layer (state-dict keys unchanged); swap by setting .impl."""
    torch.manual_seed(0)
    layer = CrossAttention(16, heads=2, mode="frame", impl="reference")
    assert set(layer.state_dict()) == {f"attention.{m}.{p}" for m in
                                       ("norm_q", "norm_kv", "proj_q", "proj_kv", "proj_out")
                                       for p in ("weight", "bias")}
    body, hand = torch.randn(2, 16, 3, 25), torch.randn(2, 16, 3, 42)
    mask = torch.rand(2, 3, 42) > 0.5
    expected = layer(body, hand, mask)
    layer.attention.impl = "triton"
    torch.testing.assert_close(layer(body, hand, mask), expected, rtol=1e-5, atol=1e-5)

    pam = PoolingAttention(16, heads=2, impl="triton")
    pam_inputs = torch.randn(2, 16, 5, 25), torch.randn(2, 16, 5, 42)
    got = pam(*pam_inputs)
    for module in (pam.time_attention, pam.joint_attention):
        assert module.impl == "triton"
        module.impl = "reference"
    torch.testing.assert_close(got, pam(*pam_inputs), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("index, value, error, match", [
    (0, torch.randn(3, 16), ValueError, r"x_q must have shape \(N, Lq, dim\)"),
    (1, torch.randn(2, 7, 16), ValueError, r"x_kv must have shape \(3, 7, 16\)"),
    (1, torch.randn(3, 0, 16), ValueError, "at least one token"),
    (2, 3, ValueError, "heads must be a positive int dividing dim=16"),
    (3, torch.randn(16, 8), ValueError, r"q_weight must have shape \(16, 16\)"),
    (5, torch.randn(16, 16), ValueError, r"kv_weight must have shape \(32, 16\)"),
    (6, torch.randn(16), ValueError, r"kv_bias must have shape \(32,\)"),
    (7, torch.randn(16, 16).int(), TypeError, "out_weight must be floating point"),
    (9, torch.ones(3, 6, dtype=torch.bool), ValueError, r"key_mask must have shape \(3, 7\)"),
    (9, torch.ones(3, 7), TypeError, "key_mask must be a bool tensor"),
    (10, torch.randn(15), ValueError, r"norm_q_weight must have shape \(16,\)"),
    (13, [0.0] * 16, TypeError, "norm_kv_bias must be a torch.Tensor"),
    (5, torch.randn(32, 16, dtype=torch.float64), TypeError, "kv_weight is torch.float64, x_q torch.float32"),
    (1, torch.randn(3, 7, 16, dtype=torch.float64), TypeError, "x_kv is torch.float64, x_q torch.float32"),
])
def test_bad_input_raises_clear_error(index, value, error, match):
    inputs = make_inputs(3, 5, 7, 16, 2)
    inputs[index] = value
    with pytest.raises(error, match=match):
        cross_attention(*inputs, backend="triton")


def test_triton_backend_rejects_what_it_cannot_run():
    inputs = make_inputs(1, 2, 3, 258, 1)
    with pytest.raises(ValueError, match="head dims <= 128, got dim 258 / heads 1 = 258"):
        cross_attention(*inputs, backend="triton")
    with pytest.raises(TypeError, match="cannot run bfloat16 on CPU"):
        cross_attention(*make_inputs(1, 2, 3, 16, 2, dtype=torch.bfloat16), backend="triton")


# --- GPU (run by bench/gpu_check.sh) -----------------------------------------------------------
# (N, Lq, Lk, dim, heads): the model's frame mode (N = B·T frames, 25 body joints attend 42 hand
# joints) and sequence mode (16 frames: Lq = 400, Lk = 672; N reduced from 128 to keep the
# float64 reference small), head dim 128 (2 heads), and the longest sequences with head dim 8.
GPU_SHAPES = [(2048, 25, 42, 256, 8), (16, 400, 672, 256, 8), (32, 25, 42, 256, 2),
              (4, 1024, 1024, 64, 8)]


def gpu_inputs(N, Lq, Lk, D, heads, dtype):
    mask = random_mask(N, Lk, fully_masked=(0,))
    inputs = make_inputs(N, Lq, Lk, D, heads, dtype=dtype, mask=mask)
    return [t.cuda() if isinstance(t, torch.Tensor) else t for t in inputs]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=lambda s: "N{}_Lq{}_Lk{}_D{}_h{}".format(*s))
def test_gpu_precision_rule(shape, dtype, poisoned):
    """DESIGN.md §6 for every dtype. For float32 (errors ~1e-7 to 1e-6, kernel/reference ratio
    0.9 to 1.5 in the interpreter) the bound is at least 1e-5, which still rules out TF32
    products (10-bit mantissas: ~1e-4 relative error) while leaving room for the GPU's
    approximate exp2 (2 ulp)."""
    inputs = gpu_inputs(*shape, dtype)
    expected = run(cross_attention_reference, as_float64(inputs))
    same_precision = run(cross_attention_reference, inputs)
    got = run(triton_fn, inputs)
    assert_low_precision_rule(got, same_precision, expected, NAMES, floor={torch.float32: 1e-5}, err=err)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", GPU_SHAPES[:2], ids=lambda s: "N{}_Lq{}_Lk{}_D{}_h{}".format(*s))
def test_gpu_float64_kernels(shape, poisoned):
    inputs = gpu_inputs(*shape, torch.float64)
    assert_matches(run(triton_fn, inputs), run(cross_attention_reference, inputs),
                   TOLERANCE[torch.float64])


@pytest.mark.gpu
def test_gpu_torch_compile_sees_the_triton_op():
    layer = TokenCrossAttention(256, heads=8, impl="triton").cuda()
    x_q, x_kv = torch.randn(64, 25, 256, device="cuda"), torch.randn(64, 42, 256, device="cuda")
    mask = random_mask(64, 42).cuda()

    def loss(x_q, x_kv):
        return layer(x_q, x_kv, mask).square().sum()

    torch._dynamo.reset()
    expected = run(loss, (x_q, x_kv))
    got = run(torch.compile(loss, fullgraph=True), (x_q, x_kv))
    for name, g, r in zip(("loss", "dx_q", "dx_kv"), got, expected):
        assert err(g, r) < 1e-5, name


def test_an_empty_batch_gives_an_empty_output_on_every_backend():
    D = 8
    params = [torch.randn(D, D), torch.randn(D), torch.randn(2 * D, D), torch.randn(2 * D), torch.randn(D, D),
              torch.randn(D)]
    for backend in ("reference", "triton"):
        out = cross_attention(torch.randn(0, 3, D), torch.randn(0, 5, D), 2, *params, backend=backend)
        assert out.shape == (0, 3, D), backend


@pytest.mark.parametrize("masked_first_block", [False, True])
def test_rows_whose_scores_are_all_very_negative(masked_first_block):
    """Every score about -100 (q = 10, k = -2.5, d = 16): softmax is shift-invariant, so the
    output is the plain mean of v. The Triton forward's running-max correction overflowed there
    (exp(100) in float32) and gave NaN and lse = +inf, and then zero gradients."""
    import math

    N, Lq, Lk, d = 1, 4, 200, 16
    q = torch.full((N, Lq, d), 10.0)
    kv = torch.cat([torch.full((N, Lk, d), -2.5), torch.randn(N, Lk, d, generator=torch.Generator().manual_seed(0))],
                   dim=-1)
    mask = torch.ones(N, Lk, dtype=torch.bool)
    if masked_first_block:
        mask[:, :64] = False  # the first key block has no valid key
    o, lse = torch.ops.bharnet.cross_attention_core(q, kv, mask, 1)
    keep = mask[0]
    torch.testing.assert_close(o[0], kv[0, keep, d:].mean(0).expand(Lq, d), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse[0, 0], torch.full((Lq,), -100.0 + math.log(int(keep.sum()))), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("backend", ["triton", "cpp"])
@pytest.mark.parametrize("Lk", [40, 200], ids=["one_key_block", "streamed_keys"])
def test_nan_scores_give_nan_rows_and_nan_gradients(Lk, backend):
    """A query whose scores are NaN (a diverged weight) gets o = NaN and lse = NaN, as the
    reference and the CUDA kernels do, and its NaN reaches dkv; the other queries' outputs stay
    finite. The Triton forward took the NaN row for one without valid keys (lse = +inf), so its
    backward gave the keys finite gradients and hid the divergence."""
    import math

    if backend == "cpp":
        ops_module._register_cpp_ops()  # the C++ core's autograd
    N, Lq, heads, d = 1, 5, 2, 8
    g = torch.Generator().manual_seed(0)
    q = torch.randn(N, Lq, heads * d, generator=g)
    kv = torch.randn(N, Lk, 2 * heads * d, generator=g, requires_grad=True)
    q[0, 2, 0] = math.nan  # head 0 of query 2
    q.requires_grad_()
    core = (torch.ops.bharnet.cross_attention_core if backend == "triton"
            else torch.ops.bharnet.cross_attention_core_cpp)
    o, lse = core(q, kv, None, heads)
    assert o[0, 2, :8].isnan().all() and lse[0, 0, 2].isnan()
    bad = torch.zeros(N, Lq, heads * d, dtype=torch.bool)
    bad[0, 2, :8] = True
    assert torch.isfinite(o[~bad]).all() and torch.isfinite(lse[0, 1]).all()
    assert torch.isfinite(lse[0, 0, [0, 1, 3, 4]]).all()
    o.sum().backward()
    assert kv.grad[..., :8].isnan().any() and kv.grad[..., 16:24].isnan().any()  # head 0's keys and values
    assert torch.isfinite(kv.grad[..., 8:16]).all()  # head 1's keys
