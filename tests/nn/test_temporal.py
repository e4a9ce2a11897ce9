import pytest
import torch
import torch.nn.functional as F

from bharnet.nn import DeformableTemporalConv, MultiScaleTemporalConv
from bharnet.ops import deformable_temporal_conv, deformable_temporal_conv_reference


def test_integer_offsets_equal_a_replicate_padded_convolution():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 11, 5, dtype=torch.float64)
    weight = torch.randn(4, 3, 5, dtype=torch.float64)
    bias = torch.randn(4, dtype=torch.float64)
    offsets = torch.arange(-2.0, 3.0, dtype=torch.float64)
    for stride in (1, 2):
        y = deformable_temporal_conv_reference(x, offsets, weight, bias, stride)
        padded = F.pad(x, (0, 0, 2, 2), mode="replicate")
        expected = F.conv2d(padded, weight[..., None], bias, stride=(stride, 1))
        torch.testing.assert_close(y, expected)


def test_offset_gradient_matches_finite_differences():
    torch.manual_seed(1)
    x = torch.randn(2, 3, 9, 4, dtype=torch.float64)
    weight = torch.randn(5, 3, 4, dtype=torch.float64)
    # fractional offsets away from integers; the last ones push samples past both ends (clamped)
    offsets = torch.tensor([-1.37, 0.41, 2.73, 8.6], dtype=torch.float64, requires_grad=True)
    probe = torch.randn(2, 5, 5, 4, dtype=torch.float64)

    def objective(tau):
        return (deformable_temporal_conv_reference(x, tau, weight, None, 2) * probe).sum()

    (grad,) = torch.autograd.grad(objective(offsets), offsets)
    eps = 1e-6
    numeric = torch.stack([
        (objective(offsets.detach() + eps * e) - objective(offsets.detach() - eps * e)) / (2 * eps)
        for e in torch.eye(4, dtype=torch.float64)])
    torch.testing.assert_close(grad, numeric, rtol=1e-6, atol=1e-8)
    assert grad[:3].abs().min() > 0  # in range: the offsets do receive gradient
    assert grad[3] == 0  # every sample of the last offset is clamped at T - 1


def test_module_initial_offsets_and_shapes():
    layer = DeformableTemporalConv(8, 8, kernel_size=5, dilation=2, stride=2)
    torch.testing.assert_close(layer.offsets.data, torch.linspace(-4, 4, 4))
    assert layer(torch.randn(2, 8, 13, 25)).shape == (2, 8, 7, 25)
    mstcn = MultiScaleTemporalConv(16, 32, stride=2)
    y = mstcn(torch.randn(2, 16, 13, 25))
    assert y.shape == (2, 32, 7, 25)
    y.sum().backward()
    assert all(p.grad is not None for p in mstcn.parameters())


def test_bad_input():
    x = torch.randn(2, 3, 9, 4)
    with pytest.raises(ValueError, match=r"weight must have shape \(C_out, 3, 4\)"):
        deformable_temporal_conv(x, torch.zeros(4), torch.randn(5, 2, 4))
    with pytest.raises(ValueError, match=r"x must have shape \(B, C_in, T, V\)"):
        deformable_temporal_conv(x[0], torch.zeros(4), torch.randn(5, 3, 4))
    with pytest.raises(ValueError, match="stride must be a positive int"):
        deformable_temporal_conv(x, torch.zeros(4), torch.randn(5, 3, 4), stride=0)
    with pytest.raises(ValueError, match="multiple of 4"):
        MultiScaleTemporalConv(8, 10)
