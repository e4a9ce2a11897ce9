"""The ``cpp`` backend of ``bharnet.ops.deformable_temporal_conv`` (C++ CPU kernels here, CUDA
kernels in the GPU tests) against the float64 reference: output and every gradient (x, offsets,
weight, bias), as relative errors ``||out - ref|| / ||ref||``.

Tolerances: float64 kernels 1e-12 (exact up to summation order; measured ~1e-15). float32
kernels accumulate in float32 (dtau's partial sums in double), so each result carries about
sqrt(reduction length) * 2^-24; the longest reduction here (dweight over B * T_out * V <= 3200
terms) gives ~3e-6 in the worst case, hence 1e-5 (measured <= 2e-6). CUDA float16/bfloat16
follow DESIGN.md section 6.
"""
import importlib

import pytest
import torch

from bharnet.ops import deformable_temporal_conv, deformable_temporal_conv_reference

op_module = importlib.import_module("bharnet.ops.deformable_temporal_conv")  # the attribute is the function

E = 4
# (B, C_in, C_out, T, V, stride): the Triton tests' odd sizes, plus V = 42 and 67 and a C_out
# that is not a multiple of the micro-kernel's 4 rows.
SHAPES = [
    (2, 3, 5, 7, 5, 1),
    (2, 6, 8, 13, 25, 2),
    (2, 3, 8, 13, 5, 2),
    (2, 6, 5, 7, 25, 1),
    (1, 3, 5, 13, 5, 3),
    (2, 5, 7, 9, 42, 1),
    (1, 8, 6, 11, 67, 2),
]
TOLERANCE = {torch.float64: 1e-12, torch.float32: 1e-5}
NAMES = ("y", "dx", "doffsets", "dweight", "dbias")
GPU = "cuda"


def boundary_offsets(dtype=torch.float32):
    """tau with positions below 0 (-2.35), above T-1 (3.41 for late t'), within 1e-3 of an
    integer and of both clamp bounds, and otherwise fractional; no r is an integer."""
    return torch.tensor([-2.35, -0.9993, 1.9994, 3.41], dtype=dtype)


def make_inputs(B, C, O, T, V, dtype=torch.float32, offsets=None, bias=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(B, C, T, V, generator=gen).to(dtype)
    if offsets is None:
        offsets = boundary_offsets(torch.float64 if dtype == torch.float64 else torch.float32)
    weight = torch.randn(O, C, offsets.shape[0], generator=gen).to(dtype)
    b = torch.randn(O, generator=gen).to(dtype) if bias else None
    return x, offsets, weight, b


def run(fn, inputs, seed=1):
    """[y, grads of every tensor input...] for a fixed random upstream gradient."""
    leaves = [t.detach().requires_grad_() for t in inputs if t is not None]
    it = iter(leaves)
    args = [next(it) if t is not None else None for t in inputs]
    y = fn(*args)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed)).to(y.device, y.dtype)
    return [y.detach(), *torch.autograd.grad(y, leaves, dy)]


def cpp_fn(stride):
    return lambda x, tau, w, b: deformable_temporal_conv(x, tau, w, b, stride, backend="cpp")


def reference_fn(stride):
    return lambda x, tau, w, b: deformable_temporal_conv_reference(x, tau, w, b, stride)


def as_float64_cpu(inputs):
    return [None if t is None else t.double().cpu() for t in inputs]


def rel_err(out, ref):
    return ((out.double().cpu() - ref.double().cpu()).norm() / ref.double().cpu().norm()).item()


def assert_matches_reference(inputs, stride, tolerance):
    expected = run(reference_fn(stride), as_float64_cpu(inputs))
    got = run(cpp_fn(stride), inputs)
    assert len(got) == len(expected)
    for name, g, r in zip(NAMES, got, expected):
        assert torch.isfinite(g).all(), name
        err = rel_err(g, r)
        assert err < tolerance, f"{name}: relative error {err:.2e}"


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}_C{}_O{}_T{}_V{}_s{}".format(*s))
def test_matches_float64_reference(shape, dtype):
    B, C, O, T, V, stride = shape
    assert_matches_reference(make_inputs(B, C, O, T, V, dtype), stride, TOLERANCE[dtype])


@pytest.mark.parametrize("taps, T, V", [(3, 13, 5), (5, 7, 25), (1, 7, 5), (4, 1, 1)])
def test_other_tap_counts_and_degenerate_sizes(taps, T, V):
    """E != 4 with random fractional offsets in [-4, 4); T = V = 1 (every sample at row 0)."""
    gen = torch.Generator().manual_seed(2)
    inputs = (torch.randn(2, 3, T, V, generator=gen), torch.rand(taps, generator=gen) * 8 - 4,
              torch.randn(5, 3, taps, generator=gen), torch.randn(5, generator=gen))
    expected = run(reference_fn(2), as_float64_cpu(inputs))
    got = run(cpp_fn(2), inputs)
    for name, g, r in zip(NAMES, got, expected):
        if name == "doffsets" and T == 1:  # nothing to interpolate: the gradient is exactly 0
            assert (g == 0).all() and (r == 0).all()
        else:
            assert rel_err(g, r) < TOLERANCE[torch.float32], name


