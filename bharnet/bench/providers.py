"""Providers: who computes an op or a model in a benchmark row.

* ``eager``: the pure-PyTorch reference (backend ``reference``);
* ``compile``: the reference under ``torch.compile`` (``compile:<mode>`` for a mode other than
  the default, e.g. ``compile:max-autotune``);
* ``<backend>``: each bharnet backend other than ``reference``/``auto`` (``triton``, ``cpp``,
  and whatever ``bharnet.ops`` declares later), discovered at run time;
* ``<backend>+compile`` (``<backend>+compile:<mode>``): that backend under ``torch.compile``;
* for an op with an SDPA form (``cross_attention``, see :mod:`.baselines`): ``sdpa`` (PyTorch
  picks the SDPA backend), ``sdpa+compile``, and ``sdpa-<name>`` with one SDPA backend forced
  (``math``, ``efficient``, ``flash``, ``cudnn``; eager only). Whether a forced backend takes
  the inputs is known only when it runs: one that rejects them is reported as skipped.

Whole models use ``eager``, ``compile``, ``auto`` and ``auto+compile``: ``auto`` runs each op
on the fastest backend available for the device (``bharnet.ops.use_backend("auto")``), which
is how bharnet is used; a single explicit backend would fail on a model using an op without it.
Inference adds ``auto+fold``: ``auto`` on the model fused for inference
(:func:`bharnet.fast.fuse_for_inference`: BatchNorm folded, branch convolutions merged, absent
persons skipped), and ``auto+fold+compile``: ``torch.compile`` of that model. In bf16 the
fused model is a bfloat16 model (parameters and inputs; see bharnet/bench/model_cases.py).

A backend that cannot run is kept as a provider with a skip reason, so the report says why.
On CPU the Triton backend is skipped: there it runs only in the Triton interpreter.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence

import torch

from ..engine.config import COMPILE_MODES
from ..ops._backend import BACKENDS, unavailable_reason
from .baselines import SDPA, SDPA_FORMS, forced_sdpa_providers

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
TRITON_ON_CPU = ("Triton on CPU runs only in the interpreter (TRITON_INTERPRET=1), "
                 "which is not a benchmark")


@dataclass(frozen=True)
class Provider:
    """``backend`` computes the ops (a bharnet backend, or an SDPA provider name for an op's
    SDPA form); ``compile_mode`` is None for eager execution."""

    backend: str
    compile_mode: Optional[str] = None
    skip: Optional[str] = None
    fold: bool = False  # models only: run the model fused for inference

    @property
    def name(self) -> str:
        base = "eager" if self.backend == "reference" else self.backend
        if self.fold:
            base += "+fold"
        if self.compile_mode is None:
            return base
        suffix = "" if self.compile_mode == "default" else f":{self.compile_mode}"
        return f"compile{suffix}" if self.backend == "reference" else f"{base}+compile{suffix}"


def fused_backends() -> List[str]:
    """The bharnet backends besides the reference (``auto`` only selects among them)."""
    return [b for b in BACKENDS if b not in ("reference", "auto")]


# ops whose cpp backend has CPU kernels only (PyTorch's own op elsewhere), and those of them whose
# kernels also step aside under CPU autocast (bharnet.ops._checks.nn_layer_kernel_applies; the
# 1x1 convolution's batched GEMM does not)
CPU_ONLY_CPP = ("batch_norm", "pointwise_conv", "temporal_max_pool")
CPP_NOT_UNDER_AUTOCAST = ("batch_norm",)


def backend_skip_reason(op: str, backend: str, device_type: str) -> Optional[str]:
    """Why ``backend`` is not benchmarked for ``op`` (None: benchmark it)."""
    if backend == "triton" and device_type == "cpu":
        return TRITON_ON_CPU
    if backend == "cpp" and op in CPU_ONLY_CPP and device_type != "cpu":
        return f"its C++ kernels are CPU-only: on {device_type} it runs PyTorch's op, the eager row"
    return unavailable_reason(op, backend, device_type)


def dtype_skip_reason(op: str, backend: str, device_type: str, dtype: str) -> Optional[str]:
    """Why ``backend`` is not benchmarked for ``op`` in ``dtype`` although it is in others."""
    if backend == "cpp" and op in CPP_NOT_UNDER_AUTOCAST and device_type == "cpu" and dtype != "fp32":
        return f"under {dtype} autocast it runs PyTorch's op, the eager row"
    return None


def model_providers(compile_modes: Sequence[str], infer: bool = False) -> List[Provider]:
    """eager, auto, and both under every mode in ``compile_modes``; for inference also
    ``auto+fold``, under those modes too."""
    backends = [("reference", False), ("auto", False)] + ([("auto", True)] if infer else [])
    return [Provider(backend, mode, fold=fold) for backend, fold in backends for mode in (None, *compile_modes)]


def providers(op: str, device_type: str, compile_modes: Sequence[str]) -> List[Provider]:
    """Every provider for ``op``: eager, its SDPA form if it has one, each backend, and each of
    them under every mode in ``compile_modes`` (an empty sequence: no compiled providers); the
    forced SDPA backends run eager only."""
    result = [Provider("reference")] + [Provider("reference", m) for m in compile_modes]
    if op in SDPA_FORMS:
        result += [Provider(SDPA)] + [Provider(SDPA, m) for m in compile_modes]
        result += [Provider(name) for name in forced_sdpa_providers()]
    for backend in fused_backends():
        skip = backend_skip_reason(op, backend, device_type)
        result.append(Provider(backend, None, skip))
        result += [Provider(backend, m, skip) for m in compile_modes]
    return result


def compiled(fn: Callable, mode: Optional[str], fullgraph: bool) -> Callable:
    """``fn`` itself (``mode`` None) or ``torch.compile(fn)`` with static shapes; under
    ``reduce-overhead`` (CUDA graphs) every call first marks a new step."""
    if mode is None:
        return fn
    compiled_fn = torch.compile(fn, mode=None if mode == "default" else mode,
                                fullgraph=fullgraph, dynamic=False)
    if mode != "reduce-overhead":
        return compiled_fn

    def call(*args, **kwargs):
        torch.compiler.cudagraph_mark_step_begin()
        return compiled_fn(*args, **kwargs)
    return call


def autocast(device: torch.device, dtype_name: str):
    """``torch.autocast`` to bfloat16 for ``bf16``; no-op context for ``fp32``."""
    if dtype_name == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=DTYPES[dtype_name])
