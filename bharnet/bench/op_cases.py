"""Per-op benchmark cases: the op's shapes in the NTU models (DESIGN.md section 5) or tiny
shapes for ``--quick``.

Full shapes use B = 128 sequences (64 clips x 2 persons; ``--op-batch`` changes it, e.g. 2 for
one clip as in single-clip inference), the three widths and lengths of
the backbone (C = 64/128/256 at T = 64/32/16 for graph convolution; C/4 per DeTGC branch) on the
body (V = 25) and two-hand (V = 42) graphs. Inputs mirror the models: in ``bf16`` the
activations are bfloat16 and the parameters float32, and the op runs under ``torch.autocast``.
"""
from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Tuple

import torch

from .. import ops
from ..graphs import BODY, HANDS, UNIFIED, Graph
from .baselines import SDPA, sdpa_function

GRAPH_BY_JOINTS: Dict[int, Graph] = {g.num_nodes: g for g in (BODY, HANDS, UNIFIED)}

# The ops this module has cases for, among those that ``bharnet.ops`` provides.
OP_FUNCTIONS: Dict[str, Callable[..., torch.Tensor]] = {
    name: getattr(ops, name)
    for name in ("ctr_graph_conv", "deformable_temporal_conv", "cross_attention", "bone", "temporal_max_pool",
                 "pointwise_conv", "batch_norm")
    if hasattr(ops, name)
}


@dataclass(frozen=True)
class OpInputs:
    """Positional arguments of one op call and the differentiable tensors among them."""

    args: Tuple[object, ...]
    grads: Tuple[torch.Tensor, ...]


@dataclass(frozen=True)
class OpCase:
    """One op at one shape. ``x`` labels the shape on plots; ``sizes`` are its dimensions.
    Every op gets achieved GB/s; ``memory_bound`` ops also get it as a % of the copy bandwidth;
    an op with ``fwd_flops`` (and ``bwd_flops``, counted for the backward) gets TFLOP/s."""

    op: str
    x: str
    sizes: Dict[str, int]
    make: Callable[[torch.device, torch.dtype], OpInputs] = field(repr=False)
    memory_bound: bool = True
    fwd_flops: int = 0
    bwd_flops: int = 0

    def config(self, dtype_name: str) -> str:
        return ";".join([f"dtype={dtype_name}"] + [f"{k}={v}" for k, v in self.sizes.items()])

    def function(self, backend: str) -> Callable[..., torch.Tensor]:
        """The op with ``backend`` fixed, called as ``function(*inputs.args)``: a bharnet
        backend, or an SDPA baseline (``sdpa``, ``sdpa-<SDPA backend>``, see baselines.py)."""
        if backend.startswith(SDPA):
            return sdpa_function(self.op, backend)
        return functools.partial(OP_FUNCTIONS[self.op], backend=backend)


def _param(*shape, device, scale=1.0) -> torch.Tensor:
    """A float32 parameter (parameters stay float32 under autocast, as in the models)."""
    return (torch.randn(*shape, device=device) * scale).requires_grad_()


def _act(*shape, device, dtype) -> torch.Tensor:
    return torch.randn(*shape, device=device, dtype=dtype).requires_grad_()


