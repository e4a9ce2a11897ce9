"""bfloat16 through the C++ CPU kernels: the forwards of ctr_graph_conv_cpp,
deformable_temporal_conv_cpp and temporal_max_pool read bfloat16 features as they are (widened
exactly, computed in float32, the output rounded to nearest even; the max-pool's maxima are
copied as stored), so a bfloat16 model runs without float32 copies of its activations
(``cpu_kernel_dtype``); their backward kernels read bfloat16 too (dy and the saved features,
rounding the input gradients once), so bfloat16 training (CPU autocast) runs them without
casts.

The kernels compute exactly what the float32 kernels compute on the widened inputs: same products
in the same order, and the same rounding as ``Tensor.to(torch.bfloat16)``. So each native output
is checked bit for bit against the float32 kernel's output rounded by torch (finite values; NaN
and inf where the float32 kernel gives them), on both vector widths, contiguous and
channels-last, and against the float64 reference within one bfloat16 unit roundoff (2^-8; the
rounding of the output alone gives about 2^-9 / sqrt(3) in the norm).
"""
import mmap
import subprocess
import sys

import pytest
import torch

import ctr_graph_conv_cases as ctr_cases
import deformable_temporal_conv_cases as det_cases
import torch.nn.functional as F

from bharnet.ops import ctr_graph_conv_reference, deformable_temporal_conv, temporal_max_pool
from bharnet.ops._checks import is_channels_last
from bharnet.ops._custom_op import cpu_kernel_dtype
from bharnet.ops.ctr_graph_conv import ctr_graph_conv_cpp

BF16 = torch.bfloat16
CL = torch.channels_last
BF16_UNIT_ROUNDOFF = 2.0 ** -8


def rel_err_to(y, exact):
    return ((y.double() - exact).norm() / exact.norm()).item()


def assert_rounded_float32_result(y, y32):
    """y (bfloat16) is the float32 result y32 rounded to bfloat16, value for value."""
    assert y.dtype == BF16 and y.shape == y32.shape and y.stride() == y32.stride()
    expected = y32.to(BF16)
    assert torch.equal(y.isnan(), expected.isnan())
    assert torch.equal(y.nan_to_num(0.0), expected.nan_to_num(0.0))


def channels_last_v(v):
    """The (B, H, C, T, V) view of a channels-last (B, H * C, T, V) tensor with v's values."""
    B, H, C, T, V = v.shape
    return v.reshape(B, H * C, T, V).contiguous(memory_format=CL).view(B, H, C, T, V)


def test_cpu_kernel_dtype():
    """bfloat16 as it is (the recorded calls are the *_training_reads_bfloat16 tests below)."""
    assert cpu_kernel_dtype(torch.float32) == torch.float32
    assert cpu_kernel_dtype(torch.float64) == torch.float64
    assert cpu_kernel_dtype(BF16) == BF16
    assert cpu_kernel_dtype(torch.float16) == torch.float32


# (B, H, C, T, V, R, G): groups of 16 channels (the channels-last kernel reads whole 64-byte
# vectors of float32), odd V (5, 25, 67; the rows' last vectors partly past V), a group of 6
# channels (the channels-first kernel, output converted back) and 15 rows per group; 320 rows per
# group: two row blocks of the channels-first kernel (240 + 80), which widens bfloat16 rows a block
# at a time.
CTR_SHAPES = [(2, 3, 64, 5, 25, 3, 4), (1, 2, 32, 3, 42, 2, 2), (2, 3, 12, 4, 7, 2, 2), (1, 2, 16, 3, 67, 4, 1),
              (3, 1, 12, 5, 5, 1, 4), (1, 2, 64, 5, 25, 2, 1)]


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dynamic", [True, False], ids=["ctr_gc", "st_gc"])
@pytest.mark.parametrize("shape", CTR_SHAPES, ids=str)
def test_ctr_graph_conv_bfloat16_forward(shape, dynamic, layout, cpu_vector_bytes):
    v64, *params = ctr_cases.make_inputs(*shape, dynamic=dynamic)
    v = v64.to(BF16)
    params = [t.float() for t in params] + [None] * (6 - len(params))  # static: A only
    if layout == "channels_last":
        v = channels_last_v(v)
    with torch.no_grad():
        y = torch.ops.bharnet.ctr_graph_conv_cpp(v, *params)  # the kernel itself: bfloat16 in, out
        assert_rounded_float32_result(y, ctr_graph_conv_cpp(v.float(), *params))
        assert torch.equal(ctr_graph_conv_cpp(v, *params), y)  # the wrapper passes bfloat16 through
    assert is_channels_last(y) == (layout == "channels_last")
    exact = ctr_graph_conv_reference(v.double(), *[None if t is None else t.double() for t in params])
    assert rel_err_to(y, exact) <= BF16_UNIT_ROUNDOFF


