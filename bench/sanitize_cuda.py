"""Each op with C++/CUDA kernels (backend ``cpp``) once, forward and backward, at the small
shapes of ``bharnet bench --quick``, in bf16 autocast and fp32: a workload for NVIDIA's
compute-sanitizer, which finds what the tests' outputs may not show (shared-memory races,
divergent barriers, reads of uninitialised memory, out-of-bounds accesses).

    compute-sanitizer --tool racecheck python bench/sanitize_cuda.py

``bench/gpu_check.sh`` runs it under racecheck, synccheck, initcheck and memcheck with
``GPU_CHECK_SANITIZE=1``. A tool for kernel work: it checks nothing itself beyond finishing.
"""
from __future__ import annotations

import argparse

import torch

from bharnet.bench.op_cases import attention_case, ctr_case, quick_cases
from bharnet.bench.providers import autocast

OPS = ("ctr_graph_conv", "deformable_temporal_conv", "cross_attention")
# Beyond the quick shapes: several 64-row blocks and 64-key steps of the tensor-core attention
# kernels (d = 64), and more than one 128-row tile of CTR-GC's.
EXTRA = {"cross_attention": [attention_case(2, 70, 130, 128, 2)], "ctr_graph_conv": [ctr_case(1, 16, 48, 25)]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtypes", default="bf16,fp32", help="comma list of bf16 and fp32 (default both)")
    args = parser.parse_args()
    device = torch.device("cuda")
    for op in OPS:
        for case in quick_cases(op) + EXTRA.get(op, []):
            for dtype in args.dtypes.split(","):
                inputs = case.make(device, torch.bfloat16 if dtype == "bf16" else torch.float32)
                with autocast(device, dtype):
                    y = case.function("cpp")(*inputs.args)
                torch.autograd.grad(y, inputs.grads, torch.randn_like(y), allow_unused=True)
                torch.cuda.synchronize()
                print(f"ran {op} {case.x} {dtype}", flush=True)


if __name__ == "__main__":
    main()
