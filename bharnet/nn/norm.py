"""The BatchNorm of the graph, temporal and residual layers."""
from __future__ import annotations

from typing import Optional, Sequence

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


def can_stack(layers: Sequence[nn.Module]) -> bool:
    """Whether :func:`stacked_batch_norm` computes ``layers``: bharnet BatchNorm2d layers (not
    subclasses) with the same backend, eps, momentum (not None: the cumulative average would
    need each layer's batch count on the host), affine, mode and running statistics' rule."""
    first = layers[0]
    return all(type(bn) is BatchNorm2d for bn in layers) and first.momentum is not None and all(
        bn.impl == first.impl and bn.eps == first.eps and bn.momentum == first.momentum
        and bn.affine == first.affine and bn.training == first.training
        and bn.track_running_stats == first.track_running_stats
        and (bn.running_mean is None) == (first.running_mean is None)
        and (bn.num_batches_tracked is None) == (first.num_batches_tracked is None)
        for bn in layers)


def stacked_batch_norm(layers: Sequence[BatchNorm2d], x: torch.Tensor) -> torch.Tensor:
    """``torch.cat([bn(part) for bn, part in zip(layers, x.split(widths, 1))], 1)`` for
    ``layers`` that :func:`can_stack`, as one call of :func:`bharnet.ops.batch_norm` with their
    affine parameters and running statistics stacked: batch norm is per channel, so the values
    and gradients are the same; each layer's running statistics and batch count are updated as
    its own forward would."""
    first = layers[0]
    if first.training and first.track_running_stats and first.num_batches_tracked is not None:
        torch._foreach_add_([bn.num_batches_tracked for bn in layers], 1)
    batch_stats = first.training or first.running_mean is None
    tracked = first.running_mean is not None and (not first.training or first.track_running_stats)
    running_mean = torch.cat([bn.running_mean for bn in layers]) if tracked else None
    running_var = torch.cat([bn.running_var for bn in layers]) if tracked else None
    weight = torch.cat([bn.weight for bn in layers]) if first.affine else None
    bias = torch.cat([bn.bias for bn in layers]) if first.affine else None
    y = batch_norm(x, running_mean, running_var, weight, bias, batch_stats, first.momentum, first.eps,
                   backend=first.impl)
    if tracked and batch_stats:  # updated in the stacked copies: back to each layer's buffers
        widths = [bn.num_features for bn in layers]
        torch._foreach_copy_([bn.running_mean for bn in layers] + [bn.running_var for bn in layers],
                             list(running_mean.split(widths)) + list(running_var.split(widths)))
    return y
