"""Where an op's fwd+bwd time goes: per-kernel device time and the host overhead around it.

    python bench/profile_ops.py --device cuda                       # the DESIGN.md shapes
    python bench/profile_ops.py --device cuda --op ctr_graph_conv --backend triton --case 1

For each (op case, backend) it runs fwd+bwd under ``torch.profiler`` (bf16 autocast as in
``bharnet bench``) and prints: wall time per call (CUDA events, back to back, no cache flush),
the summed device time of the kernels per call (wall minus that is launch and host overhead),
and the kernels with the most device time. ``--host`` adds where the host time goes (the
Python functions with the most own time, by cProfile) and the cost of one launch of an empty
Triton kernel: direct, through ``wrap_triton``, and as a ``triton_op`` custom op. A tool for
kernel work, not a benchmark: speed claims come from ``bharnet bench``.
"""
from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import pstats
import time

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton
from torch.profiler import ProfilerActivity, profile

from bharnet.bench.op_cases import full_cases, quick_cases
from bharnet.bench.providers import autocast

CASES = {"ctr_graph_conv": [0, 1], "deformable_temporal_conv": [0], "cross_attention": [0, 1]}
BACKENDS = {"ctr_graph_conv": ["reference", "triton", "cpp"], "deformable_temporal_conv": ["reference", "triton"],
            "cross_attention": ["sdpa", "triton"]}


def fwd_bwd_call(case, backend, device, dtype):
    inputs = case.make(device, torch.bfloat16 if dtype == "bf16" else torch.float32)
    fn = case.function(backend)
    with autocast(device, dtype):
        grad_out = torch.randn_like(fn(*inputs.args))

    def call():
        with autocast(device, dtype):
            y = fn(*inputs.args)
        torch.autograd.grad(y, inputs.grads, grad_out)
    return call


def wall_ms(call, device, iters):
    if device.type != "cuda":
        start = time.perf_counter()
        for _ in range(iters):
            call()
        return (time.perf_counter() - start) * 1e3 / iters
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(iters):
        call()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def host_profile(call, iters, top):
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(iters):
        call()
    profiler.disable()
    stats = pstats.Stats(profiler)
    rows = sorted(stats.stats.items(), key=lambda item: -item[1][2])[:top]
    print(f"  host, own time per call (cProfile, {iters} calls):")
    if not rows:
        print("  (cProfile recorded nothing: another profiler holds the interpreter's hook)")
    for (path, line, name), (_, calls, own, _, _) in rows:
        print(f"  {own / iters * 1e6:8.1f} us  x{calls / iters:5.1f}  {name} ({path.split('/')[-1]}:{line})")


def launch_overhead(device, iters=2000):
    """Host microseconds per launch of an empty Triton kernel, three ways."""

    @triton.jit
    def empty_kernel(x_ptr, n, BLOCK: tl.constexpr):
        pass

    @triton.jit
    def many_args_kernel(a_ptr, b_ptr, c_ptr, d_ptr, e_ptr, s0, s1, s2, s3, s4, s5, s6, s7, s8, s9,
                         s10, s11, s12, s13, s14, s15, s16, s17, s18, s19, BLOCK: tl.constexpr):
        pass

    @triton_op("bharnet_profile::empty", mutates_args=())
    def empty_op(x: torch.Tensor) -> torch.Tensor:
        wrap_triton(empty_kernel)[(1,)](x, x.numel(), BLOCK=16)
        return x.new_empty(0)

    x = torch.zeros(16, device=device)
    ways = {"direct kernel[grid](...)": lambda: empty_kernel[(1,)](x, x.numel(), BLOCK=16),
            "direct, 5 pointers + 20 ints (like DeTGC's kernels)":
                lambda: many_args_kernel[(1,)](x, x, x, x, x, *range(3, 23), BLOCK=16),
            "wrap_triton(kernel)[grid](...)": lambda: wrap_triton(empty_kernel)[(1,)](x, x.numel(), BLOCK=16),
            "triton_op custom op": lambda: empty_op(x),
            "torch.empty": lambda: torch.empty(16, device=device),
            "tensor.sum": lambda: x.sum()}
    for name, fn in ways.items():
        for _ in range(20):
            fn()
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(iters):
            fn()
        elapsed = time.perf_counter() - start
        torch.cuda.synchronize()
        print(f"  launch overhead: {elapsed / iters * 1e6:6.1f} us  {name}")


def profiled(call, device, iters):
    """torch.profiler's per-name averages of ``iters`` calls (CPU ops, and CUDA kernels on CUDA)."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(iters):
            call()
        if device.type == "cuda":
            torch.cuda.synchronize()
    return prof.key_averages()


def print_by_device_time(events, iters, top):
    """The ``top`` events with the most own device time, per call."""
    for e in sorted(events, key=lambda e: -e.self_device_time_total)[:top]:
        print(f"  {e.self_device_time_total / 1e3 / iters:8.3f} ms  x{e.count / iters:5.1f}  {e.key[:110]}")


def profile_one(case, backend, device, dtype, iters, top, host=False):
    call = fwd_bwd_call(case, backend, device, dtype)
    for _ in range(3):
        call()
    wall = wall_ms(call, device, iters)
    if host:  # before torch.profiler, which can leave cProfile without its hook (Python 3.12)
        host_rows = io.StringIO()
        with contextlib.redirect_stdout(host_rows):
            host_profile(call, iters, 2 * top)
    averages = profiled(call, device, iters)
    events = [e for e in averages if e.device_type.name == "CUDA"]
    kernel_ms = sum(e.self_device_time_total for e in events) / 1e3 / iters
    print(f"\n## {case.op} {case.x} [{backend}, {dtype}]: wall {wall:.3f} ms/call, "
          f"kernels {kernel_ms:.3f} ms/call, {sum(e.count for e in events) / iters:.0f} launches/call")
    print_by_device_time(events, iters, top)
    if host:
        print(host_rows.getvalue(), end="")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--op", choices=sorted(CASES), action="append")
    parser.add_argument("--backend", action="append", help="default: eager and the fused backend")
    parser.add_argument("--case", type=int, action="append", help="index into the op's full cases")
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--top", type=int, default=8)
    parser.add_argument("--quick", action="store_true", help="tiny shapes (a CPU rehearsal)")
    parser.add_argument("--host", action="store_true", help="also where the host time goes")
    args = parser.parse_args()
    device = torch.device(args.device)
    print(f"device: {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}, torch {torch.__version__}")
    if args.host and device.type == "cuda":
        launch_overhead(device)
    for op in args.op or list(CASES):
        cases = quick_cases(op) if args.quick else full_cases(op)
        for index in args.case or CASES[op]:
            for backend in args.backend or BACKENDS[op]:
                try:
                    profile_one(cases[index], backend, device, args.dtype, args.iters, args.top, args.host)
                except Exception as error:  # report and go on: one failure must not hide the rest
                    print(f"\n## {op} case {index} [{backend}]: FAILED {type(error).__name__}: {error}")


if __name__ == "__main__":
    main()
