"""The BatchNorm of the graph, temporal and residual layers."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..ops import batch_norm
from ..ops._backend import resolve_missing_as_auto


class BatchNorm2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` whose normalisation runs through :func:`bharnet.ops.batch_norm`
    (``impl`` picks the backend: on CPU the C++ kernel computes the training-mode statistics,
    on the GPU the Triton kernels where ``impl`` resolves to ``triton``; other GPU calls take
    ``nn.BatchNorm2d``'s own path).

    The same parameters, buffers, state-dict keys and running-statistics rule (``momentum``,
    or the cumulative average with ``momentum=None``; ``track_running_stats``): checkpoints load
    either way, and code that finds batch norms with ``isinstance`` (BN folding, SyncBatchNorm
    conversion) handles it. Tools keyed on the exact type do not: ``torch.fx`` traces into it
    (nn's own layers are leaves), ``torch.jit.script`` and quantization's module fusion refuse
    it; ``bharnet.fast.swap_layers(model, "reference")`` does not change that either.
    """

    fused_op = "batch_norm"  # the op behind ``impl`` (see bharnet.fast.swap_layers)

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1, affine: bool = True,
                 track_running_stats: bool = True, impl: Optional[str] = None, device=None, dtype=None):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype)
        self.impl = impl

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu" and resolve_missing_as_auto(self.fused_op, self.impl, x.device.type) != "triton":
            return super().forward(x)  # F.batch_norm either way: nn.BatchNorm2d's own path
        self._check_input_dim(x)
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        tracked = not self.training or self.track_running_stats
        return batch_norm(x, self.running_mean if tracked else None, self.running_var if tracked else None,
                          self.weight, self.bias, batch_stats, factor, self.eps, backend=self.impl)
