"""Spatial graph convolutions: ST-GC (static, learnable adjacency) and CTR-GC.

Both produce ``v = conv_v(x)`` of shape (B, H, C_out, T, V) with one 1x1 convolution for all H
subsets and aggregate it with :func:`bharnet.ops.ctr_graph_conv`, then batch-normalise. The
aggregation backend is ``impl`` (None = the global backend, see ``bharnet.ops.use_backend``).

Where the aggregation runs GPU kernels (``triton``; ``cpp`` on CUDA), autograd does not keep
``v`` for the backward (the fused op's only large saved input, H times the output's size): it
keeps ``x``, and the backward recomputes ``v`` (:mod:`bharnet.nn.recompute`).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..ops import ctr_graph_conv
from ..ops._backend import resolve
from ..ops.ctr_graph_conv import backends_that_cannot_take
from ..ops._checks import is_channels_last
from . import recompute
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

        def aggregate(v):
            return ctr_graph_conv(v, self.A, backend=backend)
        return self.bn(recompute.consume(self.conv_v, x, shape, backend, aggregate))


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
        return self.bn(recompute.consume(self.conv_v, x, shape, backend, aggregate))
