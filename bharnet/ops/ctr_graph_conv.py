r"""Channel-wise topology refinement graph convolution (CTR-GC), with ST-GC as its static case.

Math (H adjacency subsets, G channel groups, R relation channels; channel ``c`` belongs to
group ``g(c) = c // (C / G)``; ``G = C`` is CTR-GCN's per-channel topology)::

    Aref[b, h, g, i, j] = alpha * (sum_r W[h, g, r] * tanh(q[b, h, r, i] - k[b, h, r, j]) + b[h, g])
                          + A[h, i, j]
    y[b, c, t, i]       = sum_h sum_j Aref[b, h, g(c), i, j] * v[b, h, c, t, j]

Row ``i`` of an adjacency is the output joint (the CTR-GCN einsum ``'ncuv,nctv->nctu'``).
Static mode (``q = k = weight = bias = alpha = None``) is ST-GC: ``y = sum_h A[h] · v[:, h]``.

Shapes: ``v`` (B, H, C, T, V); ``A`` (H, V, V); ``q``, ``k`` (B, H, R, V); ``weight`` (H, G, R);
``bias`` (H, G); ``alpha`` a one-element tensor. Output ``y`` (B, C, T, V).

Gradients (``dy = dL/dy``; ``dAref`` is the gradient of the refined topology;
``th_r = tanh(q[b, h, r, i] - k[b, h, r, j])``)::

    dv[b, h, c, t, j]    = sum_i Aref[b, h, g(c), i, j] * dy[b, c, t, i]
    dAref[b, h, g, i, j] = sum_{c in g} sum_t dy[b, c, t, i] * v[b, h, c, t, j]
    dA[h, i, j]          = sum_b sum_g dAref[b, h, g, i, j]
    dq[b, h, r, i]       =  alpha * sum_g W[h, g, r] sum_j dAref[b, h, g, i, j] * (1 - th_r^2)
    dk[b, h, r, j]       = -alpha * sum_g W[h, g, r] sum_i dAref[b, h, g, i, j] * (1 - th_r^2)
    dW[h, g, r]          =  alpha * sum_{b, i, j} dAref[b, h, g, i, j] * th_r
    dbias[h, g]          =  alpha * sum_{b, i, j} dAref[b, h, g, i, j]
    dalpha               =  sum_{b, h, g, i, j} dAref[b, h, g, i, j]
                                * (sum_r W[h, g, r] * th_r + bias[h, g])

Backends: ``reference`` (below), ``triton`` (``bharnet.kernels.ctr_graph_conv``) and ``cpp``
(``csrc/ctr_graph_conv.cpp`` on CPU, float32/float64/bfloat16, OpenMP + SIMD;
``csrc/ctr_graph_conv_kernels.cu`` on CUDA; custom ops ``bharnet::ctr_graph_conv_cpp*``, see
the cpp section below; on CPU its forward also reads a ``v`` that is the view of a
channels-last (B, H * C, T, V) convolution output in place and then returns a channels-last
``y``). The Triton
kernels evaluate the refined topologies once per call (forward, and again in the backward)
into a (B, H, G, V, V) buffer in v's dtype that the GEMM kernels read; nothing is saved for
the backward but the inputs, and the backward's intermediates besides that buffer are the
topology gradient dAref ((chunks, B, H, G, V, V) partial sums in the accumulation dtype) and
small partial sums for dA, dk, dW and dbias. Limits: V <= 128;
float16/bfloat16/float32/float64 inputs, fp32 accumulation (fp64 for fp64 ``v``); ``v``'s dtype
is the compute and output dtype, the other inputs may have their own (e.g. fp32 parameters
with fp16 features) and get gradients in it. The backend is the custom op
``torch.ops.bharnet.ctr_graph_conv`` (a ``torch.library.triton_op`` on the GPU, so that
``torch.compile`` sees its kernels; an opaque ``custom_op`` under the Triton interpreter) with
autograd through ``torch.ops.bharnet.ctr_graph_conv_backward`` (and
``ctr_graph_conv_static_backward`` for ST-GC); plain eager calls run the same functions without
the dispatcher (``_custom_op.with_autograd``). Double backward is not supported.
"""
from __future__ import annotations

