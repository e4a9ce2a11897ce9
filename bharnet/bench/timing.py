"""Timers: repeated wall-clock medians on CPU, CUDA events on GPU.

:func:`interleaved` times several functions side by side, in alternating blocks of calls;
:func:`measure` times one. Each gives a :class:`Timing` with the 20th, 50th and 80th
percentiles in milliseconds. A function under test takes no arguments, or the result of an
untimed ``setup`` call (e.g. the forward pass before a timed backward); callers make it cycle
through several input sets so that each call sees fresh inputs. Warm-up calls are never timed.
"""
from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple

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


Call = Tuple[Callable, Optional[Callable[[], object]]]  # (fn, setup): each timed call is fn() or fn(setup())

BLOCKS = 8  # a function's calls are timed in about this many blocks, alternating with the others'


def _with_setup(fn: Callable, setup: Optional[Callable[[], object]]):
    """``(call, setup)`` such that every timed call is ``call(setup())``."""
    if setup is None:
        return (lambda _: fn()), (lambda: None)
    return fn, setup


def interleaved(calls: Sequence[Call], device: torch.device, settings: TimerSettings = TimerSettings()) -> List[Timing]:
    """Timings of several functions measured side by side: after ``settings.warmup`` untimed
    calls of each, the functions take turns in blocks of calls (each block about
    ``min_time_s / BLOCKS`` long, by one more untimed call, and at most ``max_reps / BLOCKS``
    calls; the first function of a round rotates), until each has at least ``min_reps`` timed calls and ``min_time_s`` seconds of
    them (at most ``max_reps``). A slow drift of the machine's speed (other load, clocks) thus
    reaches every function alike, where timing one after the other would put it on one alone.
    CPU: ``time.perf_counter`` around each call. CUDA: events around each call, each after
    zeroing a 256 MiB buffer to flush the L2 cache (``triton.testing.do_bench``'s protocol)."""
    prepared = [_with_setup(fn, setup) for fn, setup in calls]
    cuda = device.type == "cuda"
    flush = torch.empty(L2_FLUSH_BYTES, dtype=torch.int8, device="cuda") if cuda else None
    block = []
    for call, setup in prepared:
        for _ in range(settings.warmup):
            call(setup())
        arg = setup()
        estimate_s = first_call_seconds(lambda: call(arg), device)
        block.append(max(1, min(math.ceil(settings.max_reps / BLOCKS),
                                math.ceil(settings.min_time_s / BLOCKS / max(estimate_s, 1e-6)))))
    samples: List[List[float]] = [[] for _ in prepared]
    for round_index in itertools.count():
        pending = [i for i, s in enumerate(samples)
                   if len(s) < settings.max_reps and (len(s) < settings.min_reps or sum(s) < settings.min_time_s)]
        if not pending:
            break
        for i in pending[round_index % len(pending):] + pending[:round_index % len(pending)]:
            call, setup = prepared[i]
            reps = min(block[i], settings.max_reps - len(samples[i]))
            samples[i] += _cuda_block(call, setup, reps, flush) if cuda else _cpu_block(call, setup, reps)
    return [timing_from_seconds(s) for s in samples]


def _cpu_block(call, setup, reps: int) -> List[float]:
    samples = []
    for _ in range(reps):
        arg = setup()
        t0 = time.perf_counter()
        call(arg)
        samples.append(time.perf_counter() - t0)
    return samples


def _cuda_block(call, setup, reps: int, flush: torch.Tensor) -> List[float]:
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for start, end in zip(starts, ends):
        arg = setup()
        flush.zero_()
        start.record()
        call(arg)
        end.record()
    torch.cuda.synchronize()
    return [s.elapsed_time(e) * 1e-3 for s, e in zip(starts, ends)]


def measure(fn: Callable, device: torch.device, settings: TimerSettings = TimerSettings(),
            setup: Optional[Callable[[], object]] = None) -> Timing:
    """:func:`interleaved` for one function: ``fn()``, or ``fn(setup())`` timing ``fn`` only."""
    return interleaved([(fn, setup)], device, settings)[0]


def first_call_seconds(fn: Callable[[], object], device: torch.device) -> float:
    """Wall-clock seconds of one call, synchronised (used for the first, compiling call)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0