@pytest.mark.parametrize("stride", [1, 2])
def test_without_bias(stride):
    inputs = make_inputs(2, 3, 5, 13, 5, torch.float64, bias=False)
    got = run(cpp_fn(stride), inputs)
    assert len(got) == 4
    assert_matches_reference(inputs, stride, TOLERANCE[torch.float64])


def test_noncontiguous_inputs():
    x, tau, weight, bias = make_inputs(2, 3, 5, 13, 5, torch.float64)
    x_nc = x.transpose(2, 3).contiguous().transpose(2, 3)
    weight_nc = weight.permute(2, 0, 1).contiguous().permute(1, 2, 0)
    tau_nc = torch.stack([tau, tau], 1)[:, 0]
    assert not (x_nc.is_contiguous() or weight_nc.is_contiguous() or tau_nc.is_contiguous())
    expected = run(reference_fn(2), (x, tau, weight, bias))
    got = run(cpp_fn(2), (x_nc, tau_nc, weight_nc, bias))
    for name, g, r in zip(NAMES, got, expected):
        assert rel_err(g, r) < TOLERANCE[torch.float64], name


def test_dtypes_of_mixed_inputs():
    """float32 x with float64 offsets (positions in float64) and float16 x on CPU (computed in
    float32): every gradient comes back in its input's dtype."""
    x, tau, weight, bias = make_inputs(2, 3, 5, 7, 5, torch.float64)
    expected = run(reference_fn(1), (x, tau, weight, bias))
    got = run(cpp_fn(1), (x.float(), tau, weight.float(), bias.float()))
    assert [t.dtype for t in got] == [torch.float32, torch.float32, torch.float64, torch.float32, torch.float32]
    for name, g, r in zip(NAMES, got, expected):
        assert rel_err(g, r) < TOLERANCE[torch.float32], name
    half = run(cpp_fn(1), (x.half(), tau.float(), weight.float(), bias.float()))
    assert [t.dtype for t in half] == [torch.float16, torch.float16, torch.float32, torch.float32, torch.float32]
    assert rel_err(half[0], expected[0]) < 2 ** -9


def test_offsets_at_exact_clamp_bounds_match_reference():
    """Integer offsets put r exactly on 0 and T-1, where the clamp's derivative is a convention
    of the installed torch: the kernel follows the reference."""
    tau = torch.tensor([-3.0, 0.0, 2.0, 6.0], dtype=torch.float64)
    assert_matches_reference(make_inputs(2, 3, 5, 7, 5, torch.float64, offsets=tau), 1, TOLERANCE[torch.float64])


@pytest.mark.parametrize("passes", [True, False])
def test_both_clamp_conventions_at_exact_bounds(passes, monkeypatch):
    """Derivative 1 at the bounds gives the right derivative (the reference's gradient at
    tau + 1e-9); derivative 0 drops the taps whose r is exactly 0."""
    monkeypatch.setattr(op_module, "CLAMP_PASSES_GRADIENT_AT_BOUNDS", passes)
    tau = torch.tensor([-3.0, 0.0, 2.0, 6.0], dtype=torch.float64)
    x, _, weight, bias = make_inputs(2, 3, 5, 7, 5, torch.float64)
    dtau = run(cpp_fn(1), (x, tau, weight, bias))[2]
    right = run(reference_fn(1), (x, tau + 1e-9, weight, bias))[2]
    dy = torch.randn(2, 5, 7, 5, generator=torch.Generator().manual_seed(1)).double()  # as in run()
    g = torch.einsum("oce,botv->bctev", weight, dy)
    at_zero = (torch.arange(7, dtype=torch.float64)[:, None] + tau) == 0
    slope = (x[:, :, 1] - x[:, :, 0])[:, :, None, None, :]
    dropped = (g * slope * at_zero[None, None, :, :, None]).sum((0, 1, 2, 4))
    assert (dropped[:2] != 0).all()
    assert rel_err(dtau, right if passes else right - dropped) < 1e-6


def test_kernel_gradients_match_finite_differences():
    inputs = [t.requires_grad_() for t in make_inputs(2, 3, 5, 7, 5, torch.float64)]
    assert torch.autograd.gradcheck(cpp_fn(2), inputs, fast_mode=True, eps=1e-6, atol=1e-7)


def test_empty_batch():
    x, tau, weight, bias = make_inputs(2, 3, 5, 7, 5, torch.float64)
    y, dx, dtau, dweight, dbias = run(cpp_fn(2), (x[:0], tau, weight, bias))
    assert y.shape == (0, 5, 4, 5) and dx.shape == (0, 3, 7, 5)
    assert not dtau.any() and not dweight.any() and not dbias.any()


