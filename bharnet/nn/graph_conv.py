"""Spatial graph convolutions: ST-GC (static, learnable adjacency) and CTR-GC.

Both produce ``v = conv_v(x)`` of shape (B, H, C_out, T, V) with one 1x1 convolution for all H
subsets and aggregate it with :func:`bharnet.ops.ctr_graph_conv`, then batch-normalise. The
aggregation backend is ``impl`` (None = the global backend, see ``bharnet.ops.use_backend``).

Where the aggregation runs GPU kernels (``triton``; ``cpp`` on CUDA), autograd does not keep
``v`` for the backward: the fused op's only large saved input, H times the output's size and
about 30% of what a BHaRNet-E training step saves with the fused ops. It keeps ``x``
in its place, which ``conv_v`` saves anyway, and the backward recomputes ``v`` with one more 1x1
convolution (:func:`_aggregate`). DESIGN.md's full fusion, which would do that
convolution inside the kernels, would save the same memory. On the CPU the C++ backend keeps
``v``: there the convolution is a large share of a training step (recomputing it made a
BHaRNet-E step 16% slower on a 2-core EPYC, ``bench/recompute_v.py``), and memory is rarely
what limits the batch.
"""
from __future__ import annotations

import weakref
from typing import Callable, Optional, Tuple

import torch
from torch import nn
from torch.nn.modules import module as module_hooks
from torch.nn.utils import parametrize

from ..ops import ctr_graph_conv
from ..ops._backend import resolve
from ..ops.ctr_graph_conv import backends_that_cannot_take
from ..ops._checks import is_channels_last
from .conv import PointwiseConv2d
from .norm import BatchNorm2d


def _adjacency_parameter(A) -> nn.Parameter:
    A = torch.as_tensor(A, dtype=torch.float32)
    if A.dim() != 3 or A.shape[1] != A.shape[2]:
        raise ValueError(f"A must have shape (H, V, V), got {tuple(A.shape)}")
    return nn.Parameter(A.clone())


def _mean_over_time(x: torch.Tensor) -> torch.Tensor:
    """``x.mean(dim=2, keepdim=True)`` of (B, C, T, V) features, NCHW-contiguous (B, C, 1, V)."""
    if is_channels_last(x):  # reduce over the outer T of memory (B, T, V, C): PyTorch's
        return x.permute(0, 2, 3, 1).mean(dim=1).transpose(1, 2).contiguous().unsqueeze(2)  # dim=2 is ~8x slower
    return x.mean(dim=2, keepdim=True)


class _RecomputedProjection:
    """What autograd keeps in place of ``v = conv(x).view(shape)``: the convolution, its input
    (as the enclosing saved-tensor hooks packed it, if any), the weight and bias tensors the
    forward used with their versions (and x's, when kept as is), and the forward's autocast
    state. The backward convolves with those tensors (not the module's parameters of the
    moment: ``torch.func.functional_call`` swaps them back before the backward) and refuses,
    as autograd does, tensors modified in place since the forward (a backward that skips
    ``conv``'s own node, ``autograd.grad(loss, [A])``, would otherwise not notice)."""

    def __init__(self, conv: nn.Conv2d, x: torch.Tensor, packed_x, shape: Tuple[int, ...],
                 autocast: Tuple[bool, torch.dtype], unpack: Optional[Callable]):
        self.conv, self.packed_x, self.shape, self.autocast, self.unpack = conv, packed_x, shape, autocast, unpack
        self.weight, self.bias = conv.weight, conv.bias
        watched = [("weight", self.weight), ("bias", self.bias)] + ([("x", x)] if unpack is None else [])
        self.versions = [(name, t, t._version) for name, t in watched if t is not None]

    def recompute(self) -> torch.Tensor:
        for name, t, version in self.versions:
            if t._version != version:
                raise RuntimeError(
                    "one of the variables needed for gradient computation has been modified by an inplace "
                    f"operation: the graph convolution's conv_v {name} is at version {t._version}; expected "
                    f"version {version} instead (its output v is recomputed in the backward)")
        x = self.packed_x if self.unpack is None else self.unpack(self.packed_x)
        enabled, dtype = self.autocast
        with torch.no_grad(), torch.autocast(x.device.type, dtype=dtype, enabled=enabled):
            return self.conv._conv_forward(x, self.weight, self.bias).view(self.shape)


