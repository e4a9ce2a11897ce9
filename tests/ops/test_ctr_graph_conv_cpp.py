"""The ``cpp`` backend of ``bharnet.ops.ctr_graph_conv`` (C++ CPU kernels here, CUDA kernels in
the GPU tests) against the float64 reference: the output and every gradient (v, A, q, k,
weight, bias, alpha), as relative errors ``||x - ref|| / ||ref||``.

Tolerances: float64 kernels vs the float64 reference 1e-12 (both exact up to summation order;
measured ~1e-15). float32 kernels 1e-5: products and sums in float32 (the long scalar sums
behind dW, dbias and dalpha in double), so a few unit roundoffs (6e-8) grown by the square
root of the summed terms (<= ~1e4 here), measured <= 1e-6; the float32 tanh is a vectorised
exp-based one with absolute error ~1e-7. The CUDA kernels: the same for float32/float64, and
DESIGN.md section 6's rule for float16/bfloat16.
"""
import mmap
import subprocess
import sys

import pytest
import torch

import bharnet
import ctr_graph_conv_cases as cases
from bharnet.nn import CTRGraphConv, STGraphConv
from bharnet.nn.temporal import DeformableTemporalConv
from bharnet.ops import ctr_graph_conv_reference
from ctr_graph_conv_cases import (GPU, NAMES, TOLERANCE, UNIT_ROUNDOFF, assert_close_to_reference,
                                  assert_compiled_matches_eager, assert_matches_fp64_reference,
                                  assert_within_low_precision_rule, backend_fn, make_inputs,
                                  noncontiguous_inputs, output_grad, small_inputs)
from op_testing import assert_independent_of_thread_count, cast, forward_backward, rel_err

cpp_backend = backend_fn("cpp")

