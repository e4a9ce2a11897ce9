"""Channels-last features through the CPU kernels of the ``cpp`` backend (the layout that
``bharnet.fast.fuse_for_inference`` runs a CPU model in): ctr_graph_conv reads a ``v`` that is
the view of a channels-last convolution output, deformable_temporal_conv and temporal_max_pool
read channels-last ``x``, and each returns a channels-last output with the values of the
channels-first kernels (ctr_graph_conv bit for bit: same products in the same order; DeTGC
against the float64 reference with its usual tolerances, see
test_deformable_temporal_conv_cpp.py). Gradients through channels-last inputs (the backward
kernels take a contiguous copy) are checked too, and opcheck checks that the fake impls give
the kernels' strides.
"""
import pytest
import torch
import torch.nn.functional as F

import ctr_graph_conv_cases as ctr_cases
import deformable_temporal_conv_cases as det_cases
from bharnet.ops import ctr_graph_conv_reference, deformable_temporal_conv, temporal_max_pool
from bharnet.ops.ctr_graph_conv import ctr_graph_conv_cpp, is_channels_last_v
from bharnet.ops._checks import is_channels_last
from op_testing import assert_close, forward_backward, run

CL = torch.channels_last


def channels_last_v(v):
    """The (B, H, C, T, V) view of a channels-last (B, H * C, T, V) tensor with v's values."""
    B, H, C, T, V = v.shape
    return v.reshape(B, H * C, T, V).contiguous(memory_format=CL).view(B, H, C, T, V)


# (B, H, C, T, V, R, G): channel groups of whole 64-byte vectors (C / G = 16 or 32 floats, 8, 16
# or 32 doubles: the channels-last kernel; groups of one vector, 16 floats or 8 doubles, go two
# frames per tile: odd T leaves one frame alone, V = 7 is one tile of rows; G = 1 and the static
# mode too) and of 6 channels (the channels-first kernel, output converted).
CTR_SHAPES = [(2, 3, 64, 5, 25, 3, 4), (1, 2, 64, 3, 42, 2, 2), (1, 2, 32, 4, 7, 2, 2), (1, 2, 16, 4, 7, 2, 2),
              (1, 2, 16, 5, 7, 2, 1), (2, 3, 12, 4, 7, 2, 2)]


@pytest.mark.parametrize("dynamic", [True, False], ids=["ctr_gc", "st_gc"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("shape", CTR_SHAPES, ids=str)
def test_ctr_graph_conv_reads_channels_last_v(shape, dtype, dynamic, cpu_vector_bytes):
    inputs = [t.to(dtype) for t in ctr_cases.make_inputs(*shape, dynamic=dynamic)]
    v = channels_last_v(inputs[0])
    assert is_channels_last_v(v)
    y = ctr_graph_conv_cpp(v, *inputs[1:])
    assert is_channels_last(y)
    assert torch.equal(y, ctr_graph_conv_cpp(inputs[0], *inputs[1:]))
    exact = ctr_graph_conv_reference(*[t.double() for t in inputs])
    assert ((y.double() - exact).norm() / exact.norm()).item() <= ctr_cases.TOLERANCE[dtype]


@pytest.mark.parametrize("dynamic", [True, False], ids=["ctr_gc", "st_gc"])
def test_ctr_graph_conv_gradients_through_channels_last_v(dynamic):
    """The channels-last forward kernel, then the backward on contiguous copies."""
    inputs = ctr_cases.make_inputs(2, 3, 16, 5, 25, 3, 2, dynamic=dynamic)  # groups of 8 doubles: 64 bytes
    dy = ctr_cases.output_grad(inputs)
    expected = forward_backward(ctr_graph_conv_reference, inputs, dy)
    got = forward_backward(lambda v, *rest: ctr_graph_conv_cpp(channels_last_v(v), *rest), inputs, dy)
    assert_close(got, expected, ctr_cases.TOLERANCE[torch.float64], ctr_cases.NAMES)


@pytest.mark.parametrize("dynamic", [True, False], ids=["ctr_gc", "st_gc"])
def test_ctr_graph_conv_opcheck_with_channels_last_v(dynamic):
    inputs = ctr_cases.make_inputs(2, 2, 32, 3, 5, 2, 2, dynamic=dynamic)  # groups of 16 floats: 64 bytes
    ctr_graph_conv_cpp(*inputs)  # registers the fake impls and autograd on first use
    v = channels_last_v(inputs[0].float()).requires_grad_()
    rest = [t.float().requires_grad_() for t in inputs[1:]]
    args = [v, *rest] if dynamic else [v, *rest, *[None] * 5]
    torch.library.opcheck(torch.ops.bharnet.ctr_graph_conv_cpp.default, args)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("shape", [(2, 16, 16, 13, 25, 1), (2, 6, 8, 13, 25, 2), (1, 5, 7, 9, 42, 2)],
                         ids=det_cases.shape_id)
def test_deformable_temporal_conv_reads_channels_last_x(shape, dtype, bias, cpu_vector_bytes):
    B, C, O, T, V, stride = shape
    x, offsets, weight, b = det_cases.make_inputs(B, C, O, T, V, dtype=dtype, bias=bias)
    y = deformable_temporal_conv(x.contiguous(memory_format=CL), offsets, weight, b, stride, backend="cpp")
    assert is_channels_last(y)
    exact = deformable_temporal_conv(*[None if t is None else t.double() for t in (x, offsets, weight, b)],
                                     stride, backend="reference")
    assert ((y.double() - exact).norm() / exact.norm()).item() <= det_cases.TOLERANCE[dtype]


def test_deformable_temporal_conv_gradients_through_channels_last_x():
    inputs = det_cases.make_inputs(2, 6, 8, 13, 25, dtype=torch.float64)
    expected = run(det_cases.reference_fn(2), inputs)
    got = run(lambda x, *rest: deformable_temporal_conv(x.contiguous(memory_format=CL), *rest, 2, backend="cpp"),
              inputs)
    assert_close(got, expected, det_cases.TOLERANCE[torch.float64], det_cases.NAMES)


def test_deformable_temporal_conv_opcheck_with_channels_last_x():
    x, offsets, weight, b = det_cases.make_inputs(2, 5, 4, 9, 6)
    deformable_temporal_conv(x, offsets, weight, b, 2, backend="cpp")  # registers the fake impls
    args = (x.contiguous(memory_format=CL).requires_grad_(), offsets.requires_grad_(), weight.requires_grad_(),
            b.requires_grad_(), 2)
    torch.library.opcheck(torch.ops.bharnet.deformable_temporal_conv_cpp.default, args)


@pytest.mark.parametrize("stride", [1, 2])
def test_temporal_max_pool_on_channels_last_x_is_max_pool_bit_for_bit(stride):
    x = torch.randn(2, 5, 11, 7)
    x[0, 1, 3, 2] = float("nan")
    x[1, 2, 4:7, 5] = 1.5  # ties
    xl = x.contiguous(memory_format=CL).requires_grad_()
    y = temporal_max_pool(xl, 3, stride, 1, backend="cpp")
    assert is_channels_last(y)
    ref_x = x.clone().requires_grad_()
    ref = F.max_pool2d(ref_x, (3, 1), (stride, 1), (1, 0))
    assert torch.equal(y.nan_to_num(7.0), ref.nan_to_num(7.0))
    dy = torch.randn(ref.shape)
    assert torch.equal(torch.autograd.grad(y, xl, dy)[0], torch.autograd.grad(ref, ref_x, dy)[0])
