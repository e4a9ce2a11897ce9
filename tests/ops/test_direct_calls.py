"""Plain eager calls of the Triton ops skip the dispatcher (``_custom_op.with_autograd``): they
must give exactly what the custom op gives through the dispatcher, forward and backward, and
anything that traces (fake tensors, torch.compile) must still get the custom op."""
import contextlib

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from bharnet.bench.op_cases import attention_case, ctr_case, detgc_case
from bharnet.ops import cross_attention
from cross_attention_cases import make_inputs, random_mask
from op_testing import run
from bharnet.ops import _custom_op
from bharnet.ops.layer_norm import layer_norm

# ctr_graph_conv's CTR-GC and ST-GC cases, DeTGC with stride 2, cross-attention (with its two
# fused LayerNorms), and LayerNorm alone.
CASES = {  # small shapes: the Triton interpreter runs them
    "ctr_graph_conv": ctr_case(2, 8, 4, 25),
    "ctr_graph_conv static": None,
    "deformable_temporal_conv": detgc_case(2, 4, 8, 5),
    "cross_attention": attention_case(4, 5, 7, 16, 2),
    "layer_norm": None,
}


def make_call(name, device="cpu"):
    """(fn, args, leaves) for one fwd+bwd of the op through its Triton backend."""
    device = torch.device(device)
    if name == "layer_norm":
        x = torch.randn(3, 7, 24, device=device, requires_grad=True)
        weight = torch.randn(24, device=device, requires_grad=True)
        bias = torch.randn(24, device=device, requires_grad=True)
        return layer_norm, (x, weight, bias), (x, weight, bias)
    if name == "ctr_graph_conv static":
        inputs = CASES["ctr_graph_conv"].make(device, torch.float32)
        v, A = inputs.args[:2]
        return CASES["ctr_graph_conv"].function("triton"), (v, A), (v, A)
    case = CASES[name]
    inputs = case.make(device, torch.float32)
    if name == "deformable_temporal_conv":
        x, offsets, weight, bias, _ = inputs.args
        return case.function("triton"), (x, offsets, weight, bias, 2), inputs.grads
    return case.function("triton"), inputs.args, inputs.grads


def fwd_bwd(fn, args, leaves):
    y = fn(*args)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(0)).to(y.device)
    return y, [y.detach(), *torch.autograd.grad(y, leaves, dy)]


def autograd_node_names(y):
    """Names of the autograd nodes behind y (breadth first)."""
    seen, frontier = set(), [y.grad_fn]
    while frontier:
        node = frontier.pop()
        if node is not None and node not in seen:
            seen.add(node)
            frontier.extend(next_node for next_node, _ in node.next_functions)
    return {node.name() for node in seen}


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("name", list(CASES))
def test_direct_calls_match_the_dispatcher_path_exactly(name, device, monkeypatch):
    """On CUDA the dispatcher path is the triton_op (wrap_triton switched off inside it), the
    direct path the same body under the same switch."""
    fn, args, leaves = make_call(name, device)
    y_direct, direct = fwd_bwd(fn, args, leaves)
    monkeypatch.setattr(_custom_op, "DIRECT_EAGER_CALLS", False)
    y_op, through_op = fwd_bwd(fn, args, leaves)
    direct_nodes, op_nodes = autograd_node_names(y_direct), autograd_node_names(y_op)
    assert any("direct" in n.lower() for n in direct_nodes), direct_nodes
    assert not any("direct" in n.lower() for n in op_nodes), op_nodes
    assert len(direct) == len(through_op)
    for got, expected in zip(direct, through_op):
        assert got.dtype == expected.dtype and got.shape == expected.shape
        assert torch.equal(got, expected)


@pytest.mark.parametrize("name", ["ctr_graph_conv", "deformable_temporal_conv", "layer_norm"])
def test_fake_tensors_go_through_the_custom_op(name):
    """Under a FakeTensorMode the kernels must not run: the op's fake impl answers."""
    fn, args, _ = make_call(name)
    with FakeTensorMode() as mode:
        fake_args = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
        y = fn(*fake_args)
    real = fn(*args)
    assert type(y).__name__ == "FakeTensor" and y.shape == real.shape and y.dtype == real.dtype


def _attention_variant(variant):
    """cross_attention inputs (fp32, CPU) for one of the layer's code paths."""
    mask = random_mask(3, 42) if variant == "masked" else None
    inputs = make_inputs(3, 25, 42, 24, 3, mask=mask)
    if variant == "no_pre_norm":
        inputs[10:] = [None] * 4
    if variant == "no_biases_or_affine":
        for index in (4, 6, 8, 10, 11, 12, 13):
            inputs[index] = None
    return inputs


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "fp16_autocast"])
@pytest.mark.parametrize("variant", ["masked", "no_pre_norm", "no_biases_or_affine"])
def test_direct_attention_layer_matches_the_node_path(variant, autocast, monkeypatch):
    """The whole-layer autograd node against the node-by-node layer: pre_norm off, LayerNorm
    without affine and projections without biases, a mask with a fully masked row; fp32 and
    float16 autocast (fp32 tensors, as in the models)."""
    inputs = _attention_variant(variant)
    pre_norm = variant != "no_pre_norm"
    context = torch.autocast("cpu", dtype=torch.float16) if autocast else contextlib.nullcontext()

    def fn(*args):
        with context:
            return cross_attention(*args, pre_norm=pre_norm, backend="triton")

    direct = run(fn, inputs)
    monkeypatch.setattr(_custom_op, "DIRECT_EAGER_CALLS", False)
    through_ops = run(fn, inputs)
    for got, expected in zip(direct, through_ops):
        assert got.dtype == expected.dtype and torch.equal(got, expected)


