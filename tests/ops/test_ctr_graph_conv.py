"""The Triton backend of ``bharnet.ops.ctr_graph_conv`` against the float64 reference.

On CPU the kernels run in the Triton interpreter (``tests/conftest.py``), so shapes are small
but odd (V = 5, 21, 25, 42, 128; T = 2..13; C not a power of two; several row and column
tiles). Every output and every gradient (v, A, q, k, weight, bias, alpha) is compared as a
relative error ``||x - ref|| / ||ref||``; kernel outputs are poisoned with NaN before the
kernels run, so an element that is never written fails the comparison.

Tolerances:
- float64 kernel vs float64 reference: 1e-12 (both exact up to summation order; measured ~1e-15).
- float32 kernel vs float64 reference: 1e-5. fp32 products are exact (``input_precision="ieee"``,
  no TF32) and accumulate in fp32, so the error is a few unit roundoffs (6e-8) grown by the
  square root of the summed terms (at most ~1e4 here): ~1e-6 worst case, ~2e-7 measured.
  TF32 would give ~1e-3 and fail.
- float16/bfloat16 (DESIGN.md section 6): the kernel's error against the float64 reference on
  the same rounded inputs is at most 2x (outputs) or 3x (gradients) the error of the reference
  itself run in that precision, or one unit roundoff of the dtype (a single rounding of the
  result), whichever is larger; the latter matters only for the scalar dalpha, whose
  low-precision reference error can be small by chance.
"""
import importlib
import json
import os
import subprocess
import sys

import pytest
import torch

from bharnet.ops import ctr_graph_conv, ctr_graph_conv_reference

op_module = importlib.import_module("bharnet.ops.ctr_graph_conv")

NAMES = ("y", "v", "A", "q", "k", "weight", "bias", "alpha")
UNIT_ROUNDOFF = {torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8}
EXACT_TOLERANCE = {torch.float64: 1e-12, torch.float32: 1e-5}
GPU = "cuda"


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    monkeypatch.setattr(op_module, "POISON_OUTPUTS", True)


def make_inputs(B, H, C, T, V, R, G, seed=0, dynamic=True):
    """Random float64 CPU inputs (v, A, q, k, weight, bias, alpha), none zero, alpha != 0.

    Scales keep every term O(1): A ~ N(0, 1/V), weight ~ N(0, 1/R)."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return torch.randn(*shape, generator=gen, dtype=torch.float64) * scale

    v, A = randn(B, H, C, T, V), randn(H, V, V, scale=V ** -0.5)
    if not dynamic:
        return [v, A]
    return [v, A, randn(B, H, R, V), randn(B, H, R, V), randn(H, G, R, scale=R ** -0.5),
            randn(H, G), torch.tensor([0.7], dtype=torch.float64)]


def output_grad(inputs, seed=1):
    B, H, C, T, V = inputs[0].shape
    return torch.randn(B, C, T, V, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def triton_backend(*args):
    return ctr_graph_conv(*args, backend="triton")


def forward_backward(fn, inputs, dy):
    """[y, dL/d input for every input] with L = <y, dy>."""
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    y = fn(*leaves)
    return [y, *torch.autograd.grad(y, leaves, dy.to(y.dtype))]


def rel_err(x, ref):
    return ((x.double() - ref.double()).norm() / ref.double().norm()).item()


def cast(inputs, dtype, device="cpu"):
    return [t.to(device=device, dtype=dtype) for t in inputs]


def assert_close_to_reference(inputs, dy, tolerance):
    """Kernel on ``inputs`` vs the float64 reference on the same values: outputs and grads."""
    got = forward_backward(triton_backend, inputs, dy)
    ref = forward_backward(ctr_graph_conv_reference, [t.double() for t in inputs], dy.double())
    for name, x, r, like in zip(NAMES, got, ref, [inputs[0], *inputs]):
        assert x.dtype == like.dtype and x.shape == r.shape, name
        err = rel_err(x, r)
        assert err <= tolerance, f"{name}: relative error {err:.2e} > {tolerance:.0e}"


def assert_low_precision_rule(inputs64, dy64, dtypes, device):
    """DESIGN.md section 6 rule; ``dtypes`` gives each input's precision (v's is the op's)."""
    rounded = [t.to(device=device, dtype=d) for t, d in zip(inputs64, dtypes)]
    dy = dy64.to(device=device, dtype=dtypes[0])
    ref = forward_backward(ctr_graph_conv_reference, [t.double() for t in rounded], dy.double())
    ref_low = forward_backward(ctr_graph_conv_reference, rounded, dy)
    got = forward_backward(triton_backend, rounded, dy)
    for index, (name, x, r_low, r) in enumerate(zip(NAMES, got, ref_low, ref)):
        expected_dtype = dtypes[0] if index == 0 else dtypes[index - 1]
        assert x.dtype == expected_dtype, f"{name}: dtype {x.dtype}, expected {expected_dtype}"
        factor = 2.0 if name == "y" else 3.0
        bound = max(factor * rel_err(r_low, r), UNIT_ROUNDOFF.get(expected_dtype, 0.0))
        err = rel_err(x, r)
        assert err <= bound, f"{name} ({expected_dtype}): kernel error {err:.2e} > bound {bound:.2e}"


