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
import importlib

import numpy as np
import pytest
import torch
import triton
import triton.language as tl

import deformable_temporal_conv_cases as cases
from bharnet.kernels import deformable_temporal_conv as kernels
from bharnet.ops import deformable_temporal_conv, deformable_temporal_conv_reference
from bharnet.kernels.deformable_temporal_conv import _first_output_reaching
from bharnet.ops.deformable_temporal_conv import _triton_backward, _triton_forward
from deformable_temporal_conv_cases import (GPU, GPU_SHAPES, SHAPES, TAP_CASES, TOLERANCE, backend_fn,
                                            make_inputs, shape_id)
from op_testing import run, to_device

custom_op_module = importlib.import_module("bharnet.ops._custom_op")


@pytest.fixture
def poisoned(monkeypatch):
    """Every kernel output and scratch buffer starts as NaN, so unwritten cells show."""
    monkeypatch.setattr(custom_op_module, "POISON_OUTPUTS", True)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_matches_float64_reference(shape, dtype, poisoned):
    B, C, O, T, V, stride = shape
    cases.assert_matches_reference("triton", make_inputs(B, C, O, T, V, dtype), stride, TOLERANCE[dtype])


def test_several_blocks_per_dimension(poisoned):
    """C_in, C_out and V above the largest block (64), C·E above BLOCK_K: every kernel loops
    over or tiles each dimension, and the partial sums span several (o, k) tiles."""
    cases.assert_matches_reference("triton", make_inputs(1, 70, 130, 9, 70, torch.float32), 2,
                                   TOLERANCE[torch.float32])


@pytest.mark.parametrize("taps, T, V", TAP_CASES)
def test_other_tap_counts_and_degenerate_sizes(taps, T, V, poisoned):
    """E != 4 with random fractional offsets in [-4, 4); T = V = 1 (every sample at row 0)."""
    cases.assert_other_tap_counts_match_reference("triton", taps, T, V)


def test_gradient_dtypes_follow_inputs():
    x, tau, weight, bias = make_inputs(2, 3, 5, 7, 5, torch.float16)
    bias = bias.float()
    y, dx, dtau, dweight, dbias = run(backend_fn("triton", 1), (x, tau, weight, bias))
    assert (y.dtype, dx.dtype, dtau.dtype, dweight.dtype, dbias.dtype) == (
        torch.float16, torch.float16, torch.float32, torch.float16, torch.float32)


@pytest.mark.parametrize("stride", [1, 2])
def test_without_bias(stride, poisoned):
    inputs = make_inputs(2, 3, 5, 13, 5, torch.float32, bias=False)
    got = cases.assert_matches_reference("triton", inputs, stride, TOLERANCE[torch.float32])
    assert len(got) == 4


def test_a_nan_offset_gives_nan_outputs():
    """A diverged run's NaN offset gives NaN outputs (so a NaN loss), as the reference does; the
    clamp's max and min had dropped the NaN and sampled row 0."""
    x, tau, weight, bias = make_inputs(1, 2, 3, 6, 3, torch.float32)
    tau[1] = float("nan")
    assert deformable_temporal_conv(x, tau, weight, bias, 1, backend="triton").isnan().all()


@pytest.mark.parametrize("transposed", [False, True])
def test_a_batch_above_the_grid_limit_is_launched_in_slices(monkeypatch, poisoned, transposed):
    """B is the forward grid's third axis, at most 65535 programs on a GPU: the forward launches
    slices of B (here of 2, so that 5 sequences need three), from x read through its strides."""
    monkeypatch.setattr(kernels, "MAX_GRID_YZ", 2)
    x, tau, weight, bias = make_inputs(5, 3, 4, 9, 5, torch.float32)
    x_in = x.transpose(2, 3).contiguous().transpose(2, 3) if transposed else x
    cases.assert_matches_reference("triton", (x_in, tau, weight, bias), 2, TOLERANCE[torch.float32],
                                   reference_inputs=(x, tau, weight, bias))


