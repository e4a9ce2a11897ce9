"""The MSTCN's branches stacked (one 1x1 convolution and one BatchNorm for the inputs of the
branches with an activation, one BatchNorm for the branches' last ones,
:class:`bharnet.nn.MultiScaleTemporalConv`) against run one by one: a whole model's training
step, side by side, time and memory.

    python bench/stacked_branches.py --device cuda                      # BHaRNet-E, bf16, 32 x 2 clips
    python bench/stacked_branches.py --device cpu --dtype fp32 --clips 1

Both variants run on the same model, optimizer and backend (default ``auto``; on ``reference``
nothing stacks), in alternating rounds (:mod:`bharnet.bench.alternating`). Per variant it prints
the median step time over the rounds' medians (ms; CUDA events on GPU), the peak memory of a
step above what was in use before it, and the bytes autograd saves in the forward (MiB), which
should be the same.
"""
from __future__ import annotations

import torch

from bharnet.bench import alternating
from bharnet.bench.model_cases import ModelCase
from bharnet.bench.timing import TimerSettings
from bharnet.nn import MultiScaleTemporalConv

STACKED_HEADS = MultiScaleTemporalConv._stacked_heads


def _one_by_one(self):
    return None


def _switch_to(stacked: bool):
    def switch():
        MultiScaleTemporalConv._stacked_heads = STACKED_HEADS if stacked else _one_by_one
    return switch


def compare(case: ModelCase, device: torch.device, dtype: str, backend: str, rounds: int,
            settings: TimerSettings):
    """{variant: (median ms, peak MiB or None, saved MiB)} (:func:`bharnet.bench.alternating.compare`)."""
    try:
        return alternating.compare_on_model(
            case, device, dtype, backend, lambda model: {"stacked": _switch_to(True), "one by one": _switch_to(False)},
            rounds, settings)
    finally:
        MultiScaleTemporalConv._stacked_heads = STACKED_HEADS


def main():
    alternating.main_on_one_backend(__doc__.split("\n\n")[0], compare, "one by one")


if __name__ == "__main__":
    main()
