"""How the C++/CUDA extension is built: sources and flags, shared by ``setup.py`` (which loads
this file by path, without importing the package) and the JIT build in ``bharnet._ext``.

CPU sources are ``csrc/*.cpp`` except the CUDA bindings ``csrc/*_cuda.cpp``; a CUDA build adds
those and ``csrc/*.cu`` (torch-free kernels, named ``*_kernels.cu``: setuptools names objects
after the file's stem, so a ``.cu`` must not share one with a ``.cpp``) and compiles device
code for sm_80 and sm_90 (plus sm_90 PTX for newer GPUs) unless ``TORCH_CUDA_ARCH_LIST`` says
otherwise. The CPU
kernels need no ``-march``: they carry per-ISA clones (``csrc/cpu_simd.h``). The link names the
shared C++ runtime where the compiler would link the static one (:func:`link_flags`).
"""
from __future__ import annotations

import os
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import List, Optional

CXX_FLAGS = ["-O3", "-fopenmp"]
LINK_FLAGS = ["-fopenmp"]
GENCODE_FLAGS = ["-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=sm_90",
                 "-gencode=arch=compute_90,code=compute_90"]


def sources(source_dir: Path, cuda: bool) -> List[str]:
    """The extension's source files (absolute paths, sorted)."""
    cpu = [p for p in sorted(source_dir.glob("*.cpp")) if not p.name.endswith("_cuda.cpp")]
    if not cuda:
        return [str(p) for p in cpu]
    return [str(p) for p in cpu + sorted(source_dir.glob("*_cuda.cpp")) + sorted(source_dir.glob("*.cu"))]


def link_flags() -> List[str]:
    """LINK_FLAGS, plus ``-l:libstdc++.so.6`` where the C++ compiler (``$CXX``, else ``c++``) finds
    only the static C++ runtime, libstdc++.a, for its implicit ``-lstdc++`` but the shared one on
    its library path. A GCC whose own library folder holds only the archive (the GPU machine's
    ``CXX=/opt/gcc/bin/g++``) links a second copy of libstdc++ into the extension, and that copy
    segfaults the first time an error message formats a number: its locale facets are not the
    process's. Naming the shared runtime first leaves the archive nothing to add."""
    if _finds_only_static_runtime(os.environ.get("CXX") or "c++"):
        return LINK_FLAGS + ["-l:libstdc++.so.6"]
    return LINK_FLAGS


def _finds_only_static_runtime(compiler: str) -> bool:
    def found(name: str) -> bool:
        try:
            answer = subprocess.run([*shlex.split(compiler), f"-print-file-name={name}"], capture_output=True,
                                    text=True, timeout=60).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return False
        return os.path.isabs(answer) and os.path.exists(answer)  # a bare name: not found

    return not found("libstdc++.so") and found("libstdc++.a") and found("libstdc++.so.6")


def nvcc_flags() -> List[str]:
    """nvcc flags; explicit -gencode flags stop torch from probing for a GPU to pick the arch."""
    flags = ["-O3"]
    if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        flags += GENCODE_FLAGS
    return flags


def cuda_home() -> Optional[str]:
    """The CUDA toolkit root: $CUDA_HOME or $CUDA_PATH, else /usr/local/cuda, else the directory
    above a real ``nvcc`` on PATH (the nvcc on PATH may be a wrapper, so /usr/local/cuda wins)."""
    for name in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(name):
            return os.environ[name]
    if Path("/usr/local/cuda/bin/nvcc").exists():
        return "/usr/local/cuda"
    nvcc = shutil.which("nvcc")
    if nvcc:
        root = Path(nvcc).resolve().parent.parent
        if (root / "include" / "cuda_runtime.h").exists():
            return str(root)
    return None
