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

import deformable_temporal_conv_cases as cases
from bharnet.ops import deformable_temporal_conv
from deformable_temporal_conv_cases import (GPU, NAMES, TAP_CASES, TOLERANCE, backend_fn, make_inputs,
                                            reference_fn, shape_id)
from op_testing import assert_independent_of_thread_count, rel_err, run, to_device

op_module = importlib.import_module("bharnet.ops.deformable_temporal_conv")  # the attribute is the function

# (B, C_in, C_out, T, V, stride): the Triton tests' odd sizes, plus V = 42 and 67 and a C_out
# that is not a multiple of the micro-kernel's 4 rows.
SHAPES = cases.SHAPES + [(2, 5, 7, 9, 42, 1), (1, 8, 6, 11, 67, 2)]


def cpp_fn(stride):
    return backend_fn("cpp", stride)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_matches_float64_reference(shape, dtype, cpu_vector_bytes):
    B, C, O, T, V, stride = shape
    cases.assert_matches_reference("cpp", make_inputs(B, C, O, T, V, dtype), stride, TOLERANCE[dtype])


@pytest.mark.parametrize("taps, T, V", TAP_CASES)
def test_other_tap_counts_and_degenerate_sizes(taps, T, V):
    """E != 4 with random fractional offsets in [-4, 4); T = V = 1 (every sample at row 0)."""
    cases.assert_other_tap_counts_match_reference("cpp", taps, T, V)


@pytest.mark.parametrize("stride", [1, 2])
def test_without_bias(stride, cpu_vector_bytes):
    inputs = make_inputs(2, 3, 5, 13, 5, torch.float64, bias=False)
    got = cases.assert_matches_reference("cpp", inputs, stride, TOLERANCE[torch.float64])
    assert len(got) == 4


def test_noncontiguous_inputs():
    x, tau, weight, bias = make_inputs(2, 3, 5, 13, 5, torch.float64)
    x_nc = x.transpose(2, 3).contiguous().transpose(2, 3)
    weight_nc = weight.permute(2, 0, 1).contiguous().permute(1, 2, 0)
    tau_nc = torch.stack([tau, tau], 1)[:, 0]
    assert not (x_nc.is_contiguous() or weight_nc.is_contiguous() or tau_nc.is_contiguous())
    cases.assert_matches_reference("cpp", (x_nc, tau_nc, weight_nc, bias), 2, TOLERANCE[torch.float64],
                                   reference_inputs=(x, tau, weight, bias))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
def test_a_slice_of_channels_is_read_in_place(dtype, cpu_vector_bytes):
    """x a slice of a contiguous tensor's channels (the MSTCN's stacked branches pass these):
    the kernels read it in place (the channels around it, NaN, would spread) and give the
    output and every gradient of a contiguous copy, bit for bit."""
    x, tau, weight, bias = make_inputs(3, 5, 6, 11, 7, torch.float64)
    if dtype == torch.bfloat16:  # bfloat16 x, float32 parameters (the CPU kernels' autocast case)
        x, tau, weight, bias = x.to(dtype), tau.float(), weight.float(), bias.float()
    else:
        x, tau, weight, bias = (t.to(dtype) for t in (x, tau, weight, bias))
    wide = torch.full((3, 9, 11, 7), float("nan"), dtype=x.dtype)
    wide[:, 2:7] = x
    sliced = wide[:, 2:7].requires_grad_()
    assert not sliced.is_contiguous()
    results = []
    for x_in in (sliced, x.clone().requires_grad_()):
        params = [t.clone().requires_grad_() for t in (tau, weight, bias)]
        y = deformable_temporal_conv(x_in, *params, stride=2, backend="cpp")
        y.backward(torch.linspace(-1, 1, y.numel()).view(y.shape).to(y.dtype))
        results.append([y, x_in.grad] + [p.grad for p in params])
    for got, want in zip(*results, strict=True):
        assert torch.equal(got, want)


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


@pytest.mark.parametrize("backend", ["cpp", "reference"])
def test_a_nan_offset_gives_nan_outputs_not_an_error(backend):
    """A diverged run's NaN offset: NaN outputs (so a NaN loss) from every backend; the
    reference had raised an IndexError for index -2^63 (NaN turned into an integer)."""
    x, tau, weight, bias = make_inputs(1, 2, 3, 6, 3, torch.float32)
    tau[1] = float("nan")
    y = deformable_temporal_conv(x, tau, weight, bias, 1, backend=backend)
    assert y.isnan().all()


