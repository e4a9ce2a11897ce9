"""Inputs and comparisons shared by the tests of ``bharnet.ops.cross_attention``'s Triton backend
(``test_cross_attention.py``) and its C++ backend (``test_cross_attention_cpp.py``); each test
file's docstring gives its tolerances.
"""
import torch

from bharnet.ops import cross_attention_reference
from op_testing import as_float64, assert_close, assert_low_precision_rule, run
from op_testing import rel_or_abs_err as err

ARGS = ("x_q", "x_kv", "heads", "q_weight", "q_bias", "kv_weight", "kv_bias", "out_weight",
        "out_bias", "key_mask", "norm_q_weight", "norm_q_bias", "norm_kv_weight", "norm_kv_bias")
NAMES = ("y", "dx_q", "dx_kv", "dq_weight", "dq_bias", "dkv_weight", "dkv_bias", "dout_weight",
         "dout_bias", "dnorm_q_weight", "dnorm_q_bias", "dnorm_kv_weight", "dnorm_kv_bias")


def names_for(inputs):
    """"y" and "d<arg>" for every floating-point tensor argument, in the order run() returns."""
    return ["y"] + ["d" + name for name, t in zip(ARGS, inputs)
                    if isinstance(t, torch.Tensor) and t.is_floating_point()]


def make_inputs(N, Lq, Lk, D, heads, dtype=torch.float32, mask=None, seed=0):
    """Positional arguments of ``cross_attention``: random values, weights scaled like nn.Linear's,
    LayerNorm affine parameters away from their (1, 0) initialisation."""
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0, shift=0.0):
        return (shift + scale * torch.randn(*shape, generator=gen)).to(dtype)

    w = D ** -0.5
    return [rand(N, Lq, D), rand(N, Lk, D), heads, rand(D, D, scale=w), rand(D, scale=0.1),
            rand(2 * D, D, scale=w), rand(2 * D, scale=0.1), rand(D, D, scale=w), rand(D, scale=0.1),
            mask, rand(D, scale=0.2, shift=1.0), rand(D, scale=0.2), rand(D, scale=0.2, shift=1.0),
            rand(D, scale=0.2)]


def random_mask(N, Lk, seed=0, fully_masked=(0,)):
    """Random key mask with some keys masked in every row and the rows in ``fully_masked`` all False."""
    mask = torch.rand(N, Lk, generator=torch.Generator().manual_seed(seed)) > 0.4
    mask[:, 0] = True
    for n in fully_masked:
        mask[n] = False
    return mask


def assert_matches(got, expected, tol, names=NAMES):
    """Each result in its input's dtype (or against a float64 reference) and within ``tol``."""
    for name, g, r in zip(names, got, expected):
        assert g.dtype == r.dtype or r.dtype == torch.float64, name
    assert_close(got, expected, tol, names, err=err)


def noncontiguous_layer_inputs():
    """``make_inputs(3, 5, 7, 24, 2)`` with a key mask, where x_q, x_kv, the three projection
    weights and the mask have non-contiguous storage (transposed copies, a strided mask)."""
    inputs = make_inputs(3, 5, 7, 24, 2, mask=random_mask(3, 7))
    nc = list(inputs)
    nc[0] = inputs[0].transpose(0, 1).contiguous().transpose(0, 1)
    nc[1] = inputs[1].transpose(1, 2).contiguous().transpose(1, 2)
    for i in (3, 5, 7):
        nc[i] = inputs[i].t().contiguous().t()
    wide_mask = torch.zeros(3, 14, dtype=torch.bool)
    wide_mask[:, ::2] = inputs[9]
    nc[9] = wide_mask[:, ::2]
    assert not any(t.is_contiguous() for t in (nc[0], nc[1], nc[3], nc[5], nc[7], nc[9]))
    return inputs, nc


