"""``bharnet.ops.batch_norm`` and ``bharnet.nn.BatchNorm2d``: the C++ training-mode forward
against ``F.batch_norm`` in float64 (the output, the gradients of x, weight and bias, the
updated running statistics), as relative errors ``||x - ref|| / ||ref||``.

Tolerances: the float64 kernel 1e-12 (the same sums in another order; measured ~1e-15).
float32 1e-5: the mean and variance are float32 sums of up to N x T x V values in 32 lanes,
then double (a few unit roundoffs, 6e-8, grown by the square root of the ~100 terms per lane);
measured <= 1e-6.
"""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bharnet.fast import swap_layers
from bharnet.nn import BatchNorm2d
from bharnet.ops import batch_norm, batch_norm_reference
from op_testing import assert_independent_of_thread_count, rel_err

TOLERANCE = {torch.float64: 1e-12, torch.float32: 1e-5}
NAMES = ("y", "x", "weight", "bias", "running_mean", "running_var")

# (N, C, T, V): T x V a multiple of the 8-float lane vector or not, one frame, one sample.
SHAPES = [(2, 5, 3, 7), (2, 16, 16, 25), (1, 3, 13, 42), (4, 6, 1, 1), (1, 7, 2, 5)]


def _inputs(N, C, T, V, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(N, C, T, V, generator=gen, dtype=torch.float64) * 3 + 5  # mean far from 0
    weight, bias = torch.randn(C, generator=gen, dtype=torch.float64), torch.randn(C, generator=gen, dtype=torch.float64)
    return x, weight, bias


def _train_step(fn, x, weight, bias, dtype, affine=True):
    """[y, dx, dweight, dbias, running_mean, running_var] of one training-mode call."""
    C = x.shape[1]
    leaves = [t.to(dtype).requires_grad_() for t in (x, weight, bias)]
    running = [torch.zeros(C, dtype=dtype), torch.ones(C, dtype=dtype)]
    w, b = (leaves[1], leaves[2]) if affine else (None, None)
    y = fn(leaves[0], *running, w, b, True, 0.1, 1e-5)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(dtype)
    grads = torch.autograd.grad(y, leaves if affine else leaves[:1], dy)
    return [y.detach(), *grads, *running]


def _cpp(*args):
    return batch_norm(*args, backend="cpp")


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_training_mode_matches_fp64_batch_norm(shape, dtype, affine):
    x, weight, bias = _inputs(*shape)
    expected = _train_step(batch_norm_reference, x, weight, bias, torch.float64, affine)
    got = _train_step(_cpp, x, weight, bias, dtype, affine)
    names = NAMES if affine else NAMES[:2] + NAMES[4:]
    assert len(got) == len(expected) == len(names)
    for name, g, e in zip(names, got, expected):
        assert g.dtype == dtype, name
        assert rel_err(g, e) <= TOLERANCE[dtype], name


def test_other_calls_are_batch_norm_itself():
    """Evaluation mode, channels-last x, autocast and one value per channel take F.batch_norm
    (the last raises its error)."""
    x, weight, bias = [t.float() for t in _inputs(2, 5, 3, 7)]
    mean, var = torch.randn(5), torch.rand(5) + 0.5
    assert torch.equal(_cpp(x, mean, var, weight, bias, False, 0.1, 1e-5),
                       F.batch_norm(x, mean, var, weight, bias, False, 0.1, 1e-5))
    x_cl = x.contiguous(memory_format=torch.channels_last)
    runs = [torch.zeros(5), torch.ones(5)], [torch.zeros(5), torch.ones(5)]
    y = _cpp(x_cl, *runs[0], weight, bias, True, 0.1, 1e-5)
    assert torch.equal(y, F.batch_norm(x_cl, *runs[1], weight, bias, True, 0.1, 1e-5))
    assert y.is_contiguous(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = _cpp(x.bfloat16(), None, None, weight, bias, True, 0.1, 1e-5)
        assert torch.equal(got, F.batch_norm(x.bfloat16(), None, None, weight, bias, True, 0.1, 1e-5))
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        _cpp(torch.randn(1, 5, 1, 1), None, None, weight, bias, True, 0.1, 1e-5)


def test_running_statistics_that_require_grad_are_refused_like_batch_norm():
    x, weight, bias = [t.float() for t in _inputs(2, 5, 3, 7)]
    for backend in ("cpp", "reference"):
        running = [torch.zeros(5, requires_grad=True), torch.ones(5)]
        with pytest.raises(RuntimeError, match="not differentiable with respect to argument 'running_mean'"):
            batch_norm(x, *running, weight, bias, True, 0.1, 1e-5, backend=backend)


def test_gradient_penalty_double_backward_matches_batch_norm():
    x, weight, bias = _inputs(2, 4, 3, 5)
    results = {}
    for name, fn in (("cpp", _cpp), ("ref", batch_norm_reference)):
        leaves = [t.clone().requires_grad_() for t in (x, weight, bias)]
        y = fn(leaves[0], None, None, leaves[1], leaves[2], True, 0.1, 1e-5)
        grads = torch.autograd.grad(y.sin().sum(), leaves, create_graph=True)
        results[name] = [*grads, *torch.autograd.grad(sum(g.square().sum() for g in grads), leaves)]
    for i, (g, e) in enumerate(zip(results["cpp"], results["ref"])):
        assert rel_err(g, e) <= 1e-10, i


def test_independent_of_thread_count():
    x, weight, bias = [t.float() for t in _inputs(2, 24, 16, 25)]
    assert_independent_of_thread_count(lambda: _train_step(_cpp, x, weight, bias, torch.float32), NAMES)


def test_opcheck_and_compile():
    x, weight, bias = _inputs(2, 5, 3, 7)
    batch_norm(x, None, None, weight, bias, True, backend="cpp")  # loads the extension, registers the fake
    args = [x.clone().requires_grad_(), weight.clone().requires_grad_(), bias.clone().requires_grad_(), 1e-5]
    torch.library.opcheck(torch.ops.bharnet.batch_norm_train_cpp.default, args)
    xf, wf, bf = x.float(), weight.float(), bias.float()

    def loss(x, running_mean, running_var):
        return _cpp(x, running_mean, running_var, wf, bf, True, 0.1, 1e-5).square().sum()

    runs = [[torch.zeros(5), torch.ones(5)] for _ in range(2)]
    compiled = torch.compile(loss, fullgraph=True)
    got, expected = compiled(xf, *runs[0]), loss(xf, *runs[1])
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    for a, b in zip(*runs):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum", "cumulative"])
@pytest.mark.parametrize("track", [True, False], ids=["tracked", "untracked"])
def test_layer_is_the_batch_norm2d_it_replaces(momentum, track):
    """Same parameters, buffers and state-dict keys; two training steps and an evaluation give
    nn.BatchNorm2d's outputs and running statistics; swap_layers sets its backend."""
    torch.manual_seed(0)
    reference = nn.BatchNorm2d(5, momentum=momentum, track_running_stats=track).double()
    torch.manual_seed(0)
    layer = swap_layers(BatchNorm2d(5, momentum=momentum, track_running_stats=track).double(), "cpp")
    assert isinstance(layer, nn.BatchNorm2d) and layer.impl == "cpp"
    assert layer.state_dict().keys() == reference.state_dict().keys()
    x = _inputs(2, 5, 3, 7)[0]
    for step in range(2):
        got, expected = layer(x + step), reference(x + step)
        assert rel_err(got, expected) <= TOLERANCE[torch.float64], step
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(layer.state_dict()[key], value, rtol=1e-12, atol=1e-12, msg=key)
    layer.eval(), reference.eval()
    torch.testing.assert_close(layer(x), reference(x), rtol=1e-12, atol=1e-12)


def test_invalid_arguments_raise_like_batch_norm():
    """eps <= 0, one running statistic and running statistics in another dtype go to
    F.batch_norm, which raises its own error."""
    x, weight, bias = _inputs(2, 5, 3, 7)
    with pytest.raises(ValueError, match="eps must be positive"):
        _cpp(x, None, None, weight, bias, True, 0.1, 0.0)
    with pytest.raises(ValueError, match="both be None or neither"):
        _cpp(x, torch.zeros(5, dtype=torch.float64), None, weight, bias, True, 0.1, 1e-5)
    with pytest.raises(RuntimeError, match="expected scalar type"):
        _cpp(x, torch.zeros(5), torch.ones(5), weight, bias, True, 0.1, 1e-5)
    # statistics or affine parameters of other than C elements: F.batch_norm's verdict, as it is
    with pytest.raises(RuntimeError, match="running_mean should contain 5 elements not 10"):
        _cpp(x, torch.zeros(2, 5, dtype=x.dtype), torch.ones(2, 5, dtype=x.dtype), weight, bias, True, 0.1, 1e-5)
    torch.testing.assert_close(_cpp(x, None, None, weight[:, None], bias, True, 0.1, 1e-5),
                               F.batch_norm(x, None, None, weight[:, None], bias, True, 0.1, 1e-5))
    # momentum=None is nn.BatchNorm2d's option, not F.batch_norm's (it failed deep in _foreach_lerp_)
    with pytest.raises(TypeError, match="momentum must be a number, as F.batch_norm takes it, got None"):
        _cpp(x, torch.zeros(5, dtype=x.dtype), torch.ones(5, dtype=x.dtype), weight, bias, True, None, 1e-5)


def test_forward_mode_ad_runs_batch_norm():
    """A C++ autograd.Function has no forward-mode formula: dual tensors take F.batch_norm."""
    import torch.autograd.forward_ad as fwAD
    x, weight, bias = _inputs(2, 5, 3, 7)
    tangent = torch.randn_like(x)
    results = []
    for fn in (_cpp, batch_norm_reference):
        with fwAD.dual_level():
            y = fn(fwAD.make_dual(x, tangent), None, None, weight, bias, True, 0.1, 1e-5)
            results.append(fwAD.unpack_dual(y).tangent)
    assert torch.equal(*results)


def test_float32_precision_with_a_mean_far_from_zero():
    """Mean 100 x std over 64 x 50 positions: no worse than F.batch_norm's own float32 result
    (both against float64)."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 64, 50, generator=gen, dtype=torch.float64) + 100
    x32 = x.float().double()  # the float32 inputs, exactly
    expected = F.batch_norm(x32, None, None, training=True)
    ours = _cpp(x32.float(), None, None, None, None, True, 0.1, 1e-5)
    torch_f32 = F.batch_norm(x32.float(), None, None, training=True)
    assert rel_err(ours, expected) <= max(1e-6, 2 * rel_err(torch_f32, expected))


@pytest.mark.parametrize("spread", [0.0, 1e-3], ids=["constant", "nearly_constant"])
def test_float32_channel_whose_mean_dwarfs_its_spread(spread):
    """A constant channel (its output is the bias, exactly) and one of spread 1e-3 about 7:
    the mean is subtracted before scaling, so nothing cancels (x·scale + (b − mean·scale) gave
    an error of 2e-4 on the constant channel, 7x F.batch_norm's); no worse than F.batch_norm's
    own float32 result (both against float64)."""
    gen = torch.Generator().manual_seed(4)
    x = (7 + spread * torch.randn(2, 3, 16, 25, generator=gen, dtype=torch.float64)).float().double()
    weight = torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64)
    bias = torch.tensor([0.25, -1.0, 3.0], dtype=torch.float64)
    expected = F.batch_norm(x, None, None, weight, bias, training=True)
    ours = _cpp(x.float(), None, None, weight.float(), bias.float(), True, 0.1, 1e-5).double()
    torch_f32 = F.batch_norm(x.float(), None, None, weight.float(), bias.float(), training=True).double()
    if spread == 0:
        assert torch.equal(ours, expected)
    assert (ours - expected).abs().max() <= max(1e-6, (torch_f32 - expected).abs().max())