# (B, H, C, T, V, R, G): NTU-like V; tiny V; two row tiles (C/G * T = 78 > 64) with V = 21;
# per-channel topology (G = C) with two column tiles (V = 42); the largest V the backend takes.
SHAPES = [
    (2, 3, 8, 7, 25, 3, 4),
    (2, 3, 12, 3, 5, 2, 4),
    (1, 3, 12, 13, 21, 3, 2),
    (1, 2, 8, 3, 42, 2, 8),
    (1, 2, 4, 2, 128, 2, 2),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_ctr_gc_matches_fp64_reference(shape, dtype):
    inputs = make_inputs(*shape)
    assert_close_to_reference(cast(inputs, dtype), output_grad(inputs), EXACT_TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("shape", [SHAPES[0], SHAPES[2]], ids=str)
def test_static_st_gc_matches_fp64_reference(shape, dtype):
    inputs = make_inputs(*shape, dynamic=False)
    assert_close_to_reference(cast(inputs, dtype), output_grad(inputs), EXACT_TOLERANCE[dtype])


@pytest.mark.parametrize("dynamic", [True, False], ids=["ctr_gc", "st_gc"])
def test_fp16_low_precision_rule(dynamic):
    """fp16 ``tl.dot`` is correct in the interpreter (bf16 is not: bf16 runs on the GPU only)."""
    inputs = make_inputs(2, 3, 8, 7, 25, 3, 4, dynamic=dynamic)
    assert_low_precision_rule(inputs, output_grad(inputs), [torch.float16] * len(inputs), "cpu")


def test_fp16_features_with_fp32_parameters():
    """Mixed precision as in autocast training: v in fp16, topology inputs in fp32; every
    gradient comes back in its input's dtype."""
    inputs = make_inputs(2, 3, 8, 7, 25, 3, 4)
    dtypes = [torch.float16] + [torch.float32] * (len(inputs) - 1)
    assert_low_precision_rule(inputs, output_grad(inputs), dtypes, "cpu")


def test_non_contiguous_inputs():
    B, H, C, T, V, R, G = 2, 3, 8, 7, 25, 3, 4
    dense = make_inputs(B, H, C, T, V, R, G)
    v = dense[0].transpose(2, 3).contiguous().transpose(2, 3)
    A = dense[1].transpose(1, 2).contiguous().transpose(1, 2)
    q = torch.stack([dense[2], dense[2]], dim=-1)[..., 0]
    k = dense[3].transpose(2, 3).contiguous().transpose(2, 3)
    weight = dense[4].transpose(0, 2).contiguous().transpose(0, 2)
    bias = dense[5].t().contiguous().t()
    alpha = dense[6].reshape(())
    inputs = [v, A, q, k, weight, bias, alpha]
    assert not any(t.is_contiguous() for t in inputs[:-1])
    dy = output_grad(dense).transpose(1, 2).contiguous().transpose(1, 2)
    assert_close_to_reference(inputs, dy, EXACT_TOLERANCE[torch.float64])


def small_op_inputs(dynamic=True):
    return [t.requires_grad_() for t in make_inputs(1, 2, 4, 3, 5, 2, 4, dynamic=dynamic)]


@pytest.mark.parametrize("dynamic", [True, False], ids=["ctr_gc", "st_gc"])
def test_opcheck_forward_op(dynamic):
    inputs = small_op_inputs(dynamic)
    args = inputs if dynamic else inputs + [None] * 5
    torch.library.opcheck(torch.ops.bharnet.ctr_graph_conv.default, args)


def test_opcheck_backward_ops():
    inputs = [t.detach() for t in small_op_inputs()]
    dy = output_grad(inputs)
    torch.library.opcheck(torch.ops.bharnet.ctr_graph_conv_backward.default, [dy, *inputs])
    torch.library.opcheck(torch.ops.bharnet.ctr_graph_conv_static_backward.default, [dy, *inputs[:2]])


def loss_after_graph_conv(v, A, q, k, weight, bias, alpha):
    return torch.sin(ctr_graph_conv(v, A, q, k, weight, bias, alpha, backend="triton")).sum()


def assert_compiled_matches_eager(inputs):
    compiled = torch.compile(loss_after_graph_conv, fullgraph=True)
    expected = forward_backward(loss_after_graph_conv, inputs, torch.tensor(1.0, dtype=inputs[0].dtype))
    got = forward_backward(compiled, inputs, torch.tensor(1.0, dtype=inputs[0].dtype))
    for name, x, r in zip(("loss",) + NAMES[1:], got, expected):
        torch.testing.assert_close(x, r, msg=lambda m: f"{name}: {m}")


def test_torch_compile_fullgraph():
    """Under the interpreter the op is an opaque custom op (see ``_custom_op``); fullgraph
    compile with autograd traces it through its fake impl and runs the kernels."""
    torch._dynamo.reset()
    assert_compiled_matches_eager(make_inputs(1, 2, 4, 3, 5, 2, 4))


# Runs in a fresh interpreter without TRITON_INTERPRET, so the ops register as triton_ops (the
# GPU path); a stand-in driver reports an H100 target so that torch can parse the kernels (to
# find which arguments they write), and the captured graph (dynamic shapes) is never run.
TRACE_TRITON_OPS = """
import json, torch, triton
from triton.backends.compiler import GPUTarget
from torch._dynamo.backends.common import aot_autograd
import bharnet.ops

class H100Target:
    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)

class Captured(Exception):
    pass

triton.runtime.driver.set_active(H100Target())
launches = []

def capture(gm, example_inputs):
    for node in gm.graph.nodes:
        if "triton_kernel_wrapper" in str(node.target):
            launches.append(sorted(node.kwargs["tensors_to_clone"]))

    def never_run(*args):
        raise Captured
    return never_run

def forward_and_backward(dy, *inputs):
    return (torch.ops.bharnet.ctr_graph_conv(*inputs),
            torch.ops.bharnet.ctr_graph_conv_backward(dy, *inputs))

shapes = [(1, 4, 3, 5), (1, 2, 4, 3, 5), (2, 5, 5), (1, 2, 2, 5), (1, 2, 2, 5), (2, 4, 2), (2, 4), (1,)]
fn = torch.compile(forward_and_backward, backend=aot_autograd(fw_compiler=capture),
                   fullgraph=True, dynamic=True)
try:
    fn(*[torch.randn(s) for s in shapes])
except Captured:
    pass
print(json.dumps(launches))
"""


def test_gpu_registration_traces_into_kernels():
    """Without the interpreter the ops are ``triton_op``s: AOTAutograd sees the three kernel
    launches, and torch's analysis of the kernels finds that they write only their outputs
    (so compiled graphs never copy the inputs)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", TRACE_TRITON_OPS], env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    launches = json.loads(result.stdout.strip().splitlines()[-1])
    assert launches == [["y_ptr"], ["dtopo_ptr", "dv_ptr"], ["dk_part_ptr", "dq_ptr", "p_part_ptr"]]


def test_too_many_joints_is_a_value_error():
    inputs = make_inputs(1, 1, 4, 2, 129, 2, 2)
    with pytest.raises(ValueError, match="V=129"):
        triton_backend(*inputs)


def test_integer_features_are_a_type_error():
    inputs = make_inputs(1, 1, 4, 2, 5, 2, 2)
    inputs[0] = inputs[0].to(torch.int32)
    with pytest.raises(TypeError, match="v"):
        triton_backend(*inputs)


def test_float8_topology_is_a_type_error():
    inputs = make_inputs(1, 1, 4, 2, 5, 2, 2)
    inputs[1] = inputs[1].to(torch.float8_e4m3fn)
    with pytest.raises(TypeError, match="A in float16, bfloat16, float32 or float64"):
        triton_backend(*inputs)


# GPU: the shapes of DESIGN.md section 5 (H = 3, G = 4, R = C / 8) and the largest V.
GPU_SHAPES = [
    (8, 3, 64, 64, 25, 8, 4),
    (8, 3, 256, 16, 42, 32, 4),
    (8, 3, 64, 16, 67, 8, 4),
    (2, 3, 32, 8, 128, 4, 4),
]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=str)
def test_gpu_low_precision_rule(shape, dtype):
    inputs = make_inputs(*shape)
    assert_low_precision_rule(inputs, output_grad(inputs), [dtype] * len(inputs), GPU)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_gpu_static_low_precision_rule(dtype):
    inputs = make_inputs(*GPU_SHAPES[0], dynamic=False)
    assert_low_precision_rule(inputs, output_grad(inputs), [dtype] * len(inputs), GPU)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("shape", GPU_SHAPES[:2], ids=str)
def test_gpu_exact_precision_matches_fp64_reference(shape, dtype):
    """fp32 on the GPU must not use TF32 (which would fail the 1e-5 tolerance)."""
    inputs = make_inputs(*shape)
    dy = output_grad(inputs).to(GPU)
    assert_close_to_reference(cast(inputs, dtype, GPU), dy, EXACT_TOLERANCE[dtype])


@pytest.mark.gpu
def test_gpu_opcheck_triton_op():
    inputs = [t.to(GPU).requires_grad_() for t in make_inputs(2, 3, 8, 7, 25, 3, 4)]
    torch.library.opcheck(torch.ops.bharnet.ctr_graph_conv.default, inputs)
    dy = output_grad(inputs).to(GPU)
    torch.library.opcheck(torch.ops.bharnet.ctr_graph_conv_backward.default,
                          [dy, *[t.detach() for t in inputs]])


@pytest.mark.gpu
def test_gpu_torch_compile_fullgraph():
    """On the GPU the op is a ``triton_op``: inductor traces into it and launches the kernels."""
    torch._dynamo.reset()
    assert_compiled_matches_eager(cast(make_inputs(2, 3, 8, 7, 25, 3, 4), torch.float32, GPU))
