"""``bharnet.ops.cpu_linear.linear``: oneDNN's matmul for float32 CPU tensors, ``F.linear``
otherwise. The oneDNN path against the float64 ``F.linear``: the output and the gradients of x,
weight and bias, as relative errors ``||x - ref|| / ||ref||``; tolerance 1e-5 (float32 products
summed over K or M <= 300 terms: a few unit roundoffs, 6e-8, grown by at most sqrt(300);
measured <= 4e-7)."""
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from bharnet.ops import cpu_linear
from bharnet.ops.cpu_linear import _cpp_weight_grad, _cpu_vendor, _onednn_matmul, linear, onednn_linear_applies
from op_testing import assert_independent_of_thread_count, forward_backward, rel_err, wide_supported

pytestmark = pytest.mark.skipif(_onednn_matmul() is None, reason="this PyTorch build has no oneDNN")


@pytest.fixture(autouse=True)
def onednn_preferred(monkeypatch):
    """The oneDNN path whatever the CPU (on an Intel one ``linear`` is F.linear itself)."""
    monkeypatch.setattr(cpu_linear, "_cpu_vendor", lambda: "AuthenticAMD")


@pytest.mark.parametrize("vendor, onednn", [("AuthenticAMD", True), ("GenuineIntel", False), (None, True)])
def test_onednn_only_where_mkl_is_the_slower_product(monkeypatch, vendor, onednn):
    monkeypatch.setattr(cpu_linear, "_cpu_vendor", lambda: vendor)
    x, w = torch.randn(6, 8), torch.randn(4, 8)
    assert onednn_linear_applies(x, w, None) == onednn
    assert _calls(lambda: linear(x, w), "bharnet::onednn_linear") == int(onednn)


def test_cpu_vendor_without_cpuinfo_reads_platform_processor(monkeypatch):
    def no_file(*args, **kwargs):
        raise FileNotFoundError("/proc/cpuinfo")

    monkeypatch.setattr(cpu_linear, "open", no_file, raising=False)
    monkeypatch.setattr(cpu_linear.platform, "processor", lambda: "Intel64 Family 6 Model 167 Stepping 1, GenuineIntel")
    assert _cpu_vendor.__wrapped__() == "GenuineIntel"
    monkeypatch.setattr(cpu_linear.platform, "processor", lambda: "arm")
    assert _cpu_vendor.__wrapped__() is None


@pytest.mark.skipif(not os.path.isfile("/proc/cpuinfo"), reason="no /proc/cpuinfo")
def test_cpu_vendor_is_cpuinfos_vendor_id():
    lines = [line for line in open("/proc/cpuinfo") if line.startswith("vendor_id")]
    assert _cpu_vendor() == (lines[0].split(":", 1)[1].strip() if lines else None)

TOLERANCE = 1e-5

# (x shape, N): 2-D and 3-D inputs, one row, odd K and N, the model's D = 256 -> 2D.
SHAPES = [((7, 5), 3), ((2, 3, 37), 19), ((1, 256), 512), ((4, 25, 256), 256)]


def _inputs(x_shape, N, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*x_shape, generator=g, dtype=torch.float64)
    w = torch.randn(N, x_shape[-1], generator=g, dtype=torch.float64) / x_shape[-1] ** 0.5
    b = torch.randn(N, generator=g, dtype=torch.float64) if bias else None
    return x, w, b


def _forward_backward(fn, x, w, b, dy):
    """op_testing.forward_backward over x, w and b; a None bias is passed through."""
    if b is None:
        return forward_backward(lambda x, w: fn(x, w, None), [x, w], dy)
    return forward_backward(fn, [x, w, b], dy)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("x_shape, N", SHAPES, ids=str)
def test_onednn_path_matches_fp64_linear(x_shape, N, bias):
    x, w, b = _inputs(x_shape, N, bias)
    dy = torch.randn(*x_shape[:-1], N, dtype=torch.float64)
    expected = _forward_backward(F.linear, x, w, b, dy)
    f32 = [t.float() if t is not None else None for t in (x, w, b)]
    assert onednn_linear_applies(*f32)
    got = _forward_backward(linear, *f32, dy.float())
    assert _calls(lambda: linear(*f32), "bharnet::onednn_linear") == 1
    assert len(got) == len(expected)
    for name, g, e in zip(["y", "x", "weight", "bias"], got, expected):
        assert g.dtype == torch.float32 and g.shape == e.shape, name
        assert rel_err(g, e) < TOLERANCE, name


