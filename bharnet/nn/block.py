"""The DeGCN-style backbone block and the stack of blocks."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

from .graph_conv import CTRGraphConv, STGraphConv
from .temporal import ConvBN, MultiScaleTemporalConv


class GCNBlock(nn.Module):
    """``y = act(GC(x) + R1(x)); out = act(MSTCN(y) + R2(x))`` with LeakyReLU(0.1).

    ``GC`` is ST-GC (``graph_conv="st"``) or CTR-GC (``"ctr"``). ``R1`` is the identity when
    the width is unchanged, else 1x1 conv + BN; ``R2`` is the same with the temporal stride, or
    zero when ``residual=False`` (the first block).

    ``act`` runs in place on the fresh sums, so that autograd keeps its outputs, which the next
    layers save anyway, instead of its inputs: for a BHaRNet-E training step 10% less saved on
    the reference backend, 15% less with the C++ kernels (measured on the CPU), with the same
    values and gradients. The MSTCN branches' activation runs in place too.
    """

    def __init__(self, in_channels: int, out_channels: int, A, stride: int = 1,
                 graph_conv: str = "ctr", residual: bool = True, groups: int = 4,
                 impl: Optional[str] = None):
        super().__init__()
        if graph_conv == "st":
            self.gcn = STGraphConv(in_channels, out_channels, A, impl=impl)
        elif graph_conv == "ctr":
            self.gcn = CTRGraphConv(in_channels, out_channels, A, groups=groups, impl=impl)
        else:
            raise ValueError(f"graph_conv must be 'st' or 'ctr', got {graph_conv!r}")
        self.tcn = MultiScaleTemporalConv(out_channels, out_channels, stride, impl=impl)
        self.res_gcn = nn.Identity() if in_channels == out_channels else ConvBN(in_channels, out_channels, impl=impl)
        if not residual:
            self.res_tcn = None
        elif in_channels == out_channels and stride == 1:
            self.res_tcn = nn.Identity()
        else:
            self.res_tcn = ConvBN(in_channels, out_channels, stride, impl=impl)
        self.act = nn.LeakyReLU(0.1, inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act(self.gcn(x) + self.res_gcn(x))
        out = self.tcn(y)
        if self.res_tcn is not None:
            out = out + self.res_tcn(x)
        return self.act(out)


def make_blocks(channels: Sequence[int], strides: Sequence[int], A, in_channels: int,
                groups: int = 4, first: bool = True, impl: Optional[str] = None) -> nn.Sequential:
    """Blocks with output widths ``channels`` and temporal ``strides``.

    With ``first=True`` the first block is the ST-GC input block without temporal residual;
    every other block is CTR-GC.
    """
    if len(channels) != len(strides):
        raise ValueError(f"channels ({len(channels)}) and strides ({len(strides)}) differ in length")
    blocks = []
    for index, (width, stride) in enumerate(zip(channels, strides)):
        is_input = first and index == 0
        blocks.append(GCNBlock(in_channels, width, A, stride,
                               graph_conv="st" if is_input else "ctr",
                               residual=not is_input, groups=groups, impl=impl))
        in_channels = width
    return nn.Sequential(*blocks)
