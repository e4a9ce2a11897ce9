"""The 1x1 convolution of the graph, temporal and residual layers."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..ops import pointwise_conv


class PointwiseConv2d(nn.Conv2d):
    """``nn.Conv2d(in_channels, out_channels, 1, stride=(stride, 1))`` computed by
    :func:`bharnet.ops.pointwise_conv` (``impl`` picks the backend: the C++ kernel on CPU).

    An ``nn.Conv2d`` with the same parameters, initialisation and state-dict keys (its
    constructor takes the temporal stride in place of the kernel size, which is 1): checkpoints
    load either way, and code that finds convolutions with ``isinstance`` (BN folding) handles
    it. Tools keyed on the exact type do not: ``torch.fx`` traces into it (nn's own layers are
    leaves), ``torch.jit.script`` and quantization's module fusion refuse it.
    """

    fused_op = "pointwise_conv"  # the op behind ``impl`` (see bharnet.fast.swap_layers)

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, bias: bool = True,
                 impl: Optional[str] = None, device=None, dtype=None):
        super().__init__(in_channels, out_channels, 1, stride=(stride, 1), bias=bias, device=device, dtype=dtype)
        self.impl = impl

    def _conv_forward(self, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        """``nn.Conv2d.forward`` calls this with the layer's parameters (and
        ``bharnet.nn.recompute`` with the tensors a forward used, to recompute its output)."""
        if x.dim() != 4 or x.device.type != "cpu":  # unbatched, or off the CPU: every backend is F.conv2d
            return super()._conv_forward(x, weight, bias)
        return pointwise_conv(x, weight, bias, self.stride[0], backend=self.impl)
