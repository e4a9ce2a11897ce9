"""Fixtures for the op tests."""
import pytest
import torch

from bharnet import _ext
from op_testing import wide_supported


@pytest.fixture(params=[32, 64], ids=["vec32", "vec64"])
def cpu_vector_bytes(request):
    """Run the test with the C++ CPU kernels forced to 32-byte vectors, then (where the CPU has
    AVX-512) with their 64-byte path; the setting is restored afterwards."""
    if request.param == 64 and not wide_supported():
        pytest.skip("this CPU has no AVX-512: the kernels' 64-byte path cannot run here")
    _ext.load()
    previous = torch.ops.bharnet.cpu_vector_bytes(request.param)
    yield request.param
    torch.ops.bharnet.cpu_vector_bytes(previous)
