import os

# The Triton interpreter must be chosen before triton is first imported; importing torch
# first is fine (it does not import triton eagerly).
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest


# Started first: with the test files shared among worker processes (pytest-xdist, addopts:
# --no-loadscope-reorder keeps this order; by default xdist hands out the files with the most
# tests first), the demo (about 160 s, one test) ran alone at the end while the other worker
# sat idle.
LONGEST_FIRST = ("tests/engine/test_demo.py",)


def pytest_collection_modifyitems(config, items):
    items.sort(key=lambda item: not item.nodeid.startswith(LONGEST_FIRST))  # stable: the rest keep their order
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (run by bench/gpu_check.sh on a GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
