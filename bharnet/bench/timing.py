"""Timers: repeated wall-clock medians on CPU, CUDA events on GPU.

Both return a :class:`Timing` with the 20th, 50th and 80th percentiles in milliseconds. The
function under test takes no arguments, or the result of an untimed ``setup`` call (e.g. the
forward pass before a timed backward); callers make it cycle through several input sets so
that each call sees fresh inputs. Warm-up calls are never timed.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence

import torch

L2_FLUSH_BYTES = 256 << 20  # zeroed before each timed CUDA call, as triton.testing.do_bench does


@dataclass(frozen=True)
class TimerSettings:
    """How long to measure: at least ``min_reps`` timed calls and about ``min_time_s`` seconds
    of them, after ``warmup`` untimed calls; ``max_reps`` caps very fast functions."""

    warmup: int = 2
    min_reps: int = 5
    min_time_s: float = 0.2
    max_reps: int = 2_000


@dataclass(frozen=True)
class Timing:
    """Percentiles of one measurement, in milliseconds."""

    p20: float
    p50: float
    p80: float


def quantile(values: Sequence[float], q: float) -> float:
    """The ``q``-quantile (0 <= q <= 1) with linear interpolation between order statistics."""
    if not values:
        raise ValueError("quantile: values must not be empty")
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"quantile: q must lie in [0, 1], got {q}")
    ordered = sorted(values)
    position = q * (len(ordered) - 1)
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def timing_from_seconds(samples: Sequence[float]) -> Timing:
    """Percentiles (ms) of per-call durations given in seconds."""
    ms = [s * 1e3 for s in samples]
    return Timing(quantile(ms, 0.2), quantile(ms, 0.5), quantile(ms, 0.8))


def _with_setup(fn: Callable, setup: Optional[Callable[[], object]]):
    """``(call, setup)`` such that every timed call is ``call(setup())``."""
    if setup is None:
        return (lambda _: fn()), (lambda: None)
    return fn, setup


def cpu_time(fn: Callable, settings: TimerSettings = TimerSettings(),
             setup: Optional[Callable[[], object]] = None) -> Timing:
    """Wall-clock time of ``fn()`` with ``time.perf_counter``, one sample per call. With
    ``setup``, each call is ``fn(setup())`` and only ``fn`` is timed."""
    call, setup = _with_setup(fn, setup)
    for _ in range(settings.warmup):
        call(setup())
    samples: List[float] = []
    start = time.perf_counter()
    while len(samples) < settings.max_reps:
        arg = setup()
        t0 = time.perf_counter()
        call(arg)
        samples.append(time.perf_counter() - t0)
        if len(samples) >= settings.min_reps and time.perf_counter() - start >= settings.min_time_s:
            break
    return timing_from_seconds(samples)


def cuda_time(fn: Callable, settings: TimerSettings = TimerSettings(),
              setup: Optional[Callable[[], object]] = None) -> Timing:
    """CUDA-event time of ``fn()`` (or ``fn(setup())``, timing ``fn`` only), the protocol of
    ``triton.testing.do_bench``: warm-up, an estimate, then enough calls to fill
    ``min_time_s`` (at least ``min_reps``), each after flushing the L2 cache."""
    call, setup = _with_setup(fn, setup)
    flush = torch.empty(L2_FLUSH_BYTES, dtype=torch.int8, device="cuda")
    for _ in range(settings.warmup):
        call(setup())
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    call(setup())
    torch.cuda.synchronize()
    estimate_s = time.perf_counter() - t0
    reps = min(settings.max_reps, max(settings.min_reps, math.ceil(settings.min_time_s / max(estimate_s, 1e-6))))
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for start, end in zip(starts, ends):
        arg = setup()
        flush.zero_()
        start.record()
        call(arg)
        end.record()
    torch.cuda.synchronize()
    return timing_from_seconds([s.elapsed_time(e) * 1e-3 for s, e in zip(starts, ends)])


def measure(fn: Callable, device: torch.device, settings: TimerSettings,
            setup: Optional[Callable[[], object]] = None) -> Timing:
    """:func:`cuda_time` on a CUDA device, else :func:`cpu_time`."""
    if device.type == "cuda":
        return cuda_time(fn, settings, setup)
    return cpu_time(fn, settings, setup)


def first_call_seconds(fn: Callable[[], object], device: torch.device) -> float:
    """Wall-clock seconds of one call, synchronised (used for the first, compiling call)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0
