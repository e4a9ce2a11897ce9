"""``bharnet.ops.temporal_max_pool``: the C++ CPU kernel against ``F.max_pool2d`` with a (k, 1)
window. A maximum and its routing are exact, and the backward adds in the same order, so the
outputs and gradients must be bitwise equal (NaN positions compared apart)."""
import pytest
import torch
import torch.nn.functional as F

import bharnet

from bharnet.nn import MultiScaleTemporalConv, TemporalMaxPool
from bharnet.ops import temporal_max_pool, temporal_max_pool_reference
from op_testing import forward_backward

# (N, C, T, V), kernel, stride, padding: MSTCN's (3, s, 1) at odd sizes, T = 2 (every window
# padded), wider and even windows, no padding, a window of one frame.
CASES = [((2, 3, 8, 5), 3, 1, 1), ((2, 3, 7, 5), 3, 2, 1), ((1, 2, 13, 42), 3, 3, 1),
         ((2, 2, 2, 3), 3, 1, 1), ((2, 1, 9, 4), 5, 2, 2), ((2, 2, 6, 3), 2, 1, 0), ((2, 2, 6, 3), 1, 1, 0)]


def _special_values(x):
    """NaNs (one, and a whole column), -inf everywhere in a column, and ties between frames."""
    T = x.shape[2]
    x[0, 0, T // 2, 0] = float("nan")
    x[-1, -1, :, 0] = float("nan")
    x[-1, 0, :, -1] = float("-inf")
    x[0, -1, :, 1] = x[0, -1, 0, 1]  # every frame equal: ties in every window
    return x


def _equal_with_nan(a, b):
    return torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num())


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("shape, kernel, stride, padding", CASES, ids=str)
def test_cpp_is_max_pool_bit_for_bit(shape, kernel, stride, padding, dtype):
    x = _special_values(torch.randn(*shape, dtype=dtype))
    y_ref = temporal_max_pool_reference(x, kernel, stride, padding)
    dy = torch.randn_like(y_ref)
    ref = forward_backward(lambda t: temporal_max_pool_reference(t, kernel, stride, padding), [x], dy)
    got = forward_backward(lambda t: temporal_max_pool(t, kernel, stride, padding, backend="cpp"), [x], dy)
    assert got[0].shape == ref[0].shape and got[0].dtype == dtype
    assert _equal_with_nan(got[0], ref[0])
    assert torch.equal(got[1], ref[1])


@pytest.mark.parametrize("channels_last", [False, True], ids=["channels_first", "channels_last"])
@pytest.mark.parametrize("shape, kernel, stride, padding", CASES, ids=str)
def test_bfloat16_inference_keeps_the_maxima_bits(shape, kernel, stride, padding, channels_last):
    """Without a gradient the kernel pools bfloat16 as stored (compared in float32 lanes): the
    maxima are max-pool's to the bit, a NaN maximum keeps its own bits, and the window offsets
    are the float32 kernel's."""
    x = _special_values(torch.randn(*shape)).to(torch.bfloat16)
    x.view(torch.int16)[0, -1, 0, -1] = 0x7FC5  # a NaN with a payload of its own
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        got = temporal_max_pool(x, kernel, stride, padding, backend="cpp")
        _, arg = torch.ops.bharnet.temporal_max_pool(x.contiguous(), kernel, stride, padding)
        _, arg32 = torch.ops.bharnet.temporal_max_pool(x.contiguous().float(), kernel, stride, padding)
    assert torch.equal(arg, arg32)  # the backward's routing: the float32 kernel's offsets
    expected = F.max_pool2d(x.contiguous(), (kernel, 1), (stride, 1), (padding, 0))
    assert got.dtype == torch.bfloat16 and got.is_contiguous(
        memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    bits, nan = got.contiguous().view(torch.int16), expected.isnan()
    assert torch.equal(got.isnan(), nan)
    assert torch.equal(bits[~nan], expected.view(torch.int16)[~nan])
    # max-pool's NaNs are canonical; the kernel's are the stored ones
    payload = nan[0, -1, :, -1]
    assert payload.any() and (bits[0, -1, :, -1][payload] == 0x7FC5).all()


def test_non_contiguous_and_low_precision_inputs():
    x = torch.randn(2, 5, 9, 3).transpose(2, 3).contiguous().transpose(2, 3)
    assert not x.is_contiguous()
    assert torch.equal(temporal_max_pool(x, backend="cpp"), F.max_pool2d(x, (3, 1), 1, (1, 0)))
    half = torch.randn(2, 3, 7, 4).to(torch.bfloat16)
    dy = torch.randn(2, 3, 7, 4).to(torch.bfloat16)
    y, dx = forward_backward(lambda t: temporal_max_pool(t, 3, 1, 1, backend="cpp"), [half], dy)
    y32, dx32 = forward_backward(lambda t: F.max_pool2d(t, (3, 1), 1, (1, 0)), [half.float()], dy.float())
    assert y.dtype == dx.dtype == torch.bfloat16
    assert torch.equal(y.float(), y32) and torch.equal(dx, dx32.to(torch.bfloat16))  # float32 sums, one rounding


def test_opcheck():
    x = torch.randn(2, 3, 7, 5)
    temporal_max_pool(x, backend="cpp")  # loads the extension and registers the autograd
    torch.library.opcheck(torch.ops.bharnet.temporal_max_pool.default, (x.requires_grad_(), 3, 2, 1))
    y, arg = torch.ops.bharnet.temporal_max_pool(x.detach(), 3, 2, 1)
    torch.library.opcheck(torch.ops.bharnet.temporal_max_pool_backward.default, (torch.randn_like(y), arg, 7, 3, 2, 1))


def test_torch_compile_fullgraph():
    x = torch.randn(2, 3, 8, 5)
    compiled = torch.compile(lambda t: temporal_max_pool(t, 3, 2, 1, backend="cpp"), fullgraph=True)
    assert torch.equal(compiled(x), F.max_pool2d(x, (3, 1), (2, 1), (1, 0)))


def test_numpy_integer_arguments_are_integers():
    import numpy as np

    x = torch.randn(1, 2, 5, 3)
    assert torch.equal(temporal_max_pool(x, np.int64(3), np.int32(1), np.int64(1), backend="cpp"),
                       F.max_pool2d(x, (3, 1), 1, (1, 0)))


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(kernel=3, stride=0, padding=1), ValueError, "stride"),
    (dict(kernel=3, stride=1, padding=2), ValueError, "padding"),
    (dict(kernel=9, stride=1, padding=1), ValueError, "no window"),
    (dict(kernel=3.0, stride=1, padding=1), TypeError, "kernel must be an int, got 3.0"),
])
def test_bad_arguments_are_clear_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        temporal_max_pool(torch.randn(1, 2, 5, 3), backend="cpp", **kwargs)