def core_inputs(N=2, Lq=5, Lk=7, D=16, dtype=torch.float64, masked=True, seed=3, requires_grad=False):
    """q (N, Lq, D), kv (N, Lk, 2D) and a key mask whose last row is fully masked (or None)."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(N, Lq, D, generator=gen).to(dtype).requires_grad_(requires_grad)
    kv = torch.randn(N, Lk, 2 * D, generator=gen).to(dtype).requires_grad_(requires_grad)
    mask = random_mask(N, Lk, fully_masked=(N - 1,)) if masked else None
    return q, kv, mask


def assert_core_reads_strided_views(attend):
    """``attend(q, kv, mask) -> o`` gives bitwise the same o and gradients for q and kv passed
    as views whose row strides are not their widths (q: the first half of wider rows; kv: rows
    from 7 rows into a taller buffer)."""
    q, kv, mask = core_inputs(dtype=torch.float32)
    D = q.shape[-1]
    q_view = torch.cat([q, torch.randn_like(q)], dim=-1)[..., :D]
    kv_view = torch.cat([torch.randn_like(kv), kv], dim=1)[:, 7:]
    assert q_view.stride(1) == 2 * D and kv_view.storage_offset() == 7 * 2 * D
    for a, b in zip(run(attend, (q, kv, mask)), run(attend, (q_view, kv_view, mask))):
        assert torch.equal(a, b)


def assert_matches_without_affine_and_biases(fn, tolerance):
    """LayerNorm without affine parameters and projections without biases (all None)."""
    inputs = make_inputs(3, 5, 7, 16, 2, mask=random_mask(3, 7))
    for i in (4, 6, 8, 10, 11, 12, 13):
        inputs[i] = None
    expected = run(cross_attention_reference, as_float64(inputs))
    got = run(fn, inputs)
    assert len(got) == 6  # y and the five tensors left: x_q, x_kv and the three weights
    assert_matches(got, expected, tolerance, names_for(inputs))


def assert_low_precision_layer(fn, dtype):
    """The whole layer in ``dtype``: results in ``dtype``, within DESIGN.md section 6's rule."""
    inputs = make_inputs(3, 25, 42, 24, 2, dtype=dtype, mask=random_mask(3, 42))
    expected = run(cross_attention_reference, as_float64(inputs))
    same_precision = run(cross_attention_reference, inputs)
    got = run(fn, inputs)
    assert all(g.dtype == dtype for g in got)
    assert_low_precision_rule(got, same_precision, expected, NAMES, err=err)


def assert_fully_masked_rows_pass_the_residual(fn):
    """Sequences 0 and 2 without a valid key: y = x_q + out_bias there, their keys get no
    gradient; sequence 1's masked keys get none, its valid keys some; all finite."""
    mask = random_mask(3, 42, fully_masked=(0, 2))
    inputs = make_inputs(3, 25, 42, 24, 2, mask=mask)
    x_q, out_bias = inputs[0], inputs[8]
    y, dx_q, dx_kv, dq_weight = run(fn, inputs)[:4]
    torch.testing.assert_close(y[0], x_q[0] + out_bias, rtol=0, atol=1e-6)
    torch.testing.assert_close(y[2], x_q[2] + out_bias, rtol=0, atol=1e-6)
    assert (dx_kv[0] == 0).all() and (dx_kv[2] == 0).all()  # masked keys get no gradient
    assert (dx_kv[1][~mask[1]] == 0).all() and (dx_kv[1][mask[1]] != 0).any()
    assert torch.isfinite(dx_q).all() and torch.isfinite(dq_weight).all()


def assert_every_key_masked_everywhere(fn, tol):
    """No key anywhere: matches the float64 reference within ``tol``, and the attention output
    and the q/kv-side gradients are exactly zero."""
    mask = torch.zeros(3, 7, dtype=torch.bool)
    inputs = make_inputs(3, 5, 7, 16, 2, mask=mask)
    expected = run(cross_attention_reference, as_float64(inputs))
    got = run(fn, inputs)
    assert_matches(got, expected, tol)
    for name, g in zip(NAMES, got):
        if name in ("dx_kv", "dq_weight", "dq_bias", "dkv_weight", "dkv_bias"):
            assert (g == 0).all(), name
