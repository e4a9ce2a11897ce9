"""The scripts in examples/ run and show what they say they show."""
import importlib.util
import pathlib

import pytest

from bharnet.ops._backend import unavailable_reason

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"


def load(name):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_custom_skeleton_trains_and_matches_the_reference(capsys):
    if unavailable_reason("ctr_graph_conv", "cpp", "cpu") is not None:
        pytest.skip("the C++ extension is not available: auto would be the reference itself")
    result = load("custom_skeleton").main(["--steps", "20", "--frames", "24"])
    assert result["backend"] == "cpp"  # so that the comparison with the reference is not trivial
    assert result["losses"][-1] < 0.5 * result["losses"][0]
    assert result["accuracy"] >= 0.9  # the toy classes differ in the sign of a wrist sway
    assert result["fast_vs_reference"] < 1e-4 and result["fused_vs_reference"] < 1e-4
    assert "held-out accuracy" in capsys.readouterr().out
