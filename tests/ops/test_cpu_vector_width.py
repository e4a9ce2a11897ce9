"""The C++ CPU kernels' two vector widths (csrc/cpu_simd.h): the 32-byte clones and the 64-byte
AVX-512 copy run the same products in the same order, so their results are bitwise equal; the
call counter ``bharnet::cpu_wide_calls`` shows which path ran."""
import pytest
import torch

import cross_attention_cases as xattn_cases
import ctr_graph_conv_cases as ctr_cases
import deformable_temporal_conv_cases as det_cases
from bharnet.ops import pointwise_conv
from op_testing import run, wide_supported

needs_wide = pytest.mark.skipif(not wide_supported(), reason="this CPU has no AVX-512")

# (B, H, C, T, V, R, G) and (B, C_in, C_out, T, V, stride): every wide tile shape (V = 42: 3
# vectors, 25: 2, 5: 1; 67 and 128: several column tiles) and row tails.
CTR_SHAPES = [(2, 3, 8, 7, 25, 3, 4), (1, 2, 8, 3, 42, 2, 8), (2, 3, 16, 5, 67, 4, 4), (1, 2, 4, 2, 128, 2, 2),
              (2, 3, 12, 3, 5, 2, 4)]
DET_SHAPES = [(2, 5, 7, 9, 42, 1), (1, 8, 6, 11, 67, 2), (2, 3, 5, 13, 5, 2), (2, 7, 5, 9, 49, 2)]


def _both_widths(compute):
    """compute() at 32 then 64 bytes; the wide-call count each time; the setting restored."""
    op = torch.ops.bharnet.cpu_vector_bytes
    previous = op(0)
    results, calls = {}, {}
    try:
        for width in (32, 64):
            op(width)
            before = torch.ops.bharnet.cpu_wide_calls()
            results[width] = compute()
            calls[width] = torch.ops.bharnet.cpu_wide_calls() - before
    finally:
        op(previous)
    return results, calls


def _assert_bitwise_equal_and_paths(results, calls):
    assert calls[32] == 0 and calls[64] > 0, calls
    assert len(results[32]) == len(results[64])
    for i, (a, b) in enumerate(zip(results[32], results[64])):
        assert torch.equal(a, b), i


@needs_wide
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("dynamic", [True, False], ids=["ctr_gc", "st_gc"])
@pytest.mark.parametrize("shape", CTR_SHAPES, ids=str)
def test_ctr_graph_conv_widths_agree_bitwise(shape, dynamic, dtype):
    inputs = [t.to(dtype) for t in ctr_cases.make_inputs(*shape, dynamic=dynamic)]
    fn = ctr_cases.backend_fn("cpp")
    _assert_bitwise_equal_and_paths(*_both_widths(lambda: run(fn, inputs)))


@needs_wide
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("shape", DET_SHAPES, ids=str)
def test_deformable_temporal_conv_widths_agree_bitwise(shape, dtype):
    B, C, O, T, V, stride = shape
    inputs = det_cases.make_inputs(B, C, O, T, V, dtype)
    fn = det_cases.backend_fn("cpp", stride)
    _assert_bitwise_equal_and_paths(*_both_widths(lambda: run(fn, inputs)))


@needs_wide
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("shape", [(5, 7, 32, 4), (70, 42, 32, 4), (25, 67, 120, 3), (130, 1, 216, 3)], ids=str)
def test_cross_attention_core_widths_agree_bitwise(shape, dtype):
    """The core's GEMMs, forward and backward (the softmax and the backward's elementwise passes
    are 32-byte on both paths): head dims 8, 40 and 72 (one to several column tiles), a key mask
    with a fully masked sequence, one key, and up to three query blocks."""
    Lq, Lk, D, heads = shape
    q, kv, mask = xattn_cases.core_inputs(N=2, Lq=Lq, Lk=Lk, D=D, dtype=dtype)
    grad_o = torch.randn(q.shape, generator=torch.Generator().manual_seed(5)).to(dtype)
    ops = torch.ops.bharnet

    def forward_backward():
        o, lse = ops.cross_attention_core_cpp(q, kv, mask, heads)
        return [o, lse, *ops.cross_attention_core_cpp_backward(grad_o, q, kv, lse, mask, heads)]
    _assert_bitwise_equal_and_paths(*_both_widths(forward_backward))


@needs_wide
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("shape", [(2, 5, 7, 3, 5), (2, 64, 24, 7, 42), (1, 12, 40, 13, 9), (2, 3, 30, 16, 25),
                                   (24, 6, 5, 8, 25), (2, 256, 264, 3, 5), (1, 264, 256, 1, 9)],
                         ids=str)
def test_pointwise_conv_widths_agree_bitwise(shape, dtype):
    """Forward, dx and dW, C_in > C_out and <, with edge columns of every width, T x V of whole
    vectors and not (dW's lone last chunk and its tail products), (24 samples) dW's sum over
    several blocks of samples, and (256 channels and more) the packed dW GEMM, both ways."""
    N, C_in, C_out, T, V = shape
    gen = torch.Generator().manual_seed(0)
    inputs = [torch.randn(*size, generator=gen).to(dtype) for size in ((N, C_in, T, V), (C_out, C_in, 1, 1), (C_out,))]
    _assert_bitwise_equal_and_paths(*_both_widths(lambda: run(
        lambda x, w, b: pointwise_conv(x, w, b, backend="cpp"), inputs)))


def test_setting_is_checked():
    """bharnet::cpu_vector_bytes takes 32, 64 (where the CPU has AVX-512) or 0 (query)."""
    op = torch.ops.bharnet.cpu_vector_bytes
    previous = op(0)
    assert previous in (32, 64)
    for bad in (16, 48, 128):
        with pytest.raises(RuntimeError, match="32 or 64"):
            op(bad)
    try:
        assert op(32) == previous
        assert op(0) == 32
        if not wide_supported():
            with pytest.raises(RuntimeError, match="AVX-512"):
                op(64)
    finally:
        op(previous)
