import copy

import pytest
import torch
from torch import nn

from bharnet.bench.memory import saved_tensor_bytes
from bharnet.graphs import BODY
from bharnet.nn.block import GCNBlock


def _saved_and_grads(block, x):
    block.zero_grad()
    leaf = x.detach().clone().requires_grad_()
    saved = saved_tensor_bytes(lambda: block(leaf))
    out = block(leaf)
    (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view(out.shape)).sum().backward()
    return saved, [out.detach(), leaf.grad] + [p.grad.clone() for p in block.parameters()]


@pytest.mark.parametrize("impl", ["reference", "cpp"])
def test_block_activations_in_place_save_two_feature_maps_less(impl):
    """The block's LeakyReLU runs in place on the fresh sums, so autograd keeps its outputs
    (which the next layers save anyway) instead of its inputs:
    two blocks give the same output and gradients as with out-of-place activations, and save
    at least three output-sized maps less (the first block's two pre-activation sums, the
    second's first one; its last output is saved by no later layer)."""
    torch.manual_seed(0)
    block = nn.Sequential(*(GCNBlock(16, 16, BODY.adjacency(), impl=impl) for _ in range(2))).double()
    out_of_place = copy.deepcopy(block)
    for module in out_of_place:
        assert module.act.inplace
        module.act = nn.LeakyReLU(module.act.negative_slope)
    x = torch.randn(2, 16, 9, 25, dtype=torch.float64)
    saved, grads = _saved_and_grads(block, x)
    saved_out_of_place, expected = _saved_and_grads(out_of_place, x)
    assert saved <= saved_out_of_place - 3 * x.numel() * x.element_size()
    for got, ref in zip(grads, expected):
        torch.testing.assert_close(got, ref, rtol=0, atol=0)


@pytest.mark.parametrize("impl, maps", [("reference", 1), ("cpp", 3)])
def test_mstcn_branch_activations_in_place_save_their_inputs(impl, maps):
    """The MSTCN branches' LeakyReLU runs in place on its BN's fresh output, so autograd keeps
    the activation's output instead of its input: the same output and gradients as out of
    place, and branch maps (a quarter of the output's channels each) less wherever the next
    layer saves that output anyway: one, the max-pool's, in PyTorch (the reference DeTGC saves
    its samples, not its input); three with the C++ kernels, where the three branches' input
    ConvBNs run stacked and one act covers their maps: in place, autograd keeps that output
    (which the DeTGCs' parts of it keep anyway); out of place, its input as well."""
    from bharnet.nn import MultiScaleTemporalConv
    torch.manual_seed(0)
    tcn = MultiScaleTemporalConv(16, 16, impl=impl).double()
    out_of_place = copy.deepcopy(tcn)
    act = nn.LeakyReLU(tcn.branches[0][1].negative_slope)  # shared, as in place: the same path (stacked on cpp)
    for branch in out_of_place.branches[:3]:
        assert branch[1].inplace
        branch[1] = act
    x = torch.randn(2, 16, 9, 25, dtype=torch.float64)
    saved, grads = _saved_and_grads(tcn, x)
    saved_out_of_place, expected = _saved_and_grads(out_of_place, x)
    assert saved == saved_out_of_place - maps * x.numel() // 4 * x.element_size()
    for got, ref in zip(grads, expected):
        torch.testing.assert_close(got, ref, rtol=0, atol=0)
