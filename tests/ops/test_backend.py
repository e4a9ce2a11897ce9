import pytest
import torch

from bharnet import ops
from bharnet.ops._backend import resolve


def test_use_backend_sets_and_restores():
    before = ops.get_backend()
    with ops.use_backend("reference"):
        assert ops.get_backend() == "reference"
    assert ops.get_backend() == before


def test_environment_variable(monkeypatch):
    monkeypatch.setenv("BHARNET_BACKEND", "reference")
    assert ops.get_backend() == "reference"
    monkeypatch.setenv("BHARNET_BACKEND", "fastest")
    with pytest.raises(ValueError, match="backend must be one of"):
        ops.get_backend()


def test_auto_on_cpu_never_picks_triton():
    assert resolve("ctr_graph_conv", "auto", "cpu") in ("cpp", "reference")


def test_unavailable_backend_says_why():
    with pytest.raises(RuntimeError, match="cannot run bone on cuda"):
        resolve("bone", "cpp", "cuda")
    with pytest.raises(ValueError, match="backend must be one of"):
        ops.ctr_graph_conv(torch.randn(1, 1, 4, 2, 3), torch.randn(1, 3, 3), backend="fast")