def test_non_contiguous_inputs():
    x, w, b = _inputs((6, 40), 24)
    dy = torch.randn(6, 24, dtype=torch.float64)
    expected = _forward_backward(F.linear, x, w, b, dy)
    x_nc = x.float().t().contiguous().t()
    w_nc = w.float().t().contiguous().t()
    b_nc = torch.stack([b.float(), b.float()], 1)[:, 0]
    assert not (x_nc.is_contiguous() or w_nc.is_contiguous() or b_nc.is_contiguous())
    got = _forward_backward(linear, x_nc, w_nc, b_nc, dy.float())
    for name, g, e in zip(["y", "x", "weight", "bias"], got, expected):
        assert rel_err(g, e) < TOLERANCE, name


def _calls(fn, name="mkldnn::_linear_pointwise") -> int:
    """How many times ``fn()`` runs the op ``name`` (profiler events; default oneDNN's matmul)."""
    with torch.profiler.profile() as prof:
        fn()
    return sum(1 for e in prof.events() if e.name == name)


def test_only_needed_gradients_are_computed():
    """Forward: one matmul; backward for the weight only: one weight-gradient product (the C++
    kernel, or a oneDNN matmul without the extension), no dX, no db."""
    x, w, b = [t.float() for t in _inputs((5, 8), 4)]
    w.requires_grad_()
    y = linear(x, w, b)
    dw = []
    cpp = _cpp_weight_grad() is not None
    assert _calls(lambda: dw.extend(torch.autograd.grad(y.sum(), [w]))) == (0 if cpp else 1)
    assert torch.allclose(dw[0], torch.ones(5, 4).t() @ x, rtol=1e-5, atol=1e-6)
    y = linear(x, w, b)
    assert _calls(lambda: torch.autograd.grad(y.sum(), [w]), "bharnet::linear_weight_grad_cpp") == int(cpp)
    assert _calls(lambda: linear(x, w, b)) == 1