def test_noncontiguous_inputs():
    x, tau, weight, bias = make_inputs(2, 3, 5, 13, 5, torch.float32)
    x_nc = x.transpose(2, 3).contiguous().transpose(2, 3)  # same values, (T, V) strides swapped
    weight_nc = weight.permute(2, 0, 1).contiguous().permute(1, 2, 0)
    assert not x_nc.is_contiguous() and not weight_nc.is_contiguous()
    cases.assert_matches_reference("triton", (x_nc, tau, weight_nc, bias), 2, TOLERANCE[torch.float32],
                                   reference_inputs=(x, tau, weight, bias))


def test_offsets_at_exact_clamp_bounds_match_reference():
    """Integer offsets put r exactly on 0 and T-1, where the clamp's derivative is a convention
    of the installed torch (1 in older releases, 0 in 2.14.1): the kernel follows the reference."""
    cases.assert_matches_reference("triton", cases.exact_bound_inputs(), 1, TOLERANCE[torch.float64])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("stride", [1, 2, 3])
def test_far_offsets_clamp_many_positions(stride, dtype, poisoned):
    """Offsets that send most or all t' to row 0 or T-1 (the input gradient's long ranges),
    and integers that hit both clamp bounds exactly."""
    cases.assert_matches_reference("triton", cases.far_offset_inputs(dtype), stride, TOLERANCE[dtype])


@pytest.mark.parametrize("stride", [1, 2, 3])
def test_float32_positions_rounded_onto_integers(stride, poisoned):
    """Offsets an ulp from integers, where float32 rounding puts positions onto integers: every
    result matches the reference sampled at the same float32 positions. (A range bound off by
    one there drops a weight of 0 or of an ulp, too little to see here: the next test checks
    the bounds themselves.)"""
    cases.assert_matches_float32_position_reference("triton", stride)


@triton.jit
def _first_output_probe(tau_ptr, out_ptr, stride, T, T_out):
    """out[e, q + 1] = _first_output_reaching(q, tau[e]) for q in [-1, T]; one program per e."""
    e = tl.program_id(0)
    tau = tl.load(tau_ptr + e)
    for q in range(-1, T + 1):
        tl.store(out_ptr + e * (T + 2) + q + 1, _first_output_reaching(q, tau, stride, T, T_out))


def assert_first_output_reaching_is_exact(stride, device):
    """The input gradient's range bound equals a brute-force count over the float32 positions:
    first(q) = #{t' : p0[t'] < q} (p0 is non-decreasing in t')."""
    T = 13
    T_out = (T - 1) // stride + 1
    tau = torch.cat([cases.rounding_offsets(), torch.tensor(cases.FAR_OFFSETS), torch.tensor([0.25, -2.5])])
    p0 = ((torch.arange(T_out) * stride).float()[:, None] + tau).clamp(0, T - 1).floor()
    q = torch.arange(-1, T + 1, dtype=torch.float32)
    expected = (p0[:, :, None] < q).sum(0).int()  # (E, T + 2)
    got = torch.full((len(tau), T + 2), -1, dtype=torch.int32, device=device)
    _first_output_probe[(len(tau),)](tau.to(device), got, stride, T, T_out)
    assert torch.equal(got.cpu(), expected)


@pytest.mark.parametrize("stride", [1, 2, 3])
def test_first_output_reaching_is_exact(stride):
    assert_first_output_reaching_is_exact(stride, "cpu")


def test_strided_upstream_gradient():
    """dy with zero and non-unit strides (e.g. from y.sum() or a channel slice) is read in place."""
    x, tau, weight, _ = make_inputs(2, 3, 5, 13, 5, torch.float32)
    dy = torch.randn(2, 10, 7, 5)[:, ::2]
    for strided in (dy, torch.randn(2, 5, 1, 5).expand(2, 5, 7, 5)):
        got = _triton_backward.op(strided, x, tau, weight, 2)
        expected = _triton_backward.op(strided.contiguous(), x, tau, weight, 2)
        for g, r in zip(got, expected):
            assert torch.equal(g, r)


@pytest.mark.parametrize("passes", [True, False])
def test_both_clamp_conventions_at_exact_bounds(passes, monkeypatch):
    """Whichever convention the installed torch has, the other one is right too."""
    monkeypatch.setattr(kernels, "CLAMP_PASSES_GRADIENT_AT_BOUNDS", passes)
    cases.assert_follows_clamp_convention("triton", passes)


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
    cases.assert_kernel_gradients_match_finite_differences("triton")


