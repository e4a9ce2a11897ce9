"""Temporal crop-resize and random rotation for ``(C, T, V, M)`` skeleton tensors.

Crop-resize (CTR-GCN practice): take ``size`` of the ``length`` valid frames and resample
them to ``window`` frames by linear interpolation with the crop's first and last frames as
the end points (``align_corners=True`` semantics), so a sequence linear in time stays
exactly linear. Training draws the crop ratio uniformly from ``[0.5, 1]`` and its start
uniformly; testing takes the centred 95 %. An output frame interpolated from an invalid
frame is invalid and zero: missing detections are never blended into real ones.

Rotation: ``R = Rz(γ) Ry(β) Rx(α)`` with each angle uniform in ``[-0.3, 0.3]`` rad, applied to
the xyz channels about the origin of the coordinates in use. Apply the same crop and the
same ``R`` to the body and the hands of one sample.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch


def random_crop(length: int, ratio_range: Tuple[float, float] = (0.5, 1.0),
                generator: Optional[torch.Generator] = None) -> Tuple[int, int]:
    """(start, size) of a random crop of ``length`` frames with ratio drawn from ``ratio_range``."""
    low, high = ratio_range
    if not 0 < low <= high <= 1:
        raise ValueError(f"ratio_range must satisfy 0 < low <= high <= 1, got {ratio_range}")
    _check_length(length)
    ratio = low + (high - low) * torch.rand((), generator=generator).item()
    size = min(length, max(1, int(math.floor(length * ratio))))
    start = int(torch.randint(0, length - size + 1, (), generator=generator))
    return start, size


def centre_crop(length: int, ratio: float = 0.95) -> Tuple[int, int]:
    """(start, size) of the centred crop keeping ``ratio`` of ``length`` frames."""
    if not 0 < ratio <= 1:
        raise ValueError(f"ratio must be in (0, 1], got {ratio}")
    _check_length(length)
    size = min(length, max(1, int(math.floor(length * ratio))))
    return (length - size) // 2, size


def _check_length(length: int) -> None:
    if length < 1:
        raise ValueError(f"length must be at least 1 frame, got {length}")


def crop_resize(x: torch.Tensor, start: int, size: int, window: int,
                valid: Optional[torch.Tensor] = None):
    """Resample frames ``[start, start + size)`` of ``x`` (C, T, V, M) to ``window`` frames.

    Output frame k samples position ``start + k (size - 1) / (window - 1)`` (the crop's
    middle when window = 1) by linear interpolation. ``valid`` (T, V, M) or (T, 1, M) bool
    is resampled alongside: an output frame is valid only if every frame it blends (with
    non-zero weight) is valid, and invalid output is zero. Returns ``(x_out, valid_out)``
    (``valid_out`` is None without ``valid``).
    """
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise ValueError(f"x must be a tensor of shape (C, T, V, M), got "
                         f"{getattr(x, 'shape', type(x).__name__)}")
    frames = x.shape[1]
    if size < 1 or start < 0 or start + size > frames:
        raise ValueError(f"crop [start={start}, start+size={start + size}) must lie within "
                         f"the {frames} frames of x")
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    # position = start + numerator / denominator, split exactly in integers: in floating point
    # a whole position such as 23 could come out as 23.000000000000004 and blend in frame 24
    if window == 1:
        numerator, denominator = torch.tensor([size - 1]), 2
    else:
        numerator, denominator = torch.arange(window) * (size - 1), window - 1
    lower = (start + numerator // denominator).clamp(max=frames - 1)
    upper = (lower + 1).clamp(max=frames - 1)
    fraction = (numerator % denominator).to(torch.float64) / denominator
    weight = fraction.to(x.dtype).view(1, -1, 1, 1)
    # index_select, not x[:, lower]: advanced indexing runs a parallel kernel whose thread
    # start-up dwarfs this tiny gather (and stalls on a busy CPU).
    out = x.index_select(1, lower) * (1 - weight) + x.index_select(1, upper) * weight
    if valid is None:
        return out, None
    if valid.dtype != torch.bool or valid.dim() != 3 or valid.shape[0] != frames:
        raise ValueError(f"valid must be a bool tensor of shape (T={frames}, V or 1, M), "
                         f"got {tuple(valid.shape)} {valid.dtype}")
    blended = fraction.view(-1, 1, 1) > 0
    valid_out = valid.index_select(0, lower) & (valid.index_select(0, upper) | ~blended)
    return out * valid_out.unsqueeze(0), valid_out


def random_rotation(max_angle: float = 0.3, generator: Optional[torch.Generator] = None,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A (3, 3) rotation ``Rz Ry Rx`` with angles uniform in ``[-max_angle, max_angle]``."""
    if max_angle < 0:
        raise ValueError(f"max_angle must be >= 0, got {max_angle}")
    ax, ay, az = ((torch.rand(3, generator=generator, dtype=torch.float64) * 2 - 1)
                  * max_angle).tolist()
    return rotation_matrix(ax, ay, az, dtype)


def rotation_matrix(ax: float, ay: float, az: float,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``Rz(az) @ Ry(ay) @ Rx(ax)`` as a (3, 3) tensor."""
    cx, sx, cy, sy, cz, sz = (math.cos(ax), math.sin(ax), math.cos(ay), math.sin(ay),
                              math.cos(az), math.sin(az))
    rx = torch.tensor([[1, 0, 0], [0, cx, -sx], [0, sx, cx]], dtype=torch.float64)
    ry = torch.tensor([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]], dtype=torch.float64)
    rz = torch.tensor([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]], dtype=torch.float64)
    return (rz @ ry @ rx).to(dtype)


def rotate(x: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    """Apply a (3, 3) ``rotation`` to the xyz channels of ``x`` (3, T, V, M)."""
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[0] != 3:
        raise ValueError(f"x must be a tensor of shape (3, T, V, M), got "
                         f"{getattr(x, 'shape', type(x).__name__)}")
    if rotation.shape != (3, 3):
        raise ValueError(f"rotation must have shape (3, 3), got {tuple(rotation.shape)}")
    rotation = rotation.to(x.dtype)
    # Three multiply-adds rather than a matmul: no BLAS threads for a few thousand points.
    return sum(rotation[:, j].view(3, 1, 1, 1) * x[j] for j in range(3))
