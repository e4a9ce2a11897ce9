"""Body-hand cross-attention (*reconstruction*: the authors' code is unreleased).

Pre-LayerNorm multi-head attention with a residual connection::

    out = x_q + W_o · MHA(LN_q(x_q) W_q, LN_kv(x_kv) W_k, LN_kv(x_kv) W_v)

Token modes for (B, C, T, V) features: ``frame`` (one attention per (b, t): Lq = V_q joints
attend Lk = V_kv joints) and ``sequence`` (one per b: Lq = T·V_q, Lk = T·V_kv).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

TOKEN_MODES = ("frame", "sequence")


def masked_softmax_attention(q, k, v, key_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``softmax(q kᵀ / sqrt(d)) v`` over (N, heads, L, d) tensors.

    ``key_mask`` (N, Lk) is True for keys that may be attended. A query whose keys are all
    masked gets a zero output (so the residual passes its input through unchanged).
    """
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if key_mask is None:
        return scores.softmax(dim=-1) @ v
    allowed = key_mask[:, None, None, :]
    scores = scores.masked_fill(~allowed, float("-inf"))
    any_allowed = allowed.any(dim=-1, keepdim=True)
    weights = torch.where(any_allowed, scores, torch.zeros_like(scores)).softmax(dim=-1)
    return (weights * any_allowed) @ v


class TokenCrossAttention(nn.Module):
    """Pre-LN multi-head cross-attention with residual on token tensors (N, L, dim)."""

    def __init__(self, dim: int, heads: int = 8):
        super().__init__()
        if dim % heads != 0:
            raise ValueError(f"dim={dim} must be a multiple of heads={heads}")
        self.heads = heads
        self.norm_q = nn.LayerNorm(dim)
        self.norm_kv = nn.LayerNorm(dim)
        self.proj_q = nn.Linear(dim, dim)
        self.proj_kv = nn.Linear(dim, 2 * dim)
        self.proj_out = nn.Linear(dim, dim)

    def _split_heads(self, x):
        N, L, D = x.shape
        return x.view(N, L, self.heads, D // self.heads).transpose(1, 2)

    def forward(self, x_q: torch.Tensor, x_kv: torch.Tensor,
                key_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        if x_q.dim() != 3 or x_kv.dim() != 3 or x_q.shape[0] != x_kv.shape[0] or x_q.shape[2] != x_kv.shape[2]:
            raise ValueError(f"x_q (N, Lq, dim) and x_kv (N, Lk, dim) must agree in N and dim, "
                             f"got {tuple(x_q.shape)} and {tuple(x_kv.shape)}")
        if key_mask is not None and tuple(key_mask.shape) != tuple(x_kv.shape[:2]):
            raise ValueError(f"key_mask must have shape {tuple(x_kv.shape[:2])}, got {tuple(key_mask.shape)}")
        q = self._split_heads(self.proj_q(self.norm_q(x_q)))
        k, v = self.proj_kv(self.norm_kv(x_kv)).chunk(2, dim=-1)
        attended = masked_softmax_attention(q, self._split_heads(k), self._split_heads(v), key_mask)
        N, _, Lq, _ = attended.shape
        return x_q + self.proj_out(attended.transpose(1, 2).reshape(N, Lq, -1))


def to_tokens(x: torch.Tensor, mode: str) -> torch.Tensor:
    """(B, C, T, V) → (B·T, V, C) for ``frame``, (B, T·V, C) for ``sequence``."""
    B, C, T, V = x.shape
    tokens = x.permute(0, 2, 3, 1)  # (B, T, V, C)
    return tokens.reshape(B * T, V, C) if mode == "frame" else tokens.reshape(B, T * V, C)


def from_tokens(tokens: torch.Tensor, shape) -> torch.Tensor:
    """Inverse of :func:`to_tokens` for a (B, C, T, V) ``shape``."""
    B, C, T, V = shape
    return tokens.reshape(B, T, V, C).permute(0, 3, 1, 2).contiguous()


class CrossAttention(nn.Module):
    """Cross-attention between two (B, C, T, V) feature maps with the same B, C and T."""

    def __init__(self, dim: int, heads: int = 8, mode: str = "frame"):
        super().__init__()
        if mode not in TOKEN_MODES:
            raise ValueError(f"mode must be one of {TOKEN_MODES}, got {mode!r}")
        self.mode = mode
        self.attention = TokenCrossAttention(dim, heads)

    def forward(self, x_q: torch.Tensor, x_kv: torch.Tensor,
                key_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``key_mask`` (B, T, V_kv), True where the key joint is valid."""
        if x_q.dim() != 4 or x_kv.dim() != 4 or x_q.shape[:3] != x_kv.shape[:3]:
            raise ValueError(f"x_q and x_kv must be (B, C, T, V) with equal B, C, T, "
                             f"got {tuple(x_q.shape)} and {tuple(x_kv.shape)}")
        if key_mask is not None:
            B, _, T, V = x_kv.shape
            key_mask = key_mask.reshape(B * T, V) if self.mode == "frame" else key_mask.reshape(B, T * V)
        out = self.attention(to_tokens(x_q, self.mode), to_tokens(x_kv, self.mode), key_mask)
        return from_tokens(out, x_q.shape)
