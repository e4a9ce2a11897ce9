"""Inputs and comparisons shared by the tests of ``bharnet.ops.ctr_graph_conv``'s Triton backend
(``test_ctr_graph_conv.py``) and its C++/CUDA backend (``test_ctr_graph_conv_cpp.py``).

Tolerances (each test file's docstring says why): float64 kernels vs the float64 reference
1e-12, float32 kernels 1e-5; float16/bfloat16 follow DESIGN.md section 6, with one unit
roundoff of the result's dtype as the smallest bound (it matters only for the scalar dalpha,
whose low-precision reference error can be small by chance).
"""
import torch

from bharnet.ops import ctr_graph_conv, ctr_graph_conv_reference
from op_testing import assert_close, assert_low_precision_rule, cast, forward_backward

NAMES = ("y", "v", "A", "q", "k", "weight", "bias", "alpha")
TOLERANCE = {torch.float64: 1e-12, torch.float32: 1e-5}
UNIT_ROUNDOFF = {torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8}
GPU = "cuda"

# (B, H, C, T, V, R, G): NTU-like V; tiny V; two row tiles of the Triton kernels (C/G * T = 78
# > 64) with V = 21; per-channel topology (G = C) with two column tiles (V = 42); the largest V
# the Triton backend takes.
SHAPES = [
    (2, 3, 8, 7, 25, 3, 4),
    (2, 3, 12, 3, 5, 2, 4),
    (1, 3, 12, 13, 21, 3, 2),
    (1, 2, 8, 3, 42, 2, 8),
    (1, 2, 4, 2, 128, 2, 2),
]
# GPU: the shapes of DESIGN.md section 5 (H = 3, G = 4, R = C / 8) and the largest V.
GPU_SHAPES = [
    (8, 3, 64, 64, 25, 8, 4),
    (8, 3, 256, 16, 42, 32, 4),
    (8, 3, 64, 16, 67, 8, 4),
    (2, 3, 32, 8, 128, 4, 4),
]


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


def small_inputs(dynamic=True):
    """Inputs of a tiny layer that require grad (for opcheck)."""
    return [t.requires_grad_() for t in make_inputs(1, 2, 4, 3, 5, 2, 4, dynamic=dynamic)]


def output_grad(inputs, seed=1):
    B, H, C, T, V = inputs[0].shape
    return torch.randn(B, C, T, V, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def noncontiguous_inputs():
    """The float64 inputs of SHAPES[0] with every tensor but alpha in non-contiguous storage (q
    with a stride-2 last dimension, the others transposed), alpha a 0-dim tensor; and dy."""
    dense = make_inputs(*SHAPES[0])
    v = dense[0].transpose(2, 3).contiguous().transpose(2, 3)
    A = dense[1].transpose(1, 2).contiguous().transpose(1, 2)
    q = torch.stack([dense[2], dense[2]], dim=-1)[..., 0]
    k = dense[3].transpose(2, 3).contiguous().transpose(2, 3)
    weight = dense[4].transpose(0, 2).contiguous().transpose(0, 2)
    bias = dense[5].t().contiguous().t()
    inputs = [v, A, q, k, weight, bias, dense[6].reshape(())]
    assert not any(t.is_contiguous() for t in inputs[:-1])
    dy = output_grad(dense).transpose(1, 2).contiguous().transpose(1, 2)
    return inputs, dy


def backend_fn(backend):
    return lambda *args: ctr_graph_conv(*args, backend=backend)


def assert_close_to_reference(backend, inputs, dy, tolerance):
    """The backend on ``inputs`` (any device) vs the float64 CPU reference on the same values:
    output and gradients, each in its input's dtype and on its input's device."""
    got = forward_backward(backend_fn(backend), inputs, dy)
    ref = forward_backward(ctr_graph_conv_reference, cast(inputs, torch.float64), dy.double().cpu())
    for name, x, r, like in zip(NAMES, got, ref, [inputs[0], *inputs]):
        assert x.dtype == like.dtype and x.shape == r.shape and x.device == like.device, name
    assert_close(got, ref, tolerance, NAMES)


def assert_matches_fp64_reference(backend, shape, dtype, device="cpu", dynamic=True):
    """``make_inputs(*shape)`` rounded to ``dtype`` on ``device``: ``assert_close_to_reference``
    with the tolerance of ``dtype``."""
    inputs = make_inputs(*shape, dynamic=dynamic)
    dy = output_grad(inputs).to(device)
    assert_close_to_reference(backend, cast(inputs, dtype, device), dy, TOLERANCE[dtype])


def assert_within_low_precision_rule(backend, inputs64, dy64, dtypes, device, floor=UNIT_ROUNDOFF):
    """DESIGN.md section 6 with each input rounded to its entry of ``dtypes`` (v's is the op's);
    every result comes back in its input's dtype."""
    rounded = [t.to(device=device, dtype=d) for t, d in zip(inputs64, dtypes)]
    dy = dy64.to(device=device, dtype=dtypes[0])
    ref = forward_backward(ctr_graph_conv_reference, [t.double() for t in rounded], dy.double())
    ref_low = forward_backward(ctr_graph_conv_reference, rounded, dy)
    got = forward_backward(backend_fn(backend), rounded, dy)
    for name, x, expected_dtype in zip(NAMES, got, [dtypes[0], *dtypes]):
        assert x.dtype == expected_dtype, f"{name}: dtype {x.dtype}, expected {expected_dtype}"
    assert_low_precision_rule(got, ref_low, ref, NAMES, rounding=False, floor=floor)


def loss_after_graph_conv(backend):
    def loss(v, A, q, k, weight, bias, alpha):
        return torch.sin(ctr_graph_conv(v, A, q, k, weight, bias, alpha, backend=backend)).sum()
    return loss


def assert_compiled_matches_eager(backend, inputs):
    """``torch.compile(fullgraph=True)`` of a loss after the op: same loss and gradients."""
    loss = loss_after_graph_conv(backend)
    torch._dynamo.reset()
    compiled = torch.compile(loss, fullgraph=True)
    one = torch.tensor(1.0, dtype=inputs[0].dtype)
    expected = forward_backward(loss, inputs, one)
    got = forward_backward(compiled, inputs, one)
    for name, x, r in zip(("loss",) + NAMES[1:], got, expected):
        torch.testing.assert_close(x, r, msg=lambda m: f"{name}: {m}")
