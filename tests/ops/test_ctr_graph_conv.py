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

from ctr_graph_conv_cases import (GPU, GPU_SHAPES, SHAPES, TOLERANCE, assert_close_to_reference,
                                  assert_compiled_matches_eager, assert_matches_fp64_reference,
                                  assert_within_low_precision_rule, backend_fn, make_inputs,
                                  noncontiguous_inputs, output_grad, small_inputs)
from op_testing import cast

custom_op_module = importlib.import_module("bharnet.ops._custom_op")

triton_backend = backend_fn("triton")


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    monkeypatch.setattr(custom_op_module, "POISON_OUTPUTS", True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_ctr_gc_matches_fp64_reference(shape, dtype):
    assert_matches_fp64_reference("triton", shape, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("shape", [SHAPES[0], SHAPES[2]], ids=str)
def test_static_st_gc_matches_fp64_reference(shape, dtype):
    assert_matches_fp64_reference("triton", shape, dtype, dynamic=False)


@pytest.fixture
def grad_chunks(monkeypatch):
    """The (chunks, row tiles per chunk) of every dv/dAref launch the op makes."""
    kernels = importlib.import_module("bharnet.kernels.ctr_graph_conv")
    original, seen = kernels.grad_config, []

    def spy(*args, **kwargs):
        launch, j_tiles, chunks = original(*args, **kwargs)
        seen.append((chunks, launch["ROW_TILES_PER_CHUNK"]))
        return launch, j_tiles, chunks
    monkeypatch.setattr(kernels, "grad_config", spy)
    return seen


def assert_split(chunking, rows, row_tile):
    """The rows' tiles are spread over more than one chunk and every chunk has some."""
    chunks, per_chunk = chunking
    row_tiles = -(-rows // row_tile)
    assert chunks > 1 and (chunks - 1) * per_chunk < row_tiles <= chunks * per_chunk


@pytest.mark.parametrize("dynamic", [True, False], ids=["ctr_gc", "st_gc"])
def test_rows_split_over_programs(dynamic, grad_chunks):
    """A group's 260 rows (520 for ST-GC's single group; row tiles of 64 in float64) are split
    into chunks with a shorter last one, whose partial dAref sums are added: dA, dq, dk,
    dweight, dbias, dalpha must not miss any."""
    assert_matches_fp64_reference("triton", (1, 2, 4, 130, 5, 2, 2), torch.float64, dynamic=dynamic)
    assert_split(grad_chunks[-1], rows=260 if dynamic else 520, row_tile=64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_parameter_sums_over_several_blocks_and_i_tiles(dtype, monkeypatch):
    """The last backward kernel with every role split and every loop taken more than once:
    V = 37 gives two i-tiles (dk summed over them) and 11 column blocks of dA (the last
    partial); rows of 2 make the dA sum over B = 3 and the parameter sums over 2 x 3 rows loop
    with a partial last step; 16-wide parameter blocks split H * G * R = 24 weights in two
    (dalpha from two partials, the second block partial)."""
    kernels = importlib.import_module("bharnet.kernels.ctr_graph_conv")
    original, blocks = kernels.parameter_config, []

    def narrow(params):
        launch = dict(original(params), BLOCK_ROWS=2, BLOCK_PARAMS=16, PARAM_ROWS=4)
        blocks.append(-(-params // launch["BLOCK_PARAMS"]))
        return launch
    monkeypatch.setattr(kernels, "parameter_config", narrow)
    assert_matches_fp64_reference("triton", (3, 2, 6, 3, 37, 4, 3), dtype)
    assert blocks == [2]


def test_static_da_sums_rows_in_several_steps(monkeypatch):
    """ST-GC's dA: column sums over chunks x B = 3 rows in steps of 2 (a partial last step)."""
    kernels = importlib.import_module("bharnet.kernels.ctr_graph_conv")
    monkeypatch.setattr(kernels, "SUM_LAUNCH", dict(kernels.SUM_LAUNCH, BLOCK_ROWS=2))
    assert_matches_fp64_reference("triton", (3, 2, 4, 5, 9, 2, 2), torch.float64, dynamic=False)


@pytest.mark.parametrize("dynamic", [True, False], ids=["ctr_gc", "st_gc"])
def test_fp16_rows_split_with_a_partial_last_tile(dynamic, grad_chunks):
    """float16 (128-row tiles): 520 rows (1040 for ST-GC) end in a partial row tile and are
    split over chunks."""
    inputs = make_inputs(1, 2, 4, 260, 5, 2, 2, dynamic=dynamic)
    assert_within_low_precision_rule("triton", inputs, output_grad(inputs), [torch.float16] * len(inputs),
                                     "cpu")
    assert_split(grad_chunks[-1], rows=520 if dynamic else 1040, row_tile=128)


@pytest.mark.parametrize("dynamic", [True, False], ids=["ctr_gc", "st_gc"])
def test_fp16_low_precision_rule(dynamic):
    """fp16 ``tl.dot`` is correct in the interpreter (bf16 is not: bf16 runs on the GPU only)."""
    inputs = make_inputs(2, 3, 8, 7, 25, 3, 4, dynamic=dynamic)
    assert_within_low_precision_rule("triton", inputs, output_grad(inputs), [torch.float16] * len(inputs),
                                     "cpu")


@pytest.mark.parametrize("dynamic", [True, False], ids=["ctr_gc", "st_gc"])
@pytest.mark.parametrize("V", [25, 128])
def test_fp16_features_with_fp32_parameters(dynamic, V):
    """Mixed precision as in autocast training: v in fp16, topology inputs (A alone for ST-GC)
    in fp32; every gradient comes back in its input's dtype. V = 128 takes two 64-wide
    j-tiles."""
    inputs = make_inputs(2, 3, 8, 7, V, 3, 4, dynamic=dynamic) if V == 25 else make_inputs(1, 2, 4, 2, V, 2, 2, dynamic=dynamic)
    dtypes = [torch.float16] + [torch.float32] * (len(inputs) - 1)
    assert_within_low_precision_rule("triton", inputs, output_grad(inputs), dtypes, "cpu")


def test_non_contiguous_inputs():
    assert_close_to_reference("triton", *noncontiguous_inputs(), TOLERANCE[torch.float64])


@pytest.mark.parametrize("dynamic", [True, False], ids=["ctr_gc", "st_gc"])
def test_opcheck_forward_op(dynamic):
    inputs = small_inputs(dynamic)
    args = inputs if dynamic else inputs + [None] * 5
    torch.library.opcheck(torch.ops.bharnet.ctr_graph_conv.default, args)


def test_opcheck_backward_ops():
    inputs = [t.detach() for t in small_inputs()]
    dy = output_grad(inputs)
    torch.library.opcheck(torch.ops.bharnet.ctr_graph_conv_backward.default, [dy, *inputs])
    torch.library.opcheck(torch.ops.bharnet.ctr_graph_conv_static_backward.default, [dy, *inputs[:2]])


def test_torch_compile_fullgraph():
    """Under the interpreter the op is an opaque custom op (see ``_custom_op``); fullgraph
    compile with autograd traces it through its fake impl and runs the kernels."""
    assert_compiled_matches_eager("triton", make_inputs(1, 2, 4, 3, 5, 2, 4))


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
    """Without the interpreter the ops are ``triton_op``s: AOTAutograd sees the six kernel
    launches (topology + aggregation forward; topology, dv/dAref, refinement and parameter
    gradients backward), and torch's analysis of the kernels finds that they write only their
    outputs and the op's own scratch buffers (the refinement kernel stores the chunk sums of
    dAref back into its buffer), so compiled graphs never copy the op's inputs."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", TRACE_TRITON_OPS], env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    launches = json.loads(result.stdout.strip().splitlines()[-1])
    assert launches == [["topo_ptr"], ["y_ptr"], ["topo_ptr"], ["dtopo_ptr", "dv_ptr"],
                        ["da_part_ptr", "dk_part_ptr", "dq_ptr", "dtopo_ptr", "p_part_ptr", "s_part_ptr"],
                        ["da_ptr", "dalpha_ptr", "db_ptr", "dk_ptr", "dw_ptr"]]


@pytest.mark.parametrize("dynamic", [True, False], ids=["ctr", "static"])
@pytest.mark.parametrize("empty", ["B", "C", "T"])
def test_empty_inputs_give_zero_gradients(empty, dynamic):
    """B, C or T of 0: an empty output, and the backward (whose launch grids would be empty)
    gives zeros, as the reference does."""
    sizes = dict(B=2, C=4, T=3)
    sizes[empty] = 0
    inputs = make_inputs(sizes["B"], 2, sizes["C"], sizes["T"], 5, 2, 2 if sizes["C"] else 1, dynamic=dynamic)
    inputs = [t.float().requires_grad_() if t is not None else None for t in inputs]
    y = triton_backend(*inputs)
    assert y.shape == (sizes["B"], sizes["C"], sizes["T"], 5)
    y.sum().backward()
    for t in inputs:
        if t is not None:
            assert t.grad is not None and t.grad.shape == t.shape and not t.grad.any()


def test_too_many_joints_is_a_value_error():
    inputs = make_inputs(1, 1, 4, 2, 129, 2, 2)
    with pytest.raises(ValueError, match="V=129"):
        triton_backend(*inputs)


def test_integer_features_are_a_type_error():
    inputs = make_inputs(1, 1, 4, 2, 5, 2, 2)
    inputs[0] = inputs[0].to(torch.int32)
    with pytest.raises(TypeError, match="v"):
        triton_backend(*inputs)


def test_bfloat16_features_on_cpu_are_a_type_error():
    """The Triton interpreter's bf16 tl.dot is wrong: refused rather than computed wrongly."""
    inputs = make_inputs(1, 1, 4, 2, 5, 2, 2)
    inputs[0] = inputs[0].to(torch.bfloat16)
    with pytest.raises(TypeError, match="cannot run bfloat16 on CPU"):
        triton_backend(*inputs)


def test_alpha_as_a_number_is_a_type_error():
    inputs = make_inputs(1, 1, 4, 2, 5, 2, 2)
    inputs[6] = 0.5
    with pytest.raises(TypeError, match="alpha must be a torch.Tensor, got float"):
        backend_fn("reference")(*inputs)


def test_the_reference_takes_refinement_parameters_of_another_dtype_as_the_kernels_do():
    """float64 W4 next to float32 features (the reference raised torch's 'expected scalar type')."""
    inputs = [t.float() for t in make_inputs(2, 3, 4, 5, 6, 2, 2)]
    mixed = list(inputs)
    mixed[4] = inputs[4].double()
    expected = backend_fn("reference")(*inputs)
    for backend in ("reference", "cpp"):
        torch.testing.assert_close(backend_fn(backend)(*mixed), expected, msg=backend)


def test_float8_topology_is_a_type_error():
    inputs = make_inputs(1, 1, 4, 2, 5, 2, 2)
    inputs[1] = inputs[1].to(torch.float8_e4m3fn)
    with pytest.raises(TypeError, match="A in float16, bfloat16, float32 or float64"):
        triton_backend(*inputs)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=str)
def test_gpu_low_precision_rule(shape, dtype):
    inputs = make_inputs(*shape)
    assert_within_low_precision_rule("triton", inputs, output_grad(inputs), [dtype] * len(inputs), GPU)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_gpu_static_low_precision_rule(dtype):
    inputs = make_inputs(*GPU_SHAPES[0], dynamic=False)
    assert_within_low_precision_rule("triton", inputs, output_grad(inputs), [dtype] * len(inputs), GPU)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("shape", GPU_SHAPES[:2], ids=str)
def test_gpu_exact_precision_matches_fp64_reference(shape, dtype):
    """fp32 on the GPU must not use TF32 (which would fail the 1e-5 tolerance)."""
    assert_matches_fp64_reference("triton", shape, dtype, GPU)


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
    assert_compiled_matches_eager("triton", cast(make_inputs(2, 3, 8, 7, 25, 3, 4), torch.float32, GPU))
