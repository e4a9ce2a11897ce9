"""bench/layer_backends.py: one op's layers switched between backends on one model."""
import sys
from pathlib import Path

import pytest
import torch

from bharnet.bench.model_cases import ModelCase
from bharnet.bench.timing import TimerSettings

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import layer_backends  # noqa: E402

CASE = ModelCase("body", "train", "small", 2, 2, 16)
QUICK = TimerSettings(warmup=0, min_reps=1, min_time_s=0.0)


def test_compare_switches_only_that_ops_layers():
    results = layer_backends.compare(CASE, torch.device("cpu"), "fp32", "ctr_graph_conv", ["cpp", "reference"],
                                     rounds=1, settings=QUICK)
    assert list(results) == ["cpp", "reference"]
    (ms_cpp, _, saved_cpp), (ms_ref, _, saved_ref) = results["cpp"], results["reference"]
    assert ms_cpp > 0 and ms_ref > 0
    assert saved_cpp < saved_ref  # the reference graph convolution saves its refined topology


def test_layers_of_finds_the_graph_convolutions():
    from bharnet.models import create_model
    from bharnet.nn import CTRGraphConv, STGraphConv
    model = create_model("body", 120, preset="small")
    layers = layer_backends.layers_of(model, "ctr_graph_conv")
    assert layers and all(isinstance(m, (CTRGraphConv, STGraphConv)) for m in layers)
    assert len(layers) == sum(isinstance(m, (CTRGraphConv, STGraphConv)) for m in model.modules())


@pytest.mark.parametrize("op, backends, match", [
    ("ctr_graph_conv", ["cuda"], "ctr_graph_conv has no backend 'cuda'"),
    ("cross_attention", ["cpp"], "body has no layers of cross_attention"),
])
def test_compare_refuses_what_it_cannot_switch(op, backends, match):
    with pytest.raises(ValueError, match=match):
        layer_backends.compare(CASE, torch.device("cpu"), "fp32", op, backends, rounds=1, settings=QUICK)