def ctr_case(B: int, C: int, T: int, V: int, static: bool = False, H: int = 3, G: int = 4) -> OpCase:
    """CTR-GC (or ST-GC with ``static``): ``v`` (B, H, C, T, V), R = C / 8 relation channels."""
    R = max(1, C // 8)

    def make(device, dtype):
        v = _act(B, H, C, T, V, device=device, dtype=dtype)
        A = torch.as_tensor(GRAPH_BY_JOINTS[V].adjacency(), device=device).requires_grad_()
        if static:
            return OpInputs((v, A), (v, A))
        q, k = _act(B, H, R, V, device=device, dtype=dtype), _act(B, H, R, V, device=device, dtype=dtype)
        weight, bias, alpha = _param(H, G, R, device=device, scale=0.1), _param(H, G, device=device), _param(1, device=device)
        tensors = (v, A, q, k, weight, bias, alpha)
        return OpInputs(tensors, tensors)

    sizes = dict(B=B, H=H, C=C, T=T, V=V) if static else dict(B=B, H=H, C=C, T=T, V=V, R=R, G=G)
    label = f"{'static ' if static else ''}C{C} T{T} V{V}"
    return OpCase("ctr_graph_conv", label, sizes, make)


def detgc_case(B: int, C: int, T: int, V: int, stride: int = 1, E: int = 4) -> OpCase:
    """DeTGC: ``x`` (B, C, T, V), E offsets, C -> C channels, temporal ``stride``."""

    def make(device, dtype):
        x = _act(B, C, T, V, device=device, dtype=dtype)
        offsets = torch.linspace(-2, 2, E, device=device).add_(0.25).requires_grad_()
        weight, bias = _param(C, C, E, device=device, scale=C ** -0.5), _param(C, device=device)
        return OpInputs((x, offsets, weight, bias, stride), (x, offsets, weight, bias))

    label = f"C{C} T{T} V{V}" + (f" s{stride}" if stride > 1 else "")
    return OpCase("deformable_temporal_conv", label, dict(B=B, C=C, T=T, V=V, E=E, stride=stride), make)


def bone_case(N: int, T: int, V: int, M: int = 2) -> OpCase:
    """Bone features of model input (N, 3, T, V, M) along the joint axis."""

    def make(device, dtype):
        x = _act(N, 3, T, V, M, device=device, dtype=dtype)
        parents = torch.as_tensor(GRAPH_BY_JOINTS[V].parents, device=device)
        return OpInputs((x, parents, -2), (x,))

    return OpCase("bone", f"T{T} V{V}", dict(N=N, C=3, T=T, V=V, M=M), make)


def pool_case(B: int, C: int, T: int, V: int, stride: int = 1) -> OpCase:
    """MSTCN's max-pool branch: a (3, 1) window over ``x`` (B, C, T, V), padding 1."""

    def make(device, dtype):
        x = _act(B, C, T, V, device=device, dtype=dtype)
        return OpInputs((x, 3, stride, 1), (x,))

    label = f"C{C} T{T} V{V}" + (f" s{stride}" if stride > 1 else "")
    return OpCase("temporal_max_pool", label, dict(B=B, C=C, T=T, V=V, stride=stride), make)


def pointwise_case(B: int, C_in: int, C_out: int, T: int, V: int, stride: int = 1) -> OpCase:
    """A 1x1 convolution of ``x`` (B, C_in, T, V) to C_out channels with temporal ``stride``;
    FLOPs ``2 B C_in C_out T' V`` forward, twice that backward (input and weight gradients)."""

    def make(device, dtype):
        x = _act(B, C_in, T, V, device=device, dtype=dtype)
        weight, bias = _param(C_out, C_in, 1, 1, device=device, scale=C_in ** -0.5), _param(C_out, device=device)
        return OpInputs((x, weight, bias, stride), (x, weight, bias))

    flops = 2 * B * C_in * C_out * len(range(0, T, stride)) * V
    label = f"{C_in}->{C_out} T{T} V{V}" + (f" s{stride}" if stride > 1 else "")
    return OpCase("pointwise_conv", label, dict(B=B, C_in=C_in, C_out=C_out, T=T, V=V, stride=stride), make,
                  memory_bound=False, fwd_flops=flops, bwd_flops=2 * flops)


def batch_norm_case(B: int, C: int, T: int, V: int) -> OpCase:
    """A training-mode batch norm of ``x`` (B, C, T, V) with running statistics (updated)."""

    def make(device, dtype):
        x = _act(B, C, T, V, device=device, dtype=dtype)
        weight, bias = _param(C, device=device), _param(C, device=device)
        running = torch.zeros(C, device=device), torch.ones(C, device=device)
        return OpInputs((x, *running, weight, bias, True, 0.1, 1e-5), (x, weight, bias))

    return OpCase("batch_norm", f"C{C} T{T} V{V}", dict(B=B, C=C, T=T, V=V), make)


def attention_case(N: int, Lq: int, Lk: int, D: int, heads: int) -> OpCase:
    """Pre-LN cross-attention with residual: queries (N, Lq, D) attend keys/values (N, Lk, D),
    no key mask (the models pass none).

    FLOPs (multiply-adds count 2; LayerNorm, softmax, biases and residual not counted):
    attention ``4 N heads Lq Lk d`` (d = D / heads) forward, 2.5x that backward (five
    products of that size, QK^T recomputed: FlashAttention's convention, so fwd+bwd is 3.5x);
    the q, [k | v] and output projection GEMMs ``2 N (Lq + 2 Lk + Lq) D^2`` forward, twice that
    backward (input and weight gradients)."""

    def make(device, dtype):
        x_q, x_kv = _act(N, Lq, D, device=device, dtype=dtype), _act(N, Lk, D, device=device, dtype=dtype)
        scale = D ** -0.5
        q_w, q_b = _param(D, D, device=device, scale=scale), _param(D, device=device)
        kv_w, kv_b = _param(2 * D, D, device=device, scale=scale), _param(2 * D, device=device)
        out_w, out_b = _param(D, D, device=device, scale=scale), _param(D, device=device)
        norms = [_param(D, device=device) for _ in range(4)]  # LN_q and LN_kv weight and bias
        params = (q_w, q_b, kv_w, kv_b, out_w, out_b)
        return OpInputs((x_q, x_kv, heads, *params, None, *norms), (x_q, x_kv, *params, *norms))

    attention = 4 * N * heads * Lq * Lk * (D // heads)
    projections = 2 * N * (Lq + 2 * Lk + Lq) * D * D
    return OpCase("cross_attention", f"N{N} Lq{Lq} Lk{Lk}", dict(N=N, Lq=Lq, Lk=Lk, D=D, heads=heads),
                  make, memory_bound=False, fwd_flops=attention + projections,
                  bwd_flops=attention * 5 // 2 + 2 * projections)


FULL_BATCH = 128


def full_cases(op: str, batch: int = FULL_BATCH) -> List[OpCase]:
    """NTU shapes at ``batch`` sequences (default 128 = 64 clips x 2 persons; 2 is one clip, as
    in single-clip inference); the shapes quoted in DESIGN.md section 5 come first. Labels other
    than at the default batch start with ``B<batch>``. Cross-attention has ``16 batch``
    sequences per frame-mode call (one per sequence and frame of T' = 16) and ``batch`` in
    sequence mode; the bone features ``batch // 2`` clips (at least 1) of 2 persons, labelled
    with the sequences they hold."""
    cases = _full_cases(op, batch)
    if batch == FULL_BATCH:
        return cases
    sequences = 2 * max(1, batch // 2) if op == "bone" else batch  # bone: whole clips of 2
    return [dataclasses.replace(case, x=f"B{sequences} {case.x}") for case in cases]


def _full_cases(op: str, batch: int) -> List[OpCase]:
    if op == "ctr_graph_conv":
        widths = [(64, 64, 25), (256, 16, 42), (128, 32, 25), (256, 16, 25), (64, 64, 42), (128, 32, 42)]
        return [ctr_case(batch, C, T, V) for C, T, V in widths] + [ctr_case(batch, 64, 64, 25, static=True)]
    if op == "deformable_temporal_conv":
        widths = [(16, 64, 25), (64, 16, 42), (32, 32, 25), (64, 16, 25), (16, 64, 42), (32, 32, 42)]
        return [detgc_case(batch, C, T, V) for C, T, V in widths] + [detgc_case(batch, 32, 64, 25, stride=2)]
    if op == "cross_attention":  # body attends hands per frame, and per sequence (T' = 16)
        return [attention_case(16 * batch, 25, 42, 256, 8), attention_case(batch, 400, 672, 256, 8)]
    if op == "bone":
        clips = max(1, batch // 2)
        return [bone_case(clips, 64, 25), bone_case(clips, 64, 42)]
    if op == "temporal_max_pool":  # the branch has C/4 channels
        widths = [(16, 64, 25), (64, 16, 42), (32, 32, 42), (16, 64, 42)]
        return [pool_case(batch, C, T, V) for C, T, V in widths] + [pool_case(batch, 32, 64, 42, stride=2)]
    if op == "pointwise_conv":  # BHaRNet-E's: CTR-GC's v (C -> 3C) and qk, MSTCN branches (C -> C/4)
        shapes = [(64, 192, 64, 25), (128, 384, 32, 42), (256, 768, 16, 42), (256, 64, 16, 42), (128, 32, 32, 42)]
        return [pointwise_case(batch, *shape) for shape in shapes] + [pointwise_case(batch, 64, 128, 64, 25, 2)]
    if op == "batch_norm":  # after the graph convolutions (C) and the MSTCN branches (C / 4)
        return [batch_norm_case(batch, C, T, V) for C, T, V in [(64, 64, 25), (64, 64, 42), (128, 32, 42),
                                                                (256, 16, 42), (16, 64, 42)]]
    raise ValueError(f"unknown op {op!r}; expected one of {list(OP_FUNCTIONS)}")


def quick_cases(op: str) -> List[OpCase]:
    """Tiny shapes (a few milliseconds per call on two CPU cores)."""
    if op == "ctr_graph_conv":
        return [ctr_case(4, 16, 16, 25), ctr_case(4, 16, 16, 42)]
    if op == "deformable_temporal_conv":
        return [detgc_case(4, 8, 16, 25), detgc_case(4, 8, 16, 42)]
    if op == "cross_attention":
        return [attention_case(32, 25, 42, 32, 4)]
    if op == "bone":
        return [bone_case(4, 16, 25), bone_case(4, 16, 42)]
    if op == "temporal_max_pool":
        return [pool_case(4, 8, 16, 25), pool_case(4, 8, 16, 42, stride=2)]
    if op == "pointwise_conv":
        return [pointwise_case(4, 16, 48, 16, 25), pointwise_case(4, 32, 8, 16, 42, stride=2)]
    if op == "batch_norm":
        return [batch_norm_case(4, 16, 16, 25)]
    raise ValueError(f"unknown op {op!r}; expected one of {list(OP_FUNCTIONS)}")
