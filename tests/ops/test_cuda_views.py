"""The CUDA kernels' index arithmetic, checked on the CPU.

No GPU runs here, so the CUDA kernels themselves are only compiled (``.ci/run``) and run by
``bench/gpu_check.sh`` on a lent GPU. What can be run here is the arithmetic that maps GEMM
coordinates to tensor elements, where a wrong offset gives wrong numbers rather than a
compile error:

* ``csrc/fast_divmod.h`` (division by multiplication) against plain division
  (``cuda_host/fast_divmod_check.cpp``, g++);
* the operand views of the DeTGC kernels and of CTR-GC's generic SIMT kernels (the
  ``Problem::at(batch)`` objects of ``csrc/*_kernels.cu``, host-device functions), run through
  ``cuda_gemm.cuh``'s GEMM contract with plain host loops and compared with each op's math
  written as loops, in float64 (1e-12) and float32 (``cuda_host/*_views.cu``, compiled by nvcc
  for the host; its device code is compiled for sm_90 along the way). The DeTGC cases cover
  odd sizes, stride 2 and 3, positions at and beyond the clamp bounds, output channels above
  32 (the 64-row tile), uneven and empty split-K shares.

The tiling, shared memory and launch configuration of the GPU kernels are not covered here.
"""
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
HOST_DIR = Path(__file__).resolve().parent / "cuda_host"


def _build_and_run(compiler: list, source: str, tmp_path: Path) -> str:
    binary = tmp_path / Path(source).stem
    build = subprocess.run([*compiler, "-std=c++17", "-O1", f"-I{ROOT / 'csrc'}", f"-I{HOST_DIR}", "-o", str(binary),
                            str(HOST_DIR / source)], capture_output=True, text=True)
    assert build.returncode == 0, f"building {source} failed:\n{build.stdout}{build.stderr}"
    run = subprocess.run([str(binary)], capture_output=True, text=True)
    assert run.returncode == 0, f"{source} failed:\n{run.stdout}{run.stderr}"
    return run.stdout


def _nvcc() -> str:
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc not found (the CUDA sources are compile-checked only where nvcc is)")
    return nvcc


def test_fast_divmod_matches_division(tmp_path):
    cxx = shutil.which("g++") or shutil.which("c++")
    assert cxx, "a C++ compiler is needed (the extension builds with it too)"
    out = _build_and_run([cxx], "fast_divmod_check.cpp", tmp_path)
    assert "ok FastDivmod" in out


def test_detgc_cuda_views_match_the_math(tmp_path):
    out = _build_and_run([_nvcc(), "-arch=sm_90"], "detgc_views.cu", tmp_path)
    assert out.count("ok ") == 3 * 4 * 2, out  # forward, [dW | D], dx; four cases; float64 and float32
    assert "all DeTGC view checks passed" in out


def test_ctr_cuda_views_match_the_math(tmp_path):
    out = _build_and_run([_nvcc(), "-arch=sm_90"], "ctr_views.cu", tmp_path)
    assert out.count("ok ") == 3 * 3 * 2, out  # forward, dv, dtopo; three shapes; float64 and float32
    assert "all CTR-GC view checks passed" in out
