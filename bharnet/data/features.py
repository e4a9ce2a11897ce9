"""Input modalities and coordinate preprocessing for skeleton tensors.

Tensors are ``(..., C, T, V, M)`` (channels, frames, nodes, persons), optionally with
leading batch dimensions. ``valid`` masks are bool, broadcastable to ``(..., T, V, M)``:
True where a node holds a real observation (a body present in the frame, a detected hand).
Invalid entries are zero in stored data and stay zero through every function here.

Modalities (CTR-GCN/DeGCN practice):

* ``joint``: the coordinates themselves;
* ``bone``: ``x[v] - x[parent(v)]`` (a root is its own parent, so its bone is zero);
* ``motion``: ``x[t + 1] - x[t]``, zero for the last frame and wherever either frame is invalid;
* ``bone_motion``: the motion of the bones.

Preprocessing: ``canonical`` translates body and hands so that the body's centre joint
(SpineMid, joint 2 1-based, as in CTR-GCN's NTU preprocessing) of person 0 in its first
present frame is the origin; ``calibration-free`` keeps the native camera coordinates.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from ..graphs import HAND_NODES

MODALITIES = ("joint", "bone", "motion", "bone_motion")
PREPROCESSINGS = ("canonical", "calibration-free")
CENTRE_JOINT = 1  # 0-based NTU SpineMid


def _check_tensor(x, name: str = "x", min_dim: int = 4) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape (..., C, T, V, M), "
                        f"got {type(x).__name__}")
    if x.dim() < min_dim:
        raise ValueError(f"{name} must have shape (..., C, T, V, M), got {tuple(x.shape)}")
    return x


def _channel_mask(valid: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A (..., T, V, M) validity mask broadcast against (..., C, T, V, M)."""
    if not isinstance(valid, torch.Tensor) or valid.dtype != torch.bool:
        raise TypeError("valid must be a bool torch.Tensor broadcastable to (..., T, V, M)")
    mask = valid.unsqueeze(-4)
    try:
        torch.broadcast_shapes(mask.shape, x.shape)
    except RuntimeError:
        raise ValueError(f"valid of shape {tuple(valid.shape)} does not broadcast to "
                         f"(..., T, V, M) = {tuple(x.shape[:-4]) + tuple(x.shape[-3:])}") from None
    return mask


def bone(x: torch.Tensor, parents) -> torch.Tensor:
    """``x[..., v, :] - x[..., parents[v], :]`` over the node axis (V = len(parents))."""
    x = _check_tensor(x)
    parents = torch.as_tensor(np.asarray(parents), dtype=torch.long, device=x.device)
    if parents.dim() != 1 or parents.numel() != x.shape[-2]:
        raise ValueError(f"parents must have one entry per node (V = {x.shape[-2]}), "
                         f"got shape {tuple(parents.shape)}")
    return x - x.index_select(-2, parents)


def motion(x: torch.Tensor, valid: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``x[t + 1] - x[t]`` along T, zero at the last frame and where ``valid`` is False
    at t or t + 1."""
    x = _check_tensor(x)
    out = torch.zeros_like(x)
    out[..., :-1, :, :] = x[..., 1:, :, :] - x[..., :-1, :, :]
    if valid is not None:
        mask = _channel_mask(valid, x).expand(*x.shape[:-4], 1, *x.shape[-3:])
        both = torch.zeros_like(mask)
        both[..., :-1, :, :] = mask[..., 1:, :, :] & mask[..., :-1, :, :]
        out = out * both
    return out


def modality(x: torch.Tensor, name: str, parents, valid: Optional[torch.Tensor] = None):
    """The ``name`` modality of ``x`` (one of :data:`MODALITIES`)."""
    if name == "joint":
        return _check_tensor(x)
    if name == "bone":
        return bone(x, parents)
    if name == "motion":
        return motion(x, valid)
    if name == "bone_motion":
        return motion(bone(x, parents), valid)
    raise ValueError(f"modality must be one of {MODALITIES}, got {name!r}")


def body_presence(body: torch.Tensor) -> torch.Tensor:
    """(C, T, V, M) -> (T, 1, M) bool: True where a person has any non-zero coordinate."""
    body = _check_tensor(body, "body")
    return (body != 0).any(dim=-4).any(dim=-2, keepdim=True)


def hand_node_validity(hand_valid: torch.Tensor) -> torch.Tensor:
    """Per-hand validity (..., T, 2, M) -> per-node validity (..., T, 42, M)."""
    if not isinstance(hand_valid, torch.Tensor) or hand_valid.dim() < 3 \
            or hand_valid.shape[-2] != 2:
        raise ValueError("hand_valid must be a bool tensor of shape (..., T, 2, M), got "
                         f"{getattr(hand_valid, 'shape', type(hand_valid).__name__)}")
    return hand_valid.repeat_interleave(HAND_NODES, dim=-2)


def canonical_origin(body: torch.Tensor, centre_joint: int = CENTRE_JOINT) -> torch.Tensor:
    """The (C,) origin of canonical preprocessing: ``body[:, t0, centre_joint, 0]`` for the
    first frame t0 where person 0 is present (zeros if person 0 never is)."""
    body = _check_tensor(body, "body")
    if body.dim() != 4:
        raise ValueError(f"body must have shape (C, T, V, M), got {tuple(body.shape)}")
    present = body_presence(body)[:, 0, 0]
    frames = torch.nonzero(present).flatten()
    if frames.numel() == 0:
        return body.new_zeros(body.shape[0])
    return body[:, frames[0], centre_joint, 0].clone()


def canonicalize(body: torch.Tensor, hand: torch.Tensor, hand_valid: torch.Tensor,
                 centre_joint: int = CENTRE_JOINT):
    """Translate body (C, T, 25, M) and hands (C, T, 42, M) by the same
    :func:`canonical_origin`; absent people and undetected hands stay zero."""
    body, hand = _check_tensor(body, "body"), _check_tensor(hand, "hand")
    if body.dim() != 4 or hand.dim() != 4 or body.shape[:2] != hand.shape[:2] \
            or body.shape[-1] != hand.shape[-1]:
        raise ValueError("body (C, T, V, M) and hand (C, T, 42, M) must agree in C, T and M; "
                         f"got {tuple(body.shape)} and {tuple(hand.shape)}")
    origin = canonical_origin(body, centre_joint).view(-1, 1, 1, 1)
    body_mask = _channel_mask(body_presence(body), body)
    hand_mask = _channel_mask(hand_node_validity(hand_valid), hand)
    # where, not a product with the mask: a non-finite origin must not reach absent entries
    return torch.where(body_mask, body - origin, body), torch.where(hand_mask, hand - origin, hand)