def test_no_input_channels():
    cases.assert_no_input_channels("triton")


def test_float16_in_interpreter_follows_low_precision_rule():
    """fp16 x, weight and bias (offsets stay fp32 like a parameter under autocast)."""
    cases.assert_within_low_precision_rule("triton", make_inputs(2, 6, 8, 13, 25, torch.float16), 2)


@pytest.mark.parametrize("with_bias", [True, False])
def test_opcheck_forward(with_bias):
    x, tau, weight, bias = make_inputs(2, 3, 5, 7, 5, torch.float32, bias=with_bias)
    for t in (x, tau, weight, bias):
        if t is not None:
            t.requires_grad_()
    torch.library.opcheck(_triton_forward.op, (x, tau, weight, bias, 2))


def test_opcheck_backward():
    x, tau, weight, _ = make_inputs(2, 3, 5, 7, 5, torch.float32)
    dy = torch.randn(2, 5, 4, 5)
    torch.library.opcheck(_triton_backward.op, (dy, x, tau, weight, 2))


def test_torch_compile_fullgraph():
    """Inductor compiles a caller without graph breaks (the custom op is opaque to it)."""
    cases.assert_compiled_matches_eager("triton")


@pytest.mark.parametrize("make_bad, error, match", [
    (lambda x, t, w: (x[0], t, w), ValueError, r"x must have shape \(B, C_in, T, V\)"),
    (lambda x, t, w: (x, t, w[:, :2]), ValueError, r"weight must have shape \(C_out, 3, 4\)"),
    (lambda x, t, w: (x, t[None], w), ValueError, r"offsets must have shape \(E,\)"),
    (lambda x, t, w: (x.to(torch.int32), t, w), TypeError, "x must be floating point"),
    (lambda x, t, w: (x.bfloat16(), t, w), TypeError, "cannot run bfloat16 on CPU"),
    (lambda x, t, w: (x, t, w, [0.0] * 5), TypeError, "bias must be a torch.Tensor or None, got list"),
])
def test_bad_input_raises_clear_error(make_bad, error, match):
    x, tau, weight, _ = make_inputs(2, 3, 5, 7, 5)
    with pytest.raises(error, match=match):
        deformable_temporal_conv(*make_bad(x, tau, weight), backend="triton")


def test_bad_stride_raises():
    x, tau, weight, _ = make_inputs(2, 3, 5, 7, 5)
    with pytest.raises(ValueError, match="stride must be a positive int"):
        deformable_temporal_conv(x, tau, weight, None, 0, backend="triton")
    with pytest.raises(ValueError, match="stride must be a positive int, got True"):
        deformable_temporal_conv(x, tau, weight, None, True, backend="reference")
    torch.testing.assert_close(deformable_temporal_conv(x, tau, weight, None, np.int64(2), backend="cpp"),
                               deformable_temporal_conv(x, tau, weight, None, 2, backend="reference"))


# --- GPU (run by bench/gpu_check.sh) -----------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=shape_id)
def test_gpu_low_precision_rule(shape, dtype):
    B, C, O, T, V, stride = shape
    inputs = to_device(make_inputs(B, C, O, T, V, dtype), GPU)
    cases.assert_within_low_precision_rule("triton", inputs, stride)


@pytest.mark.gpu
@pytest.mark.parametrize("stride", [1, 2, 3])
def test_gpu_far_and_rounded_offsets(stride, poisoned):
    """Compiled kernels (approximate division in the range estimate) on the boundary cases."""
    inputs = to_device(cases.far_offset_inputs(torch.float32), GPU)
    cases.assert_matches_reference("triton", inputs, stride, TOLERANCE[torch.float32])
    cases.assert_matches_float32_position_reference("triton", stride, device=GPU)


@pytest.mark.gpu
@pytest.mark.parametrize("stride", [1, 2, 3])
def test_gpu_first_output_reaching_is_exact(stride):
    assert_first_output_reaching_is_exact(stride, GPU)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=shape_id)
def test_gpu_float32_is_not_tf32(shape, poisoned):
    B, C, O, T, V, stride = shape
    inputs = to_device(make_inputs(B, C, O, T, V, torch.float32), GPU)
    cases.assert_matches_reference("triton", inputs, stride, TOLERANCE[torch.float32])
