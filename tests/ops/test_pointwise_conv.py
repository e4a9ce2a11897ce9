"""``bharnet.ops.pointwise_conv`` and ``bharnet.nn.PointwiseConv2d``: the C++ CPU kernel against
``F.conv2d`` in float64 (outputs and the gradients of x, weight and bias, as relative errors
``||x - ref|| / ||ref||``).

Tolerances: the float64 kernel 1e-12 (the same products as the reference, summed in another
order; measured ~1e-15). float32 1e-5: sums of up to C_in (forward, dx) or N x T x V (dW, db)
float32 products, a few unit roundoffs (6e-8) grown by the square root of their count;
measured <= 3e-7.
"""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bharnet
from bharnet.fast import swap_layers
from bharnet.nn import PointwiseConv2d
from bharnet.ops import pointwise_conv, pointwise_conv_reference
from op_testing import assert_independent_of_thread_count, rel_err, run

TOLERANCE = {torch.float64: 1e-12, torch.float32: 1e-5}
NAMES = ("y", "x", "weight", "bias")

# (N, C_in, C_out, T, V): T x V a multiple of the 16-float vector (1 x 16, 16 x 25) and not
# (edges of several widths: 3 x 5, 7 x 42 = 294, 1 x 1, 4 x 5), C_in > C_out and C_in < C_out, one
# input channel, more columns than one task's block; dW's sum over samples in three blocks
# (24 samples of 8 x 25: 11, 11 and 2); 256 channels and more on both sides, whose dW is the
# packed GEMM (x packed, and dy packed with dW transposed back).
SHAPES = [(2, 5, 7, 3, 5), (1, 16, 64, 16, 25), (2, 64, 24, 7, 42), (3, 33, 17, 1, 1), (2, 1, 9, 1, 16),
          (1, 12, 40, 13, 9), (2, 24, 8, 40, 11), (2, 7, 5, 4, 5), (24, 6, 5, 8, 25), (2, 256, 264, 3, 5),
          (2, 264, 256, 1, 9)]


