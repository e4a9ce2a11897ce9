"""The ``cpp`` backend of ``bharnet.ops.ctr_graph_conv`` (C++ CPU kernels here, CUDA kernels in
the GPU tests) against the float64 reference: the output and every gradient (v, A, q, k,
weight, bias, alpha), as relative errors ``||x - ref|| / ||ref||``.

Tolerances: float64 kernels vs the float64 reference 1e-12 (both exact up to summation order;
measured ~1e-15). float32 kernels 1e-5: products and sums in float32 (the long scalar sums
behind dW, dbias and dalpha in double), so a few unit roundoffs (6e-8) grown by the square
root of the summed terms (<= ~1e4 here), measured <= 1e-6; the float32 tanh is a vectorised
exp-based one with absolute error ~1e-7. The CUDA kernels: the same for float32/float64, and
DESIGN.md section 6's rule for float16/bfloat16.
"""
import pytest
import torch

import bharnet
from bharnet.nn import CTRGraphConv, STGraphConv
from bharnet.nn.temporal import DeformableTemporalConv
from bharnet.ops import ctr_graph_conv, ctr_graph_conv_reference

NAMES = ("y", "v", "A", "q", "k", "weight", "bias", "alpha")
TOLERANCE = {torch.float64: 1e-12, torch.float32: 1e-5}
GPU = "cuda"


def make_inputs(B, H, C, T, V, R, G, seed=0, dynamic=True):
    """Random float64 inputs (v, A, q, k, weight, bias, alpha) with O(1) terms, alpha != 0."""
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


def cpp_backend(*args):
    return ctr_graph_conv(*args, backend="cpp")


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
    got = forward_backward(cpp_backend, inputs, dy)
    ref = forward_backward(ctr_graph_conv_reference, [t.double().cpu() for t in inputs], dy.double().cpu())
    for name, x, r, like in zip(NAMES, got, ref, [inputs[0], *inputs]):
        assert x.dtype == like.dtype and x.shape == r.shape and x.device == like.device, name
        assert torch.isfinite(x).all(), name
        err = rel_err(x.cpu(), r)
        assert err <= tolerance, f"{name}: relative error {err:.2e} > {tolerance:.0e}"


