"""The ``triton`` backend of ``bharnet.ops.batch_norm`` against ``F.batch_norm`` in float64: the
output, the gradients of x, weight and bias and the updated running statistics, as relative
errors ``||x - ref|| / ||ref||``.

On CPU the kernels run in the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1);
tests shrink the tiles to reach several programs per channel and the loops over positions.
Tolerances: float64 1e-12 (the same sums in another order); float32 1e-5 (float32 sums of up to
N x T x V shifted values, a few unit roundoffs grown by the square root of the terms per lane).
float16/bfloat16 follow DESIGN.md section 6 on the GPU (the interpreter rounds bf16 wrongly).
"""
import importlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bharnet.fast import swap_layers
from bharnet.nn import BatchNorm2d
from bharnet.ops import batch_norm, batch_norm_reference
from bharnet.ops._backend import resolve
from op_testing import assert_low_precision_rule, rel_err
from test_batch_norm import NAMES, SHAPES, TOLERANCE, _inputs, _train_step

ops_module = importlib.import_module("bharnet.ops.batch_norm")
custom_op_module = importlib.import_module("bharnet.ops._custom_op")


def _triton(*args):
    return batch_norm(*args, backend="triton")


@pytest.fixture
def poisoned(monkeypatch):
    """Every kernel output and partial-sum buffer starts as NaN, so unwritten cells show."""
    monkeypatch.setattr(custom_op_module, "POISON_OUTPUTS", True)


def _assert_matches(got, expected, dtype, names):
    assert len(got) == len(expected) == len(names)
    for name, g, e in zip(names, got, expected):
        assert g.dtype == dtype, name
        assert torch.isfinite(g).all(), name
        assert rel_err(g, e) <= TOLERANCE[dtype], name


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_training_mode_matches_fp64_batch_norm(shape, dtype, affine, poisoned):
    x, weight, bias = _inputs(*shape)
    expected = _train_step(batch_norm_reference, x, weight, bias, torch.float64, affine)
    got = _train_step(_triton, x, weight, bias, dtype, affine)
    _assert_matches(got, expected, dtype, NAMES if affine else NAMES[:2] + NAMES[4:])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("max_programs", [64, 2], ids=["one_block_each", "row_block_loop"])
def test_several_programs_per_channel_and_position_blocks(dtype, max_programs, monkeypatch, poisoned):
    """Tiles of 2 rows x 8 positions: 3 programs per channel (the last one half empty) and 3
    position blocks per row (the last one partial); or, with programs capped at 2 per channel,
    one program looping over two row blocks."""
    monkeypatch.setattr(ops_module, "TILE", 32 if dtype == torch.float64 else 16)
    monkeypatch.setattr(ops_module, "MAX_BLOCK_P", 8)
    monkeypatch.setattr(ops_module, "MAX_ROW_PROGRAMS", max_programs)
    x, weight, bias = _inputs(5, 3, 3, 7)
    assert ops_module._config(x.to(dtype)) == ((2, 8, 3, 4) if max_programs == 64 else (2, 8, 2, 2))
    expected = _train_step(batch_norm_reference, x, weight, bias, torch.float64)
    _assert_matches(_train_step(_triton, x, weight, bias, dtype), expected, dtype, NAMES)


def test_float32_precision_with_one_value_far_from_the_rest():
    """A channel whose first value is 1000 standard deviations out: the shift is the mean of
    the first 256 values, not that value alone (with it alone, the error was 7e-3)."""
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(64, 1, 4096, generator=gen, dtype=torch.float64)
    x[0, 0, 0] = 1000
    x32 = x.float().double()
    expected = F.batch_norm(x32, None, None, training=True)
    ours = _triton(x32.float(), None, None, None, None, True, 0.1, 1e-5)
    torch_f32 = F.batch_norm(x32.float(), None, None, training=True)
    assert rel_err(ours, expected) <= max(1e-6, 2 * rel_err(torch_f32, expected))


