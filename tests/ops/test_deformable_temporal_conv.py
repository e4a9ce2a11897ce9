"""Triton deformable_temporal_conv vs the float64 reference: output and every gradient.

On CPU the kernels run in the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1),
so shapes are small and odd. Errors are relative: ``‖out − ref‖ / ‖ref‖``.

Tolerances: float32 kernels accumulate in fp32 with exact ("ieee") products, so each result
carries about sqrt(reduction length)·2⁻²⁴ relative error; the longest reduction here (dweight,
B·T_out·V = 650 terms) gives ~1.5e-6 in the worst case, hence 1e-5. float64 kernels: 1e-12.
fp16/bf16 follow DESIGN.md §6: at most 2× (3× for gradients) the error of the reference run
in the same precision, plus the error of rounding the exact result to that dtype (no result
stored in that dtype can do better).
"""
import pytest
import torch

from bharnet.kernels import deformable_temporal_conv as kernels
from bharnet.ops import deformable_temporal_conv, deformable_temporal_conv_reference
from bharnet.ops.deformable_temporal_conv import _triton_backward, _triton_forward

E = 4
# (B, C_in, C_out, T, V, stride): odd sizes, none a power of two
SHAPES = [
    (2, 3, 5, 7, 5, 1),
    (2, 6, 8, 13, 25, 2),
    (2, 3, 8, 13, 5, 2),
    (2, 6, 5, 7, 25, 1),
    (1, 3, 5, 13, 5, 3),
]
TOLERANCE = {torch.float64: 1e-12, torch.float32: 1e-5}
NAMES = ("y", "dx", "doffsets", "dweight", "dbias")


def boundary_offsets(dtype=torch.float32):
    """tau with positions below 0 (-2.35), above T-1 (3.41 for late t'), within 1e-3 of an
    integer and of both clamp bounds (-0.9993 gives r = 7e-4 at t' = 1; 1.9994 gives
    r = T-1 - 6e-4 at t'·s = T-3), and otherwise fractional; no r is an integer."""
    return torch.tensor([-2.35, -0.9993, 1.9994, 3.41], dtype=dtype)


def make_inputs(B, C, O, T, V, dtype=torch.float32, offsets=None, bias=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(B, C, T, V, generator=gen).to(dtype)
    if offsets is None:
        offsets = boundary_offsets(torch.float64 if dtype == torch.float64 else torch.float32)
    weight = torch.randn(O, C, E, generator=gen).to(dtype)
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


def triton_fn(stride):
    return lambda x, tau, w, b: deformable_temporal_conv(x, tau, w, b, stride, backend="triton")


def reference_fn(stride):
    return lambda x, tau, w, b: deformable_temporal_conv_reference(x, tau, w, b, stride)


def as_float64(inputs):
    return [None if t is None else t.double() for t in inputs]


def rel_err(out, ref):
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


@pytest.fixture
def poisoned(monkeypatch):
    """Every kernel output and scratch buffer starts as NaN, so unwritten cells show."""
    def nan_empty(shape, device, dtype):
        return torch.full(shape, float("nan"), device=device, dtype=dtype)
    monkeypatch.setattr(kernels, "_empty", nan_empty)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}_C{}_O{}_T{}_V{}_s{}".format(*s))
def test_matches_float64_reference(shape, dtype, poisoned):
    B, C, O, T, V, stride = shape
    inputs = make_inputs(B, C, O, T, V, dtype)
    expected = run(reference_fn(stride), as_float64(inputs))
    got = run(triton_fn(stride), inputs)
    for name, g, r in zip(NAMES, got, expected):
        assert torch.isfinite(g).all(), name
        assert rel_err(g, r) < TOLERANCE[dtype], name


@pytest.mark.parametrize("taps, T, V", [(3, 13, 5), (5, 7, 25), (1, 7, 5), (4, 1, 1)])
def test_other_tap_counts_and_degenerate_sizes(taps, T, V, poisoned):
    """E != 4 with random fractional offsets in [-4, 4); T = V = 1 (every sample at row 0)."""
    gen = torch.Generator().manual_seed(2)
    tau = torch.rand(taps, generator=gen) * 8 - 4
    x = torch.randn(2, 3, T, V, generator=gen)
    weight = torch.randn(5, 3, taps, generator=gen)
    bias = torch.randn(5, generator=gen)
    expected = run(reference_fn(2), as_float64((x, tau, weight, bias)))
    got = run(triton_fn(2), (x, tau, weight, bias))
    for name, g, r in zip(NAMES, got, expected):
        if name == "doffsets" and T == 1:  # nothing to interpolate: the gradient is exactly 0
            assert (g == 0).all() and (r == 0).all()
        else:
            assert rel_err(g, r) < TOLERANCE[torch.float32], name