def test_ctr_graph_conv_bfloat16_forward_keeps_nan_and_inf(cpu_vector_bytes):
    v64, *params = ctr_cases.make_inputs(2, 3, 32, 4, 25, 3, 2)
    v = channels_last_v(v64.to(BF16))
    v[0, 1, 3, 2, 7] = float("nan")
    v[1, 0, 20, 1, 3] = float("inf")
    params = [t.float() for t in params]
    with torch.no_grad():
        y = ctr_graph_conv_cpp(v, *params)
        assert y.isnan().any() and y.isinf().any()
        assert_rounded_float32_result(y, ctr_graph_conv_cpp(v.float(), *params))


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dynamic", [True, False], ids=["ctr_gc", "st_gc"])
@pytest.mark.parametrize("shape", CTR_SHAPES, ids=str)
def test_ctr_graph_conv_bfloat16_backward(shape, dynamic, layout, cpu_vector_bytes):
    """The backward kernels read bfloat16 dy and v (each group widened into scratch first): dv is
    the float32 kernel's dv on the widened inputs rounded to bfloat16, and every parameter's
    gradient is the float32 kernel's, bit for bit."""
    v64, *params = ctr_cases.make_inputs(*shape, dynamic=dynamic)
    v = v64.to(BF16)
    if layout == "channels_last":
        v = channels_last_v(v)
    params = [t.float() for t in params]
    dy = ctr_cases.output_grad([v64]).to(BF16)
    if dynamic:
        got = torch.ops.bharnet.ctr_graph_conv_cpp_backward(dy, v, *params)
        expected = torch.ops.bharnet.ctr_graph_conv_cpp_backward(dy.float(), v.float(), *params)
    else:
        got = torch.ops.bharnet.ctr_graph_conv_cpp_static_backward(dy, v, *params)
        expected = torch.ops.bharnet.ctr_graph_conv_cpp_static_backward(dy.float(), v.float(), *params)
    assert_rounded_float32_result(got[0], expected[0].contiguous())
    for g, e in zip(got[1:], expected[1:]):
        assert g.dtype == torch.float32 and torch.equal(g, e)


@pytest.mark.parametrize("dynamic", [True, False], ids=["ctr_gc", "st_gc"])
def test_ctr_graph_conv_bfloat16_backward_of_a_group_too_large_to_widen_first(dynamic):
    """A group of over 2^20 values (16 channels x 2622 frames x 25 joints) is read as bfloat16 in
    place instead of widened into scratch first: the same bits."""
    v64, *params = ctr_cases.make_inputs(1, 1, 16, 2622, 25, 2, 1, dynamic=dynamic)
    v, params = v64.to(BF16), [t.float() for t in params]
    dy = ctr_cases.output_grad([v64]).to(BF16)
    backward = (torch.ops.bharnet.ctr_graph_conv_cpp_backward if dynamic
                else torch.ops.bharnet.ctr_graph_conv_cpp_static_backward)
    got, expected = backward(dy, v, *params), backward(dy.float(), v.float(), *params)
    assert_rounded_float32_result(got[0], expected[0])
    for g, e in zip(got[1:], expected[1:]):
        assert torch.equal(g, e)


