"""Registering Triton-backed functions as PyTorch custom ops."""
from __future__ import annotations

import os

import torch
from torch.library import triton_op, wrap_triton

try:
    from torch._library.triton import is_wrap_triton_enabled
except ImportError:  # a torch without the switch: always go through wrap_triton
    def is_wrap_triton_enabled() -> bool:
        return True


def triton_custom_op(name: str, fake):
    """Register the decorated function as the custom op ``bharnet::<name>``.

    With Triton compiling for a GPU it is a ``triton_op``: ``torch.compile`` traces into it and
    sees its kernels (the function itself serves as the fake impl). Under TRITON_INTERPRET=1,
    ``wrap_triton`` hands back the interpreted kernel, which would run on the fake tensors that
    tracing uses, so there the op is an opaque ``custom_op`` whose fake impl is ``fake``."""
    def register(fn):
        if os.environ.get("TRITON_INTERPRET") == "1":
            op = torch.library.custom_op(f"bharnet::{name}", fn, mutates_args=())
            op.register_fake(fake)
            return op
        return triton_op(f"bharnet::{name}", fn, mutates_args=())
    return register


def launcher(kernel):
    """``launcher(kernel)[grid](...)`` launches a Triton kernel from inside a ``triton_custom_op``.

    While torch traces the op (``torch.compile``) this is ``wrap_triton(kernel)``, which records
    the launch. In eager calls a ``triton_op`` switches ``wrap_triton`` off, and then the
    kernel is launched directly (older torch releases still build wrapper objects per launch
    there; host time adds up: each fused op launches up to five kernels per call)."""
    return wrap_triton(kernel) if is_wrap_triton_enabled() else kernel


# Tests set this to fill every output and scratch buffer of the Triton ops with NaN before the
# kernels run, so that an element a kernel forgets to write cannot pass for a correct one.
POISON_OUTPUTS = False


def new_output(shape, dtype: torch.dtype, device) -> torch.Tensor:
    """An output or scratch buffer of a Triton op (NaN-filled while ``POISON_OUTPUTS``)."""
    if POISON_OUTPUTS:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for launch grids (plain Python: ``triton.cdiv`` is slower to call)."""
    return -(-a // b)
