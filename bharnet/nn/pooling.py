"""Global pooling and the Pooling-Attention Module (PAM, *reconstruction*)."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .attention import TokenCrossAttention


def global_pool(x: torch.Tensor) -> torch.Tensor:
    """Mean over time and joints: (B, C, T, V) → (B, C)."""
    return x.mean(dim=(2, 3))


def valid_mean(x: torch.Tensor, valid: torch.Tensor, dim) -> torch.Tensor:
    """Mean of (B, C, T, V) ``x`` over ``dim`` (2, 3 or both) at the positions where ``valid``
    (B, T, V) is True; zero where there are none. Values at the other positions do not enter
    (not even an inf); the division is in at least float32 (a 16-bit count would round)."""
    valid = valid[:, None]
    total = torch.where(valid, x, torch.zeros((), dtype=x.dtype, device=x.device)).sum(dim=dim)
    count = valid.sum(dim=dim).clamp(min=1)
    return (total.to(torch.promote_types(x.dtype, torch.float32)) / count).to(total.dtype)


class PoolingAttention(nn.Module):
    """PAM: pools one modality's features with attention to the other modality.

    For ``x`` (B, C, T, V) and the other modality ``other`` (B, C, T, V'):

    * time path: tokens ``mean_V x`` (B, T, C) cross-attend ``mean_V other``; mean over T;
    * joint path: tokens ``mean_T x`` (B, V, C) cross-attend ``mean_T other`` (B, V', C); mean over V;
    * channel path: ``sigmoid(W₂ act(W₁ mean_{T,V} other)) ⊙ mean_{T,V} x``.

    ``other_valid`` (B, T, V') bool, optional: where ``other``'s nodes hold real observations
    (detected hands). Each path then reads ``other`` at its valid positions only: the time
    path's tokens are means over the valid nodes of each step and it attends only the steps
    with one; the joint path's are means over the valid steps of each node and it attends only
    the nodes valid at some step; the channel path's gate reads the mean over the valid
    positions (zero where there are none).

    The three (B, C) vectors are summed. The paper describes the module only in outline; this
    is our reconstruction and is configurable through ``heads``. Both attentions run
    ``bharnet.ops.cross_attention`` with backend ``impl`` (see :class:`TokenCrossAttention`).
    """

    def __init__(self, dim: int, heads: int = 8, reduction: int = 4, impl: Optional[str] = None):
        super().__init__()
        self.time_attention = TokenCrossAttention(dim, heads, impl=impl)
        self.joint_attention = TokenCrossAttention(dim, heads, impl=impl)
        hidden = max(1, dim // reduction)
        self.gate = nn.Sequential(nn.Linear(dim, hidden), nn.LeakyReLU(0.1),
                                  nn.Linear(hidden, dim), nn.Sigmoid())

    def forward(self, x: torch.Tensor, other: torch.Tensor, other_valid: Optional[torch.Tensor] = None) -> torch.Tensor:
        if x.dim() != 4 or other.dim() != 4 or x.shape[:3] != other.shape[:3]:
            raise ValueError(f"x and other must be (B, C, T, V) with equal B, C, T, "
                             f"got {tuple(x.shape)} and {tuple(other.shape)}")
        if other_valid is None:
            other_steps, other_joints, other_pooled = other.mean(3), other.mean(2), global_pool(other)
            time_mask = joint_mask = None
        else:
            B, _, T, V = other.shape
            if tuple(other_valid.shape) != (B, T, V):
                raise ValueError(f"other_valid must have shape (B, T, V') = {(B, T, V)}, "
                                 f"got {tuple(other_valid.shape)}")
            other_steps, other_joints = valid_mean(other, other_valid, 3), valid_mean(other, other_valid, 2)
            other_pooled = valid_mean(other, other_valid, (2, 3))
            time_mask, joint_mask = other_valid.any(2), other_valid.any(1)
        time_tokens = self.time_attention(x.mean(3).transpose(1, 2), other_steps.transpose(1, 2), time_mask)
        joint_tokens = self.joint_attention(x.mean(2).transpose(1, 2), other_joints.transpose(1, 2), joint_mask)
        channel = self.gate(other_pooled) * global_pool(x)
        return time_tokens.mean(1) + joint_tokens.mean(1) + channel