def test_ctr_graph_conv_bfloat16_training_reads_bfloat16():
    """A recorded call runs the bfloat16 kernels (nothing cast to float32 on the way): y and dv
    bfloat16, the parameters' gradients float32, within a bfloat16 unit roundoff of the float64
    reference's."""
    inputs = ctr_cases.make_inputs(2, 3, 16, 5, 25, 3, 4)
    v = inputs[0].to(BF16).requires_grad_()
    params = [t.float().requires_grad_() for t in inputs[1:]]
    dy = ctr_cases.output_grad(inputs).to(BF16)
    with torch.profiler.profile() as prof:
        y = ctr_graph_conv_cpp(v, *params)
        grads = torch.autograd.grad(y, [v, *params], dy)
    assert "aten::_to_copy" not in {e.name for e in prof.events()}
    assert y.dtype == BF16 and grads[0].dtype == BF16 and all(g.dtype == torch.float32 for g in grads[1:])
    exact_inputs = [t.detach().double().requires_grad_() for t in (v, *params)]
    exact_y = ctr_graph_conv_reference(*exact_inputs)
    exact_grads = torch.autograd.grad(exact_y, exact_inputs, dy.double())
    assert rel_err_to(y, exact_y.detach()) <= BF16_UNIT_ROUNDOFF
    for got, exact in zip(grads, exact_grads):
        assert rel_err_to(got, exact) <= BF16_UNIT_ROUNDOFF


def test_ctr_graph_conv_kernels_refuse_float16():
    v, *params = ctr_cases.make_inputs(1, 2, 4, 3, 5, 2, 2)
    params = [t.float() for t in params]
    v = v.half()
    with pytest.raises(RuntimeError, match="take float32, float64 or bfloat16 v"):
        torch.ops.bharnet.ctr_graph_conv_cpp_backward(torch.ones(1, 4, 3, 5, dtype=v.dtype), v, *params)
    with pytest.raises(RuntimeError, match="take float32, float64 or bfloat16 v"):
        torch.ops.bharnet.ctr_graph_conv_cpp(v, *params)


# (B, C, O, T, V, stride): 16 and 6 input channels, stride 2, the hands' V = 42.
DET_SHAPES = [(2, 16, 16, 13, 25, 1), (2, 6, 8, 13, 25, 2), (1, 5, 7, 9, 42, 2)]


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("shape", DET_SHAPES, ids=det_cases.shape_id)
def test_deformable_temporal_conv_bfloat16_forward(shape, bias, layout, cpu_vector_bytes):
    B, C, O, T, V, stride = shape
    x, offsets, weight, b = det_cases.make_inputs(B, C, O, T, V, dtype=BF16, bias=bias)
    if layout == "channels_last":
        x = x.contiguous(memory_format=CL)
    w32, b32 = weight.float(), None if b is None else b.float()
    with torch.no_grad():
        y = torch.ops.bharnet.deformable_temporal_conv_cpp(x, offsets, w32, b32, stride)  # float32 parameters
        y32 = deformable_temporal_conv(x.float(), offsets, w32, b32, stride, backend="cpp")
        assert_rounded_float32_result(y, y32)
        assert torch.equal(deformable_temporal_conv(x, offsets, weight, b, stride, backend="cpp"), y)
    assert is_channels_last(y) == (layout == "channels_last")
    exact = deformable_temporal_conv(*[None if t is None else t.double() for t in (x, offsets, weight, b)], stride,
                                     backend="reference")
    assert rel_err_to(y, exact) <= BF16_UNIT_ROUNDOFF


