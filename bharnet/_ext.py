"""The C++/CUDA extension built from ``csrc/``.

``setup.py`` builds it as ``bharnet/_C.so`` when torch is importable at install time
(``pip install --no-build-isolation -e .``). Otherwise the first call of :func:`load`
JIT-compiles the same sources with ``torch.utils.cpp_extension.load`` (cached under
``$TORCH_EXTENSIONS_DIR``, about 5 s once). The ops register themselves with
``TORCH_LIBRARY`` under ``torch.ops.bharnet``.
"""
from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Optional

import torch

_PACKAGE_DIR = Path(__file__).resolve().parent
SOURCE_DIR = _PACKAGE_DIR.parent / "csrc"


@functools.lru_cache(maxsize=None)
def load() -> None:
    """Load the prebuilt extension, or JIT-compile it; raise RuntimeError with the reason."""
    prebuilt = sorted(_PACKAGE_DIR.glob("_C*.so"))
    if prebuilt:
        torch.ops.load_library(str(prebuilt[0]))
        return
    sources = sorted(str(p) for p in SOURCE_DIR.glob("*.cpp"))
    if not sources:
        raise RuntimeError(f"bharnet: no prebuilt extension and no C++ sources in {SOURCE_DIR}; "
                           "reinstall with `pip install --no-build-isolation .` to build it")
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)  # CUDA_HOME notice
    from torch.utils import cpp_extension

    try:
        cpp_extension.load(name="bharnet_C", sources=sources, extra_cflags=["-O3", "-fopenmp"],
                           extra_ldflags=["-fopenmp"], is_python_module=False, verbose=False)
    except Exception as error:  # compiler missing or failing: say so, keep the reference backend
        raise RuntimeError(f"bharnet: could not build the C++ extension from {SOURCE_DIR} "
                           f"({type(error).__name__}: {str(error).strip().splitlines()[-1] if str(error).strip() else ''}); "
                           "the 'reference' backend still works") from error


def cpp_availability(device_type: str) -> Optional[str]:
    """Backend availability rule for the C++ CPU kernels (None when usable)."""
    if device_type != "cpu":
        return f"the C++ kernels run on CPU only (got {device_type})"
    try:
        load()
    except RuntimeError as error:
        return str(error)
    return None
