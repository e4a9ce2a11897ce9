"""What ``bharnet.fast.keep_freed_memory()`` changes for single-clip CPU inference.

    python bench/cpu_page_faults.py                  # BHaRNet-E, full preset, T = 64, 2 threads
    python bench/cpu_page_faults.py --calls 30 --threads 1

Runs the eager reference model, then its ``fuse_for_inference`` copy (C++ kernels, BN folded),
each on one clip of 2 persons for ``--calls`` calls in a row after 3 untimed ones (as an
application runs one model), in two fresh processes: glibc's default malloc, then
``keep_freed_memory()`` (it is process-wide and cannot be undone, hence the processes).
Prints, per model, the minor page faults per call and the median and mean ms per call. Speed
claims about ``keep_freed_memory`` in the docs come from this script.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys

MEASURE = r"""
import json, resource, statistics, sys, time
import torch
import bharnet
from bharnet.fast import fuse_for_inference, keep_freed_memory, swap_layers

keep, threads, calls, frames = sys.argv[1] == "keep", int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
applied = keep_freed_memory() if keep else False
torch.set_num_threads(threads)
torch.manual_seed(0)
model = bharnet.create_model("bharnet-e", 120, preset="full").eval()
swap_layers(model, "reference")
fused = fuse_for_inference(model, backend="auto")
body, hand = torch.randn(1, 3, frames, 25, 2), torch.randn(1, 3, frames, 42, 2)
times, faults = {"eager": [], "fused": []}, {"eager": 0, "fused": 0}
with torch.no_grad():
    for name, m in (("eager", model), ("fused", fused)):
        for _ in range(3):
            m(body, hand)
        for _ in range(calls):
            f0, t0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
            m(body, hand)
            times[name].append((time.perf_counter() - t0) * 1e3)
            faults[name] += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0
print(json.dumps({"applied": applied, **{name: {"faults": faults[name] / calls,
                  "median_ms": statistics.median(times[name]), "mean_ms": statistics.mean(times[name])}
                  for name in times}}))
"""


def measure(mode: str, threads: int, calls: int, frames: int) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}  # glibc's defaults
    result = subprocess.run([sys.executable, "-c", MEASURE, mode, str(threads), str(calls), str(frames)],
                            capture_output=True, text=True, env=env, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--calls", type=int, default=20, help="timed calls per model")
    parser.add_argument("--frames", type=int, default=64)
    args = parser.parse_args()
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch threads "
          f"{args.threads}; BHaRNet-E full, 1 clip x 2 persons x {args.frames} frames, float32")
    print("| malloc | model | page faults / call | median ms | mean ms | fused speedup (median) |")
    print("|---|---|---:|---:|---:|---:|")
    for mode in ("default", "keep"):
        result = measure(mode, args.threads, args.calls, args.frames)
        label = "keep_freed_memory()" if result["applied"] else "glibc default"
        for name in ("eager", "fused"):
            r = result[name]
            speedup = result["eager"]["median_ms"] / r["median_ms"] if name == "fused" else None
            print(f"| {label} | {name} | {r['faults']:.0f} | {r['median_ms']:.1f} | {r['mean_ms']:.1f} | "
                  + (f"{speedup:.2f}x |" if speedup else "- |"))


if __name__ == "__main__":
    main()
