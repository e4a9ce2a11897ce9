"""Triton layer_norm vs the float64 reference: output and the gradients of x, weight and bias.

On CPU the kernels run in the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1):
small odd shapes (D in {5, 7, 33, 250, 256}, odd row counts), blocks shrunk where a test must
reach the backward's loop over row blocks. Errors are relative, ``‖out − ref‖ / ‖ref‖``
(absolute where the reference is exactly zero).

Tolerances: float32 statistics and products add a few ulps times sqrt(D) (measured <= 1e-7
here), hence 1e-5; float64: 1e-12. float16 follows DESIGN.md §6 (at most 2× the error of
torch's LayerNorm run in float16, 3× for gradients, plus the error of rounding the exact
result to float16). bfloat16 runs on the GPU only (the interpreter truncates fp32 -> bf16).
"""
import importlib

import pytest
import torch

from bharnet.ops.cross_attention import cross_attention, cross_attention_reference
from bharnet.ops.layer_norm import layer_norm, layer_norm_reference
from op_testing import as_float64, assert_close, assert_low_precision_rule, run
from op_testing import rel_or_abs_err as err

ops_module = importlib.import_module("bharnet.ops.layer_norm")
custom_op_module = importlib.import_module("bharnet.ops._custom_op")

TOLERANCE = {torch.float64: 1e-12, torch.float32: 1e-5}
NAMES = ("y", "dx", "dweight", "dbias")


def make_inputs(shape, dtype=torch.float32, affine=(True, True), seed=0):
    """[x, weight, bias]: x random and off-centre (mean 0.5, scale 2), the affine parameters
    away from their (1, 0) initialisation, or None where ``affine`` says so."""
    gen = torch.Generator().manual_seed(seed)
    D = shape[-1]
    x = (0.5 + 2.0 * torch.randn(*shape, generator=gen)).to(dtype)
    weight = (1.0 + 0.2 * torch.randn(D, generator=gen)).to(dtype)
    bias = (0.2 * torch.randn(D, generator=gen)).to(dtype)
    return [x, weight if affine[0] else None, bias if affine[1] else None]


def names_for(inputs):
    return ["y"] + ["d" + name for name, t in zip(("x", "weight", "bias"), inputs) if t is not None]


def assert_matches(got, expected, tol, names=NAMES):
    for name, g, r in zip(names, got, expected):
        assert g.dtype == r.dtype or r.dtype == torch.float64, name
    assert_close(got, expected, tol, names, err=err)


@pytest.fixture
def poisoned(monkeypatch):
    """Every kernel output and partial-sum buffer starts as NaN, so unwritten cells show."""
    monkeypatch.setattr(custom_op_module, "POISON_OUTPUTS", True)


AFFINE = [(True, True), (True, False), (False, True), (False, False)]
SHAPES = [(13, 7), (3, 5, 33), (2, 37, 250), (1, 256), (2, 3, 4, 5)]


@pytest.mark.parametrize("affine", AFFINE, ids=lambda a: "w{}_b{}".format(*a))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_float32_matches_float64_reference(shape, affine, poisoned):
    inputs = make_inputs(shape, affine=affine)
    expected = run(layer_norm_reference, as_float64(inputs))
    got = run(layer_norm, inputs)
    assert_matches(got, expected, TOLERANCE[torch.float32], names_for(inputs))


@pytest.mark.parametrize("D", [7, 250])
def test_float64_kernels(D, poisoned):
    inputs = as_float64(make_inputs((3, 11, D)))
    assert_matches(run(layer_norm, inputs), run(layer_norm_reference, inputs),
                   TOLERANCE[torch.float64])


def test_eps_reaches_float64_kernels_exactly():
    """eps is a constexpr, so a float64 kernel adds it in float64: with a variance of 1e-6 the
    float32-rounded 1e-5 (relative error 2.5e-8) would show in y at ~1e-8."""
    x = (1e-3 * torch.randn(4, 64, generator=torch.Generator().manual_seed(5))).double()
    assert err(layer_norm(x, eps=1e-5), layer_norm_reference(x, eps=1e-5)) < 1e-14
    assert err(layer_norm(x, eps=1e-3), layer_norm_reference(x, eps=1e-3)) < 1e-14


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_backward_loops_over_row_blocks(dtype, monkeypatch, poisoned):
    """Three backward programs over 25 four-row blocks (blocks p, p + 3, ...; the last one
    ragged): each program loops and keeps partial dweight and dbias across its blocks."""
    monkeypatch.setattr(ops_module, "TILE", 256)
    monkeypatch.setattr(ops_module, "BACKWARD_PROGRAMS", 3)
    inputs = make_inputs((99, 33), dtype=dtype)
    block_m, block_d = ops_module._config(33, inputs[0])
    assert block_d == 64 and block_m == (4 if dtype == torch.float32 else 2)
    expected = run(layer_norm_reference, as_float64(inputs))
    assert_matches(run(layer_norm, inputs), expected, TOLERANCE[dtype])