# (B, H, C, T, V, R, G): the Triton tests' odd shapes (V = 25, 5, 21, 42, 128; a per-channel
# topology G = C), the unified graph's V = 67 with R = 4, and rows that are not a multiple of
# the micro-kernel's 4 (C/G * T = 3 * 5 = 15), and one row per group (C/G = T = 1: the backward's
# dAref reads only its zero-padded copy of the last row).
SHAPES = cases.SHAPES + [(2, 3, 16, 5, 67, 4, 4), (3, 1, 12, 5, 25, 1, 4), (2, 2, 4, 1, 25, 2, 4)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_ctr_gc_matches_fp64_reference(shape, dtype, cpu_vector_bytes):
    assert_matches_fp64_reference("cpp", shape, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("shape", [SHAPES[0], SHAPES[2], SHAPES[5]], ids=str)
def test_static_st_gc_matches_fp64_reference(shape, dtype, cpu_vector_bytes):
    assert_matches_fp64_reference("cpp", shape, dtype, dynamic=False)


def test_parameters_in_other_dtypes_get_gradients_in_their_dtypes():
    """float32 features with float64 topology inputs (computed in float32) and float16 features
    on CPU (computed in float32, the output rounded to float16)."""
    inputs = make_inputs(2, 3, 8, 7, 25, 3, 4)
    dy = output_grad(inputs)
    ref = forward_backward(ctr_graph_conv_reference, inputs, dy)
    got = forward_backward(cpp_backend, [inputs[0].float(), *inputs[1:]], dy)
    assert [t.dtype for t in got] == [torch.float32] * 2 + [torch.float64] * 6
    for name, x, r in zip(NAMES, got, ref):
        assert rel_err(x, r) <= 1e-5, name
    half = forward_backward(cpp_backend, [inputs[0].half(), *cast(inputs[1:], torch.float32)], dy)
    assert [t.dtype for t in half] == [torch.float16] * 2 + [torch.float32] * 6
    assert rel_err(half[0], ref[0]) <= 2 ** -10


def relation_rows_on_the_factorised_tanh(q, k):
    """Share of the (b, h, r) rows whose float32 tanh(q_i - k_j) the CPU kernel takes as
    (a_i - b_j) / (a_i + b_j) (csrc/ctr_graph_conv.cpp: finite rows spanning at most 8)."""
    both = torch.cat([q, k], dim=-1).float()
    rows = both.isfinite().all(-1) & (both.amax(-1) - both.amin(-1) <= 8)
    return rows.double().mean().item()


def topology_of_one_relation(q, k):
    """Aref[i, j] = tanh(q_i - k_j) as computed by the CPU kernel (float32): H = G = R = 1,
    W = 1, bias = 0, alpha = 1, A = 0, and v[t, j] = delta(t, j), so y[t, i] = Aref[i, t]."""
    V = q.shape[0]
    v = torch.eye(V).view(1, 1, 1, V, V)
    y = cpp_backend(v, torch.zeros(1, V, V), q.view(1, 1, 1, V), k.view(1, 1, 1, V), torch.ones(1, 1, 1),
                    torch.zeros(1, 1), torch.ones(1))
    return y[0, 0].t()


@pytest.mark.parametrize("spread, bound", [(1.0, 2e-7), (7.5, 6e-7), (30.0, 2e-7)])
def test_float32_tanh_of_q_minus_k_elementwise(spread, bound, cpu_vector_bytes):
    """Each refined-topology entry against float64 tanh: rows spanning up to 8 take the
    factorised formula (error ~2^-24 x span), wider ones the direct tanh (~1e-7)."""
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        q, k = (torch.rand(2, 25, generator=g) - 0.5) * spread + torch.randn(1, generator=g)
        if spread < 8:
            assert relation_rows_on_the_factorised_tanh(q, k) == 1
        exact = torch.tanh(q.double()[:, None] - k.double()[None, :])
        assert (topology_of_one_relation(q, k).double() - exact).abs().max().item() <= bound


def test_float32_tanh_of_q_minus_k_with_nan_and_inf(cpu_vector_bytes):
    """NaN in q_i or k_j gives NaN in row i or column j only; inf differences give +-1."""
    q, k = torch.randn(2, 25, generator=torch.Generator().manual_seed(1))
    for nan_at in (0, 7):
        qn = q.clone()
        qn[nan_at] = float("nan")
        got = topology_of_one_relation(qn, k)
        assert got.isnan()[nan_at].all() and not got.isnan()[torch.arange(25) != nan_at].any()
    ki = k.clone()
    ki[3] = float("inf")
    got, exact = topology_of_one_relation(q, ki), torch.tanh(q.double()[:, None] - ki.double()[None, :])
    assert torch.equal(got[:, 3], torch.full((25,), -1.0))
    assert (got.double() - exact).abs().max().item() <= 2e-7


@pytest.mark.parametrize("spread, factorised", [(1.0, "all"), (1.6, "some"), (4.0, "none")])
def test_float32_tanh_formulas_in_the_whole_op(spread, factorised, cpu_vector_bytes):
    """Output and every gradient against float64 with q and k scaled so that all, some or none
    of the relation rows take the factorised tanh."""
    inputs = make_inputs(2, 3, 16, 5, 25, 4, 4)
    inputs[2], inputs[3] = inputs[2] * spread, inputs[3] * spread
    share = relation_rows_on_the_factorised_tanh(inputs[2], inputs[3])
    assert {"all": share == 1, "some": 0 < share < 1, "none": share == 0}[factorised], share
    dy = output_grad(inputs)
    assert_close_to_reference("cpp", cast(inputs, torch.float32), dy, TOLERANCE[torch.float32])


GUARD_PAGE_SCRIPT = r"""
import ctypes, mmap, sys
import torch
import bharnet._ext as ext
ext.load()
ops = torch.ops.bharnet
libc = ctypes.CDLL(None)
libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
for width, dtype, V, C, T in [(32, torch.float32, 1, 1, 2), (64, torch.float32, 7, 2, 3), (32, torch.float32, 5, 1, 2),
                              (64, torch.float64, 3, 1, 2), (32, torch.float64, 1, 2, 2), (64, torch.float32, 25, 3, 4)]:
    try:
        ops.cpu_vector_bytes(width)
    except RuntimeError:  # no AVX-512 here: the 64-byte path cannot run
        continue
    page = mmap.PAGESIZE
    buf = mmap.mmap(-1, 2 * page)  # v's storage ends where a PROT_NONE page starts
    assert libc.mprotect(ctypes.addressof(ctypes.c_char.from_buffer(buf)) + page, page, 0) == 0
    size = torch.empty((), dtype=dtype).element_size()
    n = C * T * V
    v = torch.frombuffer(buf, dtype=dtype, count=n, offset=page - n * size).view(1, 1, C, T, V)
    v.copy_(torch.randn(v.shape, dtype=dtype))
    args = [torch.randn(1, V, V, dtype=dtype), torch.randn(1, 1, 1, V, dtype=dtype), torch.randn(1, 1, 1, V, dtype=dtype),
            torch.randn(1, 1, 1, dtype=dtype), torch.randn(1, 1, dtype=dtype), torch.tensor([0.7], dtype=dtype)]
    dy = torch.randn(1, C, T, V, dtype=dtype)
    got = ops.ctr_graph_conv_cpp_backward(dy, v, *args)
    expected = ops.ctr_graph_conv_cpp_backward(dy, v.clone(), *args)
    assert all(torch.equal(a, b) for a, b in zip(got, expected))
    ops.ctr_graph_conv_cpp(v, *args)
print("ok")
"""


def test_kernels_read_nothing_past_the_end_of_v():
    """v's storage ends at a PROT_NONE page (in a subprocess: a read past it is a segfault). The
    backward's dAref GEMM reads v's rows in place as whole vectors, which for V below half a
    vector would reach past the last rows; those are read from a padded copy."""
    if not hasattr(mmap, "PROT_READ"):
        pytest.skip("needs mmap with page protection (POSIX)")
    done = subprocess.run([sys.executable, "-c", GUARD_PAGE_SCRIPT], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


def test_non_contiguous_inputs(cpu_vector_bytes):
    assert_close_to_reference("cpp", *noncontiguous_inputs(), TOLERANCE[torch.float64])


def test_results_do_not_depend_on_the_thread_count(cpu_vector_bytes):
    """Every output element is computed by one task in a fixed order: bitwise identical."""
    inputs = cast(make_inputs(3, 3, 16, 9, 25, 4, 4), torch.float32)
    dy = output_grad(inputs).float()
    assert_independent_of_thread_count(lambda: forward_backward(cpp_backend, inputs, dy), NAMES)


@pytest.mark.parametrize("dynamic", [True, False], ids=["ctr_gc", "st_gc"])
def test_opcheck_forward_op(dynamic):
    cpp_backend(*small_inputs(dynamic))  # registers the fake impls and autograd on first use
    inputs = small_inputs(dynamic)
    args = inputs if dynamic else inputs + [None] * 5
    torch.library.opcheck(torch.ops.bharnet.ctr_graph_conv_cpp.default, args)


def test_opcheck_backward_ops():
    inputs = [t.detach() for t in small_inputs()]
    cpp_backend(*inputs)
    dy = output_grad(inputs)
    torch.library.opcheck(torch.ops.bharnet.ctr_graph_conv_cpp_backward.default, [dy, *inputs])
    torch.library.opcheck(torch.ops.bharnet.ctr_graph_conv_cpp_static_backward.default, [dy, *inputs[:2]])


def test_mismatched_parameter_dtype_is_a_clear_error():
    inputs = cast(make_inputs(1, 2, 4, 3, 5, 2, 4), torch.float32)
    cpp_backend(*inputs)
    inputs[4] = inputs[4].double()
    with pytest.raises(RuntimeError, match="weight must be Float"):
        torch.ops.bharnet.ctr_graph_conv_cpp(*inputs)


@pytest.mark.parametrize("dynamic", [True, False], ids=["ctr_gc", "st_gc"])
def test_create_graph_gives_first_order_grads_and_refuses_double_backward(dynamic):
    """Autograd is registered in C++ (csrc/autograd.cpp): under create_graph the gradients are
    the usual ones, and differentiating them again raises instead of silently giving zeros."""
    inputs = make_inputs(2, 2, 4, 3, 5, 2, 2, dynamic=dynamic)
    leaves = [t.clone().requires_grad_() for t in inputs]
    expected = torch.autograd.grad(cpp_backend(*leaves).square().sum(), leaves)
    got = torch.autograd.grad(cpp_backend(*leaves).square().sum(), leaves, create_graph=True)
    for name, g, e in zip(NAMES[1:], got, expected):
        torch.testing.assert_close(g, e, rtol=0, atol=0, msg=lambda m: f"{name}: {m}")
    with pytest.raises(RuntimeError, match=r"bharnet::ctr_graph_conv_cpp: double backward is not supported .*backend=.reference."):
        got[0].sum().backward()


def test_torch_compile_fullgraph():
    """The custom op traces through its fake impl: no graph break, same values and gradients."""
    assert_compiled_matches_eager("cpp", make_inputs(1, 2, 4, 3, 5, 2, 4))


def test_whole_model_matches_reference_backend():
    """BHaRNet-E (small preset, float64, train mode): every ctr_graph_conv and
    deformable_temporal_conv of the model on the C++ kernels gives the reference's logits and
    parameter gradients."""
    torch.manual_seed(0)
    model = bharnet.create_model("bharnet-e", 5, preset="small").double()
    for module in model.modules():
        if isinstance(module, CTRGraphConv):  # alpha starts at 0, which would hide the refinement
            module.alpha.data.fill_(0.5)
    gen = torch.Generator().manual_seed(0)
    body = torch.randn(2, 3, 12, 25, 2, generator=gen, dtype=torch.float64)
    hand = torch.randn(2, 3, 12, 42, 2, generator=gen, dtype=torch.float64)
    target = torch.tensor([1, 3])
    results = {}
    for backend in ("reference", "cpp"):
        for module in model.modules():
            if isinstance(module, (STGraphConv, CTRGraphConv, DeformableTemporalConv)):
                module.impl = backend
        model.zero_grad()
        out = model(body, hand)
        model.loss(out, target).backward()
        results[backend] = [out.logits.detach()] + [p.grad.clone() for p in model.parameters()]
    names = ["logits"] + [name for name, _ in model.named_parameters()]
    for name, got, ref in zip(names, results["cpp"], results["reference"]):
        torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-12, msg=lambda m: f"{name}: {m}")


# --- CUDA kernels (run by bench/gpu_check.sh) ---------------------------------------------------
GPU_SHAPES = cases.GPU_SHAPES + [(2, 3, 12, 13, 21, 3, 12)]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=str)
def test_gpu_matches_fp64_reference(shape, dtype):
    assert_matches_fp64_reference("cpp", shape, dtype, GPU)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_gpu_static_matches_fp64_reference(dtype):
    assert_matches_fp64_reference("cpp", GPU_SHAPES[0], dtype, GPU, dynamic=False)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", GPU_SHAPES[:3], ids=str)
def test_gpu_low_precision_rule(shape, dtype):
    """DESIGN.md section 6 with 16-bit features and float32 topology inputs (autocast-like):
    the kernel's error is at most 2x (3x for gradients) the reference's own in that precision,
    or one unit roundoff of the result's dtype."""
    inputs = make_inputs(*shape)
    dtypes = [dtype] + [torch.float32] * (len(inputs) - 1)
    floor = {**UNIT_ROUNDOFF, torch.float32: 2.0 ** -24}
    assert_within_low_precision_rule("cpp", inputs, output_grad(inputs), dtypes, GPU, floor)


# Every tensor-core tile width (V padded to 16 * NT, NT = 1..8), including the launches above
# 48 KB of shared memory (forward V > 80, backward V > 32), rows below, at and above one row
# tile, a per-channel topology (G = C) and V = 5.
TENSOR_CORE_SHAPES = [(2, 3, 8, 7, 16, 3, 4), (2, 3, 8, 9, 17, 3, 4), (2, 3, 64, 13, 25, 8, 4),
                      (2, 3, 64, 9, 42, 8, 4), (2, 3, 16, 11, 67, 4, 4), (1, 2, 16, 13, 100, 4, 2),
                      (1, 3, 8, 20, 128, 4, 4), (2, 3, 12, 13, 21, 3, 12), (1, 2, 4, 3, 5, 2, 4)]


@pytest.mark.gpu
@pytest.mark.parametrize("dynamic", [True, False], ids=["ctr_gc", "st_gc"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", TENSOR_CORE_SHAPES, ids=str)
def test_gpu_tensor_core_tiles(shape, dtype, dynamic):
    """The 16-bit (WMMA) CUDA kernels at every tile width, under DESIGN.md section 6's rule."""
    inputs = make_inputs(*shape, dynamic=dynamic)
    dtypes = [dtype] + [torch.float32] * (len(inputs) - 1)
    floor = {**UNIT_ROUNDOFF, torch.float32: 2.0 ** -24}
    assert_within_low_precision_rule("cpp", inputs, output_grad(inputs), dtypes, GPU, floor)


@pytest.mark.gpu
def test_gpu_opcheck():
    inputs = [t.to(GPU).requires_grad_() for t in make_inputs(2, 3, 8, 7, 25, 3, 4)]
    cpp_backend(*inputs)
    torch.library.opcheck(torch.ops.bharnet.ctr_graph_conv_cpp.default, inputs)
    dy = output_grad(inputs).to(GPU)
    detached = [t.detach() for t in inputs]
    torch.library.opcheck(torch.ops.bharnet.ctr_graph_conv_cpp_backward.default, [dy, *detached])
    torch.library.opcheck(torch.ops.bharnet.ctr_graph_conv_cpp_static_backward.default, [dy, *detached[:2]])