def test_float32_precision_with_a_mean_far_from_zero():
    """Mean 100 x std over 64 x 50 positions: no worse than F.batch_norm's own float32 result
    (both against float64); the shift by one of each channel's values keeps the variance."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 64, 50, generator=gen, dtype=torch.float64) + 100
    x32 = x.float().double()  # the float32 inputs, exactly
    expected = F.batch_norm(x32, None, None, training=True)
    ours = _triton(x32.float(), None, None, None, None, True, 0.1, 1e-5)
    torch_f32 = F.batch_norm(x32.float(), None, None, training=True)
    assert rel_err(ours, expected) <= max(1e-6, 2 * rel_err(torch_f32, expected))


def test_float16_follows_the_low_precision_rule():
    """float16 x with float32 parameters, as under autocast (the interpreter handles float16)."""
    x, weight, bias = _inputs(2, 6, 8, 25)
    expected = _train_step(batch_norm_reference, x, weight, bias, torch.float64)[:4]
    x16 = x.half().double()

    def half_step(fn):
        leaves = [x.half().requires_grad_(), weight.float().requires_grad_(), bias.float().requires_grad_()]
        y = fn(leaves[0], None, None, leaves[1], leaves[2], True, 0.1, 1e-5)
        dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(y.dtype)
        return [y.detach(), *torch.autograd.grad(y, leaves, dy)]

    got, same_precision = half_step(_triton), half_step(batch_norm_reference)
    assert [g.dtype for g in got] == [torch.float16, torch.float16, torch.float32, torch.float32]
    expected = _train_step(batch_norm_reference, x16, weight, bias, torch.float64)[:4]
    assert_low_precision_rule(got, same_precision, expected, NAMES[:4])


def test_direct_calls_and_the_dispatcher_agree(monkeypatch):
    """Plain eager calls skip the dispatcher; the custom op (what torch.compile and opcheck
    see) gives bitwise the same results."""
    x, weight, bias = [t.float() for t in _inputs(2, 5, 6, 7)]
    direct = _train_step(_triton, x, weight, bias, torch.float32)
    monkeypatch.setattr(custom_op_module, "DIRECT_EAGER_CALLS", False)
    through_op = _train_step(_triton, x, weight, bias, torch.float32)
    for name, a, b in zip(NAMES, direct, through_op):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
def test_opcheck(affine):
    x, weight, bias = _inputs(2, 5, 3, 7)
    params = [weight.requires_grad_(), bias.requires_grad_()] if affine else [None, None]
    torch.library.opcheck(torch.ops.bharnet.batch_norm_train.default, (x.requires_grad_(), *params, 1e-5))
    _, stats = torch.ops.bharnet.batch_norm_train(x.detach(), weight.detach(), None, 1e-5)
    torch.library.opcheck(torch.ops.bharnet.batch_norm_train_backward.default,
                          (torch.randn_like(x), x.detach(), weight.detach() if affine else None, stats))


def test_torch_compile_fullgraph_with_running_statistics():
    x, weight, bias = [t.float() for t in _inputs(2, 5, 3, 7)]

    def loss(x, running_mean, running_var):
        return _triton(x, running_mean, running_var, weight, bias, True, 0.1, 1e-5).square().sum()

    runs = [[torch.zeros(5), torch.ones(5)] for _ in range(2)]
    torch._dynamo.reset()
    got, expected = torch.compile(loss, fullgraph=True)(x, *runs[0]), loss(x, *runs[1])
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    for a, b in zip(*runs):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_other_calls_are_batch_norm_itself():
    """Evaluation mode, non-contiguous x, bf16 on CPU, forward-mode AD and torch.func
    transforms take F.batch_norm; one value per channel raises its error."""
    x, weight, bias = [t.float() for t in _inputs(2, 5, 3, 7)]
    mean, var = torch.randn(5), torch.rand(5) + 0.5
    assert torch.equal(_triton(x, mean, var, weight, bias, False, 0.1, 1e-5),
                       F.batch_norm(x, mean, var, weight, bias, False, 0.1, 1e-5))
    x_cl = x.contiguous(memory_format=torch.channels_last)
    runs = [torch.zeros(5), torch.ones(5)], [torch.zeros(5), torch.ones(5)]
    y = _triton(x_cl, *runs[0], weight, bias, True, 0.1, 1e-5)
    assert torch.equal(y, F.batch_norm(x_cl, *runs[1], weight, bias, True, 0.1, 1e-5))
    assert torch.equal(runs[0][1], runs[1][1])
    assert torch.equal(_triton(x.bfloat16(), None, None, weight, bias, True, 0.1, 1e-5),
                       F.batch_norm(x.bfloat16(), None, None, weight, bias, True, 0.1, 1e-5))
    import torch.autograd.forward_ad as fwAD
    tangent = torch.randn_like(x)
    tangents = []
    for fn in (_triton, batch_norm_reference):
        with fwAD.dual_level():
            y = fn(fwAD.make_dual(x, tangent), None, None, weight, bias, True, 0.1, 1e-5)
            tangents.append(fwAD.unpack_dual(y).tangent)
    assert torch.equal(*tangents)
    per_sample = torch.func.vmap(lambda v: _triton(v, None, None, weight, bias, True, 0.1, 1e-5))(x.unsqueeze(1))
    assert torch.equal(per_sample, torch.func.vmap(
        lambda v: F.batch_norm(v, None, None, weight, bias, True, 0.1, 1e-5))(x.unsqueeze(1)))
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        _triton(torch.randn(1, 5, 1, 1), None, None, weight, bias, True, 0.1, 1e-5)
    # parameters not laid out as C contiguous values, or in a dtype PyTorch refuses next to x
    strided = torch.randn(10)[::2]
    assert torch.equal(_triton(x, None, None, strided, bias, True, 0.1, 1e-5),
                       F.batch_norm(x, None, None, strided, bias, True, 0.1, 1e-5))
    with pytest.raises(RuntimeError):
        _triton(x, None, None, weight.double(), bias, True, 0.1, 1e-5)


def test_invalid_arguments_raise_like_batch_norm():
    x, weight, bias = _inputs(2, 5, 3, 7)
    with pytest.raises(ValueError, match="eps must be positive"):
        _triton(x, None, None, weight, bias, True, 0.1, 0.0)
    with pytest.raises(ValueError, match="both be None or neither"):
        _triton(x, torch.zeros(5, dtype=torch.float64), None, weight, bias, True, 0.1, 1e-5)


@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum", "cumulative"])
@pytest.mark.parametrize("track", [True, False], ids=["tracked", "untracked"])
def test_layer_is_the_batch_norm2d_it_replaces(momentum, track, poisoned):
    """Two training steps and an evaluation of the layer on triton give nn.BatchNorm2d's
    outputs, gradients and running statistics (float64)."""
    torch.manual_seed(0)
    reference = nn.BatchNorm2d(5, momentum=momentum, track_running_stats=track).double()
    torch.manual_seed(0)
    layer = swap_layers(BatchNorm2d(5, momentum=momentum, track_running_stats=track).double(), "triton")
    assert layer.impl == "triton"
    x = _inputs(2, 5, 3, 7)[0]
    for step in range(2):
        got, expected = (run_layer(m, x + step) for m in (layer, reference))
        for name, g, e in zip(("y", "x", "weight", "bias"), got, expected):
            assert rel_err(g, e) <= TOLERANCE[torch.float64], (step, name)
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(layer.state_dict()[key], value, rtol=1e-12, atol=1e-12, msg=key)
    layer.eval(), reference.eval()
    torch.testing.assert_close(layer(x), reference(x), rtol=1e-12, atol=1e-12)


def run_layer(layer, x):
    x = x.clone().requires_grad_()
    y = layer(x)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(2), dtype=y.dtype)
    return [y.detach(), *torch.autograd.grad(y, [x, layer.weight, layer.bias], dy)]


# --- CUDA (run by bench/gpu_check.sh) -----------------------------------------------------------
GPU_SHAPES = [(64, 64, 64, 25), (32, 128, 32, 42), (128, 16, 64, 42), (3, 7, 5, 67)]


def _gpu_step(fn, x, weight, bias, autocast=False):
    """[y, dx, dweight, dbias, running_mean, running_var] on CUDA; x keeps its dtype, the
    parameters and running statistics are float32 unless x is float64."""
    params_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    leaves = [x.cuda().requires_grad_(), weight.to("cuda", params_dtype).requires_grad_(),
              bias.to("cuda", params_dtype).requires_grad_()]
    C = x.shape[1]
    running = [torch.zeros(C, device="cuda", dtype=params_dtype), torch.ones(C, device="cuda", dtype=params_dtype)]
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        y = fn(leaves[0], *running, leaves[1], leaves[2], True, 0.1, 1e-5)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to("cuda", y.dtype)
    return [y.detach(), *torch.autograd.grad(y, leaves, dy), *running]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=str)
def test_gpu_low_precision_rule(shape, dtype, poisoned):
    """16-bit x with float32 parameters (the autocast case): DESIGN.md section 6 against
    F.batch_norm in the same precision; the running statistics within float32 rounding."""
    x, weight, bias = _inputs(*shape)
    low = x.to(dtype)
    expected = _gpu_step(batch_norm_reference, low.double(), weight, bias)
    got = _gpu_step(_triton, low, weight, bias)
    same_precision = _gpu_step(batch_norm_reference, low, weight, bias)
    assert [g.dtype for g in got[:4]] == [dtype, dtype, torch.float32, torch.float32]
    assert_low_precision_rule(got[:4], same_precision[:4], expected[:4], NAMES[:4])
    for name, g, e in zip(NAMES[4:], got[4:], expected[4:]):
        assert rel_err(g, e) <= 1e-5, name


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=str)
def test_gpu_float32_float64(shape, dtype, poisoned):
    x, weight, bias = _inputs(*shape)
    expected = _gpu_step(batch_norm_reference, x, weight, bias)
    _assert_matches(_gpu_step(_triton, x.to(dtype), weight, bias), expected, dtype, NAMES)


def test_auto_passes_over_the_triton_backend():
    """Until a GPU run shows it faster in a model, auto keeps PyTorch's batch norm on CUDA
    (through the cpp backend, which is F.batch_norm there); named, triton runs."""
    assert resolve("batch_norm", "auto", "cuda") == "cpp"
    assert resolve("batch_norm", "triton", "cuda") == "triton"
    assert resolve("ctr_graph_conv", "auto", "cuda") == "triton"


@pytest.mark.gpu
def test_gpu_model_layers_take_the_triton_kernels_when_named(monkeypatch):
    """On CUDA, bharnet.nn.BatchNorm2d on triton calls the Triton op in training mode and
    matches nn.BatchNorm2d (bf16 autocast, as in training); on auto it does not call it."""
    calls = []
    real = ops_module._batch_norm_train_call
    monkeypatch.setattr(ops_module, "_batch_norm_train_call", lambda *args: calls.append(1) or real(*args))
    torch.manual_seed(0)
    reference = nn.BatchNorm2d(64).cuda()
    torch.manual_seed(0)
    layer = BatchNorm2d(64, impl="triton").cuda()
    x = _inputs(16, 64, 64, 25)[0].float().cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        x16 = x.bfloat16()
        got, expected = layer(x16), reference(x16)
        BatchNorm2d(64).cuda()(x16)
    assert calls == [1]
    assert got.dtype == expected.dtype == torch.bfloat16
    assert rel_err(got, expected) <= 1e-2
    torch.testing.assert_close(layer.running_var, reference.running_var, rtol=1e-4, atol=1e-5)


@pytest.mark.gpu
def test_gpu_torch_compile_sees_the_triton_op():
    x, weight, bias = [t.float().cuda() for t in _inputs(8, 32, 16, 25)]

    def loss(x, running_mean, running_var):
        return _triton(x, running_mean, running_var, weight, bias, True, 0.1, 1e-5).float().square().sum()

    runs = [[torch.zeros(32, device="cuda"), torch.ones(32, device="cuda")] for _ in range(2)]
    torch._dynamo.reset()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        got = torch.compile(loss, fullgraph=True)(x.bfloat16(), *runs[0])
        expected = loss(x.bfloat16(), *runs[1])
    torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-3)
    for a, b in zip(*runs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