@pytest.mark.parametrize("bounds_pass_grad", [True, False], ids=["bounds_pass", "bounds_stop"])
@pytest.mark.parametrize("positions", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("shape", DET_SHAPES + [(2, 13, 9, 7, 5, 1)], ids=det_cases.shape_id)
def test_deformable_temporal_conv_bfloat16_backward(shape, positions, bounds_pass_grad, cpu_vector_bytes):
    """The backward kernel reads bfloat16 dy and x as they are: dx is the float32 kernel's dx on
    the widened inputs rounded to bfloat16 (13 channels: a block of 6 rows, one of 1), and the
    offsets', weight's and bias's gradients are the float32 kernel's, bit for bit."""
    B, C, O, T, V, stride = shape
    x, offsets, weight, _ = det_cases.make_inputs(B, C, O, T, V, dtype=BF16)
    offsets, weight = offsets.to(positions), weight.float()
    dy = torch.randn(B, O, (T - 1) // stride + 1, V, generator=torch.Generator().manual_seed(1)).to(BF16)
    backward = torch.ops.bharnet.deformable_temporal_conv_cpp_backward
    got = backward(dy, x, offsets, weight, stride, bounds_pass_grad)
    expected = backward(dy.float(), x.float(), offsets, weight, stride, bounds_pass_grad)
    assert_rounded_float32_result(got[0], expected[0])
    for g, e in zip(got[1:], expected[1:]):
        assert g.dtype == e.dtype and torch.equal(g, e)


def test_deformable_temporal_conv_bfloat16_training_reads_bfloat16():
    """A recorded call with float32 parameters (autocast's case) runs the bfloat16 kernels
    (nothing cast on the way): y and dx bfloat16, the parameters' gradients float32, within a
    bfloat16 unit roundoff of the float64 reference's."""
    x, offsets, weight, b = det_cases.make_inputs(2, 6, 8, 13, 25, dtype=torch.float32)
    inputs = [x.to(BF16).requires_grad_(), offsets.requires_grad_(), weight.requires_grad_(), b.requires_grad_()]
    dy = torch.randn(2, 8, 7, 25).to(BF16)
    with torch.profiler.profile() as prof:
        y = deformable_temporal_conv(*inputs, 2, backend="cpp")
        grads = torch.autograd.grad(y, inputs, dy)
    assert "aten::_to_copy" not in {e.name for e in prof.events()}
    assert y.dtype == BF16 and [g.dtype for g in grads] == [BF16, torch.float32, torch.float32, torch.float32]
    exact_inputs = [t.detach().double().requires_grad_() for t in inputs]
    exact_y = deformable_temporal_conv(*exact_inputs, 2, backend="reference")
    exact_grads = torch.autograd.grad(exact_y, exact_inputs, dy.double())
    assert rel_err_to(y, exact_y.detach()) <= BF16_UNIT_ROUNDOFF
    for got, exact in zip(grads, exact_grads):
        assert rel_err_to(got, exact) <= BF16_UNIT_ROUNDOFF


def test_deformable_temporal_conv_bfloat16_features_with_float32_parameters():
    """bfloat16 x with float32 weight and bias (autocast's case): the same result with and without
    gradients recorded (the native forward takes the parameters in float32, unrounded), and the
    kernel refuses bfloat16 parameters with a clear error."""
    x, offsets, weight, b = det_cases.make_inputs(2, 6, 8, 13, 25, dtype=torch.float32)
    x = x.to(BF16).contiguous(memory_format=CL)
    with torch.no_grad():
        native = deformable_temporal_conv(x, offsets, weight, b, 2, backend="cpp")
    recorded = deformable_temporal_conv(x, offsets, weight.requires_grad_(), b, 2, backend="cpp")
    assert native.dtype == BF16 and torch.equal(native, recorded.detach())
    with pytest.raises(RuntimeError, match="weight must be Float for x of dtype BFloat16"):
        torch.ops.bharnet.deformable_temporal_conv_cpp(x, offsets, weight.detach().to(BF16), None, 2)


def test_deformable_temporal_conv_kernels_refuse_float16_and_bfloat16_parameters():
    x, offsets, weight, b = det_cases.make_inputs(1, 2, 3, 5, 4, dtype=BF16)
    dy = torch.ones(1, 3, 5, 4, dtype=BF16)
    backward = torch.ops.bharnet.deformable_temporal_conv_cpp_backward
    with pytest.raises(RuntimeError, match="take float32, float64 or bfloat16 x"):
        backward(dy.half(), x.half(), offsets, weight.half(), 1, True)
    with pytest.raises(RuntimeError, match="weight must be Float for x of dtype BFloat16"):
        backward(dy, x, offsets, weight, 1, True)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("stride", [1, 2])
def test_temporal_max_pool_bfloat16_forward_is_max_pool_bit_for_bit(stride, layout):
    x = torch.randn(2, 5, 11, 7).to(BF16)
    x[0, 1, 3, 2] = float("nan")
    x[1, 2, 4:7, 5] = 1.5  # ties
    if layout == "channels_last":
        x = x.contiguous(memory_format=CL)
    with torch.no_grad():
        y, arg = torch.ops.bharnet.temporal_max_pool(x.contiguous(), 3, stride, 1)  # the kernel: bfloat16 in, out
        y32, arg32 = torch.ops.bharnet.temporal_max_pool(x.float().contiguous(), 3, stride, 1)
        pooled = temporal_max_pool(x, 3, stride, 1, backend="cpp")
    assert y.dtype == BF16 and torch.equal(arg, arg32)
    assert_rounded_float32_result(y, y32)
    assert is_channels_last(pooled) == (layout == "channels_last")
    expected = F.max_pool2d(x, (3, 1), (stride, 1), (1, 0))
    assert torch.equal(pooled.nan_to_num(7.0), expected.nan_to_num(7.0))


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("stride", [1, 2])
def test_temporal_max_pool_bfloat16_backward(stride, layout):
    """The backward reads bfloat16 dy (a recorded call runs the bfloat16 kernels, no casts):
    dx is the float32 kernel's sums rounded once (overlapping windows send up to 3 terms to a
    frame), and the same as max-pool's where its half-precision sums agree."""
    x = torch.randn(2, 5, 11, 7).to(BF16)
    if layout == "channels_last":
        x = x.contiguous(memory_format=CL)
    x.requires_grad_()
    with torch.no_grad():
        _, arg = torch.ops.bharnet.temporal_max_pool(x.contiguous(), 3, stride, 1)
    dy = torch.randn(arg.shape).to(BF16)
    dx = torch.ops.bharnet.temporal_max_pool_backward(dy, arg, 11, 3, stride, 1)
    assert_rounded_float32_result(dx, torch.ops.bharnet.temporal_max_pool_backward(dy.float(), arg, 11, 3, stride, 1))
    with torch.profiler.profile() as prof:
        y = temporal_max_pool(x, 3, stride, 1, backend="cpp")
        grad = torch.autograd.grad(y, x, dy.contiguous(memory_format=CL) if layout == "channels_last" else dy)[0]
    assert "aten::_to_copy" not in {e.name for e in prof.events()}
    assert y.dtype == grad.dtype == BF16 and torch.equal(grad, dx.contiguous(memory_format=CL) if layout ==
                                                        "channels_last" else dx)
    ref_x = x.detach().clone().requires_grad_()
    ref = F.max_pool2d(ref_x, (3, 1), (stride, 1), (1, 0))
    assert torch.equal(y, ref)
    exact = torch.autograd.grad(F.max_pool2d(ref_x.double(), (3, 1), (stride, 1), (1, 0)), ref_x, dy.double())[0]
    assert rel_err_to(grad, exact.double()) <= BF16_UNIT_ROUNDOFF
    with pytest.raises(RuntimeError, match="take float32, float64 or bfloat16"):
        torch.ops.bharnet.temporal_max_pool_backward(dy.half(), arg, 11, 3, stride, 1)


GUARD_PAGE_SCRIPT = r"""
import ctypes, mmap
import torch
import bharnet._ext as ext
ext.load()
ops = torch.ops.bharnet
libc = ctypes.CDLL(None)
libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
BF16, CL = torch.bfloat16, torch.channels_last


def at_page_end(memory_shape):
    # a bfloat16 tensor of memory_shape whose storage ends where a PROT_NONE page starts
    page = mmap.PAGESIZE
    n = 1
    for d in memory_shape:
        n *= d
    pages = (2 * n + page - 1) // page + 1
    buf = mmap.mmap(-1, pages * page)
    assert libc.mprotect(ctypes.addressof(ctypes.c_char.from_buffer(buf)) + (pages - 1) * page, page, 0) == 0
    t = torch.frombuffer(buf, dtype=BF16, count=n, offset=(pages - 1) * page - 2 * n).view(memory_shape)
    t.copy_(torch.randn(memory_shape).to(BF16))
    return t


for width in (32, 64):
    try:
        ops.cpu_vector_bytes(width)
    except RuntimeError:  # no AVX-512 here: the 64-byte path cannot run
        continue
    for B, H, CG, T, V in [(1, 1, 16, 1, 1), (1, 2, 48, 2, 5), (2, 1, 96, 1, 3), (1, 3, 16, 3, 25), (1, 1, 3, 2, 7)]:
        G = 2
        C = CG * G
        A, q, k = torch.randn(H, V, V), torch.randn(B, H, 2, V), torch.randn(B, H, 2, V)
        params = [A, q, k, torch.randn(H, G, 2), torch.randn(H, G), torch.tensor([0.7])]
        v_cl = at_page_end((B, T, V, H * C)).permute(0, 3, 1, 2).view(B, H, C, T, V)  # channels-last v
        v = at_page_end((B, H, C, T, V))
        for vv in (v_cl, v):
            assert torch.equal(ops.ctr_graph_conv_cpp(vv, *params), ops.ctr_graph_conv_cpp(vv.clone(), *params))
        dy = at_page_end((B, C, T, V))
        for got, expected in zip(ops.ctr_graph_conv_cpp_backward(dy, v, *params),
                                 ops.ctr_graph_conv_cpp_backward(dy.clone(), v.clone(), *params)):
            assert torch.equal(got, expected)
    for C, O, T, V, stride in [(1, 3, 1, 1, 1), (16, 5, 5, 3, 2), (17, 16, 13, 25, 3)]:
        offsets, weight, bias = torch.tensor([-1.5, 0.25, 2.0]), torch.randn(O, C, 3), torch.randn(O)
        x_cl = at_page_end((2, T, V, C)).permute(0, 3, 1, 2)
        x = at_page_end((2, C, T, V))
        for xx in (x_cl, x):
            y = ops.deformable_temporal_conv_cpp(xx, offsets, weight, bias, stride)
            assert torch.equal(y, ops.deformable_temporal_conv_cpp(xx.clone(), offsets, weight, bias, stride))
        dy = at_page_end((2, O, (T - 1) // stride + 1, V))
        for got, expected in zip(ops.deformable_temporal_conv_cpp_backward(dy, x, offsets, weight, stride, True),
                                 ops.deformable_temporal_conv_cpp_backward(dy.clone(), x.clone(), offsets, weight,
                                                                           stride, True)):
            assert torch.equal(got, expected)
        pooled, arg = ops.temporal_max_pool(x, 3, 2, 1)
        assert torch.equal(pooled, ops.temporal_max_pool(x.clone(), 3, 2, 1)[0])
        dy = at_page_end(tuple(pooled.shape))
        assert torch.equal(ops.temporal_max_pool_backward(dy, arg, T, 3, 2, 1),
                           ops.temporal_max_pool_backward(dy.clone(), arg, T, 3, 2, 1))
print("ok")
"""


def test_bfloat16_forwards_read_nothing_past_the_end_of_their_input():
    """Each input's storage ends at a PROT_NONE page (in a subprocess: a read past it is a
    segfault): the channels-last ctr_graph_conv forward reads bfloat16 rows as whole vectors
    (groups of 16, 48 and 96 channels: 1 to 3 vectors per tile), the channels-first one widens
    each row block by whole vectors, then value by value, its backward reads v's rows as whole
    vectors but the last ones' (copied), the other paths (the DeTGC backward too) value by value."""
    if not hasattr(mmap, "PROT_READ"):
        pytest.skip("needs mmap with page protection (POSIX)")
    done = subprocess.run([sys.executable, "-c", GUARD_PAGE_SCRIPT], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]
