"""bharnet.nn.recompute: what the recomputation keeps alive (its gradients are tested with the
layers that use it, tests/nn/test_graph_conv.py and tests/nn/test_temporal.py)."""
import weakref

import pytest
import torch
from torch.utils.checkpoint import checkpoint

from bharnet.graphs import BODY
from bharnet.nn import ConvBN, CTRGraphConv, recompute

LAYERS = {
    "ConvBN": (lambda: ConvBN(6, 8, impl="cpp", recompute_bn_input=True), (2, 6, 9, 5)),
    "CTRGraphConv": (lambda: CTRGraphConv(16, 24, BODY.adjacency(), impl="cpp"), (2, 16, 9, 25)),
}


def _checkpointed_step(make, shape):
    """The layer's input, made inside a non-reentrant checkpoint: (whether it is alive after the
    forward, the input gradient)."""
    torch.manual_seed(0)
    layer = make()
    leaf = torch.randn(*shape, requires_grad=True)
    inputs = []

    def region(a):
        x = a * 2
        inputs.append(weakref.ref(x))
        return layer(x)
    y = checkpoint(region, leaf, use_reentrant=False)
    alive = inputs[0]() is not None
    (y * torch.linspace(-1, 1, y.numel()).view(y.shape)).sum().backward()
    return alive, leaf.grad


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_checkpoint_drops_the_input_the_recomputation_would_use(monkeypatch, name):
    """Under non-reentrant checkpointing the layer's input is the checkpoint's to drop and
    recompute: the recomputation's hooks (which autograd keeps with the graph) must not hold it.
    Gradients as without the recomputation."""
    make, shape = LAYERS[name]
    monkeypatch.setattr(recompute, "recomputes", lambda backend, device_type: False)
    alive_kept, grad_kept = _checkpointed_step(make, shape)
    monkeypatch.setattr(recompute, "recomputes", lambda backend, device_type: True)
    alive, grad = _checkpointed_step(make, shape)
    assert not alive_kept and not alive
    assert torch.equal(grad, grad_kept)
