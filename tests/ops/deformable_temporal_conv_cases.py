"""Inputs and comparisons shared by the tests of ``bharnet.ops.deformable_temporal_conv``'s
Triton backend (``test_deformable_temporal_conv.py``) and its C++/CUDA backend
(``test_deformable_temporal_conv_cpp.py``).

Tolerances (each test file's docstring says why): float64 kernels vs the float64 reference
1e-12, float32 kernels 1e-5; float16/bfloat16 follow DESIGN.md section 6.
"""
import torch

from bharnet.ops import deformable_temporal_conv, deformable_temporal_conv_reference
from op_testing import as_float64, assert_close, assert_low_precision_rule, rel_err, run, to_device

TOLERANCE = {torch.float64: 1e-12, torch.float32: 1e-5}
NAMES = ("y", "dx", "doffsets", "dweight", "dbias")
GPU = "cuda"

# (B, C_in, C_out, T, V, stride): odd sizes, none a power of two
SHAPES = [
    (2, 3, 5, 7, 5, 1),
    (2, 6, 8, 13, 25, 2),
    (2, 3, 8, 13, 5, 2),
    (2, 6, 5, 7, 25, 1),
    (1, 3, 5, 13, 5, 3),
]
# GPU: NTU's body (V = 25) at strides 1 and 2, and the hands (V = 42) with 64 channels.
GPU_SHAPES = [(16, 16, 16, 64, 25, 1), (16, 16, 16, 64, 25, 2), (16, 64, 64, 16, 42, 1)]
# (taps, T, V): E != 4 and the degenerate T = V = 1.
TAP_CASES = [(3, 13, 5), (5, 7, 25), (1, 7, 5), (4, 1, 1)]


def shape_id(shape):
    return "B{}_C{}_O{}_T{}_V{}_s{}".format(*shape)


def boundary_offsets(dtype=torch.float32):
    """tau with positions below 0 (-2.35), above T-1 (3.41 for late t'), within 1e-3 of an
    integer and of both clamp bounds (-0.9993 gives r = 7e-4 at t' = 1; 1.9994 gives
    r = T-1 - 6e-4 at t'·s = T-3), and otherwise fractional; no r is an integer."""
    return torch.tensor([-2.35, -0.9993, 1.9994, 3.41], dtype=dtype)


def make_inputs(B, C, O, T, V, dtype=torch.float32, offsets=None, bias=True, seed=0):
    """(x, offsets, weight, bias): offsets default to ``boundary_offsets`` (float64 for float64
    x, else float32, as a parameter under autocast); bias None without ``bias``."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(B, C, T, V, generator=gen).to(dtype)
    if offsets is None:
        offsets = boundary_offsets(torch.float64 if dtype == torch.float64 else torch.float32)
    weight = torch.randn(O, C, offsets.shape[0], generator=gen).to(dtype)
    b = torch.randn(O, generator=gen).to(dtype) if bias else None
    return x, offsets, weight, b


def exact_bound_inputs(bias=True):
    """float64 inputs (T = 7) whose integer offsets put r exactly on 0 and T-1 for some t'."""
    tau = torch.tensor([-3.0, 0.0, 2.0, 6.0], dtype=torch.float64)
    return make_inputs(2, 3, 5, 7, 5, torch.float64, offsets=tau, bias=bias)


# Offsets far outside [0, T-1] (T = 13): -100 and 40.5 clamp every t' to one row, -9.3 and
# 11.6 most of them; the integers -4 and 6 put r exactly on 0 and on T-1 = 12 for some t'.
FAR_OFFSETS = (-100.0, -9.3, -4.0, 6.0, 11.6, 40.5)


