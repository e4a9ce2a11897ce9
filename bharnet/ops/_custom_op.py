"""Registering Triton-backed functions as PyTorch custom ops."""
from __future__ import annotations

import functools
import os
from typing import Callable, Optional

import torch
from torch._C import _functions as autograd_functions
from torch._library.triton import is_wrap_triton_enabled, set_wrap_triton_enabled
from torch.library import triton_op, wrap_triton


class FusedOp:
    """A custom op ``bharnet::<name>`` (``op``) and the Python function behind it (``body``).

    ``op(*args)`` goes through the dispatcher: autograd, ``torch.compile``, ``opcheck``.
    ``body(*args)`` runs the function itself with kernels launched directly; plain eager calls
    take it (see :func:`with_autograd`), because on a slow host the dispatcher's per-call work
    (schema checks, the custom-op autograd wrapper, alias checks: about 30 us of host time per
    op on the H100 machine) costs more than a small kernel runs."""

    def __init__(self, name: str, op, body: Callable):
        self.name = name
        self.op = op
        self.body = body


def opaque_custom_op(name: str, fake):
    """Register the decorated function as an opaque ``custom_op`` ``bharnet::<name>`` with the
    fake impl ``fake`` (torch.compile does not look inside); returns a FusedOp."""
    def register(fn):
        op = torch.library.custom_op(f"bharnet::{name}", fn, mutates_args=())
        op.register_fake(fake)
        return FusedOp(name, op, fn)
    return register


def triton_custom_op(name: str, fake):
    """Register the decorated function as the custom op ``bharnet::<name>``; returns a FusedOp.

    With Triton compiling for a GPU it is a ``triton_op``: ``torch.compile`` traces into it and
    sees its kernels (the function itself serves as the fake impl). Under TRITON_INTERPRET=1,
    ``wrap_triton`` hands back the interpreted kernel, which would run on the fake tensors that
    tracing uses, so there the op is an opaque ``custom_op`` whose fake impl is ``fake``."""
    def register(fn):
        if os.environ.get("TRITON_INTERPRET") == "1":
            return opaque_custom_op(name, fake)(fn)

        def body(*args):  # what triton_op does in eager calls: launch kernels, no wrap_triton
            with set_wrap_triton_enabled(False):
                return fn(*args)
        return FusedOp(name, triton_op(f"bharnet::{name}", fn, mutates_args=()), body)
    return register


# Tests set this to False to send eager calls through the dispatcher too (the path that
# torch.compile and opcheck take), so that both paths are checked against the reference.
DIRECT_EAGER_CALLS = True


def direct_call_allowed(first: torch.Tensor) -> bool:
    """A call may skip the dispatcher when nothing but plain eager autograd would see it: not
    while torch.compile/export or torch.jit.trace traces, under a dispatch mode (fake tensors,
    functionalization) or a functorch transform, nor when the first argument (the activation)
    is a tensor subclass. Limits: other arguments are not inspected, and the choice is made at
    the forward, so a dispatch mode entered only around ``backward()`` (e.g. a FLOP counter)
    sees the backward's kernels as one opaque autograd node."""
    return (DIRECT_EAGER_CALLS and type(first) is torch.Tensor
            and not torch.compiler.is_compiling()
            and torch._C._get_tracing_state() is None
            and torch._C._len_torch_dispatch_stack() == 0
            and not torch._C._are_functorch_transforms_active())


def _through_dispatcher(fused: FusedOp, *args):
    return fused.op(*args)


def _direct(fused: FusedOp, *args):
    return fused.body(*args)


def double_backward_error(op: str) -> str:
    """The error of differentiating a fused op's backward (the C++ ops say the same)."""
    return (f"bharnet::{op}: double backward is not supported (gradients of gradients, e.g. "
            f"create_graph=True for a gradient penalty); use backend='reference' for them")


def differentiable_once(op: str, backward: Callable) -> Callable:
    """``backward`` run under no_grad; under ``create_graph`` its gradients come out of a node
    that raises :func:`double_backward_error` when they are differentiated. Like
    ``torch.autograd.function.once_differentiable``, with an error that names the op, and (as
    the C++ ops' ``once_differentiable`` in csrc/autograd.cpp) whenever the graph is created:
    torch's only when an incoming gradient requires grad, so for a loss linear in the output
    (``y.sum()``) a gradient penalty through the op was silently dropped. The node also takes
    the incoming gradients and saved tensors that require grad, so that it lies on the graph's
    paths from the gradients to the inputs: ``torch.autograd.grad(penalty, x)`` reaches it
    and raises (without them ``x`` looked unused: torch's error, or None with
    ``allow_unused``)."""
    @functools.wraps(backward)
    def wrapper(ctx, *grads):
        if not torch.is_grad_enabled():
            with torch.no_grad():
                return backward(ctx, *grads)
        # unpacked once, for the backward (saved_tensors) and here: non-reentrant checkpointing
        # refuses a second unpack, and a recomputing pack hook would recompute twice
        ctx.bharnet_saved = ctx.saved_tensors
        try:
            with torch.no_grad():
                outputs = backward(ctx, *grads)
            paths = [t for t in (*grads, *ctx.bharnet_saved) if t is not None and t.requires_grad]
        finally:
            del ctx.bharnet_saved
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        refusal = autograd_functions.DelayedError(double_backward_error(op).encode(), len(outputs) + len(paths))
        refused = refusal(*[None if t is None else t.detach().requires_grad_() for t in outputs], *paths)
        return tuple(refused if isinstance(refused, (tuple, list)) else (refused,))[:len(outputs)]
    return wrapper


