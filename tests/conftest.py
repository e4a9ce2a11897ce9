import os

# The Triton interpreter must be chosen before triton is first imported; importing torch
# first is fine (it does not import triton eagerly).
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

# pytest-xdist's workers share the cores: each takes its share of the threads, and so do the
# processes its tests start (OMP_NUM_THREADS). With two OpenMP threads in each of two workers on
# two cores, a test whose parallel regions waited on a descheduled thread ran up to 30x slower
# (1.5 s alone, 43 s in the full run).
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    _THREADS = max(1, len(os.sched_getaffinity(0)) // _WORKERS)
    torch.set_num_threads(_THREADS)
    os.environ["OMP_NUM_THREADS"] = str(_THREADS)


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
