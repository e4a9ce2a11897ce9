"""Backend selection shared by every fused op.

Backends: ``reference`` (pure PyTorch, the numerical ground truth), ``triton`` (Triton
kernels; on CPU only under ``TRITON_INTERPRET=1``), ``cpp`` (the C++/CUDA extension) and
``auto`` (the fastest backend that can run on the tensor's device, falling back to
``reference``; a backend registered with ``in_auto=False`` runs only when named; under
``torch.func`` transforms and forward-mode AD, for which the kernels' autograd Functions have
no rules, ``auto`` is ``reference``; a backend named there raises, saying so, unless it runs
PyTorch's ops then). The choice
is made per call (``backend=``), per layer (``impl=``) or globally (:func:`use_backend`,
environment variable ``BHARNET_BACKEND``), in that order of precedence.
"""
from __future__ import annotations

import functools
import os
from typing import Callable, Dict, List, Optional, Set, Tuple

import torch

BACKENDS = ("reference", "triton", "cpp", "auto")
_AUTO_ORDER = {"cuda": ("triton", "cpp", "reference"), "cpu": ("cpp", "reference")}

_global_backend: Optional[str] = None
# op name -> backend name -> callable returning None when usable or a reason string
_availability: Dict[str, Dict[str, Callable[[str], Optional[str]]]] = {}
# (op, backend) pairs that ``auto`` passes over (run only when named)
_explicit_only: Set[Tuple[str, str]] = set()
# (op, backend) pairs that compute forward-mode derivatives (they run PyTorch's ops under it)
_forward_ad: Set[Tuple[str, str]] = set()


def _check_name(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    return name


def get_backend() -> str:
    """The global default backend: :func:`use_backend`, else ``$BHARNET_BACKEND``, else auto."""
    if _global_backend is not None:
        return _global_backend
    name = os.environ.get("BHARNET_BACKEND", "auto")
    if name not in BACKENDS:
        raise ValueError(f"$BHARNET_BACKEND must be one of {BACKENDS}, got {name!r}")
    return name


class use_backend:
    """Set the global backend; also a context manager and a function decorator that restore the
    old one on leaving.

    >>> bharnet.ops.use_backend("reference")          # from now on
    >>> with bharnet.ops.use_backend("triton"): ...    # only inside the block
    >>> @bharnet.ops.use_backend("cpp")                # only inside each call
    ... def infer(x): ...

    The setting is one value for the whole process, not per thread: threads that run models on
    different backends should pass ``backend=`` or set their layers' ``impl``
    (:func:`bharnet.fast.swap_layers`) instead.
    """

    def __init__(self, name: str):
        global _global_backend
        self._name = _check_name(name)
        self._previous = _global_backend
        _global_backend = self._name

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        global _global_backend
        _global_backend = self._previous
        return False

    def __call__(self, function: Callable) -> Callable:
        global _global_backend
        _global_backend = self._previous  # decorating sets nothing by itself

        @functools.wraps(function)
        def with_backend(*args, **kwargs):
            with use_backend(self._name):
                return function(*args, **kwargs)
        return with_backend


def register_backend(op: str, backend: str, availability: Callable[[str], Optional[str]],
                     in_auto: bool = True, forward_ad: bool = False) -> None:
    """Declare that ``op`` has ``backend``; ``availability(device_type)`` returns None if it can
    run on that device type, else a one-line reason. With ``in_auto=False``, ``auto`` passes
    over it: it runs only when named (a backend not yet shown to be faster where it runs).
    ``forward_ad``: it computes forward-mode derivatives and runs under ``torch.func``
    transforms (by running PyTorch's ops there); else, named there, it raises."""
    _availability.setdefault(op, {})[_check_name(backend)] = availability
    if not in_auto:
        _explicit_only.add((op, backend))
    if forward_ad:
        _forward_ad.add((op, backend))


def has_backend(op: str, backend: str) -> bool:
    """Whether ``op`` has ``backend`` at all (``reference`` and ``auto`` always), whatever the device."""
    return backend in ("reference", "auto") or backend in _availability.get(op, {})


def registered_ops() -> List[str]:
    """The ops with a backend besides ``reference``, in registration (import) order."""
    return list(_availability)


def unavailable_reason(op: str, backend: str, device_type: str) -> Optional[str]:
    """Why ``backend`` cannot run ``op`` on ``device_type`` (None when it can)."""
    if backend == "reference":
        return None
    check = _availability.get(op, {}).get(backend)
    if check is None:
        return f"{op} has no {backend!r} backend"
    return check(device_type)


def resolve(op: str, backend: Optional[str], device_type: str, cannot_take: Tuple[str, ...] = ()) -> str:
    """Turn a requested backend (None = global default) into a concrete one for ``device_type``.

    An explicitly requested backend that cannot run raises ``RuntimeError`` with the reason;
    ``auto`` picks the first usable backend in a fixed preference order, passing over those
    registered with ``in_auto=False`` and those in ``cannot_take`` (the backends whose kernels
    cannot take this call's shapes, e.g. more joints than the Triton tiles hold; named
    explicitly, such a backend raises its own error saying so).
    """
    name = _check_name(backend) if backend is not None else get_backend()
    if name == "auto":
        # torch.func transforms (grad, vmap, jvp, ...) and forward-mode AD: the kernels' autograd
        # Functions have no rules for them
        if torch._C._are_functorch_transforms_active() or torch.autograd.forward_ad._current_level >= 0:
            return "reference"
        for candidate in _AUTO_ORDER.get(device_type, ("reference",)):
            if (candidate not in cannot_take and (op, candidate) not in _explicit_only
                    and unavailable_reason(op, candidate, device_type) is None):
                return candidate
        return "reference"
    reason = unavailable_reason(op, name, device_type)
    if reason is None and name != "reference" and (op, name) not in _forward_ad:
        if torch._C._are_functorch_transforms_active():
            reason = ("its kernels' autograd has no rules for torch.func transforms (grad, vjp, jacrev, vmap, "
                      "jvp, ...); use backend='reference', or 'auto', which picks it there")
        elif torch.autograd.forward_ad._current_level >= 0:
            reason = ("its kernels have no forward-mode derivatives (torch.func.jvp, jacfwd, hessian, "
                      "torch.autograd.forward_ad); use backend='reference', or 'auto', which picks it there")
    if reason is not None:
        raise RuntimeError(f"bharnet: backend {name!r} cannot run {op} on {device_type}: {reason}")
    return name


def resolve_missing_as_auto(op: str, backend: Optional[str], device_type: str) -> str:
    """:func:`resolve`, except that a backend ``op`` does not have at all counts as ``auto``: for
    ops that only speed up a layer of a model whose other layers take that backend (e.g. a
    model on ``triton`` whose max-pool has no Triton kernel), like :func:`bharnet.fast.swap_layers`
    does for layers. A backend the op has but that cannot run on the device still raises."""
    name = _check_name(backend) if backend is not None else get_backend()
    return resolve(op, name if has_backend(op, name) else "auto", device_type)


def triton_availability(device_type: str) -> Optional[str]:
    """Shared availability rule for Triton backends."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return "triton is not installed"
    if device_type == "cuda":
        return None
    if device_type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
        return None
    return f"Triton kernels need a CUDA device (or TRITON_INTERPRET=1 on CPU), got {device_type}"
