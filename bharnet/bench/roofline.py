"""Roofline column for memory-bound ops: the bytes that must move over the measured time, as a
share of the device's copy bandwidth measured in the same run.

Bytes that must move: every input read once and every output written once. Forward reads the
op's tensor arguments and writes its output; backward reads the output gradient and the
forward's tensor arguments again and writes one gradient per differentiable argument.
"""
from __future__ import annotations

from typing import Iterable

import torch

from .timing import TimerSettings, Timing, measure


def tensor_bytes(values: Iterable[object]) -> int:
    """Total ``nbytes`` of the tensors among ``values`` (other values are ignored)."""
    return sum(v.nbytes for v in values if isinstance(v, torch.Tensor))


def gbps(num_bytes: int, ms: float) -> float:
    """Achieved bandwidth in GB/s (10^9 bytes per second) for ``num_bytes`` in ``ms``."""
    if ms <= 0:
        raise ValueError(f"time must be positive, got {ms} ms")
    return num_bytes / (ms * 1e-3) / 1e9


def roofline_percent(num_bytes: int, ms: float, copy_gbps: float) -> float:
    """Achieved bandwidth as a percentage of the measured copy bandwidth."""
    if copy_gbps <= 0:
        raise ValueError(f"copy bandwidth must be positive, got {copy_gbps} GB/s")
    return 100.0 * gbps(num_bytes, ms) / copy_gbps


def copy_bandwidth(device: torch.device, num_bytes: int, settings: TimerSettings) -> Timing:
    """Time of ``dst.copy_(src)`` for float32 tensors of ``num_bytes`` each (read ``num_bytes``,
    write ``num_bytes``); GB/s is ``gbps(2 * num_bytes, timing.p50)``."""
    src = torch.rand(num_bytes // 4, device=device)
    dst = torch.empty_like(src)
    return measure(lambda: dst.copy_(src), device, settings)
