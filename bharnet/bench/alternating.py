"""Variants of one training step measured side by side in alternating rounds (the A/B scripts
``bench/recompute_v.py``, ``bench/stacked_branches.py`` and ``bench/layer_backends.py``).

Each variant is a zero-argument callable that switches the step to it (a policy, the backend of
some layers). Per variant: one warm-up step, the peak memory of one step above what was in use
before it, and the bytes autograd saves in the forward; then ``rounds`` rounds that time every
variant in turn, so that a change of the machine's load hits them all. A variant's time is the
median over the rounds of each round's median step (CUDA events on GPU).
"""
from __future__ import annotations

import argparse
import statistics
from typing import Callable, Dict, Optional, Tuple

import torch

from ..ops import use_backend
from .env import device_description, timestamp
from .memory import MIB, peak_memory
from .model_cases import ModelCase, make_step
from .timing import TimerSettings, measure

Result = Tuple[float, Optional[float], float]  # median ms, peak MiB (None: not measurable), saved MiB


def compare(step: Callable[[], None], variants: Dict[str, Callable[[], None]], device: torch.device,
            rounds: int, settings: TimerSettings) -> Dict[str, Result]:
    """{variant: (median ms, peak MiB or None, saved MiB)} of ``step`` (a
    :func:`bharnet.bench.model_cases.make_step` training step) under each variant."""
    medians = {name: [] for name in variants}
    memory = {}
    for name, switch in variants.items():
        switch()
        step()  # warm-up under each variant
        peak = peak_memory(step, device)
        memory[name] = (None if peak is None else peak / MIB, step.saved_bytes() / MIB)
    for _ in range(rounds):
        for name, switch in variants.items():
            switch()
            medians[name].append(measure(step, device, settings).p50)
    return {name: (statistics.median(medians[name]), *memory[name]) for name in variants}


def compare_on_model(case: ModelCase, device: torch.device, dtype: str, backend: str,
                     variants_of: Callable[[torch.nn.Module], Dict[str, Callable[[], None]]], rounds: int,
                     settings: TimerSettings) -> Dict[str, Result]:
    """:func:`compare` on the training step of ``case`` (its ops on ``backend``), under the
    variants that ``variants_of`` gives for the step's model."""
    with use_backend(backend):
        step = make_step(case, device, dtype, compile_mode=None)
        return compare(step, variants_of(step.model), device, rounds, settings)


def print_report(args: argparse.Namespace, case: ModelCase, varied: str, results: Dict[str, Result],
                 base: str) -> None:
    """An A/B script's output: the device, time, step and what ``varied``, then :func:`report`."""
    print(f"{device_description(torch.device(args.device))}, {timestamp()}: {args.model} training step, {case.x}, "
          f"{args.dtype}, {varied}, {args.rounds} alternating rounds")
    print(report(results, base))


def report(results: Dict[str, Result], base: str) -> str:
    """One line per variant: time, its ratio to ``base``'s, peak and saved memory."""
    base_ms = results[base][0]
    width = max(map(len, results))
    lines = []
    for name, (ms, peak, saved) in results.items():
        peak_text = "-" if peak is None else f"{peak:.0f}"
        lines.append(f"  {name:<{width}} {ms:9.2f} ms ({ms / base_ms:.3f}x of {base})   peak {peak_text} MiB   "
                     f"saved {saved:.0f} MiB")
    return "\n".join(lines)


def main_on_one_backend(description: str, compare: Callable[..., Dict[str, Result]], base: str) -> None:
    """The ``main`` of an A/B script whose variants all run on one backend (``--backend``,
    default ``auto``): the step's options, ``compare(case, device, dtype, backend, rounds,
    settings)``, and :func:`print_report` against the variant ``base``."""
    parser = argparse.ArgumentParser(description=description)
    add_step_arguments(parser)
    parser.add_argument("--backend", default="auto")
    args = parser.parse_args()
    case, settings = step_case(args)
    results = compare(case, torch.device(args.device), args.dtype, args.backend, args.rounds, settings)
    print_report(args, case, f"backend {args.backend}", results, base)


def add_step_arguments(parser: argparse.ArgumentParser) -> None:
    """The training step's options, shared by the A/B scripts (BHaRNet-E, bf16, 32 x 2 clips)."""
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--model", default="bharnet-e")
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    parser.add_argument("--clips", type=int, default=32)
    parser.add_argument("--frames", type=int, default=64)
    parser.add_argument("--preset", default="full", choices=["full", "small"])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--min-time", type=float, default=1.0, help="seconds of timed steps per variant and round")


def step_case(args: argparse.Namespace) -> Tuple[ModelCase, TimerSettings]:
    """The training step's case (2 persons per clip) and timer settings from those options."""
    case = ModelCase(args.model, "train", args.preset, args.clips, 2, args.frames)
    return case, TimerSettings(warmup=1, min_reps=3, min_time_s=args.min_time)