def _same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether ``a`` and ``b`` view the same memory as the same dtype, shape and strides (the
    tensor a pack hook receives need not be the Python object that was saved)."""
    return (a.data_ptr() == b.data_ptr() and a.dtype == b.dtype and a.device == b.device
            and a.shape == b.shape and a.stride() == b.stride())


def _can_recompute(v: torch.Tensor) -> bool:
    """Whether autograd will save ``v`` in plain eager mode, where saved-tensor hooks apply
    (``torch.compile`` decides what to keep by itself)."""
    return (v.requires_grad and torch.is_grad_enabled() and type(v) is torch.Tensor
            and not torch.compiler.is_compiling() and torch._C._get_tracing_state() is None
            and torch._C._autograd._saved_tensors_hooks_is_enabled())


def _recomputable(conv: nn.Module) -> bool:
    """Whether ``conv._conv_forward(x, weight, bias)`` in the backward gives the forward's
    ``v``: an ``nn.Conv2d`` or ``PointwiseConv2d`` computing its class's own forward, with no
    forward hooks (its own or global: they may change the output or keep state, as the old
    ``spectral_norm``'s power iteration does) and no parametrizations (a ``spectral_norm``
    parametrization iterates at each access in training mode)."""
    stock = (nn.Conv2d._conv_forward, PointwiseConv2d._conv_forward)
    return (isinstance(conv, nn.Conv2d) and type(conv).forward is nn.Conv2d.forward
            and type(conv)._conv_forward in stock and not {"forward", "_conv_forward"} & set(vars(conv))
            and not parametrize.is_parametrized(conv)
            and not (conv._forward_hooks or conv._forward_pre_hooks
                     or module_hooks._global_forward_hooks or module_hooks._global_forward_pre_hooks))


def _recomputes_v(backend: str, device_type: str) -> bool:
    """Whether the graph convolutions recompute ``v`` in the backward (module docstring): on
    the GPU kernels' backends (the Triton interpreter on the CPU included)."""
    return backend == "triton" or (backend == "cpp" and device_type != "cpu")


def _aggregate(conv: nn.Module, x: torch.Tensor, shape: Tuple[int, ...], backend: str,
               aggregate: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """``aggregate(v)`` for ``v = conv(x).view(shape)`` on ``backend``. Where the graph
    convolutions recompute ``v`` (:func:`_recomputes_v`), autograd keeps ``x`` in place of ``v``
    wherever ``aggregate`` saves ``v`` for its backward, and the backward recomputes ``v``.

    Saved-tensor hooks around ``aggregate`` swap ``v`` for a :class:`_RecomputedProjection`;
    every other saved tensor, and ``x`` inside the projection, goes to the enclosing hooks if
    there are any (``torch.autograd.graph.save_on_cpu``, non-reentrant checkpointing, memory
    probes), else is kept as is (``save_on_cpu`` then copies ``x`` a second time, besides
    ``conv``'s own copy: C_in against v's H·C_out channels). A ``v`` that ``aggregate`` casts
    or copies before saving is kept as the copy. A convolution that might not give the same
    ``v`` again (:func:`_recomputable`) keeps it."""
    v = conv(x).view(shape)
    if not (_recomputes_v(backend, x.device.type) and _can_recompute(v) and _recomputable(conv)):
        return aggregate(v)
    outer = torch._C._autograd._top_saved_tensors_default_hooks(False)
    outer_pack, outer_unpack = outer if outer is not None else (None, None)
    device = x.device.type
    autocast = (torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))

    # pack sees v through a weak reference: autograd keeps the hooks (and so their closures)
    # with every tensor they packed, and a strong one would keep v alive with the graph
    v_ref = weakref.ref(v)

    def pack(t: torch.Tensor):
        v = v_ref()
        if v is not None and _same_tensor(t, v):
            return _RecomputedProjection(conv, x, x if outer_pack is None else outer_pack(x), shape, autocast,
                                         outer_unpack)
        return t if outer_pack is None else outer_pack(t)

    def unpack(packed):
        if isinstance(packed, _RecomputedProjection):
            return packed.recompute()
        return packed if outer_unpack is None else outer_unpack(packed)

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        return aggregate(v)


