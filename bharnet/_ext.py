"""The C++/CUDA extension built from ``csrc/``.

``setup.py`` builds it as ``bharnet/_C.so`` when torch is importable at install time
(``pip install --no-build-isolation -e .``), with the CUDA kernels when torch is a CUDA build
and nvcc is found. Otherwise the first call of :func:`load` JIT-compiles the same sources
(``bharnet/_build.py`` lists them) with ``torch.utils.cpp_extension.load`` (cached under
``$TORCH_EXTENSIONS_DIR``, a folder per source tree and torch install): the CPU kernels always, the CUDA kernels too when a GPU is visible
and nvcc is found (if that CUDA build fails, the CPU-only build is used and a warning says
why). The ops register themselves with ``TORCH_LIBRARY`` under ``torch.ops.bharnet``.
"""
from __future__ import annotations

import functools
import hashlib
import logging
import os
import sys
import threading
import warnings
from pathlib import Path
from typing import Callable, Optional

import torch

from . import _build

_PACKAGE_DIR = Path(__file__).resolve().parent
SOURCE_DIR = _PACKAGE_DIR.parent / "csrc"


def _last_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[-1] if text else ""


def build_directory(name: str) -> str:
    """Where the JIT build of ``name`` goes: a folder under torch's extension root
    (``$TORCH_EXTENSIONS_DIR``, else torch's default) of its own per source tree and torch
    install. With torch's one folder per name, two checkouts or virtualenvs rebuilt the
    extension (80 s) each time after the other had been used."""
    from torch.utils import cpp_extension

    root = os.environ.get("TORCH_EXTENSIONS_DIR") or cpp_extension.get_default_build_root()
    key = hashlib.sha1(f"{SOURCE_DIR}|{os.path.dirname(torch.__file__)}".encode()).hexdigest()[:12]
    path = os.path.join(root, f"{name}-{key}")
    os.makedirs(path, exist_ok=True)
    return path


def _jit_build(cuda: bool) -> None:
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)  # CUDA_HOME notice
    if cuda:
        os.environ.setdefault("CUDA_HOME", _build.cuda_home())
    from torch.utils import cpp_extension

    if cuda and cpp_extension.CUDA_HOME is None:  # imported before CUDA_HOME was set
        cpp_extension.CUDA_HOME = os.environ["CUDA_HOME"]
    # a cached build loads in about a second: say so only when the compiler runs
    notice = threading.Timer(3.0, lambda: print(
        f"bharnet: compiling the C++ extension{' with its CUDA kernels' if cuda else ''} (once; about "
        "1-2 minutes on two cores, cached by torch afterwards)", file=sys.stderr, flush=True))
    notice.start()
    try:
        name = "bharnet_C_cuda" if cuda else "bharnet_C"
        cpp_extension.load(name=name, build_directory=build_directory(name),
                           sources=_build.sources(SOURCE_DIR, cuda), extra_cflags=_build.CXX_FLAGS,
                           extra_cuda_cflags=_build.nvcc_flags() if cuda else None,
                           extra_ldflags=_build.link_flags(), is_python_module=False, verbose=False,
                           with_cuda=cuda)
    finally:
        notice.cancel()


def load() -> None:
    """Load the prebuilt extension, or JIT-compile it; raise RuntimeError with the reason.

    One attempt per process: after a failed build, later calls raise the same reason at once
    instead of running the compiler again (every availability check calls this)."""
    reason = _load_once()
    if reason is not None:
        raise RuntimeError(reason)


@functools.lru_cache(maxsize=None)
def _load_once() -> Optional[str]:
    """None once the extension is loaded, else why it cannot be."""
    try:
        _load()
    except RuntimeError as error:
        return str(error)
    return None


def _load() -> None:
    prebuilt = sorted(_PACKAGE_DIR.glob("_C*.so"))
    if prebuilt:
        torch.ops.load_library(str(prebuilt[0]))
        return
    if not _build.sources(SOURCE_DIR, cuda=False):
        raise RuntimeError(f"bharnet: no prebuilt extension and no C++ sources in {SOURCE_DIR}; "
                           "reinstall with `pip install --no-build-isolation .` to build it")
    if torch.version.cuda and torch.cuda.is_available() and _build.cuda_home():
        try:
            _jit_build(cuda=True)
            return
        except Exception as error:  # keep the CPU kernels usable
            warnings.warn(f"bharnet: building the CUDA kernels failed ({type(error).__name__}: "
                          f"{_last_line(error)}); using the CPU-only C++ extension")
    try:
        _jit_build(cuda=False)
    except Exception as error:  # compiler missing or failing: say so, keep the reference backend
        raise RuntimeError(f"bharnet: could not build the C++ extension from {SOURCE_DIR} "
                           f"({type(error).__name__}: {_last_line(error)}); "
                           "the 'reference' backend still works") from error


# Availability is decided once, eagerly: torch.compile evaluates these at trace time and keeps
# the answer as a constant instead of tracing into the build.
@torch.compiler.assume_constant_result
def cpp_availability(device_type: str) -> Optional[str]:
    """Backend availability rule for the C++ CPU kernels (None when usable)."""
    if device_type != "cpu":
        return f"the C++ kernels run on CPU only (got {device_type})"
    try:
        load()
    except RuntimeError as error:
        return str(error)
    return None


@torch.compiler.assume_constant_result
def cuda_availability(op: str) -> Optional[str]:
    """Why the CUDA kernel of the custom op ``bharnet::<op>`` cannot run (None when it can): the
    extension must load and have been built with its CUDA kernels."""
    try:
        load()
    except RuntimeError as error:
        return str(error)
    if not torch._C._dispatch_has_kernel_for_dispatch_key(f"bharnet::{op}", "CUDA"):
        return ("the C++ extension was built without CUDA kernels (needs a CUDA build of torch and "
                "nvcc at build time, and a visible GPU for the JIT build)")
    return None


def cpp_backend_availability(cuda_op: str) -> Callable[[str], Optional[str]]:
    """The availability rule of an op's ``cpp`` backend whose CUDA kernels are the custom op
    ``bharnet::<cuda_op>``: :func:`cuda_availability` on CUDA, :func:`cpp_availability` elsewhere."""
    def availability(device_type: str) -> Optional[str]:
        return cuda_availability(cuda_op) if device_type == "cuda" else cpp_availability(device_type)
    return availability


def cpp_on_cpu_availability(device_type: str) -> Optional[str]:
    """The availability rule of a ``cpp`` backend whose C++ kernels are CPU-only and which runs
    PyTorch's own op on other devices: :func:`cpp_availability` on CPU, always usable elsewhere."""
    return cpp_availability(device_type) if device_type == "cpu" else None


# every function made by registered_after_loading, for register_all
_REGISTRATIONS: list = []


def registered_after_loading(register: Callable[[], None]) -> Callable[[], bool]:
    """A function that loads the extension and then runs ``register`` (the fake impls and
    autograd of an op's C++ ops) the first time it is called, and does nothing afterwards.

    It is an ``assume_constant_result``: ``torch.compile`` runs it eagerly while tracing a caller
    instead of tracing into the extension loading. :func:`register_all` runs every such function."""
    done = False

    @torch.compiler.assume_constant_result
    def ensure_registered() -> bool:
        nonlocal done
        if not done:
            load()
            register()
            done = True
        return True
    _REGISTRATIONS.append(ensure_registered)
    return ensure_registered


def register_all() -> None:
    """Run every op module's registration (see :func:`registered_after_loading`); the op modules
    that made them must have been imported."""
    for ensure_registered in _REGISTRATIONS:
        ensure_registered()