def test_results_do_not_depend_on_the_thread_count():
    """Fixed task slices and in-order partial sums: bitwise identical for 1 and 2 threads."""
    inputs = make_inputs(3, 8, 8, 33, 25, torch.float32)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run(cpp_fn(1), inputs)
        torch.set_num_threads(max(2, threads))
        many = run(cpp_fn(1), inputs)
    finally:
        torch.set_num_threads(threads)
    for name, a, b in zip(NAMES, one, many):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("with_bias", [True, False])
def test_opcheck_forward(with_bias):
    x, tau, weight, bias = make_inputs(2, 3, 5, 7, 5, torch.float32, bias=with_bias)
    run(cpp_fn(2), (x, tau, weight, bias))  # registers the fake impls and autograd
    for t in (x, tau, weight, bias):
        if t is not None:
            t.requires_grad_()
    torch.library.opcheck(torch.ops.bharnet.deformable_temporal_conv_cpp.default, (x, tau, weight, bias, 2))


def test_opcheck_backward():
    x, tau, weight, bias = make_inputs(2, 3, 5, 7, 5, torch.float32)
    run(cpp_fn(2), (x, tau, weight, bias))
    dy = torch.randn(2, 5, 4, 5)
    torch.library.opcheck(torch.ops.bharnet.deformable_temporal_conv_cpp_backward.default,
                          (dy, x, tau, weight, 2, False))


def test_torch_compile_fullgraph():
    def loss(x, tau, weight, bias):
        return deformable_temporal_conv(x, tau, weight, bias, 2, backend="cpp").square().sum()

    inputs = make_inputs(2, 3, 5, 7, 5, torch.float32)
    torch._dynamo.reset()
    compiled = torch.compile(loss, fullgraph=True)
    expected = run(loss, inputs)
    got = run(compiled, inputs)
    for name, g, r in zip(("loss", "dx", "doffsets", "dweight", "dbias"), got, expected):
        assert rel_err(g, r) < 1e-6, name


def test_bad_offsets_dtype_is_a_clear_error():
    x, tau, weight, bias = make_inputs(2, 3, 5, 7, 5, torch.float64)
    run(cpp_fn(1), (x, tau, weight, bias))
    with pytest.raises(RuntimeError, match="offsets must be float32 or float64"):
        torch.ops.bharnet.deformable_temporal_conv_cpp(x, tau.float(), weight, bias, 1)


# --- CUDA kernels (run by bench/gpu_check.sh) ---------------------------------------------------
GPU_SHAPES = [(16, 16, 16, 64, 25, 1), (16, 16, 16, 64, 25, 2), (16, 64, 64, 16, 42, 1), (4, 24, 20, 13, 67, 2)]


def to_gpu(inputs):
    return [None if t is None else t.to(GPU) for t in inputs]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=lambda s: "B{}_C{}_O{}_T{}_V{}_s{}".format(*s))
def test_gpu_matches_float64_reference(shape, dtype):
    B, C, O, T, V, stride = shape
    assert_matches_reference(to_gpu(make_inputs(B, C, O, T, V, dtype)), stride, TOLERANCE[dtype])


@pytest.mark.gpu
def test_gpu_exact_clamp_bounds_and_no_bias():
    tau = torch.tensor([-3.0, 0.0, 2.0, 6.0], dtype=torch.float64)
    assert_matches_reference(to_gpu(make_inputs(2, 3, 5, 7, 5, torch.float64, offsets=tau, bias=False)), 1,
                             TOLERANCE[torch.float64])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", GPU_SHAPES[:3], ids=lambda s: "B{}_C{}_O{}_T{}_V{}_s{}".format(*s))
def test_gpu_low_precision_rule(shape, dtype):
    B, C, O, T, V, stride = shape
    inputs = to_gpu(make_inputs(B, C, O, T, V, dtype))
    expected = run(reference_fn(stride), [None if t is None else t.double() for t in inputs])
    same_precision = run(reference_fn(stride), inputs)
    got = run(cpp_fn(stride), inputs)
    for i, (name, g, lp, r) in enumerate(zip(NAMES, got, same_precision, expected)):
        rounding = rel_err(r.to(g.dtype), r)
        assert rel_err(g, r) <= (2 if i == 0 else 3) * rel_err(lp, r) + rounding, name


@pytest.mark.gpu
def test_gpu_opcheck():
    x, tau, weight, bias = to_gpu(make_inputs(2, 3, 5, 7, 5, torch.float32))
    run(cpp_fn(2), (x, tau, weight, bias))
    torch.library.opcheck(torch.ops.bharnet.deformable_temporal_conv_cpp.default,
                          (x.requires_grad_(), tau, weight, bias, 2))
    dy = torch.randn(2, 5, 4, 5, device=GPU)
    torch.library.opcheck(torch.ops.bharnet.deformable_temporal_conv_cpp_backward.default,
                          (dy, x.detach(), tau, weight, 2, True))
