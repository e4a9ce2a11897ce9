"""Baselines that are not bharnet backends: an op written the standard PyTorch way.

``cross_attention`` is measured against the same layer as PyTorch users write it (issue 6 states
its speed targets against this): pre-LayerNorm, ``nn.Linear`` projections (``F.linear``, which
is what ``nn.Linear.forward`` calls; k and v in one GEMM, as ``nn.MultiheadAttention`` does),
``torch.nn.functional.scaled_dot_product_attention`` with the key mask as a boolean
``attn_mask``, output projection and residual.

Providers: ``sdpa`` lets PyTorch pick the SDPA backend for each call; ``sdpa-<name>`` forces
one of :data:`SDPA_BACKENDS` with ``torch.nn.attention.sdpa_kernel``. A forced backend that
rejects the inputs (device, dtype, head dim, mask) raises :class:`Rejected` with PyTorch's
reasons, and the benchmark reports it as skipped.
"""
from __future__ import annotations

import warnings
from typing import Callable, Dict, List

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

SDPA = "sdpa"
SDPA_BACKENDS: Dict[str, SDPBackend] = {
    "math": SDPBackend.MATH,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "flash": SDPBackend.FLASH_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
}
# How SDPA's RuntimeError begins when no enabled backend takes the inputs (CUDA, CPU)
NO_KERNEL = ("No available kernel", "No viable backend")


class Rejected(Exception):
    """A provider cannot run these inputs: not a failure, reported as skipped with the reason."""


def sdpa_cross_attention(x_q, x_kv, heads, q_weight, q_bias, kv_weight, kv_bias, out_weight,
                         out_bias, key_mask=None, norm_q_weight=None, norm_q_bias=None,
                         norm_kv_weight=None, norm_kv_bias=None, pre_norm=True, eps=1e-5):
    """``bharnet.ops.cross_attention``'s math (same signature) with SDPA as the attention core.

    Fully masked query rows are not special-cased: the op's attention output there is zero
    (``y = x_q + b_o``), and this gives what the SDPA backend returns for a row without keys:
    zero too for the math and CPU flash backends (PyTorch's safe softmax)."""
    N, Lq, D = x_q.shape
    Lk, head_dim = x_kv.shape[1], D // heads
    a_q, a_kv = x_q, x_kv
    if pre_norm:
        a_q = F.layer_norm(x_q, (D,), norm_q_weight, norm_q_bias, eps)
        a_kv = F.layer_norm(x_kv, (D,), norm_kv_weight, norm_kv_bias, eps)
    q = F.linear(a_q, q_weight, q_bias).view(N, Lq, heads, head_dim).transpose(1, 2)
    k, v = F.linear(a_kv, kv_weight, kv_bias).view(N, Lk, 2, heads, head_dim).permute(2, 0, 3, 1, 4)
    mask = None if key_mask is None else key_mask[:, None, None, :]
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return x_q + F.linear(o.transpose(1, 2).reshape(N, Lq, D), out_weight, out_bias)


# op -> the op written with scaled_dot_product_attention (the op's signature, no ``backend=``)
SDPA_FORMS: Dict[str, Callable[..., torch.Tensor]] = {"cross_attention": sdpa_cross_attention}


def forced_sdpa_providers() -> List[str]:
    """``sdpa-<name>`` for each of :data:`SDPA_BACKENDS`."""
    return [f"{SDPA}-{name}" for name in SDPA_BACKENDS]


def sdpa_function(op: str, provider: str) -> Callable[..., torch.Tensor]:
    """The SDPA form of ``op`` for ``provider`` (``sdpa`` or ``sdpa-<name>``); a forced backend
    that has no kernel for the inputs raises :class:`Rejected`."""
    fn = SDPA_FORMS[op]
    if provider == SDPA:
        return fn
    backend = SDPA_BACKENDS[provider[len(SDPA) + 1:]]

    def forced(*args):
        with sdpa_kernel(backend):
            try:
                return fn(*args)
            except RuntimeError as error:
                if not str(error).startswith(NO_KERNEL):
                    raise
                reasons = _rejection_reasons(fn, args)
                raise Rejected(f"{backend.name} has no {args[0].device.type} kernel for these inputs"
                               + (f": {reasons}" if reasons else "")) from error
    return forced


def _rejection_reasons(fn: Callable, args) -> str:
    """Call ``fn`` again, recording the warnings in which PyTorch says why each backend was not
    used (CUDA emits them, once per call site, so they may have been filtered before)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            fn(*args)
        except RuntimeError:
            pass
    lines = [str(w.message).split("(Triggered internally")[0].strip() for w in caught]
    return " ".join(dict.fromkeys(line for line in lines if line))