# (M, N, K): K a whole number of 16-float vectors or not (edge columns of several widths), one
# row, more rows than one block of the sum (256), more output rows and columns than one task.
WEIGHT_GRAD_SHAPES = [(7, 3, 5), (1, 19, 37), (300, 17, 33), (513, 100, 256), (40, 130, 200)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("shape", WEIGHT_GRAD_SHAPES, ids=str)
def test_cpp_weight_grad_matches_fp64(shape, dtype, cpu_vector_bytes):
    if _cpp_weight_grad() is None:
        pytest.skip("the C++ extension cannot load")
    M, N, K = shape
    g = torch.Generator().manual_seed(0)
    dy, x = torch.randn(M, N, generator=g, dtype=torch.float64), torch.randn(M, K, generator=g, dtype=torch.float64)
    got = _cpp_weight_grad()(dy.to(dtype), x.to(dtype))
    assert got.dtype == dtype and got.shape == (N, K)
    assert rel_err(got, dy.t() @ x) < (1e-12 if dtype == torch.float64 else TOLERANCE)


def test_cpp_weight_grad_is_independent_of_threads_and_width():
    if _cpp_weight_grad() is None:
        pytest.skip("the C++ extension cannot load")
    g = torch.Generator().manual_seed(0)
    dy, x = torch.randn(300, 100, generator=g), torch.randn(300, 200, generator=g)
    assert_independent_of_thread_count(lambda: [_cpp_weight_grad()(dy, x)], ["dw"])
    if wide_supported():
        op, previous = torch.ops.bharnet.cpu_vector_bytes, torch.ops.bharnet.cpu_vector_bytes(0)
        results = []
        try:
            for width in (32, 64):
                op(width)
                results.append(_cpp_weight_grad()(dy, x))
        finally:
            op(previous)
        assert torch.equal(*results)
    torch.library.opcheck(torch.ops.bharnet.linear_weight_grad_cpp.default, [dy[:7, :5], x[:7, :9]])


@pytest.mark.parametrize("bias_shape", [(), (1,)], ids=["scalar", "one"])
def test_broadcast_biases_take_f_linear(bias_shape):
    """F.linear broadcasts a 0-d or (1,) bias; oneDNN would drop or refuse it."""
    x, w, _ = [t.float() if t is not None else None for t in _inputs((5, 8), 4)]
    bias = torch.full(bias_shape, 1.5)
    assert not onednn_linear_applies(x, w, bias)
    assert torch.equal(linear(x, w, bias), F.linear(x, w, bias))


def test_other_calls_are_f_linear_itself():
    """float64, empty inputs and autocast take F.linear: bitwise its results and dtypes."""
    x, w, b = _inputs((5, 8), 4)
    assert not onednn_linear_applies(x, w, b)
    assert torch.equal(linear(x, w, b), F.linear(x, w, b))
    empty = torch.randn(0, 8)
    assert not onednn_linear_applies(empty, w.float(), None)
    assert linear(empty, w.float()).shape == (0, 4)
    xf, wf, bf = x.float(), w.float(), b.float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not onednn_linear_applies(xf, wf, bf)
        got, expected = linear(xf, wf, bf), F.linear(xf, wf, bf)
    assert got.dtype == torch.bfloat16 and torch.equal(got, expected)


def test_double_backward_matches_f_linear():
    """Under create_graph every gradient is itself a product of the op (or a sum), so second
    derivatives are those of F.linear: here d/dw and d/dx of <dx, c> + <dw, e>."""
    x, w, b = [t.float() for t in _inputs((6, 5), 4)]
    g = torch.Generator().manual_seed(1)
    dy, c, e = (torch.randn(shape, generator=g) for shape in ((6, 4), (6, 5), (4, 5)))

    def second_order(fn):
        leaves = [t.detach().clone().requires_grad_() for t in (x, w, b)]
        dx, dw = torch.autograd.grad(fn(*leaves), leaves[:2], dy, create_graph=True)
        return torch.autograd.grad((dx * c).sum() + (dw * e).sum(), leaves[:2])

    for got, expected in zip(second_order(linear), second_order(F.linear)):
        assert rel_err(got, expected) < TOLERANCE


def test_torch_compile_keeps_the_onednn_op():
    """The compiled forward and backward run the same products as eager (oneDNN's matmul for y and
    dX, the C++ kernel or oneDNN for dW), not the CPU GEMM torch.compile would choose, and give
    the float64 results; opcheck covers the op's fake and autograd registrations."""
    x, w, b = _inputs((2, 7, 16), 8)
    dy = torch.randn(2, 7, 8, dtype=torch.float64)
    expected = _forward_backward(F.linear, x, w, b, dy)
    f32 = [t.float() for t in (x, w, b)]
    compiled = torch.compile(linear, fullgraph=True)
    got = _forward_backward(compiled, *f32, dy.float())
    for name, g, e in zip(["y", "x", "weight", "bias"], got, expected):
        assert rel_err(g, e) < TOLERANCE, name
    cpp = _cpp_weight_grad() is not None
    with torch.profiler.profile() as prof:
        _forward_backward(compiled, *f32, dy.float())
    names = [e.name for e in prof.events()]
    assert names.count("mkldnn::_linear_pointwise") == (2 if cpp else 3)
    assert names.count("bharnet::linear_weight_grad_cpp") == int(cpp)
    assert not {"aten::mm", "aten::addmm", "aten::bmm"} & set(names)
    rows = f32[0].reshape(-1, 16)
    for bias in (f32[2], None):
        args = [t.detach().clone().requires_grad_() if t is not None else None for t in (rows, f32[1], bias)]
        torch.library.opcheck(torch.ops.bharnet.onednn_linear.default, args)


COMPILE_IN_A_FRESH_PROCESS = """
import torch
from bharnet.ops import cpu_linear
from bharnet.ops.cpu_linear import linear
cpu_linear._cpu_vendor = lambda: "AuthenticAMD"  # the oneDNN path, whatever the CPU
x, w, b = (torch.randn(shape, requires_grad=True) for shape in ((5, 8), (4, 8), (4,)))
torch.compile(linear, fullgraph=True)(x, w, b).sum().backward()
assert torch.allclose(w.grad, torch.ones(5, 4).t() @ x, rtol=1e-5, atol=1e-5)
print("ok")
"""


def test_compiled_backward_from_the_compile_cache(tmp_path):
    """The second process gets its compiled forward and backward from the cache, without tracing
    the backward, whose C++ weight-gradient op must still be there (it once was not: the
    extension only loaded while the backward was traced)."""
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "cache")}
    for _ in range(2):
        run = subprocess.run([sys.executable, "-c", COMPILE_IN_A_FRESH_PROCESS], env=env, capture_output=True,
                             text=True, timeout=300)
        assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stderr[-3000:]