import functools
from typing import Optional, Tuple

import torch
from torch import Tensor

from .._ext import cpp_backend_availability, registered_after_loading
from ._backend import register_backend, resolve, triton_availability
from ._checks import expect_tensor, expect_triton_dtype
from ._custom_op import (MAX_GRID_YZ, as_dtype, cdiv, cpu_kernel_dtype, launcher, new_output, saved_tensors,
                         triton_custom_op, with_autograd)

OP_NAME = "ctr_graph_conv"


def ctr_graph_conv_reference(v, A, q=None, k=None, weight=None, bias=None, alpha=None):
    """Pure-PyTorch ground truth (materialises the (B, H, G, V, V) topology, in the widest
    dtype of A, q, k, weight, bias and alpha, which may differ from v's as the kernels allow)."""
    B, H, C, T, V = v.shape
    if q is None:
        return torch.einsum("hij,bhctj->bcti", A.to(v.dtype), v)
    G = weight.shape[1]
    dtype = functools.reduce(torch.promote_types, [t.dtype for t in (A, q, k, weight, bias, alpha)])
    A, q, k, weight, bias, alpha = (t.to(dtype) for t in (A, q, k, weight, bias, alpha))
    rel = torch.tanh(q.unsqueeze(-1) - k.unsqueeze(-2))  # (B, H, R, V, V): [.., i, j]
    refine = torch.einsum("hgr,bhrij->bhgij", weight, rel) + bias[None, :, :, None, None]
    topo = alpha.reshape(()) * refine + A[None, :, None]  # (B, H, G, V, V)
    vg = v.reshape(B, H, G, C // G, T, V)
    return torch.einsum("bhgij,bhgctj->bgcti", topo.to(v.dtype), vg).reshape(B, C, T, V)


TRITON_MAX_JOINTS = 128  # one padded V x V topology tile per program (kernels.joint_block)


@functools.cache
def _kernels():
    """The Triton kernels, imported on first use (after TRITON_INTERPRET has been chosen)."""
    from bharnet.kernels import ctr_graph_conv as kernels
    return kernels


def _accumulates_in_fp64(v: Tensor) -> bool:
    return v.dtype == torch.float64


def _exact_dot(v: Tensor) -> bool:
    """fp32/fp64 inputs take exact ``tl.dot`` products (no TF32), to match fp64 closely."""
    return v.dtype in (torch.float32, torch.float64)


def _dot_flags(v: Tensor) -> dict:
    return dict(ACC_FP64=_accumulates_in_fp64(v), EXACT_DOT=_exact_dot(v))


def _contiguous(*tensors):
    return [None if t is None else t.contiguous() for t in tensors]


def _launch_sizes(v: Tensor, weight: Optional[Tensor]):
    """(B, H, C, T, V, G) with G = 1 (all channels share A[h]) in static mode."""
    B, H, C, T, V = v.shape
    G = 1 if weight is None else weight.shape[1]
    return B, H, C, T, V, G


def _topology(v, A, q, k, weight, bias, alpha) -> Tuple[Tensor, int]:
    """The topologies the GEMM kernels read, and their batch stride: the refined (B, H, G, V, V)
    buffer in v's dtype (one ``topology_kernel`` launch), or A itself in static mode."""
    if weight is None:
        return A, 0
    kernels = _kernels()
    B, H, C, T, V, G = _launch_sizes(v, weight)
    topo = new_output((B, H, G, V, V), v.dtype, v.device)
    launch = kernels.topology_config(V)
    launcher(kernels.topology_kernel)[(cdiv(V, launch["BLOCK_I"]), H * G, B)](
        A, q, k, weight, bias, alpha, topo, H, V, weight.shape[2], G,
        ACC_FP64=_accumulates_in_fp64(v), **launch)
    return topo, H * G * V * V


def _forward_fake(v, A, q, k, weight, bias, alpha):
    B, H, C, T, V = v.shape
    return v.new_empty((B, C, T, V))


def _static_backward_fake(dy, v, A):
    return v.new_empty(v.shape), A.new_empty(A.shape)


def _backward_fake(dy, v, A, q, k, weight, bias, alpha):
    return tuple(t.new_empty(t.shape) for t in (v, A, q, k, weight, bias, alpha))


@triton_custom_op("ctr_graph_conv", _forward_fake)
def _ctr_graph_conv_op(v: Tensor, A: Tensor, q: Optional[Tensor], k: Optional[Tensor],
                       weight: Optional[Tensor], bias: Optional[Tensor],
                       alpha: Optional[Tensor]) -> Tensor:
    """Fused forward: y = sum_h Aref[h] v[:, h] (module docstring), in two launches: the
    topologies (``topology_kernel``, skipped in static mode), then the aggregation.

    Grid (cdiv(C/G * T, BLOCK_M), G, B); each program owns a (BLOCK_M rows (c, t), V) tile of y."""
    kernels = _kernels()
    v, A, q, k, weight, bias, alpha = _contiguous(v, A, q, k, weight, bias, alpha)
    B, H, C, T, V, G = _launch_sizes(v, weight)
    topo, topo_stride = _topology(v, A, q, k, weight, bias, alpha)
    y = new_output((B, C, T, V), v.dtype, v.device)
    launch = kernels.forward_config(V, C // G * T, fma_dot=_exact_dot(v))
    grid = (cdiv(C // G * T, launch["BLOCK_M"]), G, B)
    launcher(kernels.ctr_graph_conv_fwd_kernel)[grid](
        v, topo, y, topo_stride, H, C, T, V, G, **_dot_flags(v), **launch)
    return y


def _topology_grad(dy, v, topo, topo_stride, G) -> Tuple[Tensor, Tensor]:
    """dv (like v) and dAref as (chunks, B, H, G, V, V) partial sums in the accumulation dtype.

    Grid (cdiv(V, BLOCK_J) * chunks, H * G, B): each program walks one chunk of a group's
    C/G * T rows and writes its partial dAref sum (the next kernel adds the chunks)."""
    kernels = _kernels()
    B, H, C, T, V = v.shape
    acc_dtype = torch.float64 if _accumulates_in_fp64(v) else torch.float32
    launch, j_tiles, chunks = kernels.grad_config(V, C // G * T, _exact_dot(v), H * G * B)
    dv = new_output(v.shape, v.dtype, v.device)
    dtopo = new_output((chunks, B, H, G, V, V), acc_dtype, v.device)
    launcher(kernels.topology_grad_kernel)[(j_tiles * chunks, H * G, B)](
        dy, v, topo, dv, dtopo, topo_stride, B, H, C, T, V, G, **_dot_flags(v), **launch)
    return dv, dtopo


@triton_custom_op("ctr_graph_conv_static_backward", _static_backward_fake)
def _static_backward_op(dy: Tensor, v: Tensor, A: Tensor) -> Tuple[Tensor, Tensor]:
    """ST-GC backward: dv[b, h] = A[h]^T applied to dy, dA[h] = sum_b sum_{c,t} dy^T v[:, h]
    (``topology_grad_kernel``, then ``column_sum_kernel`` sums the chunk x b partials)."""
    if v.numel() == 0:  # nothing to aggregate (B, C or T is 0): the launch grids would be empty
        return torch.zeros_like(v), torch.zeros_like(A)
    kernels = _kernels()
    dy, v, A = _contiguous(as_dtype(dy, v.dtype), v, A)
    dv, dtopo = _topology_grad(dy, v, A, 0, 1)
    dA = new_output(A.shape, A.dtype, A.device)
    launch = kernels.SUM_LAUNCH
    launcher(kernels.column_sum_kernel)[(cdiv(A.numel(), launch["BLOCK_COLS"]),)](
        dtopo, dA, dtopo.numel() // A.numel(), A.numel(), ACC_FP64=_accumulates_in_fp64(v), **launch)
    return dv, dA


@triton_custom_op("ctr_graph_conv_backward", _backward_fake)
def _backward_op(dy: Tensor, v: Tensor, A: Tensor, q: Tensor, k: Tensor, weight: Tensor,
                 bias: Tensor, alpha: Tensor
                 ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """CTR-GC backward: (dv, dA, dq, dk, dweight, dbias, dalpha), formulas in the module docstring.

    Four kernels: ``topology_kernel`` (the refined topologies again: recomputing them is
    cheaper than saving them), ``topology_grad_kernel`` (dv and dAref), ``refinement_grad_kernel``
    (dq, and per-i-tile partials of dk, P = sum_ij dAref * th_r, S = sum_ij dAref and the
    g-summed dAref; grid (cdiv(V, 32), H, B)) and ``parameter_grad_kernel`` (dA, dk, dW =
    alpha sum_b P, dbias = alpha sum_b S, dalpha = sum W * sum_b P + sum bias * sum_b S).
    Every gradient is written in its input's dtype."""
    if v.numel() == 0:  # nothing was aggregated (B, C or T is 0): every gradient is zero
        return tuple(torch.zeros_like(t) for t in (v, A, q, k, weight, bias, alpha))
    kernels = _kernels()
    dy, v, A, q, k, weight, bias, alpha = _contiguous(as_dtype(dy, v.dtype), v, A, q, k, weight, bias, alpha)
    B, H, C, T, V, G = _launch_sizes(v, weight)
    R = weight.shape[2]
    topo, topo_stride = _topology(v, A, q, k, weight, bias, alpha)
    dv, dtopo = _topology_grad(dy, v, topo, topo_stride, G)
    acc_dtype = dtopo.dtype
    launch = kernels.refinement_config(V)
    i_tiles = cdiv(V, launch["BLOCK_I"])
    dq = new_output(q.shape, q.dtype, q.device)
    dk_part = new_output((i_tiles, B, H, R, V), acc_dtype, v.device)
    p_part = new_output((i_tiles, B, H, G, R), acc_dtype, v.device)
    s_part = new_output((i_tiles, B, H, G), acc_dtype, v.device)
    da_part = new_output((B, H, V, V), acc_dtype, v.device)
    launcher(kernels.refinement_grad_kernel)[(i_tiles, H, B)](
        dtopo, q, k, weight, alpha, dq, dk_part, p_part, s_part, da_part, B, H, V, R, G,
        dtopo.shape[0], ACC_FP64=_accumulates_in_fp64(v), **launch)
    dA, dk, dweight, dbias = (new_output(t.shape, t.dtype, t.device) for t in (A, k, weight, bias))
    launch = kernels.parameter_config(H * G * R)
    da_programs = cdiv(A.numel(), launch["BLOCK_COLS"])
    dk_programs = cdiv(k.numel(), launch["BLOCK_COLS"])
    param_programs = cdiv(H * G * R, launch["BLOCK_PARAMS"])
    dalpha = new_output(alpha.shape, alpha.dtype, alpha.device)
    dalpha_part = dalpha if param_programs == 1 else new_output((param_programs,), acc_dtype, v.device)
    launcher(kernels.parameter_grad_kernel)[(da_programs + dk_programs + param_programs,)](
        da_part, dA, dk_part, dk, p_part, s_part, weight, bias, alpha, dweight, dbias, dalpha_part,
        B, A.numel(), k.numel(), i_tiles, H * G, R, da_programs, dk_programs,
        ACC_FP64=_accumulates_in_fp64(v), **launch)
    if param_programs > 1:
        dalpha = as_dtype(dalpha_part.sum().reshape(alpha.shape), alpha.dtype)
    return dv, dA, dq, dk, dweight, dbias, dalpha


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _make_backward(run):
    def backward(ctx, dy):
        """Recompute-everything backward: only the inputs are saved, never the topology."""
        v, A, q, k, weight, bias, alpha = saved_tensors(ctx)
        if weight is None:
            dv, dA = run(_static_backward_op, dy, v, A)
            return dv, dA, None, None, None, None, None
        return run(_backward_op, dy, v, A, q, k, weight, bias, alpha)
    return backward


_ctr_graph_conv_call = with_autograd(_ctr_graph_conv_op, _make_backward, _setup_context,
                                     (_static_backward_op, _backward_op))


def _triton_limit_exceeded(num_joints: int, batch: int) -> Optional[str]:
    """The Triton kernels' limit that ``num_joints`` joints or a batch of ``batch`` sequences
    exceeds (B is their third grid axis), or None."""
    if num_joints > TRITON_MAX_JOINTS:
        return f"V <= {TRITON_MAX_JOINTS} joints, got V={num_joints}"
    if batch > MAX_GRID_YZ:
        return f"B <= {MAX_GRID_YZ} sequences (a GPU grid axis), got B={batch}"
    return None


def backends_that_cannot_take(num_joints: int, batch: int) -> Tuple[str, ...]:
    """The backends whose kernels cannot take ``num_joints`` joints or a batch of ``batch``
    sequences (``auto`` passes over them)."""
    return ("triton",) if _triton_limit_exceeded(num_joints, batch) else ()


def _check_triton_inputs(v, *others):
    limit = _triton_limit_exceeded(v.shape[-1], v.shape[0])
    if limit is not None:
        raise ValueError(f"ctr_graph_conv: the triton backend supports {limit} (v of shape {tuple(v.shape)}); "
                         "backend 'auto' picks one that does")
    for name, t in zip(("v", "A", "q", "k", "weight", "bias", "alpha"), (v, *others)):
        if t is not None:
            expect_triton_dtype(OP_NAME, name, t)


def ctr_graph_conv_triton(v, A, q=None, k=None, weight=None, bias=None, alpha=None):
    """Triton backend (custom op ``bharnet::ctr_graph_conv`` with autograd)."""
    _check_triton_inputs(v, A, q, k, weight, bias, alpha)
    return _ctr_graph_conv_call(v, A, q, k, weight, bias, alpha)


# --- cpp backend ------------------------------------------------------------------------------
# The C++ (CPU, csrc/ctr_graph_conv.cpp) and CUDA (csrc/ctr_graph_conv_kernels.cu) kernels are
# the custom ops bharnet::ctr_graph_conv_cpp, ctr_graph_conv_cpp_backward and
# ctr_graph_conv_cpp_static_backward. Issue 7 asked for the same op names for every backend, but
# an op name has one schema and one kernel per dispatch key, and bharnet::ctr_graph_conv is
# the Triton op (defined from Python; on CPU it runs the Triton interpreter, which the Triton
# tests rely on), so the C++ kernels get names of their own in the same namespace.

def is_channels_last_v(v: Tensor) -> bool:
    """Whether ``v`` (B, H, C, T, V) is the view of a channels-last (B, H * C, T, V) tensor
    (memory (B, T, V, H, C)) and not also contiguous: the CPU kernel then reads it in place and
    returns a channels-last ``y`` (see ``bharnet.fast.fuse_for_inference``)."""
    return not v.is_contiguous() and v.permute(0, 3, 4, 1, 2).is_contiguous()


def _register_cpp_ops_now() -> None:
    """Fake impls of the C++ ops (run once, after the extension is loaded; their autograd is
    registered in C++, csrc/autograd.cpp)."""

    @torch.library.register_fake("bharnet::ctr_graph_conv_cpp")
    def _(v, A, q, k, weight, bias, alpha):
        y = _forward_fake(v, A, q, k, weight, bias, alpha)
        if v.device.type == "cpu" and is_channels_last_v(v):  # the CPU kernel keeps the layout
            return torch.empty(y.shape, dtype=y.dtype, device=y.device, memory_format=torch.channels_last)
        return y

    @torch.library.register_fake("bharnet::ctr_graph_conv_cpp_backward")
    def _(dy, v, A, q, k, weight, bias, alpha):
        return _backward_fake(dy, v, A, q, k, weight, bias, alpha)

    @torch.library.register_fake("bharnet::ctr_graph_conv_cpp_static_backward")
    def _(dy, v, A):
        return _static_backward_fake(dy, v, A)


_register_cpp_ops = registered_after_loading(_register_cpp_ops_now)


def ctr_graph_conv_cpp(v, A, q=None, k=None, weight=None, bias=None, alpha=None):
    """C++/CUDA backend (custom op ``bharnet::ctr_graph_conv_cpp`` with autograd).

    Kernels compute in v's dtype with the topology inputs in float32 (float64 for float64 v),
    like the Triton kernels' accumulation dtype: the inputs are cast to that (gradients flow
    back through the casts in each input's own dtype). On CPU, bfloat16 ``v`` is read as it is,
    forward and backward (the kernels widen it to float32 and round ``y`` and ``dv``; the
    parameters' gradients are float32); float16 ``v`` is computed in float32 and the output
    cast back (:func:`cpu_kernel_dtype`)."""
    _register_cpp_ops()
    ops = torch.ops.bharnet
    compute = v.dtype
    if v.device.type == "cpu":
        compute = cpu_kernel_dtype(compute)
    params = torch.float64 if compute == torch.float64 else torch.float32
    cast = [as_dtype(t, params) for t in (A, q, k, weight, bias, alpha)]
    return as_dtype(ops.ctr_graph_conv_cpp(as_dtype(v, compute), *cast), v.dtype)


_cpp_availability = cpp_backend_availability("ctr_graph_conv_cpp")


_IMPLS = {"reference": ctr_graph_conv_reference, "triton": ctr_graph_conv_triton,
          "cpp": ctr_graph_conv_cpp}
register_backend(OP_NAME, "triton", triton_availability)
register_backend(OP_NAME, "cpp", _cpp_availability)


def _expect(name, t, shape, ref):
    expect_tensor(OP_NAME, name, t, shape, ref, "v")


def validate(v, A, q, k, weight, bias, alpha):
    if not isinstance(v, torch.Tensor) or v.dim() != 5:
        got = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
        raise ValueError(f"ctr_graph_conv: v must have shape (B, H, C, T, V), got {got}")
    B, H, C, T, V = v.shape
    _expect("v", v, v.shape, v)
    _expect("A", A, (H, V, V), v)
    dynamic = [x is not None for x in (q, k, weight, bias, alpha)]
    if any(dynamic) and not all(dynamic):
        raise ValueError("ctr_graph_conv: q, k, weight, bias and alpha are given together (CTR-GC) "
                         "or all None (static ST-GC)")
    if not any(dynamic):
        return
    if q.dim() != 4:
        raise ValueError(f"ctr_graph_conv: q must have shape (B, H, R, V), got {tuple(q.shape)}")
    R = q.shape[2]
    _expect("q", q, (B, H, R, V), v)
    _expect("k", k, (B, H, R, V), v)
    if weight.dim() != 3:
        raise ValueError(f"ctr_graph_conv: weight must have shape (H, G, R), got {tuple(weight.shape)}")
    G = weight.shape[1]
    _expect("weight", weight, (H, G, R), v)
    if C % G != 0:
        raise ValueError(f"ctr_graph_conv: channels C={C} must be a multiple of the groups G={G}")
    _expect("bias", bias, (H, G), v)
    if isinstance(alpha, torch.Tensor) and alpha.numel() != 1:
        raise ValueError(f"ctr_graph_conv: alpha must have one element, got shape {tuple(alpha.shape)}")
    _expect("alpha", alpha, getattr(alpha, "shape", ()), v)


def ctr_graph_conv(v: torch.Tensor, A: torch.Tensor, q: Optional[torch.Tensor] = None,
                   k: Optional[torch.Tensor] = None, weight: Optional[torch.Tensor] = None,
                   bias: Optional[torch.Tensor] = None, alpha: Optional[torch.Tensor] = None,
                   *, backend: Optional[str] = None) -> torch.Tensor:
    """CTR-GC / ST-GC aggregation (see the module docstring for the math and shapes)."""
    validate(v, A, q, k, weight, bias, alpha)
    impl = _IMPLS[resolve(OP_NAME, backend, v.device.type, backends_that_cannot_take(v.shape[-1], v.shape[0]))]
    return impl(v, A, q, k, weight, bias, alpha)