class STGraphConv(nn.Module):
    r"""ST-GC: ``y[b,c,t,i] = sum_h sum_j A[h,i,j] · (W_h x)[b,c,t,j]``, then BN.

    ``A`` (H, V, V) is learnable, initialised from the graph's partitions.
    """

    fused_op = "ctr_graph_conv"  # the op behind ``impl`` (see bharnet.fast.swap_layers)

    def __init__(self, in_channels: int, out_channels: int, A, impl: Optional[str] = None):
        super().__init__()
        self.A = _adjacency_parameter(A)
        self.num_subsets = self.A.shape[0]
        self.out_channels = out_channels
        self.conv_v = PointwiseConv2d(in_channels, self.num_subsets * out_channels, impl=impl)
        self.bn = BatchNorm2d(out_channels, impl=impl)
        self.impl = impl

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, _, T, V = x.shape
        shape = (B, self.num_subsets, self.out_channels, T, V)
        backend = resolve(self.fused_op, self.impl, x.device.type, backends_that_cannot_take(V, B))
        return self.bn(_aggregate(self.conv_v, x, shape, backend, lambda v: ctr_graph_conv(v, self.A, backend=backend)))


class CTRGraphConv(nn.Module):
    r"""CTR-GC (channel-wise topology refinement), H subsets, G channel groups.

    ``q = mean_T(conv_q x)``, ``k = mean_T(conv_k x)`` of shape (B, H, R, V), ``v = conv_v x``;
    ``Aref[b,h,g,i,j] = alpha·(sum_r W[h,g,r]·tanh(q[b,h,r,i] − k[b,h,r,j]) + b[h,g]) + A[h,i,j]``;
    ``y[b,c,t,i] = sum_h sum_j Aref[b,h,g(c),i,j] · v[b,h,c,t,j]``, then BN.

    ``R = in_channels // rel_reduction`` (8 when ``in_channels`` is 3 or 9, as in CTR-GCN).
    On the ``reference`` backend ``q`` and ``k`` are computed in that order, as CTR-GCN does; on
    the others as ``conv_qk(mean_T x)``, the same value (``mean_t (W x_t + b) = W mean_t x_t + b``)
    and the same gradients for one frame's convolution instead of T.
    ``groups = out_channels`` gives CTR-GCN's per-channel topologies; the default of 4 groups
    follows the design (channels of a group share one refined topology).
    """

    fused_op = "ctr_graph_conv"

    def __init__(self, in_channels: int, out_channels: int, A, rel_reduction: int = 8,
                 groups: int = 4, impl: Optional[str] = None):
        super().__init__()
        if out_channels % groups != 0:
            raise ValueError(f"out_channels={out_channels} must be a multiple of groups={groups}")
        self.A = _adjacency_parameter(A)
        H = self.num_subsets = self.A.shape[0]
        R = self.rel_channels = 8 if in_channels in (3, 9) else max(1, in_channels // rel_reduction)
        self.out_channels = out_channels
        self.conv_qk = PointwiseConv2d(in_channels, 2 * H * R, impl=impl)
        self.conv_v = PointwiseConv2d(in_channels, H * out_channels, impl=impl)
        self.weight = nn.Parameter(torch.empty(H, groups, R))
        self.bias = nn.Parameter(torch.zeros(H, groups))
        self.alpha = nn.Parameter(torch.zeros(1))
        nn.init.kaiming_normal_(self.weight, mode="fan_out")
        self.bn = BatchNorm2d(out_channels, impl=impl)
        self.impl = impl

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, _, T, V = x.shape
        H, R = self.num_subsets, self.rel_channels
        backend = resolve(self.fused_op, self.impl, x.device.type, backends_that_cannot_take(V, B))
        if backend == "reference":
            qk = self.conv_qk(x).mean(dim=2)
        else:
            qk = self.conv_qk(_mean_over_time(x))
        q, k = qk.view(B, 2, H, R, V).unbind(1)
        shape = (B, H, self.out_channels, T, V)

        def aggregate(v):
            return ctr_graph_conv(v, self.A, q, k, self.weight, self.bias, self.alpha, backend=backend)
        return self.bn(_aggregate(self.conv_v, x, shape, backend, aggregate))