def test_direct_attention_layer_refuses_what_linear_refuses():
    """Projection weights in another dtype than x (no autocast): an error on every path (the
    op's input check, which names the weight), not a silent cast."""
    inputs = make_inputs(2, 5, 7, 16, 2)
    inputs[3] = inputs[3].double()
    with pytest.raises(TypeError, match="q_weight is torch.float64, x_q torch.float32"):
        cross_attention(*inputs, backend="triton")


def test_jit_trace_records_the_custom_op():
    """torch.jit.trace passes sizes as tensors: the direct path must step aside for the op."""
    x = torch.randn(2, 5, 16)
    traced = torch.jit.trace(lambda t: layer_norm(t), (x,))
    assert "bharnet::layer_norm" in str(traced.graph)
    torch.testing.assert_close(traced(x), layer_norm(x))


def _loss(y, kind):
    """A loss quadratic in y, or linear (then the incoming gradients do not require grad:
    torch's once_differentiable let a gradient penalty through such a loss pass silently)."""
    if kind == "square":
        return y.square().sum()
    return (y * torch.linspace(-1, 1, y.numel(), device=y.device).reshape(y.shape)).sum()


def _assert_double_backward_refused(fn, args, leaves, loss, op):
    """Under create_graph the first-order gradients are the usual ones; differentiating them
    again raises an error that names the op and the way out, by .backward() and by
    torch.autograd.grad (which runs only the nodes on paths to the leaves: the refusing node
    was off them, so the leaves looked unused, and allow_unused=True gave None)."""
    expected = torch.autograd.grad(_loss(fn(*args), loss), leaves)
    got = torch.autograd.grad(_loss(fn(*args), loss), leaves, create_graph=True)
    for g, e in zip(got, expected):  # sums may run in another order (a GPU; the C++ projections' GEMMs)
        assert (g - e).norm() <= 1e-5 * e.norm()
    refused = rf"bharnet::{op}: double backward is not supported .*backend='reference'"
    penalty = sum(g.square().sum() for g in got)
    with pytest.raises(RuntimeError, match=refused):
        torch.autograd.grad(penalty, leaves, allow_unused=True, retain_graph=True)
    with pytest.raises(RuntimeError, match=refused):
        penalty.backward()


@pytest.mark.parametrize("loss", ["square", "linear"])
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("direct", [True, False], ids=["direct", "dispatcher"])
@pytest.mark.parametrize("name", list(CASES))
def test_double_backward_is_refused_with_the_ops_name(name, direct, device, loss, monkeypatch):
    """The Triton ops, on both paths (through the dispatcher the cross-attention is several
    ops: its LayerNorm's backward may be reached first)."""
    monkeypatch.setattr(_custom_op, "DIRECT_EAGER_CALLS", direct)
    fn, args, leaves = make_call(name, device)
    op = {"ctr_graph_conv static": "ctr_graph_conv", "cross_attention": "(cross_attention|cross_attention_core|layer_norm)"}.get(name, name)
    _assert_double_backward_refused(fn, args, leaves, loss, op)


def test_first_order_gradients_under_create_graph_in_a_checkpointed_region():
    """Non-reentrant checkpointing refuses a second unpack of a saved tensor: the direct path's
    refusal unpacks them once, with the backward (it raised CheckpointError at the first-order
    gradients)."""
    from torch.utils.checkpoint import checkpoint

    fn, args, leaves = make_call("ctr_graph_conv static")
    v, A = args
    expected = torch.autograd.grad(fn(v, A).square().sum(), leaves)
    y = checkpoint(lambda t: fn(t, A), v, use_reentrant=False)
    got = torch.autograd.grad(y.square().sum(), leaves, create_graph=True)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e)
    with pytest.raises(RuntimeError, match="bharnet::ctr_graph_conv: double backward is not supported"):
        sum(g.square().sum() for g in got).backward()


@pytest.mark.parametrize("loss", ["square", "linear"])
@pytest.mark.parametrize("name", ["ctr_graph_conv", "deformable_temporal_conv", "cross_attention"])
def test_double_backward_through_the_cpp_ops_is_refused(name, loss):
    """The C++ ops (autograd in csrc/autograd.cpp, or registered in Python with a backward op
    that refuses: before, DeTGC's and the cross-attention's double backward only warned that
    no autograd kernel was registered, and gave wrong gradients)."""
    case = CASES[name]
    inputs = case.make(torch.device("cpu"), torch.float32)
    op = {"cross_attention": "(cross_attention_core_cpp|cross_attention)"}.get(name, f"{name}_cpp")
    _assert_double_backward_refused(case.function("cpp"), inputs.args, inputs.grads, loss, op)