def test_gradient_dtypes_follow_inputs():
    x, tau, weight, bias = make_inputs(2, 3, 5, 7, 5, torch.float16)
    bias = bias.float()
    y, dx, dtau, dweight, dbias = run(triton_fn(1), (x, tau, weight, bias))
    assert (y.dtype, dx.dtype, dtau.dtype, dweight.dtype, dbias.dtype) == (
        torch.float16, torch.float16, torch.float32, torch.float16, torch.float32)


@pytest.mark.parametrize("stride", [1, 2])
def test_without_bias(stride, poisoned):
    inputs = make_inputs(2, 3, 5, 13, 5, torch.float32, bias=False)
    expected = run(reference_fn(stride), as_float64(inputs))
    got = run(triton_fn(stride), inputs)
    assert len(got) == 4
    for name, g, r in zip(NAMES, got, expected):
        assert rel_err(g, r) < TOLERANCE[torch.float32], name


def test_noncontiguous_inputs():
    x, tau, weight, bias = make_inputs(2, 3, 5, 13, 5, torch.float32)
    x_nc = x.transpose(2, 3).contiguous().transpose(2, 3)  # same values, (T, V) strides swapped
    weight_nc = weight.permute(2, 0, 1).contiguous().permute(1, 2, 0)
    assert not x_nc.is_contiguous() and not weight_nc.is_contiguous()
    expected = run(reference_fn(2), as_float64((x, tau, weight, bias)))
    got = run(triton_fn(2), (x_nc, tau, weight_nc, bias))
    for name, g, r in zip(NAMES, got, expected):
        assert rel_err(g, r) < TOLERANCE[torch.float32], name


def test_offsets_at_exact_clamp_bounds_match_reference():
    """Integer offsets put r exactly on 0 and T-1, where the clamp's derivative is a convention
    of the installed torch (1 in older releases, 0 in 2.14.1): the kernel follows the reference."""
    tau = torch.tensor([-3.0, 0.0, 2.0, 6.0], dtype=torch.float64)
    inputs = make_inputs(2, 3, 5, 7, 5, torch.float64, offsets=tau)
    expected = run(reference_fn(1), inputs)
    got = run(triton_fn(1), inputs)
    for name, g, r in zip(NAMES, got, expected):
        assert rel_err(g, r) < TOLERANCE[torch.float64], name


@pytest.mark.parametrize("passes", [True, False])
def test_both_clamp_conventions_at_exact_bounds(passes, monkeypatch):
    """Whichever convention the installed torch has, the other one is right too.

    Derivative 1 at the bounds makes every tap's derivative the right derivative (at r = 0:
    x[1] - x[0]; at r = T-1: 0), i.e. the reference's gradient at tau + 1e-9. Derivative 0
    drops the taps whose r is exactly 0 (at r = T-1, x[p1] - x[p0] = 0 anyway)."""
    monkeypatch.setattr(kernels, "CLAMP_PASSES_GRADIENT_AT_BOUNDS", passes)
    tau = torch.tensor([-3.0, 0.0, 2.0, 6.0], dtype=torch.float64)
    x, _, weight, bias = make_inputs(2, 3, 5, 7, 5, torch.float64)
    dtau = run(triton_fn(1), (x, tau, weight, bias))[2]
    right = run(reference_fn(1), (x, tau + 1e-9, weight, bias))[2]
    dy = torch.randn(2, 5, 7, 5, generator=torch.Generator().manual_seed(1)).double()  # as in run()
    g = torch.einsum("oce,botv->bctev", weight, dy)  # (B, C, T_out, E, V)
    at_zero = (torch.arange(7, dtype=torch.float64)[:, None] + tau) == 0  # (T_out, E)
    slope = (x[:, :, 1] - x[:, :, 0])[:, :, None, None, :]  # x[1] - x[0]
    dropped = (g * slope * at_zero[None, None, :, :, None]).sum((0, 1, 2, 4))
    expected = right if passes else right - dropped
    assert (dropped[:2] != 0).all()  # taps 0 and 1 hit r = 0 exactly, so the conventions differ
    assert rel_err(dtau, expected) < 1e-6


@pytest.mark.parametrize("stride", [1, 2])
def test_reference_offsets_gradient_matches_finite_differences(stride):
    """Central differences (float64) of the reference w.r.t. tau equal its autograd gradient;
    with the kernel-vs-reference tests this pins the kernel to the true derivative. No position
    lies within 6e-4 of an integer or a clamp bound, far more than gradcheck's eps = 1e-6."""
    x, tau, weight, bias = make_inputs(2, 3, 5, 7, 5, torch.float64)
    tau.requires_grad_()
    assert torch.autograd.gradcheck(
        lambda t: deformable_temporal_conv_reference(x, t, weight, bias, stride), (tau,),
        eps=1e-6, atol=1e-7, rtol=1e-6)


def test_kernel_gradients_match_finite_differences():
    """gradcheck (fast mode: random directional derivatives) of the float64 kernel itself."""
    inputs = [t.requires_grad_() for t in make_inputs(2, 3, 5, 7, 5, torch.float64)]
    assert torch.autograd.gradcheck(triton_fn(2), inputs, fast_mode=True, eps=1e-6, atol=1e-7)


