"""Where a whole model's training step (or single-clip inference) spends its device time.

    python bench/profile_model.py --device cuda             # BHaRNet-E: eager, auto and triton
    python bench/profile_model.py --backend triton --mode infer --dtype fp32

For each backend it builds the step of ``bharnet bench`` (bharnet/bench/model_cases.py), warms
it up, then prints: wall time per step (CUDA events, back to back), the summed device time of
the kernels per step and their launch count (wall minus device time is host overhead the GPU
waits on), the kernels with the most device time, and the PyTorch ops whose kernels take the
most device time. ``--host`` adds where the host time goes (the Python functions with the
most own time, by cProfile). A tool for kernel work, not a benchmark: speed claims come from
``bharnet bench``.
"""
from __future__ import annotations

import argparse

import torch

from bharnet.bench.model_cases import ModelCase, make_step
from bharnet.ops import use_backend
from profile_ops import host_profile, print_by_device_time, profiled, wall_ms


def profile_step(case, backend, device, dtype, iters, top, host=False):
    with use_backend(backend):
        step = make_step(case, device, dtype, compile_mode=None)
        for _ in range(3):
            step()
        wall = wall_ms(step, device, iters)
        if host:  # before torch.profiler, which can leave cProfile without its hook (Python 3.12)
            print(f"\n## {case.model} {case.mode} {case.x} [{backend}, {dtype}]")
            host_profile(step, iters, top)
        averages = profiled(step, device, iters)
    kernels = [e for e in averages if e.device_type.name == "CUDA"]
    kernel_ms = sum(e.self_device_time_total for e in kernels) / 1e3 / iters
    print(f"\n## {case.model} {case.mode} {case.x} [{backend}, {dtype}]: wall {wall:.2f} ms/step, "
          f"kernels {kernel_ms:.2f} ms/step, {sum(e.count for e in kernels) / iters:.0f} launches/step")
    print("  kernels by device time:")
    print_by_device_time(kernels, iters, top)
    print("  PyTorch ops by the device time of their own kernels:")
    print_by_device_time([e for e in averages if e.device_type.name == "CPU" and e.self_device_time_total > 0],
                         iters, top)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--model", default="bharnet-e")
    parser.add_argument("--mode", default="train", choices=["train", "infer"])
    parser.add_argument("--backend", action="append", help="default: reference, auto and triton")
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    parser.add_argument("--clips", type=int, help="default: 32 for train, 1 for infer")
    parser.add_argument("--frames", type=int, default=64)
    parser.add_argument("--preset", default="full", choices=["full", "small"])
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--top", type=int, default=20)
    parser.add_argument("--host", action="store_true", help="also where the host time goes")
    args = parser.parse_args()
    device = torch.device(args.device)
    clips = args.clips or (32 if args.mode == "train" else 1)
    case = ModelCase(args.model, args.mode, args.preset, clips, 2, args.frames)
    for backend in args.backend or ["reference", "auto", "triton"]:
        profile_step(case, backend, device, args.dtype, args.iters, args.top, args.host)


if __name__ == "__main__":
    main()