def far_offset_inputs(dtype):
    """(x, offsets, weight, bias), T = 13, with ``FAR_OFFSETS`` (float64 for float64 x)."""
    tau = torch.tensor(FAR_OFFSETS, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    return make_inputs(2, 3, 5, 13, 5, dtype, offsets=tau)


def rounding_offsets():
    """float32 offsets one ulp from an integer, where float32 rounding moves the positions
    t'·s + tau onto an integer (2.9999998 + 2 = 5.0, -2.9999998 + 7 = 4.0) or makes the
    estimate ceil((q - tau)/s) of the first t' with r >= q miss by one (too large for q = 5 and
    2.9999998; too small for q = 1 and -7.0000005, since 1 + 7.0000005 rounds to 8), and a tiny
    offset just above the lower clamp bound."""
    one_ulp = torch.nextafter(torch.tensor([3.0, -3.0, -7.0]), torch.tensor([0.0, 0.0, -8.0]))
    return torch.cat([one_ulp, torch.tensor([1e-30])])


def assert_matches_float32_position_reference(backend, stride, device="cpu"):
    """float32 kernel vs the reference in float64 with the same float32 offsets, so that both
    sample at the same (rounded) positions: at a position rounded onto an integer, the offsets
    gradient jumps from x[p] - x[p-1] to x[p+1] - x[p], so exact positions would differ."""
    x, tau, weight, bias = make_inputs(2, 3, 5, 13, 5, torch.float32, offsets=rounding_offsets())
    expected = run(reference_fn(stride), (x.double(), tau, weight.double(), bias.double()))
    got = run(backend_fn(backend, stride), [t.to(device) for t in (x, tau, weight, bias)])
    assert_close(got, expected, TOLERANCE[torch.float32], NAMES)


def random_tap_inputs(taps, T, V):
    """float32 (x, offsets, weight, bias) with ``taps`` random fractional offsets in [-4, 4)."""
    gen = torch.Generator().manual_seed(2)
    tau = torch.rand(taps, generator=gen) * 8 - 4
    x = torch.randn(2, 3, T, V, generator=gen)
    weight = torch.randn(5, 3, taps, generator=gen)
    bias = torch.randn(5, generator=gen)
    return x, tau, weight, bias


def backend_fn(backend, stride):
    return lambda x, tau, w, b: deformable_temporal_conv(x, tau, w, b, stride, backend=backend)


def reference_fn(stride):
    return lambda x, tau, w, b: deformable_temporal_conv_reference(x, tau, w, b, stride)


def assert_matches_reference(backend, inputs, stride, tolerance, reference_inputs=None):
    """The backend on ``inputs`` (any device) vs the float64 CPU reference on
    ``reference_inputs`` (by default the same values): output and every gradient, which it
    returns."""
    reference_inputs = inputs if reference_inputs is None else reference_inputs
    expected = run(reference_fn(stride), as_float64(reference_inputs, "cpu"))
    got = run(backend_fn(backend, stride), inputs)
    assert_close(got, expected, tolerance, NAMES)
    return got


def assert_other_tap_counts_match_reference(backend, taps, T, V):
    inputs = random_tap_inputs(taps, T, V)
    expected = run(reference_fn(2), as_float64(inputs))
    got = run(backend_fn(backend, 2), inputs)
    assert len(got) == len(expected)
    for name, g, r in zip(NAMES, got, expected):
        if name == "doffsets" and T == 1:  # nothing to interpolate: the gradient is exactly 0
            assert (g == 0).all() and (r == 0).all()
        else:
            assert rel_err(g, r) < TOLERANCE[torch.float32], name


def assert_no_input_channels(backend, device="cpu"):
    """C_in = 0: y is the bias, so dbias = sum dy and every other gradient is empty or zero."""
    x, tau, weight, bias = make_inputs(2, 0, 5, 7, 3, torch.float64)
    y, dx, dtau, dweight, dbias = run(backend_fn(backend, 2), to_device((x, tau, weight, bias), device))
    expected = run(reference_fn(2), (x, tau, weight, bias))
    assert y.shape == (2, 5, 4, 3) and dx.shape == (2, 0, 7, 3) and dweight.shape == (5, 0, 4)
    assert_close([y, dbias], [expected[0], expected[4]], TOLERANCE[torch.float64], ["y", "dbias"])
    assert not dtau.any()


def assert_follows_clamp_convention(backend, passes):
    """With the derivative of the clamp at its bounds set to 1 (``passes``) or 0 (the caller
    patches it), the backend's offsets gradient at integer offsets is the right one.

    Derivative 1 at the bounds makes every tap's derivative the right derivative (at r = 0:
    x[1] - x[0]; at r = T-1: 0), i.e. the reference's gradient at tau + 1e-9. Derivative 0
    drops the taps whose r is exactly 0 (at r = T-1, x[p1] - x[p0] = 0 anyway)."""
    x, tau, weight, bias = exact_bound_inputs()
    dtau = run(backend_fn(backend, 1), (x, tau, weight, bias))[2]
    right = run(reference_fn(1), (x, tau + 1e-9, weight, bias))[2]
    dy = torch.randn(2, 5, 7, 5, generator=torch.Generator().manual_seed(1)).double()  # as in run()
    g = torch.einsum("oce,botv->bctev", weight, dy)  # (B, C, T_out, E, V)
    at_zero = (torch.arange(7, dtype=torch.float64)[:, None] + tau) == 0  # (T_out, E)
    slope = (x[:, :, 1] - x[:, :, 0])[:, :, None, None, :]  # x[1] - x[0]
    dropped = (g * slope * at_zero[None, None, :, :, None]).sum((0, 1, 2, 4))
    expected = right if passes else right - dropped
    assert (dropped[:2] != 0).all()  # taps 0 and 1 hit r = 0 exactly, so the conventions differ
    assert rel_err(dtau, expected) < 1e-6


def assert_kernel_gradients_match_finite_differences(backend):
    """gradcheck (fast mode: random directional derivatives) of the float64 kernel itself."""
    inputs = [t.requires_grad_() for t in make_inputs(2, 3, 5, 7, 5, torch.float64)]
    assert torch.autograd.gradcheck(backend_fn(backend, 2), inputs, fast_mode=True, eps=1e-6, atol=1e-7)


def assert_within_low_precision_rule(backend, inputs, stride):
    """DESIGN.md section 6 (with the rounding of the exact result) against the float64
    reference on the inputs' device."""
    expected = run(reference_fn(stride), as_float64(inputs))
    same_precision = run(reference_fn(stride), inputs)
    got = run(backend_fn(backend, stride), inputs)
    assert_low_precision_rule(got, same_precision, expected, NAMES)


def assert_compiled_matches_eager(backend):
    """Inductor compiles a caller without graph breaks: same loss and gradients."""
    def loss(x, tau, weight, bias):
        return deformable_temporal_conv(x, tau, weight, bias, 2, backend=backend).square().sum()

    inputs = make_inputs(2, 3, 5, 7, 5, torch.float32)
    torch._dynamo.reset()
    compiled = torch.compile(loss, fullgraph=True)
    expected = run(loss, inputs)
    got = run(compiled, inputs)
    assert_close(got, expected, 1e-6, ("loss",) + NAMES[1:])
