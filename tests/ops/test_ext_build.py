"""The C++ extension's build paths: a missing compiler leaves a clear reason and a working
reference backend; the source lists shared by setup.py and the JIT build."""
import os
import subprocess
import sys
from pathlib import Path

from bharnet import _build, _ext

NO_COMPILER = """
import torch
from bharnet import _ext
from bharnet.ops import ctr_graph_conv, deformable_temporal_conv
builds = []
jit_build = _ext._jit_build
_ext._jit_build = lambda cuda: (builds.append(cuda), jit_build(cuda))
reason = _ext.cpp_availability("cpu")
assert reason is not None and "could not build the C++ extension" in reason and "reference" in reason, reason
v, A = torch.randn(1, 3, 4, 5, 25), torch.randn(3, 25, 25)
y = ctr_graph_conv(v, A)  # auto: falls back to the reference
assert torch.allclose(y, torch.einsum("hij,bhctj->bcti", A, v), atol=1e-5)
deformable_temporal_conv(torch.randn(1, 2, 6, 5), torch.zeros(4), torch.randn(3, 2, 4))
try:
    ctr_graph_conv(v, A, backend="cpp")
except RuntimeError as error:
    assert "backend 'cpp' cannot run ctr_graph_conv" in str(error) and "could not build" in str(error)
else:
    raise AssertionError("the cpp backend ran without an extension")
assert _ext.cpp_availability("cpu") == reason
assert builds and len(builds) == len(set(builds)), builds  # each build tried once, not per call
print("ok")
"""


def test_missing_compiler_gives_a_clear_reason_and_the_reference_still_works(tmp_path):
    env = dict(os.environ, CXX=str(tmp_path / "no-such-compiler"), TORCH_EXTENSIONS_DIR=str(tmp_path / "ext"))
    result = subprocess.run([sys.executable, "-c", NO_COMPILER], env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("ok")


def test_cpu_and_cuda_source_lists():
    cpu = [Path(p).name for p in _build.sources(_ext.SOURCE_DIR, cuda=False)]
    cuda = [Path(p).name for p in _build.sources(_ext.SOURCE_DIR, cuda=True)]
    assert {"bone.cpp", "cross_attention.cpp", "ctr_graph_conv.cpp", "deformable_temporal_conv.cpp"} <= set(cpu)
    assert not any(name.endswith("_cuda.cpp") or name.endswith(".cu") for name in cpu)
    assert set(cuda) - set(cpu) == {"cross_attention_cuda.cpp", "cross_attention_kernels.cu",
                                    "cross_attention_mma_kernels.cu",
                                    "ctr_graph_conv_cuda.cpp", "ctr_graph_conv_kernels.cu",
                                    "deformable_temporal_conv_cuda.cpp", "deformable_temporal_conv_kernels.cu"}
    stems = [Path(name).stem for name in cuda]  # setuptools names each object file after its stem
    assert len(stems) == len(set(stems))


def test_each_source_tree_and_torch_install_builds_in_a_folder_of_its_own(tmp_path, monkeypatch):
    """Two checkouts (or virtualenvs) sharing torch's one folder per extension name rebuilt it
    each time after the other had been used."""
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    here = _ext.build_directory("bharnet_C")
    assert Path(here).parent == tmp_path and Path(here).is_dir() and Path(here).name.startswith("bharnet_C-")
    assert _ext.build_directory("bharnet_C") == here  # stable
    monkeypatch.setattr(_ext, "SOURCE_DIR", tmp_path / "another-checkout" / "csrc")
    assert _ext.build_directory("bharnet_C") != here


def _fake_compiler(tmp_path, name, shared_runtime: bool):
    """A compiler script answering ``-print-file-name=`` as GCC does: the library's path where
    its search path has it, else the bare name."""
    archive, shared = tmp_path / "libstdc++.a", tmp_path / "libstdc++.so.6"
    archive.touch()
    shared.touch()
    answers = {"libstdc++.a": archive, "libstdc++.so.6": shared}
    if shared_runtime:
        answers["libstdc++.so"] = shared
    cases = "".join(f'  -print-file-name={lib}) echo "{path}" ;;\n' for lib, path in answers.items())
    script = tmp_path / name
    bare = '  -print-file-name=*) echo "${1#-print-file-name=}" ;;\n'
    script.write_text(f'#!/bin/sh\ncase "$1" in\n{cases}{bare}esac\n')
    script.chmod(0o755)
    return str(script)


def test_a_compiler_with_only_the_static_cxx_runtime_links_the_shared_one(tmp_path, monkeypatch):
    """A GCC whose library folder holds only libstdc++.a (the GPU machine's CXX=/opt/gcc/bin/g++)
    would link a second copy of the C++ runtime into the extension, which segfaulted there at
    the first error message that formats a number: the link names the shared runtime then."""
    monkeypatch.setenv("CXX", _fake_compiler(tmp_path, "static-only-g++", shared_runtime=False))
    assert _build.link_flags() == _build.LINK_FLAGS + ["-l:libstdc++.so.6"]
    monkeypatch.setenv("CXX", _fake_compiler(tmp_path, "g++", shared_runtime=True))
    assert _build.link_flags() == _build.LINK_FLAGS
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))  # its build fails with its own message
    assert _build.link_flags() == _build.LINK_FLAGS
