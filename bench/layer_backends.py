"""One op's layers on each of several backends, every other layer on ``auto``: a whole model's
training step, side by side, time and memory. Which backend should ``auto`` pick for that op?

    python bench/layer_backends.py --device cuda --op ctr_graph_conv --backends triton,cpp
    python bench/layer_backends.py --device cpu --op ctr_graph_conv --backends cpp,reference --dtype fp32 --clips 1

``bharnet bench`` times each op alone, where a faster kernel need not make a faster model (the
layers around it, the launches between them). Here the layers whose ``fused_op`` is ``--op``
(e.g. the graph convolutions for ``ctr_graph_conv``) get each backend in turn (their ``impl``)
on one model and optimizer, in alternating rounds (:mod:`bharnet.bench.alternating`: median
step time, peak memory above what was in use before the step, bytes saved for the backward).
"""
from __future__ import annotations

import argparse

import torch

from bharnet.bench import alternating
from bharnet.bench.model_cases import ModelCase
from bharnet.bench.timing import TimerSettings
from bharnet.ops._backend import BACKENDS, has_backend


def layers_of(model: torch.nn.Module, op: str):
    """The layers of ``model`` whose fused op is ``op``."""
    return [m for m in model.modules() if getattr(m, "fused_op", None) == op and hasattr(m, "impl")]


def compare(case: ModelCase, device: torch.device, dtype: str, op: str, backends, rounds: int,
            settings: TimerSettings):
    """{backend: (median ms, peak MiB or None, saved MiB)} (:func:`bharnet.bench.alternating.compare`)."""
    for backend in backends:
        if backend not in BACKENDS or not has_backend(op, backend):
            raise ValueError(f"{op} has no backend {backend!r}")

    def variants_of(model):
        layers = layers_of(model, op)
        if not layers:
            raise ValueError(f"{case.model} has no layers of {op}")

        def switch_to(backend):
            def switch():
                for layer in layers:
                    layer.impl = backend
            return switch
        return {b: switch_to(b) for b in backends}

    return alternating.compare_on_model(case, device, dtype, "auto", variants_of, rounds, settings)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    alternating.add_step_arguments(parser)
    parser.add_argument("--op", default="ctr_graph_conv")
    parser.add_argument("--backends", default="triton,cpp", help="comma list; the first is the ratios' base")
    args = parser.parse_args()
    device = torch.device(args.device)
    case, settings = alternating.step_case(args)
    backends = args.backends.split(",")
    results = compare(case, device, args.dtype, args.op, backends, args.rounds, settings)
    alternating.print_report(args, case, f"{args.op} layers on each backend (the rest auto)", results, backends[0])


if __name__ == "__main__":
    main()
