"""A DeGCN-style expert: input BatchNorm over (M, V, C) and a stack of GCN blocks."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..graphs import Graph
from ..nn import make_blocks
from .config import ModelConfig


class DataNorm(nn.Module):
    """``data_bn``: BatchNorm1d over M·V·C channels; (N, C, T, V, M) → (N·M, C, T, V)."""

    def __init__(self, in_channels: int, num_nodes: int, num_person: int):
        super().__init__()
        self.bn = nn.BatchNorm1d(num_person * num_nodes * in_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        N, C, T, V, M = x.shape
        x = self.bn(x.permute(0, 4, 3, 1, 2).reshape(N, M * V * C, T))
        return x.view(N, M, V, C, T).permute(0, 1, 3, 4, 2).reshape(N * M, C, T, V)


class PersonRows(nn.Module):
    """Per-person values (N, T, P, M) → rows (N·M, T, P), in the row order of ``DataNorm``'s
    output (row n·M + m is person m of clip n). A module, so that
    :mod:`bharnet.absent_persons` can keep the present persons' rows as it does ``DataNorm``'s."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.permute(0, 3, 1, 2).flatten(0, 1)


def pooled_validity(valid: torch.Tensor, frames: int) -> torch.Tensor:
    """(B, T, P) bool → (B, frames, P) bool: frame t′ of a feature map ``frames`` long is valid
    where any input frame of its window is (adaptive max pooling over time: windows of
    T / frames frames, T = 64 → 16 at the full preset's strides)."""
    if valid.shape[1] == frames:
        return valid
    pooled = F.adaptive_max_pool1d(valid.transpose(1, 2).to(torch.float32), frames)
    return pooled.transpose(1, 2) > 0


def check_input(x: torch.Tensor, name: str, config: ModelConfig, num_nodes: int) -> None:
    """Raise a clear error unless ``x`` is (N, in_channels, T, num_nodes, num_person) float."""
    expected = f"(N, {config.in_channels}, T, {num_nodes}, {config.num_person})"
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {expected}, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")
    if (x.dim() != 5 or x.shape[1] != config.in_channels or x.shape[3] != num_nodes
            or x.shape[4] != config.num_person):
        raise ValueError(f"{name} must have shape {expected}, got {tuple(x.shape)}")
    if x.shape[2] < 1:
        raise ValueError(f"{name} must have at least one frame (T >= 1), got shape {tuple(x.shape)}")


class Expert(nn.Module):
    """Backbone for one graph. ``blocks=(start, stop)`` builds a slice of the configured stack
    (used by BHaRNet-E's stem and branches); only a slice starting at 0 has ``data_bn``."""

    def __init__(self, graph: Graph, config: ModelConfig, blocks: Optional[Sequence[int]] = None):
        super().__init__()
        start, stop = blocks if blocks is not None else (0, len(config.channels))
        self.graph = graph
        self.config = config
        self.data_bn = DataNorm(config.in_channels, graph.num_nodes, config.num_person) if start == 0 else None
        in_channels = config.in_channels if start == 0 else config.channels[start - 1]
        self.blocks = make_blocks(config.channels[start:stop], config.strides[start:stop],
                                  graph.adjacency(), in_channels, groups=config.groups,
                                  first=start == 0, impl=config.impl)
        self.out_channels = config.channels[stop - 1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.data_bn is not None:
            x = self.data_bn(x)
        return self.blocks(x)