# (B, H, C, T, V, R, G): the Triton tests' odd shapes (V = 25, 5, 21, 42, 128; a per-channel
# topology G = C), the unified graph's V = 67 with R = 4, and rows that are not a multiple of
# the micro-kernel's 4 (C/G * T = 3 * 5 = 15).
SHAPES = [
    (2, 3, 8, 7, 25, 3, 4),
    (2, 3, 12, 3, 5, 2, 4),
    (1, 3, 12, 13, 21, 3, 2),
    (1, 2, 8, 3, 42, 2, 8),
    (1, 2, 4, 2, 128, 2, 2),
    (2, 3, 16, 5, 67, 4, 4),
    (3, 1, 12, 5, 25, 1, 4),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_ctr_gc_matches_fp64_reference(shape, dtype):
    inputs = make_inputs(*shape)
    assert_close_to_reference(cast(inputs, dtype), output_grad(inputs), TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("shape", [SHAPES[0], SHAPES[2], SHAPES[5]], ids=str)
def test_static_st_gc_matches_fp64_reference(shape, dtype):
    inputs = make_inputs(*shape, dynamic=False)
    assert_close_to_reference(cast(inputs, dtype), output_grad(inputs), TOLERANCE[dtype])


def test_parameters_in_other_dtypes_get_gradients_in_their_dtypes():
    """float32 features with float64 topology inputs (computed in float32) and float16 features
    on CPU (computed in float32, the output rounded to float16)."""
    inputs = make_inputs(2, 3, 8, 7, 25, 3, 4)
    dy = output_grad(inputs)
    ref = forward_backward(ctr_graph_conv_reference, inputs, dy)
    got = forward_backward(cpp_backend, [inputs[0].float(), *inputs[1:]], dy)
    assert [t.dtype for t in got] == [torch.float32] * 2 + [torch.float64] * 6
    for name, x, r in zip(NAMES, got, ref):
        assert rel_err(x, r) <= 1e-5, name
    half = forward_backward(cpp_backend, [inputs[0].half(), *cast(inputs[1:], torch.float32)], dy)
    assert [t.dtype for t in half] == [torch.float16] * 2 + [torch.float32] * 6
    assert rel_err(half[0], ref[0]) <= 2 ** -10


def test_non_contiguous_inputs():
    dense = make_inputs(2, 3, 8, 7, 25, 3, 4)
    v = dense[0].transpose(2, 3).contiguous().transpose(2, 3)
    A = dense[1].transpose(1, 2).contiguous().transpose(1, 2)
    q = torch.stack([dense[2], dense[2]], dim=-1)[..., 0]
    k = dense[3].transpose(2, 3).contiguous().transpose(2, 3)
    weight = dense[4].transpose(0, 2).contiguous().transpose(0, 2)
    bias = dense[5].t().contiguous().t()
    inputs = [v, A, q, k, weight, bias, dense[6].reshape(())]
    assert not any(t.is_contiguous() for t in inputs[:-1])
    dy = output_grad(dense).transpose(1, 2).contiguous().transpose(1, 2)
    assert_close_to_reference(inputs, dy, TOLERANCE[torch.float64])


def test_results_do_not_depend_on_the_thread_count():
    """Every output element is computed by one task in a fixed order: bitwise identical."""
    inputs = cast(make_inputs(3, 3, 16, 9, 25, 4, 4), torch.float32)
    dy = output_grad(inputs).float()
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = forward_backward(cpp_backend, inputs, dy)
        torch.set_num_threads(max(2, threads))
        many = forward_backward(cpp_backend, inputs, dy)
    finally:
        torch.set_num_threads(threads)
    for name, a, b in zip(NAMES, one, many):
        assert torch.equal(a, b), name


def small_inputs(dynamic=True):
    return [t.requires_grad_() for t in make_inputs(1, 2, 4, 3, 5, 2, 4, dynamic=dynamic)]


@pytest.mark.parametrize("dynamic", [True, False], ids=["ctr_gc", "st_gc"])
def test_opcheck_forward_op(dynamic):
    cpp_backend(*small_inputs(dynamic))  # registers the fake impls and autograd on first use
    inputs = small_inputs(dynamic)
    args = inputs if dynamic else inputs + [None] * 5
    torch.library.opcheck(torch.ops.bharnet.ctr_graph_conv_cpp.default, args)


def test_opcheck_backward_ops():
    inputs = [t.detach() for t in small_inputs()]
    cpp_backend(*inputs)
    dy = output_grad(inputs)
    torch.library.opcheck(torch.ops.bharnet.ctr_graph_conv_cpp_backward.default, [dy, *inputs])
    torch.library.opcheck(torch.ops.bharnet.ctr_graph_conv_cpp_static_backward.default, [dy, *inputs[:2]])


def test_mismatched_parameter_dtype_is_a_clear_error():
    inputs = cast(make_inputs(1, 2, 4, 3, 5, 2, 4), torch.float32)
    cpp_backend(*inputs)
    inputs[4] = inputs[4].double()
    with pytest.raises(RuntimeError, match="weight must be Float"):
        torch.ops.bharnet.ctr_graph_conv_cpp(*inputs)


def loss_after_graph_conv(v, A, q, k, weight, bias, alpha):
    return torch.sin(ctr_graph_conv(v, A, q, k, weight, bias, alpha, backend="cpp")).sum()


def test_torch_compile_fullgraph():
    """The custom op traces through its fake impl: no graph break, same values and gradients."""
    inputs = make_inputs(1, 2, 4, 3, 5, 2, 4)
    torch._dynamo.reset()
    compiled = torch.compile(loss_after_graph_conv, fullgraph=True)
    one = torch.tensor(1.0, dtype=torch.float64)
    expected = forward_backward(loss_after_graph_conv, inputs, one)
    got = forward_backward(compiled, inputs, one)
    for name, x, r in zip(("loss",) + NAMES[1:], got, expected):
        torch.testing.assert_close(x, r, msg=lambda m: f"{name}: {m}")


def test_whole_model_matches_reference_backend():
    """BHaRNet-E (small preset, float64, train mode): every ctr_graph_conv and
    deformable_temporal_conv of the model on the C++ kernels gives the reference's logits and
    parameter gradients."""
    torch.manual_seed(0)
    model = bharnet.create_model("bharnet-e", 5, preset="small").double()
    for module in model.modules():
        if isinstance(module, CTRGraphConv):  # alpha starts at 0, which would hide the refinement
            module.alpha.data.fill_(0.5)
    gen = torch.Generator().manual_seed(0)
    body = torch.randn(2, 3, 12, 25, 2, generator=gen, dtype=torch.float64)
    hand = torch.randn(2, 3, 12, 42, 2, generator=gen, dtype=torch.float64)
    target = torch.tensor([1, 3])
    results = {}
    for backend in ("reference", "cpp"):
        for module in model.modules():
            if isinstance(module, (STGraphConv, CTRGraphConv, DeformableTemporalConv)):
                module.impl = backend
        model.zero_grad()
        out = model(body, hand)
        model.loss(out, target).backward()
        results[backend] = [out.logits.detach()] + [p.grad.clone() for p in model.parameters()]
    names = ["logits"] + [name for name, _ in model.named_parameters()]
    for name, got, ref in zip(names, results["cpp"], results["reference"]):
        torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-12, msg=lambda m: f"{name}: {m}")


# --- CUDA kernels (run by bench/gpu_check.sh) ---------------------------------------------------
GPU_SHAPES = [
    (8, 3, 64, 64, 25, 8, 4),
    (8, 3, 256, 16, 42, 32, 4),
    (8, 3, 64, 16, 67, 8, 4),
    (2, 3, 32, 8, 128, 4, 4),
    (2, 3, 12, 13, 21, 3, 12),
]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=str)
def test_gpu_matches_fp64_reference(shape, dtype):
    inputs = make_inputs(*shape)
    assert_close_to_reference(cast(inputs, dtype, GPU), output_grad(inputs).to(GPU), TOLERANCE[dtype])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_gpu_static_matches_fp64_reference(dtype):
    inputs = make_inputs(*GPU_SHAPES[0], dynamic=False)
    assert_close_to_reference(cast(inputs, dtype, GPU), output_grad(inputs).to(GPU), TOLERANCE[dtype])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", GPU_SHAPES[:3], ids=str)
