r"""Bone features: the vector from each joint's parent to the joint.

Math, along dimension ``dim`` of ``x`` (the joint axis V)::

    y[..., v, ...] = x[..., v, ...] − x[..., parents[v], ...]

A root is its own parent, so its bone is zero. Backward:
``dx = dy − index_add(dim, parents, dy)`` (each joint also receives −dy of its children).
"""
from __future__ import annotations

import operator

from typing import Optional

import torch

from .._ext import cpp_availability, registered_after_loading
from ._backend import register_backend, resolve
from ._checks import is_int

OP_NAME = "bone"


def bone_reference(x: torch.Tensor, parents: torch.Tensor, dim: int) -> torch.Tensor:
    """Pure-PyTorch ground truth."""
    return x - x.index_select(dim, parents)


def _register_cpp_op_now() -> None:
    """Fake (meta) kernel and autograd of ``bharnet::bone`` (run once, after loading)."""
    @torch.library.register_fake("bharnet::bone")
    def _(x, parents, dim):
        return torch.empty_like(x)

    def setup_context(ctx, inputs, output):
        _, parents, dim = inputs
        ctx.save_for_backward(parents)
        ctx.dim = dim

    def backward(ctx, grad):
        (parents,) = ctx.saved_tensors
        return grad - torch.zeros_like(grad).index_add(ctx.dim, parents, grad), None, None

    torch.library.register_autograd("bharnet::bone", backward, setup_context=setup_context)


_register_cpp_op = registered_after_loading(_register_cpp_op_now)


def _bone_cpp(x, parents, dim):
    """The C++ op; on CPU, whose kernel takes float32/float64, 16-bit x in float32 (cast back)."""
    _register_cpp_op()
    if x.device.type == "cpu" and x.dtype not in (torch.float32, torch.float64):
        return torch.ops.bharnet.bone(x.float(), parents, dim).to(x.dtype)
    return torch.ops.bharnet.bone(x, parents, dim)


_IMPLS = {"reference": bone_reference, "cpp": _bone_cpp}
# Only when named: on the CPU the op is a gather and a subtraction, and the C++ op's dispatch costs
# more than it saves (``bharnet bench``, fwd+bwd of (1, 3, T, V, 2) clips: 0.84-0.91x of the
# reference on a 2-core AMD EPYC, T = 16; 0.74-0.82x on a 2-core Intel Xeon, T = 64); not yet
# timed on a GPU.
register_backend(OP_NAME, "cpp", cpp_availability, in_auto=False)


def bone(x: torch.Tensor, parents, dim: int = -2, *, backend: Optional[str] = None) -> torch.Tensor:
    """Bone vectors of ``x`` along the joint dimension ``dim`` (default -2, the V of
    (C, T, V, M) and (N, C, T, V, M)); ``parents`` is a sequence or int64 tensor of length V."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"bone: x must be a floating-point tensor, got {getattr(x, 'dtype', type(x).__name__)}")
    if x.dim() == 0:
        raise ValueError("bone: x must have at least one dimension")
    if not is_int(dim):
        raise TypeError(f"bone: dim must be an int, got {dim!r}")
    if not -x.dim() <= operator.index(dim) < x.dim():
        raise ValueError(f"bone: dim must be an int in [{-x.dim()}, {x.dim()}) for x of shape {tuple(x.shape)}, "
                         f"got {dim!r}")
    dim = operator.index(dim) % x.dim()
    given = torch.as_tensor(parents, device=x.device)  # no dtype: 1.5 and True must not become indices
    if given.numel() and (given.dtype == torch.bool or given.is_floating_point() or given.is_complex()):
        raise TypeError(f"bone: parents must be integer joint indices, got {given.dtype}")
    parents = given.long()
    if parents.dim() != 1 or parents.shape[0] != x.shape[dim]:
        raise ValueError(f"bone: parents must have shape ({x.shape[dim]},) for x of shape "
                         f"{tuple(x.shape)} along dim {dim}, got {tuple(parents.shape)}")
    # (a data-dependent check: skipped while torch.compile traces; the kernels check the range too)
    if parents.numel() and not torch.compiler.is_compiling() and (parents.min() < 0 or parents.max() >= x.shape[dim]):
        raise ValueError(f"bone: parents must lie in [0, {x.shape[dim]}), got {parents.tolist()}")
    return _IMPLS[resolve(OP_NAME, backend, x.device.type)](x, parents, dim)
