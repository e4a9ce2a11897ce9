"""Build script: the Python package, the Triton kernels (as ``bharnet.kernels``) and, when
torch is importable at build time, the C++ extension from ``csrc/``.

Without torch at build time (pip's default build isolation) the extension is skipped and
``bharnet._ext`` JIT-compiles the very same sources on first use.
"""
import glob
import os

from setuptools import find_packages, setup

packages = find_packages(include=["bharnet", "bharnet.*"]) + ["bharnet.kernels"]
package_dir = {"bharnet.kernels": "kernels"}


def extension_build():
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:
        return [], {}
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    ext = CppExtension(
        name="bharnet._C",
        sources=sources,
        extra_compile_args=["-O3", "-fopenmp"],
        extra_link_args=["-fopenmp"],
    )
    return [ext], {"build_ext": BuildExtension.with_options(no_python_abi_suffix=True)}


ext_modules, cmdclass = extension_build()
setup(packages=packages, package_dir=package_dir, ext_modules=ext_modules, cmdclass=cmdclass)