def test_gpu_low_precision_rule(shape, dtype):
    """DESIGN.md section 6 with 16-bit features and float32 topology inputs (autocast-like):
    the kernel's error is at most 2x (3x for gradients) the reference's own in that precision,
    or one unit roundoff of the result's dtype."""
    inputs = make_inputs(*shape)
    rounded = [inputs[0].to(GPU, dtype)] + cast(inputs[1:], torch.float32, GPU)
    dy = output_grad(inputs).to(GPU, dtype)
    ref = forward_backward(ctr_graph_conv_reference, [t.double() for t in rounded], dy.double())
    ref_low = forward_backward(ctr_graph_conv_reference, rounded, dy)
    got = forward_backward(cpp_backend, rounded, dy)
    for name, x, r_low, r in zip(NAMES, got, ref_low, ref):
        roundoff = {torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8}.get(x.dtype, 2.0 ** -24)
        bound = max((2.0 if name == "y" else 3.0) * rel_err(r_low, r), roundoff)
        assert rel_err(x, r) <= bound, f"{name}: {rel_err(x, r):.2e} > {bound:.2e}"


@pytest.mark.gpu
def test_gpu_opcheck():
    inputs = [t.to(GPU).requires_grad_() for t in make_inputs(2, 3, 8, 7, 25, 3, 4)]
    cpp_backend(*inputs)
    torch.library.opcheck(torch.ops.bharnet.ctr_graph_conv_cpp.default, inputs)
    dy = output_grad(inputs).to(GPU)
    detached = [t.detach() for t in inputs]
    torch.library.opcheck(torch.ops.bharnet.ctr_graph_conv_cpp_backward.default, [dy, *detached])
    torch.library.opcheck(torch.ops.bharnet.ctr_graph_conv_cpp_static_backward.default, [dy, *detached[:2]])