def test_noncontiguous_inputs_and_grad(poisoned):
    """x with row stride 64 (a column slice, read without a copy), x with transposed storage
    (copied), a strided weight, and a transposed upstream gradient."""
    inputs = make_inputs((17, 40))
    expected = run(lambda x, w, b: layer_norm_reference(x, w, b).t(), as_float64(inputs))
    x_wide = torch.cat([inputs[0], torch.randn(17, 24)], dim=1)[:, :40]
    x_transposed = inputs[0].t().contiguous().t()
    weight = torch.stack([inputs[1], torch.randn(40)], dim=1)[:, 0]
    assert x_wide.stride() == (64, 1) and not x_transposed.is_contiguous() and weight.stride() == (2,)
    for x in (x_wide, x_transposed):
        got = run(lambda x, w, b: layer_norm(x, w, b).t(), [x, weight, inputs[2]])
        assert_matches(got, expected, TOLERANCE[torch.float32])


def test_float16_in_interpreter_follows_low_precision_rule():
    inputs = make_inputs((3, 25, 256), dtype=torch.float16)
    expected = run(layer_norm_reference, as_float64(inputs))
    same_precision = run(layer_norm_reference, inputs)
    got = run(layer_norm, inputs)
    assert all(g.dtype == torch.float16 for g in got)
    assert_low_precision_rule(got, same_precision, expected, NAMES, err=err)


def test_autocast_writes_the_compute_dtype():
    """Under autocast y comes out in the autocast dtype (what F.linear would cast torch's
    LayerNorm output to); dx keeps x's dtype and the parameter gradients theirs. float64 x is
    not autocast. (The interpreter truncates fp32 -> bf16, hence the bf16-sized bound.)"""
    inputs = make_inputs((6, 5, 24))
    expected = run(layer_norm_reference, as_float64(inputs))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = run(layer_norm, inputs)
        assert layer_norm_reference(inputs[0]).dtype == torch.bfloat16
        assert layer_norm(inputs[0].double()).dtype == torch.float64
    assert [t.dtype for t in got] == [torch.bfloat16] + [torch.float32] * 3
    for name, g, r in zip(NAMES, got, expected):
        assert err(g, r) < 2 ** -6, name
    assert layer_norm(inputs[0]).dtype == torch.float32  # autocast off again


def test_single_feature_gives_bias_and_zero_gradients():
    """D = 1: x - mean is exactly 0, so y = bias, dx = dweight = 0 and dbias = sum dy (torch's
    float64 LayerNorm leaves ~1e-14 residues there, so this is checked exactly instead)."""
    x, weight, bias = make_inputs((9, 1))
    y, dx, dweight, dbias = run(layer_norm, [x, weight, bias])
    dy = run(lambda y: y, [y])[1]  # run()'s upstream gradient
    assert torch.equal(y, bias.expand(9, 1)) and (dx == 0).all() and (dweight == 0).all()
    torch.testing.assert_close(dbias, dy.sum(0), rtol=1e-6, atol=1e-6)


def test_empty_rows():
    x, weight, bias = make_inputs((0, 8))
    y, dx, dweight, dbias = run(layer_norm, [x, weight, bias])
    assert y.shape == dx.shape == (0, 8)
    assert (dweight == 0).all() and (dbias == 0).all()


@pytest.mark.parametrize("affine", [(True, True), (False, False)], ids=["affine", "plain"])
def test_opcheck_forward(affine):
    x, weight, bias = make_inputs((5, 33), affine=affine)
    if weight is not None:
        weight.requires_grad_()
    torch.library.opcheck(torch.ops.bharnet.layer_norm.default,
                          (x.requires_grad_(), weight, bias, 1e-5, torch.float32))
    torch.library.opcheck(torch.ops.bharnet.layer_norm.default,
                          (x.detach(), weight, bias, 1e-5, torch.float16))


def test_opcheck_backward():
    x, weight, _ = make_inputs((5, 33))
    _, mean, rstd = torch.ops.bharnet.layer_norm(x, weight, None, 1e-5, torch.float32)
    torch.library.opcheck(torch.ops.bharnet.layer_norm_backward.default,
                          (torch.randn(5, 33), x, weight, mean, rstd))


