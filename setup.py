"""Build script: the Python package, the Triton kernels (as ``bharnet.kernels``) and, when
torch is importable at build time, the C++ extension from ``csrc/`` (CPU kernels always; the
CUDA kernels too when torch is a CUDA build and nvcc is found).

Without torch at build time (pip's default build isolation) the extension is skipped and
``bharnet._ext`` JIT-compiles the very same sources on first use.
"""
import importlib.util
import os
from pathlib import Path

from setuptools import find_packages, setup

packages = find_packages(include=["bharnet", "bharnet.*"]) + ["bharnet.kernels"]
package_dir = {"bharnet.kernels": "kernels"}
ROOT = Path(__file__).resolve().parent


def build_rules():
    """bharnet/_build.py, loaded by path: importing the package would import all of bharnet."""
    spec = importlib.util.spec_from_file_location("bharnet_build", ROOT / "bharnet" / "_build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def extension_build():
    try:
        import torch
    except ImportError:
        return [], {}
    rules = build_rules()
    cuda = bool(torch.version.cuda) and rules.cuda_home() is not None
    if cuda:
        os.environ.setdefault("CUDA_HOME", rules.cuda_home())  # read when cpp_extension is imported
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    sources = [os.path.relpath(p, ROOT) for p in rules.sources(ROOT / "csrc", cuda)]
    if cuda:
        ext = CUDAExtension(name="bharnet._C", sources=sources,
                            extra_compile_args={"cxx": rules.CXX_FLAGS, "nvcc": rules.nvcc_flags()},
                            extra_link_args=rules.link_flags())
    else:
        ext = CppExtension(name="bharnet._C", sources=sources, extra_compile_args=rules.CXX_FLAGS,
                           extra_link_args=rules.link_flags())
    return [ext], {"build_ext": BuildExtension.with_options(no_python_abi_suffix=True)}


ext_modules, cmdclass = extension_build()
setup(packages=packages, package_dir=package_dir, ext_modules=ext_modules, cmdclass=cmdclass)