def test_offsets_at_exact_clamp_bounds_match_reference():
    """Integer offsets put r exactly on 0 and T-1, where the clamp's derivative is a convention
    of the installed torch: the kernel follows the reference."""
    cases.assert_matches_reference("cpp", cases.exact_bound_inputs(), 1, TOLERANCE[torch.float64])


@pytest.mark.parametrize("passes", [True, False])
def test_both_clamp_conventions_at_exact_bounds(passes, monkeypatch):
    monkeypatch.setattr(op_module, "CLAMP_PASSES_GRADIENT_AT_BOUNDS", passes)
    cases.assert_follows_clamp_convention("cpp", passes)


def test_kernel_gradients_match_finite_differences():
    cases.assert_kernel_gradients_match_finite_differences("cpp")


def test_empty_batch():
    x, tau, weight, bias = make_inputs(2, 3, 5, 7, 5, torch.float64)
    y, dx, dtau, dweight, dbias = run(cpp_fn(2), (x[:0], tau, weight, bias))
    assert y.shape == (0, 5, 4, 5) and dx.shape == (0, 3, 7, 5)
    assert not dtau.any() and not dweight.any() and not dbias.any()


def test_no_input_channels():
    cases.assert_no_input_channels("cpp")


def test_results_do_not_depend_on_the_thread_count(cpu_vector_bytes):
    """Fixed task slices and in-order partial sums: bitwise identical for 1 and 2 threads."""
    inputs = make_inputs(3, 8, 8, 33, 25, torch.float32)
    assert_independent_of_thread_count(lambda: run(cpp_fn(1), inputs), NAMES)


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
    cases.assert_compiled_matches_eager("cpp")


def test_bad_offsets_dtype_is_a_clear_error():
    x, tau, weight, bias = make_inputs(2, 3, 5, 7, 5, torch.float64)
    run(cpp_fn(1), (x, tau, weight, bias))
    with pytest.raises(RuntimeError, match="offsets must be float32 or float64"):
        torch.ops.bharnet.deformable_temporal_conv_cpp(x, tau.float(), weight, bias, 1)


# --- CUDA kernels (run by bench/gpu_check.sh) ---------------------------------------------------
GPU_SHAPES = cases.GPU_SHAPES + [(4, 24, 20, 13, 67, 2)]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=shape_id)
def test_gpu_matches_float64_reference(shape, dtype):
    B, C, O, T, V, stride = shape
    inputs = to_device(make_inputs(B, C, O, T, V, dtype), GPU)
    cases.assert_matches_reference("cpp", inputs, stride, TOLERANCE[dtype])


@pytest.mark.gpu
def test_gpu_exact_clamp_bounds_and_no_bias():
    inputs = to_device(cases.exact_bound_inputs(bias=False), GPU)
    cases.assert_matches_reference("cpp", inputs, 1, TOLERANCE[torch.float64])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", GPU_SHAPES[:3], ids=shape_id)
def test_gpu_low_precision_rule(shape, dtype):
    B, C, O, T, V, stride = shape
    inputs = to_device(make_inputs(B, C, O, T, V, dtype), GPU)
    cases.assert_within_low_precision_rule("cpp", inputs, stride)


@pytest.mark.gpu
def test_gpu_no_input_channels():
    cases.assert_no_input_channels("cpp", GPU)


@pytest.mark.gpu
def test_gpu_opcheck():
    x, tau, weight, bias = to_device(make_inputs(2, 3, 5, 7, 5, torch.float32), GPU)
    run(cpp_fn(2), (x, tau, weight, bias))
    torch.library.opcheck(torch.ops.bharnet.deformable_temporal_conv_cpp.default,
                          (x.requires_grad_(), tau, weight, bias, 2))
    dy = torch.randn(2, 5, 4, 5, device=GPU)
    torch.library.opcheck(torch.ops.bharnet.deformable_temporal_conv_cpp_backward.default,
                          (dy, x.detach(), tau, weight, 2, True))


@pytest.mark.gpu
def test_gpu_bad_offsets_dtype_is_a_clear_error():
    """A TORCH_CHECK in the CUDA binding raises RuntimeError. (The first H100 run of the
    cross-attention CUDA tests died with SIGSEGV in calls that should raise like this; if this
    test crashes too, C++ errors from the JIT-built extension crash there in general.)"""
    x, tau, weight, bias = to_device(make_inputs(2, 3, 5, 7, 5, torch.float64), GPU)
    run(cpp_fn(1), (x, tau, weight, bias))
    with pytest.raises(RuntimeError, match="offsets must be float32 or float64"):
        torch.ops.bharnet.deformable_temporal_conv_cpp(x, tau.float(), weight, bias, 1)