def test_bad_input_is_a_clear_error():
    with pytest.raises(TypeError, match="(C, T, V)"):
        temporal_max_pool(torch.randn(5, 3))
    with pytest.raises(ValueError, match="no window"):
        temporal_max_pool(torch.randn(1, 1, 0, 3), kernel=2, stride=1, padding=1, backend="cpp")
    with pytest.raises(TypeError, match="floating-point"):
        temporal_max_pool(torch.ones(1, 2, 5, 3, dtype=torch.long))


def test_mstcn_uses_the_layer_and_backends_agree():
    """MSTCN's max-pool branch is TemporalMaxPool; the whole block's outputs and parameter
    gradients agree between the reference and cpp backends (max-pool bitwise, DeTGC to float64
    rounding)."""
    torch.manual_seed(0)
    block = MultiScaleTemporalConv(8, 8, stride=2).double()
    pools = [m for m in block.modules() if isinstance(m, TemporalMaxPool)]
    assert len(pools) == 1 and (pools[0].kernel_size, pools[0].stride, pools[0].padding) == (3, 2, 1)
    x = torch.randn(2, 8, 9, 5, dtype=torch.float64)
    results = {}
    for impl in ("reference", "cpp"):
        for m in block.modules():
            if hasattr(m, "impl"):
                m.impl = impl
        block.zero_grad()
        y = block(x)
        y.square().sum().backward()
        results[impl] = [y.detach()] + [p.grad.clone() for p in block.parameters()]
    for a, b in zip(results["reference"], results["cpp"]):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.gpu
def test_gpu_cpp_backend_is_max_pool():
    x = torch.randn(2, 3, 9, 5, device="cuda")
    assert torch.equal(temporal_max_pool(x, 3, 2, 1, backend="cpp"), F.max_pool2d(x, (3, 1), (2, 1), (1, 0)))


def test_unbatched_input_and_long_windows():
    x = torch.randn(3, 9, 4)
    assert torch.equal(temporal_max_pool(x, 3, 2, 1, backend="cpp"), F.max_pool2d(x, (3, 1), (2, 1), (1, 0)))
    long = torch.randn(1, 2, 131, 3)  # 129-frame windows: more offsets than int8 holds
    assert torch.equal(temporal_max_pool(long, 129, 1, 0, backend="cpp"), F.max_pool2d(long, (129, 1), 1, 0))


def test_a_model_on_triton_runs_its_max_pools_on_auto():
    """The op has no Triton kernel: ``triton`` (explicit or global) counts as ``auto``."""
    x = torch.randn(2, 3, 8, 5)
    expected = F.max_pool2d(x, (3, 1), 1, (1, 0))
    assert torch.equal(TemporalMaxPool(3, 1, 1, impl="triton")(x), expected)
    with bharnet.ops.use_backend("triton"):
        assert torch.equal(TemporalMaxPool(3, 1, 1)(x), expected)


def test_double_backward_raises():
    x = torch.randn(1, 2, 6, 3, requires_grad=True)
    (dx,) = torch.autograd.grad(temporal_max_pool(x, backend="cpp").square().sum(), [x], create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        dx.sum().backward()
    # a gradient penalty by torch.autograd.grad reaches the refusal too (it was off the paths to x)
    (dx,) = torch.autograd.grad(temporal_max_pool(x, backend="cpp").square().sum(), [x], create_graph=True)
    with pytest.raises(RuntimeError, match="bharnet::temporal_max_pool: double backward"):
        torch.autograd.grad(dx.square().sum(), [x], allow_unused=True)


def test_backward_op_checks_the_offsets():
    y, arg = torch.ops.bharnet.temporal_max_pool(torch.randn(1, 2, 6, 3), 3, 1, 1)
    with pytest.raises(RuntimeError, match="window offsets"):
        torch.ops.bharnet.temporal_max_pool_backward(torch.randn_like(y), torch.full_like(arg, -128), 6, 3, 1, 1)
    with pytest.raises(RuntimeError, match="window offsets"):  # offset 0 of the first window is padding
        torch.ops.bharnet.temporal_max_pool_backward(torch.randn_like(y), torch.zeros_like(arg), 6, 3, 1, 1)
