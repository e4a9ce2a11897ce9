"""Body-hand cross-attention (*reconstruction*: the authors' code is unreleased).

Pre-LayerNorm multi-head attention with a residual connection::

    out = x_q + W_o · MHA(LN_q(x_q) W_q, LN_kv(x_kv) W_k, LN_kv(x_kv) W_v)

Token modes for (B, C, T, V) features: ``frame`` (one attention per (b, t): Lq = V_q joints
attend Lk = V_kv joints) and ``sequence`` (one per b: Lq = T·V_q, Lk = T·V_kv).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..ops._checks import is_channels_last
from ..ops.cross_attention import cross_attention, masked_softmax_attention

__all__ = ["TOKEN_MODES", "masked_softmax_attention", "TokenCrossAttention", "CrossAttention",
           "to_tokens", "from_tokens"]

TOKEN_MODES = ("frame", "sequence")


class TokenCrossAttention(nn.Module):
    """Pre-LN multi-head cross-attention with residual on token tensors (N, L, dim).

    Runs ``bharnet.ops.cross_attention`` with backend ``impl`` (None = the global backend, see
    ``bharnet.ops.use_backend``); ``reference`` is the pure-PyTorch layer."""

    fused_op = "cross_attention"  # the op behind ``impl`` (see bharnet.fast.swap_layers)

    def __init__(self, dim: int, heads: int = 8, impl: Optional[str] = None):
        super().__init__()
        if dim % heads != 0:
            raise ValueError(f"dim={dim} must be a multiple of heads={heads}")
        self.heads = heads
        self.impl = impl
        self.norm_q = nn.LayerNorm(dim)
        self.norm_kv = nn.LayerNorm(dim)
        self.proj_q = nn.Linear(dim, dim)
        self.proj_kv = nn.Linear(dim, 2 * dim)
        self.proj_out = nn.Linear(dim, dim)

    def forward(self, x_q: torch.Tensor, x_kv: torch.Tensor,
                key_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``x_q`` (N, Lq, dim), ``x_kv`` (N, Lk, dim), ``key_mask`` (N, Lk) bool or None."""
        return cross_attention(
            x_q, x_kv, self.heads, self.proj_q.weight, self.proj_q.bias, self.proj_kv.weight,
            self.proj_kv.bias, self.proj_out.weight, self.proj_out.bias, key_mask,
            self.norm_q.weight, self.norm_q.bias, self.norm_kv.weight, self.norm_kv.bias,
            eps=self.norm_q.eps, backend=self.impl)


def to_tokens(x: torch.Tensor, mode: str) -> torch.Tensor:
    """(B, C, T, V) → (B·T, V, C) for ``frame``, (B, T·V, C) for ``sequence``."""
    B, C, T, V = x.shape
    tokens = x.permute(0, 2, 3, 1)  # (B, T, V, C)
    return tokens.reshape(B * T, V, C) if mode == "frame" else tokens.reshape(B, T * V, C)


def from_tokens(tokens: torch.Tensor, shape, channels_last: bool = False) -> torch.Tensor:
    """Inverse of :func:`to_tokens` for a (B, C, T, V) ``shape``: a contiguous tensor, or with
    ``channels_last`` a channels-last one (for contiguous tokens, a view of them)."""
    B, C, T, V = shape
    features = tokens.reshape(B, T, V, C).permute(0, 3, 1, 2)
    return features.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


class CrossAttention(nn.Module):
    """Cross-attention between two (B, C, T, V) feature maps with the same B, C and T."""

    def __init__(self, dim: int, heads: int = 8, mode: str = "frame", impl: Optional[str] = None):
        super().__init__()
        if mode not in TOKEN_MODES:
            raise ValueError(f"mode must be one of {TOKEN_MODES}, got {mode!r}")
        self.mode = mode
        self.attention = TokenCrossAttention(dim, heads, impl=impl)

    def forward(self, x_q: torch.Tensor, x_kv: torch.Tensor,
                key_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``key_mask`` (B, T, V_kv), True where the key joint is valid."""
        if x_q.dim() != 4 or x_kv.dim() != 4 or x_q.shape[:3] != x_kv.shape[:3]:
            raise ValueError(f"x_q and x_kv must be (B, C, T, V) with equal B, C, T, "
                             f"got {tuple(x_q.shape)} and {tuple(x_kv.shape)}")
        if key_mask is not None:
            B, _, T, V = x_kv.shape
            if tuple(key_mask.shape) != (B, T, V):
                raise ValueError(f"key_mask must have shape (B, T, V_kv) = {(B, T, V)}, got {tuple(key_mask.shape)}")
            key_mask = key_mask.reshape(B * T, V) if self.mode == "frame" else key_mask.reshape(B, T * V)
        out = self.attention(to_tokens(x_q, self.mode), to_tokens(x_kv, self.mode), key_mask)
        return from_tokens(out, x_q.shape, channels_last=is_channels_last(x_q))
