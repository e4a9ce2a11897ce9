"""Recomputing 1x1 convolutions' outputs in the backward against keeping them (the graph
convolutions' ``v = conv_v(x)`` and the ``ConvBN`` layers' BatchNorm inputs): a whole model's
training step, side by side, time and memory.

    python bench/recompute_v.py --device cuda                      # BHaRNet-E, bf16, 32 x 2 clips
    python bench/recompute_v.py --device cpu --dtype fp32 --clips 1

By default, on GPU kernels (``triton``; ``cpp`` on CUDA) the graph convolutions recompute ``v``,
the ``ConvBN`` layers only when their ``recompute_bn_input`` is set, and on the CPU's C++ kernels
every layer keeps its output (:mod:`bharnet.nn.recompute`). Here three variants (both
recomputed, ``v`` alone, both kept) run on the same model, optimizer and backend (default
``auto``), the policy and the ``ConvBN`` layers' switch changed between them, in
alternating rounds (:mod:`bharnet.bench.alternating`) so that a change of the machine's load
hits each. Per variant it prints the median step time over the rounds' medians (ms; CUDA events
on GPU), the peak memory of a step above what was in use before it, and the bytes autograd
saves in the forward (MiB). ``bharnet bench`` measures the default policy; this script measures
what that policy costs and saves.
"""
from __future__ import annotations

import torch

from bharnet.bench import alternating
from bharnet.bench.model_cases import ModelCase
from bharnet.bench.timing import TimerSettings
from bharnet.nn import ConvBN, recompute

DEFAULT_POLICY = recompute.recomputes
RECOMPUTING = lambda backend, device_type: backend != "reference"  # noqa: E731
KEEPING = lambda backend, device_type: False  # noqa: E731
# variant: (policy, whether the ConvBN layers recompute their BN input too)
VARIANTS = {"v and BN inputs": (RECOMPUTING, True), "v": (RECOMPUTING, False), "kept": (KEEPING, False)}


def _switch_to(model: torch.nn.Module, policy, bn_inputs: bool):
    def switch():
        recompute.recomputes = policy
        for module in model.modules():
            if isinstance(module, ConvBN):
                module.recompute_bn_input = bn_inputs
    return switch


def compare(case: ModelCase, device: torch.device, dtype: str, backend: str, rounds: int,
            settings: TimerSettings):
    """{variant: (median ms, peak MiB or None, saved MiB)} (:func:`bharnet.bench.alternating.compare`)."""
    try:
        return alternating.compare_on_model(
            case, device, dtype, backend,
            lambda model: {name: _switch_to(model, *variant) for name, variant in VARIANTS.items()}, rounds, settings)
    finally:
        recompute.recomputes = DEFAULT_POLICY


def main():
    alternating.main_on_one_backend(__doc__.split("\n\n")[0], compare, "kept")


if __name__ == "__main__":
    main()
