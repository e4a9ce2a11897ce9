"""Sweep the launch configurations of the two heaviest ctr_graph_conv kernels on a GPU.

    python bench/tune_ctr_graph_conv.py                 # NTU shapes C64 T64 V25, C256 T16 V42
    python bench/tune_ctr_graph_conv.py --budget 90     # stop sweeping after ~90 s

For ``ctr_graph_conv_fwd_kernel`` and ``topology_grad_kernel`` (bf16, B = 128, H = 3, G = 4 as
in ``bharnet bench``) it times each candidate configuration with ``triton.testing.do_bench``
(median, L2 flushed) next to the one the op uses now (``kernels.forward_config`` /
``kernels.grad_config``) and prints one line per candidate, then the best per kernel and shape.
Candidates that fail to compile or run are reported and skipped. A tool for choosing the
config functions' defaults, not a benchmark: speed claims come from ``bharnet bench``.
"""
from __future__ import annotations

import argparse
import itertools
import time

import torch
import triton.testing

from bharnet.kernels import ctr_graph_conv as kernels
from bharnet.ops._custom_op import cdiv

SHAPES = [(64, 64, 25), (256, 16, 42)]  # (C, T, V)
B, H, G = 128, 3, 4


def forward_candidates(V: int):
    block_v = kernels.joint_block(V)
    for block_m, warps, stages in itertools.product((32, 64, 128), (4, 8), (2, 3, 4)):
        yield dict(BLOCK_M=block_m, BLOCK_V=block_v, BLOCK_J=min(block_v, 64), num_warps=warps,
                   num_stages=stages)


def grad_candidates(V: int, rows: int):
    block_v = kernels.joint_block(V)
    row_tiles = {64: cdiv(rows, 64), 128: cdiv(rows, 128)}
    for block_m, chunks, warps, stages in itertools.product((64, 128), (1, 2, 4, 8), (4, 8), (2, 3)):
        if chunks > row_tiles[block_m]:
            continue
        per_chunk = cdiv(row_tiles[block_m], chunks)
        yield (dict(BLOCK_M=block_m, BLOCK_V=block_v, BLOCK_J=min(block_v, 64),
                    ROW_TILES_PER_CHUNK=per_chunk, num_warps=warps, num_stages=stages),
               cdiv(row_tiles[block_m], per_chunk))


def time_ms(fn) -> float:
    return triton.testing.do_bench(fn, warmup=5, rep=40, return_mode="median")


def sweep_forward(C, T, V, deadline):
    v = torch.randn(B, H, C, T, V, device="cuda", dtype=torch.bfloat16)
    topo = torch.randn(B, H, G, V, V, device="cuda", dtype=torch.bfloat16)
    y = torch.empty(B, C, T, V, device="cuda", dtype=torch.bfloat16)
    rows = C // G * T

    def run(launch):
        grid = (cdiv(rows, launch["BLOCK_M"]), G, B)
        return lambda: kernels.ctr_graph_conv_fwd_kernel[grid](
            v, topo, y, H * G * V * V, H, C, T, V, G, ACC_FP64=False, EXACT_DOT=False, **launch)

    current = dict(kernels.forward_config(V, rows, False))
    return sweep("forward", (C, T, V), run, current, forward_candidates(V), deadline)


def sweep_grad(C, T, V, deadline):
    v = torch.randn(B, H, C, T, V, device="cuda", dtype=torch.bfloat16)
    dy = torch.randn(B, C, T, V, device="cuda", dtype=torch.bfloat16)
    topo = torch.randn(B, H, G, V, V, device="cuda", dtype=torch.bfloat16)
    dv = torch.empty_like(v)
    rows = C // G * T
    buffers = {}

    def run(candidate):
        launch, chunks = candidate
        dtopo = buffers.setdefault(chunks, torch.empty(chunks, B, H, G, V, V, device="cuda"))
        tiles = cdiv(V, launch["BLOCK_J"])
        return lambda: kernels.topology_grad_kernel[(tiles * chunks, H * G, B)](
            dy, v, topo, dv, dtopo, H * G * V * V, B, H, C, T, V, G, ACC_FP64=False, EXACT_DOT=False,
            **launch)

    launch, _, chunks = kernels.grad_config(V, rows, False, H * G * B)
    return sweep("topology_grad", (C, T, V), run, (dict(launch), chunks), grad_candidates(V, rows),
                 deadline)


def sweep(kernel, shape, run, current, candidates, deadline):
    label = f"{kernel} C{shape[0]} T{shape[1]} V{shape[2]}"
    baseline = time_ms(run(current))
    print(f"{label}: current {current} {baseline * 1e3:.1f} us", flush=True)
    best = (baseline, current)
    for candidate in candidates:
        if time.monotonic() > deadline:
            print(f"{label}: budget spent, sweep cut short", flush=True)
            break
        try:
            ms = time_ms(run(candidate))
        except Exception as error:  # a config that does not compile or fit: report, go on
            print(f"  {candidate}: FAILED {type(error).__name__}: {str(error)[:120]}", flush=True)
            continue
        print(f"  {candidate}: {ms * 1e3:.1f} us", flush=True)
        if ms < best[0]:
            best = (ms, candidate)
    return label, baseline, best


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--budget", type=float, default=120.0, help="seconds for the whole sweep")
    args = parser.parse_args()
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    start = time.monotonic()
    per_sweep = args.budget / (2 * len(SHAPES))
    results = []
    for index, (C, T, V) in enumerate(SHAPES):
        results.append(sweep_forward(C, T, V, start + per_sweep * (2 * index + 1)))
        results.append(sweep_grad(C, T, V, start + per_sweep * (2 * index + 2)))
    print("\n| kernel | current us | best us | best config |\n|---|---:|---:|---|")
    for label, baseline, (ms, config) in results:
        print(f"| {label} | {baseline * 1e3:.1f} | {ms * 1e3:.1f} | {config} |")


if __name__ == "__main__":
    main()