def _inputs(N, C_in, C_out, T, V, bias=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(N, C_in, T, V, generator=gen, dtype=torch.float64)
    weight = torch.randn(C_out, C_in, 1, 1, generator=gen, dtype=torch.float64) * max(1, C_in) ** -0.5
    return [x, weight, torch.randn(C_out, generator=gen, dtype=torch.float64) if bias else None]


def _cpp(x, weight, bias=None, stride=1):
    return pointwise_conv(x, weight, bias, stride, backend="cpp")


def _ref(x, weight, bias=None, stride=1):
    return pointwise_conv_reference(x, weight, bias, stride)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_fp64_reference(shape, dtype, bias, cpu_vector_bytes):
    inputs = _inputs(*shape, bias=bias)
    expected = run(_ref, inputs)
    got = run(_cpp, [t if t is None else t.to(dtype) for t in inputs])
    assert len(got) == len(expected)
    for name, g, e in zip(NAMES, got, expected):
        assert g.dtype == dtype
        assert rel_err(g, e) <= TOLERANCE[dtype], name


@pytest.mark.parametrize("stride", [2, 3])
def test_temporal_stride_keeps_every_stride_th_frame(stride):
    inputs = _inputs(2, 6, 10, 11, 5)
    got, expected = run(_cpp, inputs, stride=stride), run(_ref, inputs, stride=stride)
    assert got[0].shape == (2, 10, len(range(0, 11, stride)), 5)
    for name, g, e in zip(NAMES, got, expected):
        assert rel_err(g, e) <= TOLERANCE[torch.float64], name


def test_noncontiguous_and_channels_last_inputs():
    """A strided view is read through a contiguous copy; a channels-last x (or a strided view
    of one) goes to F.conv2d (oneDNN's channels-last path) and comes back in F.conv2d's layout."""
    x, weight, bias = _inputs(2, 6, 10, 8, 5)
    wide = torch.randn(2, 6, 8, 10, dtype=torch.float64)[..., ::2]
    torch.testing.assert_close(_cpp(wide, weight, bias), _ref(wide, weight, bias), rtol=1e-12, atol=1e-12)
    for x_cl in (x.contiguous(memory_format=torch.channels_last),
                 x.contiguous(memory_format=torch.channels_last)[:, :, ::2]):
        y, expected = _cpp(x_cl, weight, bias), _ref(x_cl, weight, bias)
        assert y.stride() == expected.stride()
        torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shape", [(2, 0, 4, 3, 5), (0, 3, 4, 3, 5)], ids=str)
def test_empty_tensors_behave_like_conv2d(shape):
    """No input channels (the output is the bias) or no samples; no output channels raises
    F.conv2d's error."""
    inputs = _inputs(*shape)
    got, expected = run(_cpp, inputs), run(_ref, inputs)
    for name, g, e in zip(NAMES, got, expected):
        assert g.shape == e.shape and torch.equal(g, e), name
    with pytest.raises(RuntimeError, match="weight to be at least 1"):
        _cpp(*_inputs(2, 3, 0, 3, 5))


# bfloat16/float16 channels-first convolutions are one batched GEMM (torch.baddbmm), rounded once
# to the dtype: outputs and gradients of the rounded inputs within a few of its unit roundoffs
# (2^-8, 2^-11) of the float64 reference; measured <= 3.6e-3 (bf16), 5.5e-4 (fp16).
HALF_TOLERANCE = {torch.bfloat16: 1e-2, torch.float16: 2e-3}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("shape, stride", [((2, 64, 48, 16, 25), 1), ((3, 7, 5, 9, 11), 2), ((2, 256, 192, 1, 42), 1)],
                         ids=str)
def test_half_precision_channels_first_matches_fp64_reference(shape, stride, bias, dtype):
    """Odd sizes with a temporal stride, and the models' one-frame (T = 1) q/k convolution."""
    inputs = [t if t is None else t.to(dtype) for t in _inputs(*shape, bias=bias)]
    got = run(lambda *a: _cpp(*a, stride=stride), inputs)
    expected = run(lambda *a: _ref(*a, stride=stride), [t if t is None else t.double() for t in inputs])
    for name, g, e in zip(NAMES, got, expected):
        assert g.dtype == dtype and rel_err(g.double(), e) <= HALF_TOLERANCE[dtype], name


def test_half_precision_channels_first_runs_the_batched_gemm():
    """bfloat16 channels-first calls (contiguous, or a channel slice of a wider tensor) do not
    reach oneDNN's convolution; channels-last ones do, and give F.conv2d's output bit for bit."""
    x, weight, bias = [t.bfloat16() for t in _inputs(2, 12, 10, 8, 5)]
    for x_in in (x, x[:, 2:8], x[:, :, 1:7]):
        w = weight[:, :x_in.shape[1]]
        with torch.profiler.profile() as prof:
            y = _cpp(x_in, w, bias)
        names = {e.name for e in prof.events()}
        assert "aten::baddbmm" in names and "aten::convolution" not in names
        assert rel_err(y.double(), _ref(x_in.double(), w.double(), bias.double())) <= HALF_TOLERANCE[torch.bfloat16]
    channels_last = x.contiguous(memory_format=torch.channels_last)
    assert torch.equal(_cpp(channels_last, weight, bias), F.conv2d(channels_last, weight, bias))


def test_autocast_computes_in_its_dtype():
    """float32 inputs and parameters under CPU bfloat16 autocast: a bfloat16 output and float32
    gradients, as F.conv2d's under autocast, within bfloat16's tolerance of the float64 values."""
    inputs = [t.float() for t in _inputs(2, 24, 40, 6, 25)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = run(lambda *a: _cpp(*a, stride=2), inputs)
        conv = run(lambda *a: F.conv2d(*a, stride=(2, 1)), inputs)
    expected = run(lambda *a: _ref(*a, stride=2), [t.bfloat16().double() for t in inputs])
    for name, g, c, e in zip(NAMES, got, conv, expected):
        assert g.dtype == c.dtype and g.shape == c.shape, name
        assert rel_err(g.double(), e) <= HALF_TOLERANCE[torch.bfloat16], name
    x, weight, bias = inputs
    with torch.autocast("cpu", dtype=torch.bfloat16):  # float64 is left to F.conv2d, as autocast leaves it
        assert torch.equal(_cpp(x.double(), weight.double(), bias.double()),
                           F.conv2d(x.double(), weight.double(), bias.double()))


def test_strided_channels_last_backward_runs_on_the_kept_frames():
    """A channels-last x goes to F.conv2d; with a temporal stride its backward corrupted the heap
    at some shapes (torch 2.14.1: "corrupted size vs. prev_size", or a segfault, in one run of
    three at this shape), so the op convolves the kept frames without a stride."""
    for seed in range(5):
        x, weight, bias = [t.float() for t in _inputs(3, 4, 6, 16, 13, seed=seed)]
        x = x.contiguous(memory_format=torch.channels_last)
        for _ in range(4):
            got = run(lambda *a: _cpp(*a, stride=2), [x, weight, bias])
        expected = run(lambda *a: _ref(*a, stride=2), [t.double() for t in (x, weight, bias)])
        for name, g, e in zip(NAMES, got, expected):
            assert rel_err(g, e) <= TOLERANCE[torch.float32], name


def test_mixed_dtypes_outside_autocast_raise_conv2d_error():
    x, weight, bias = _inputs(2, 6, 10, 8, 5)
    with pytest.raises(RuntimeError, match="same dtype|should be the same"):
        _cpp(x.bfloat16(), weight.float(), bias.float())


@pytest.mark.parametrize("shape", [(2, 40, 24, 16, 25), (2, 40, 100, 4, 25), (64, 3, 4, 32, 32),
                                   (200, 160, 256, 8, 16), (2, 256, 300, 2, 25)], ids=str)
def test_independent_of_thread_count(shape):
    """Column blocks of the forward and dx, (C_out = 100) several row blocks of dW, (64 samples
    of 1024 products) dW's largest number of sample blocks, 16 of 4 samples, (a 256 x 160
    weight) fewer, 12 blocks of 17 samples, so that their partial sums stay within 16 MiB, and
    (256 -> 300) the packed dW GEMM's row blocks."""
    inputs = [t.float() for t in _inputs(*shape)]
    assert_independent_of_thread_count(lambda: run(_cpp, inputs), NAMES)


def test_gradient_penalty_double_backward_matches_conv2d():
    """Under create_graph the gradients are differentiable ATen products: a penalty on them
    differentiates like F.conv2d's (the first-order gradients are the same as ever)."""
    inputs = _inputs(2, 5, 7, 3, 5)
    results = {}
    for name, fn in (("cpp", _cpp), ("ref", _ref)):
        leaves = [t.clone().requires_grad_() for t in inputs]
        grads = torch.autograd.grad(fn(*leaves).square().sum(), leaves, create_graph=True)
        results[name] = [*grads, *torch.autograd.grad(sum(g.square().sum() for g in grads), leaves)]
    for i, (g, e) in enumerate(zip(results["cpp"], results["ref"])):
        assert rel_err(g, e) <= TOLERANCE[torch.float64], i


def test_torch_func_grad_runs_conv2d():
    """torch.func transforms cannot run a C++ autograd.Function: the op takes F.conv2d there."""
    x, weight, bias = _inputs(2, 5, 7, 3, 5)
    got = torch.func.grad(lambda t: _cpp(t, weight, bias).square().sum())(x)
    expected = torch.func.grad(lambda t: _ref(t, weight, bias).square().sum())(x)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
def test_opcheck(bias):
    x, weight, b = _inputs(2, 5, 7, 3, 5, bias=bias)
    args = [x.requires_grad_(), weight.flatten(1).requires_grad_(), b if b is None else b.requires_grad_()]
    pointwise_conv(x, weight, b, backend="cpp")  # loads the extension and registers the fakes
    torch.library.opcheck(torch.ops.bharnet.pointwise_conv_cpp.default, args)
    dy = torch.randn(2, 7, 3, 5, dtype=torch.float64)
    torch.library.opcheck(torch.ops.bharnet.pointwise_conv_cpp_backward.default,
                          [dy, x.detach(), weight.flatten(1).detach(), bias])
    strided = torch.randn(2, 5, 6, 5, dtype=torch.float64)[:, :, ::2].requires_grad_()
    torch.library.opcheck(torch.ops.bharnet.pointwise_conv_cpp.default, [strided, *args[1:]])


def test_torch_compile_fullgraph():
    inputs = [t.float() for t in _inputs(2, 6, 10, 8, 5)]

    def loss(x, weight, bias):
        return _cpp(x, weight, bias, 2).square().sum()

    compiled = torch.compile(loss, fullgraph=True)
    got, expected = run(compiled, inputs), run(loss, inputs)
    for name, g, e in zip(("loss",) + NAMES[1:], got, expected):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5, msg=lambda m: f"{name}: {m}")


def test_input_errors():
    x, weight, bias = _inputs(2, 5, 7, 3, 5)
    with pytest.raises(TypeError, match="x must be"):
        pointwise_conv(x[0], weight, bias)
    with pytest.raises(ValueError, match="weight must have shape"):
        pointwise_conv(x, weight[:, :4], bias)
    with pytest.raises(ValueError, match="bias must have shape"):
        pointwise_conv(x, weight, bias[:3])
    with pytest.raises(ValueError, match="stride"):
        pointwise_conv(x, weight, bias, 0)
    with pytest.raises(ValueError, match="stride must be a positive int, got True"):
        pointwise_conv(x, weight, bias, True)
    numpy_stride = pointwise_conv(x, weight, bias, np.int64(2), backend="cpp")  # a numpy int is an int
    assert torch.equal(numpy_stride, pointwise_conv(x, weight, bias, 2, backend="cpp"))
    with pytest.raises(TypeError, match="weight must be floating point, got torch.int64"):
        pointwise_conv(x, weight.long(), bias)
    with pytest.raises(RuntimeError, match="weight must be a"):
        torch.ops.bharnet.pointwise_conv_cpp(x, weight.flatten(1).float(), None)


@pytest.mark.parametrize("stride", [1, 2])
def test_layer_is_the_conv2d_it_replaces(stride):
    """Same parameters from the same seed, same state-dict keys, same outputs and gradients
    as ``nn.Conv2d(C_in, C_out, 1, stride=(stride, 1))``; swap_layers sets its backend."""
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 10, 1, stride=(stride, 1)).double()
    torch.manual_seed(0)
    layer = PointwiseConv2d(6, 10, stride).double()
    assert isinstance(layer, nn.Conv2d)
    assert layer.state_dict().keys() == conv.state_dict().keys()
    for key, value in conv.state_dict().items():
        assert torch.equal(layer.state_dict()[key], value), key
    swap_layers(layer, "cpp")
    assert layer.impl == "cpp"
    x = torch.randn(2, 6, 9, 5, dtype=torch.float64)
    got, expected = [], []
    for module, results in ((layer, got), (conv, expected)):
        leaf = x.clone().requires_grad_()
        y = module(leaf)
        results += [y, *torch.autograd.grad(y, [leaf, module.weight, module.bias], torch.ones_like(y))]
    for name, g, e in zip(NAMES, got, expected):
        assert rel_err(g, e) <= TOLERANCE[torch.float64], name
    assert torch.equal(layer(x[0]), conv(x[0]))  # unbatched input: nn.Conv2d's own path
    with bharnet.ops.use_backend("triton"):  # no triton backend: auto
        assert layer.impl == "cpp" and swap_layers(layer, "triton").impl == "auto"


def test_forward_mode_ad_runs_conv2d():
    """A C++ autograd.Function has no forward-mode formula: dual tensors take F.conv2d."""
    import torch.autograd.forward_ad as fwAD
    x, weight, bias = _inputs(2, 5, 7, 3, 5)
    tangent = torch.randn_like(x)
    results = []
    for fn in (_cpp, _ref):
        with fwAD.dual_level():
            results.append(fwAD.unpack_dual(fn(fwAD.make_dual(x, tangent), weight, bias)).tangent)
    assert torch.equal(*results)