def test_cross_attention_beyond_layer_norm_dims():
    """dim 1152 > 1024 (9 heads of 128): the triton cross-attention normalises with torch."""
    gen = torch.Generator().manual_seed(0)
    D = 1152

    def rand(*shape, scale=1.0):
        return scale * torch.randn(*shape, generator=gen)

    inputs = [rand(1, 2, D), rand(1, 3, D), 9, rand(D, D, scale=D ** -0.5), rand(D),
              rand(2 * D, D, scale=D ** -0.5), rand(2 * D), rand(D, D, scale=D ** -0.5), rand(D),
              None, 1 + rand(D, scale=0.2), rand(D, scale=0.2), 1 + rand(D, scale=0.2),
              rand(D, scale=0.2)]
    expected = run(cross_attention_reference, as_float64(inputs))
    got = run(lambda *args: cross_attention(*args, backend="triton"), inputs)
    assert_close(got, expected, 2e-5, [f"result {i}" for i in range(len(got))], err=err)


@pytest.mark.parametrize("index, value, error, match", [
    (0, torch.tensor(1.0), ValueError, r"x must have shape \(\.\.\., dim\), got \(\)"),
    (0, [1.0, 2.0], ValueError, r"x must have shape \(\.\.\., dim\), got list"),
    (0, torch.ones(3, 8, dtype=torch.int32), TypeError, "x must be floating point"),
    (0, torch.randn(2, 1025), ValueError, r"1 <= dim <= 1024 features, got x of shape \(2, 1025\)"),
    (0, torch.randn(2, 0), ValueError, r"1 <= dim <= 1024"),
    (1, torch.randn(7), ValueError, r"weight must have shape \(8,\), got \(7,\)"),
    (1, torch.randn(8, device="meta"), ValueError, "weight is on meta, expected cpu like x"),
    (2, [0.0] * 8, TypeError, "bias must be a torch.Tensor"),
    (2, torch.randn(8).to(torch.complex64), TypeError, "bias must be floating point"),
    (0, torch.randn(3, 8).to(torch.float8_e4m3fn), TypeError,
     "x must be float16, bfloat16, float32 or float64, got torch.float8_e4m3fn"),
])
def test_bad_input_raises_clear_error(index, value, error, match):
    inputs = make_inputs((3, 8))
    inputs[index] = value
    with pytest.raises(error, match=match):
        layer_norm(*inputs)


# --- GPU (run by bench/gpu_check.sh) -----------------------------------------------------------
# The cross-attention's frame mode: N * Lq = 2048 * 25 query tokens and 2048 * 42 key tokens of
# D = 256 features (rows reduced to keep the float64 reference small), plus an odd D.
GPU_SHAPES = [(256, 25, 256), (256, 42, 256), (33, 7, 250)]


def gpu_inputs(shape, dtype, params_dtype=None):
    inputs = make_inputs(shape, dtype=dtype)
    return [inputs[0].cuda()] + [t.to("cuda", params_dtype or dtype) for t in inputs[1:]]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_gpu_low_precision_rule(shape, dtype, poisoned):
    inputs = gpu_inputs(shape, dtype)
    expected = run(layer_norm_reference, as_float64(inputs))
    same_precision = run(layer_norm_reference, inputs)
    got = run(layer_norm, inputs)
    assert all(g.dtype == dtype for g in got)
    assert_low_precision_rule(got, same_precision, expected, NAMES, err=err)


@pytest.mark.gpu
@pytest.mark.parametrize("x_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", GPU_SHAPES[:2], ids=lambda s: "x".join(map(str, s)))
def test_gpu_autocast_bf16_follows_low_precision_rule(shape, x_dtype, poisoned):
    """The profiled case: bf16 autocast, float32 parameters, bf16 (or float32) activations.
    The same-precision reference is torch's LayerNorm under autocast (float32, cast to bf16)."""
    inputs = gpu_inputs(shape, x_dtype, params_dtype=torch.float32)
    expected = run(layer_norm_reference, as_float64(inputs))
    with torch.autocast("cuda", dtype=torch.bfloat16):
        same_precision = run(layer_norm_reference, inputs)
        got = run(layer_norm, inputs)
    assert [g.dtype for g in got] == [torch.bfloat16, x_dtype, torch.float32, torch.float32]
    assert_low_precision_rule(got, same_precision, expected, NAMES, err=err)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gpu_float32_float64(dtype, poisoned):
    inputs = gpu_inputs(GPU_SHAPES[0], dtype)
    expected = run(layer_norm_reference, as_float64(inputs))
    assert_matches(run(layer_norm, inputs), expected, TOLERANCE[dtype])


@pytest.mark.gpu
@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "autocast_bf16"])
def test_gpu_torch_compile_sees_the_triton_op(autocast):
    """Inductor compiles a caller without graph breaks, also reading the autocast state."""
    inputs = gpu_inputs((64, 25, 256), torch.float32)

    def fn(x, weight, bias):
        return layer_norm(x, weight, bias).float().square().sum()

    torch._dynamo.reset()
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        expected = run(fn, inputs)
        got = run(torch.compile(fn, fullgraph=True), inputs)
    for name, g, r in zip(("loss", "dx", "dweight", "dbias"), got, expected):
        assert err(g, r) < 1e-5, name