def test_float16_in_interpreter_follows_low_precision_rule():
    """fp16 x, weight and bias (offsets stay fp32 like a parameter under autocast)."""
    inputs = make_inputs(2, 6, 8, 13, 25, torch.float16)
    expected = run(reference_fn(2), as_float64(inputs))
    same_precision = run(reference_fn(2), inputs)
    got = run(triton_fn(2), inputs)
    for i, (name, g, lp, r) in enumerate(zip(NAMES, got, same_precision, expected)):
        factor = 2 if i == 0 else 3
        rounding = rel_err(r.to(g.dtype), r)
        assert rel_err(g, r) <= factor * rel_err(lp, r) + rounding, name


@pytest.mark.parametrize("with_bias", [True, False])
def test_opcheck_forward(with_bias):
    x, tau, weight, bias = make_inputs(2, 3, 5, 7, 5, torch.float32, bias=with_bias)
    for t in (x, tau, weight, bias):
        if t is not None:
            t.requires_grad_()
    torch.library.opcheck(_triton_forward, (x, tau, weight, bias, 2))


def test_opcheck_backward():
    x, tau, weight, _ = make_inputs(2, 3, 5, 7, 5, torch.float32)
    dy = torch.randn(2, 5, 4, 5)
    torch.library.opcheck(_triton_backward, (dy, x, tau, weight, 2))


def test_torch_compile_fullgraph():
    """Inductor compiles a caller without graph breaks (the custom op is opaque to it)."""
    def loss(x, tau, weight, bias):
        return deformable_temporal_conv(x, tau, weight, bias, 2, backend="triton").square().sum()

    inputs = make_inputs(2, 3, 5, 7, 5, torch.float32)
    torch._dynamo.reset()
    compiled = torch.compile(loss, fullgraph=True)
    expected = run(loss, inputs)
    got = run(compiled, inputs)
    for name, g, r in zip(("loss", "dx", "doffsets", "dweight", "dbias"), got, expected):
        assert rel_err(g, r) < 1e-6, name


@pytest.mark.parametrize("make_bad, error, match", [
    (lambda x, t, w: (x[0], t, w), ValueError, r"x must have shape \(B, C_in, T, V\)"),
    (lambda x, t, w: (x, t, w[:, :2]), ValueError, r"weight must have shape \(C_out, 3, 4\)"),
    (lambda x, t, w: (x, t[None], w), ValueError, r"offsets must have shape \(E,\)"),
    (lambda x, t, w: (x.to(torch.int32), t, w), TypeError, "x must be floating point"),
    (lambda x, t, w: (x.bfloat16(), t, w), TypeError, "cannot run bfloat16 on CPU"),
])
def test_bad_input_raises_clear_error(make_bad, error, match):
    x, tau, weight, _ = make_inputs(2, 3, 5, 7, 5)
    with pytest.raises(error, match=match):
        deformable_temporal_conv(*make_bad(x, tau, weight), backend="triton")


def test_bad_stride_raises():
    x, tau, weight, _ = make_inputs(2, 3, 5, 7, 5)
    with pytest.raises(ValueError, match="stride must be a positive int"):
        deformable_temporal_conv(x, tau, weight, None, 0, backend="triton")


# --- GPU (run by bench/gpu_check.sh) -----------------------------------------------------------
NTU_SHAPES = [(16, 16, 16, 64, 25, 1), (16, 16, 16, 64, 25, 2), (16, 64, 64, 16, 42, 1)]


def to_cuda(inputs):
    return [None if t is None else t.cuda() for t in inputs]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", NTU_SHAPES, ids=lambda s: "B{}_C{}_O{}_T{}_V{}_s{}".format(*s))
def test_gpu_low_precision_rule(shape, dtype):
    B, C, O, T, V, stride = shape
    inputs = to_cuda(make_inputs(B, C, O, T, V, dtype))
    expected = run(reference_fn(stride), as_float64(inputs))
    same_precision = run(reference_fn(stride), inputs)
    got = run(triton_fn(stride), inputs)
    for i, (name, g, lp, r) in enumerate(zip(NAMES, got, same_precision, expected)):
        factor = 2 if i == 0 else 3
        rounding = rel_err(r.to(g.dtype), r)
        assert rel_err(g, r) <= factor * rel_err(lp, r) + rounding, name


@pytest.mark.gpu
@pytest.mark.parametrize("shape", NTU_SHAPES, ids=lambda s: "B{}_C{}_O{}_T{}_V{}_s{}".format(*s))
def test_gpu_float32_is_not_tf32(shape, poisoned):
    B, C, O, T, V, stride = shape
    inputs = to_cuda(make_inputs(B, C, O, T, V, torch.float32))
    expected = run(reference_fn(stride), as_float64(inputs))
    got = run(triton_fn(stride), inputs)
    for name, g, r in zip(NAMES, got, expected):
        assert rel_err(g, r) < TOLERANCE[torch.float32], name