def saved_tensors(ctx) -> tuple:
    """``ctx.saved_tensors``, or the tuple that :func:`differentiable_once` unpacked for this
    backward already (a backward wrapped by it reads its saved tensors through this)."""
    return getattr(ctx, "bharnet_saved", None) or ctx.saved_tensors


def refuse_double_backward(backward_op: str, op: str) -> None:
    """Register autograd for the custom op ``backward_op`` (qualified name) that raises
    :func:`double_backward_error` of ``op``: differentiating a fused op's gradients."""
    def refuse(ctx, *grads):
        raise RuntimeError(double_backward_error(op))
    torch.library.register_autograd(backward_op, refuse, setup_context=lambda ctx, inputs, output: None)


def with_autograd(forward: FusedOp, make_backward: Callable, setup_context: Callable,
                  backward_ops: tuple = ()) -> Callable:
    """Register autograd for ``forward.op`` and return the function that calls the op.

    ``make_backward(run)`` builds the autograd backward ``backward(ctx, *grads)``; it calls its
    backward ops (``backward_ops``) as ``run(fused_op, *args)``. Registered with ``run`` going
    through the dispatcher, it is the op's autograd formula (compile, opcheck); the backward ops'
    own autograd raises :func:`double_backward_error`. The returned function takes the direct
    path for plain eager calls (first argument a plain tensor, nothing tracing): an
    ``autograd.Function`` over the bodies with the same ``setup_context`` and
    ``make_backward(run)`` running the backward bodies, double backward refused with the same
    error (:func:`differentiable_once`)."""
    forward.op.register_autograd(make_backward(_through_dispatcher), setup_context=setup_context)
    for backward_op in backward_ops:
        refuse_double_backward(f"bharnet::{backward_op.name}", forward.name)
    body = forward.body

    def direct_forward(ctx, *inputs):
        output = body(*inputs)
        setup_context(ctx, inputs, output)
        return output

    direct_function = type(f"{forward.name}_direct", (torch.autograd.Function,), dict(
        forward=staticmethod(direct_forward),
        backward=staticmethod(differentiable_once(forward.name, make_backward(_direct)))))
    direct, op = direct_function.apply, forward.op

    def call(*args):
        return direct(*args) if direct_call_allowed(args[0]) else op(*args)
    return call


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


def as_dtype(t: Optional[torch.Tensor], dtype: torch.dtype) -> Optional[torch.Tensor]:
    """``t.to(dtype)``, skipped when ``t`` is None or already has ``dtype`` (then ``.to`` returns
    ``t`` itself anyway, after a trip through the dispatcher: about 1.4 us of host time here,
    several times that on a slow host, and the Triton ops' eager paths make a dozen per call)."""
    return t if t is None or t.dtype == dtype else t.to(dtype)


def cpu_kernel_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype in which the C++ CPU kernels (graph and temporal convolutions, max-pool) take
    features of ``dtype``: float32, float64 and bfloat16 as they are (bfloat16 widened to
    float32 as read, forward and backward), anything else (float16) as float32."""
    return dtype if dtype in (torch.float32, torch.float64, torch.bfloat16) else torch.float32


def launch_config(fn: Callable) -> Callable:
    """Cache a launch-configuration function of plain ints (``functools.lru_cache``); calls
    with symbolic sizes (torch.compile traces with unhashable SymInts) compute it afresh."""
    cached = functools.lru_cache(maxsize=None)(fn)

    @functools.wraps(fn)
    def config(*args, **kwargs):
        try:
            return cached(*args, **kwargs)
        except TypeError:  # unhashable arguments
            return fn(*args, **kwargs)
    return config


def next_pow2(n: int) -> int:
    """Smallest power of two >= max(n, 1) (plain Python: ``triton.next_power_of_2`` is a
    constexpr function, about 1 us per host call)."""
    return 1 << (max(n, 1) - 1).bit_length()


MAX_GRID_YZ = 65535  # programs along a GPU launch grid's second and third axes (the first: 2^31 - 1)


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for launch grids (plain Python: ``triton.cdiv`` is slower to call)."""
    return -(-a // b)
