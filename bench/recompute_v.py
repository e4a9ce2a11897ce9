"""Recomputing the graph convolutions' ``v = conv_v(x)`` in the backward against keeping it:
a whole model's training step, side by side, time and memory.

    python bench/recompute_v.py --device cuda                      # BHaRNet-E, bf16, 32 x 2 clips
    python bench/recompute_v.py --device cpu --dtype fp32 --clips 1

On GPU kernels (``triton``; ``cpp`` on CUDA) the layers recompute ``v`` and on the CPU's C++
kernels they keep it (``bharnet/nn/graph_conv.py``); here both variants run on the same model,
optimizer and backend (default ``auto``), the policy switched between them, in alternating
rounds so that a change of the machine's load hits both. Per variant it prints the median step
time over the rounds' medians (ms; CUDA events on GPU), the peak memory of a step above what
was in use before it, and the bytes autograd saves in the forward (MiB). ``bharnet bench``
measures the default policy; this script measures what that policy costs and saves.
"""
from __future__ import annotations

import argparse
import statistics

import torch

from bharnet.bench.env import device_description, timestamp
from bharnet.bench.memory import MIB, peak_memory
from bharnet.bench.model_cases import ModelCase, make_step
from bharnet.bench.timing import TimerSettings, measure
from bharnet.nn import graph_conv
from bharnet.ops import use_backend

DEFAULT_POLICY = graph_conv._recomputes_v
POLICIES = {
    "v recomputed": lambda backend, device_type: backend != "reference",
    "v kept": lambda backend, device_type: False,
}


def compare(case: ModelCase, device: torch.device, dtype: str, backend: str, rounds: int,
            settings: TimerSettings):
    """{variant: (median ms, peak MiB or None, saved MiB)}."""
    medians = {name: [] for name in POLICIES}
    memory = {}
    try:
        with use_backend(backend):
            step = make_step(case, device, dtype, compile_mode=None)
            for name, policy in POLICIES.items():
                graph_conv._recomputes_v = policy
                step()  # warm-up under each policy
                peak = peak_memory(step, device)
                memory[name] = (None if peak is None else peak / MIB, step.saved_bytes() / MIB)
            for _ in range(rounds):
                for name, policy in POLICIES.items():
                    graph_conv._recomputes_v = policy
                    medians[name].append(measure(step, device, settings).p50)
    finally:
        graph_conv._recomputes_v = DEFAULT_POLICY
    return {name: (statistics.median(medians[name]), *memory[name]) for name in POLICIES}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--model", default="bharnet-e")
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    parser.add_argument("--clips", type=int, default=32)
    parser.add_argument("--frames", type=int, default=64)
    parser.add_argument("--preset", default="full", choices=["full", "small"])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--min-time", type=float, default=1.0, help="seconds of timed steps per variant and round")
    args = parser.parse_args()
    device = torch.device(args.device)
    case = ModelCase(args.model, "train", args.preset, args.clips, 2, args.frames)
    settings = TimerSettings(warmup=1, min_reps=3, min_time_s=args.min_time)
    results = compare(case, device, args.dtype, args.backend, args.rounds, settings)
    print(f"{device_description(device)}, {timestamp()}: {args.model} training step, {case.x}, "
          f"{args.dtype}, backend {args.backend}, {args.rounds} alternating rounds")
    base = results["v kept"][0]
    for name, (ms, peak, saved) in results.items():
        peak_text = "-" if peak is None else f"{peak:.0f}"
        print(f"  {name:<13} {ms:9.2f} ms ({ms / base:.3f}x of v kept)   peak {peak_text} MiB   saved {saved:.0f} MiB")


if __name__ == "__main__":
    main()
