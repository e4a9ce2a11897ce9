import pytest
import torch

from bharnet.nn import CrossAttention, PoolingAttention, TokenCrossAttention, masked_softmax_attention


def test_masked_attention_ignores_masked_keys_and_zeroes_fully_masked_rows():
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 2, 4, 5, 8, dtype=torch.float64).unbind(0)
    mask = torch.tensor([[True, False, True, True, False], [False] * 5])
    out = masked_softmax_attention(q, k, v, mask)
    keep = mask[0]
    expected = masked_softmax_attention(q[:1], k[:1, :, keep], v[:1, :, keep])
    torch.testing.assert_close(out[:1], expected)
    assert torch.all(out[1] == 0) and torch.isfinite(out).all()


def test_fully_masked_rows_pass_the_residual_and_have_finite_gradients():
    attention = TokenCrossAttention(16, heads=4).double()
    x_q = torch.randn(2, 3, 16, dtype=torch.float64, requires_grad=True)
    x_kv = torch.randn(2, 5, 16, dtype=torch.float64, requires_grad=True)
    mask = torch.zeros(2, 5, dtype=torch.bool)
    mask[0, :2] = True
    out = attention(x_q, x_kv, mask)
    out.sum().backward()
    assert torch.isfinite(x_q.grad).all() and torch.isfinite(x_kv.grad).all()
    expected_row = x_q[1] + attention.proj_out.bias  # attention output is zero, only the bias remains
    torch.testing.assert_close(out[1], expected_row.expand_as(out[1]))


@pytest.mark.parametrize("mode", ["frame", "sequence"])
def test_cross_attention_modes(mode):
    torch.manual_seed(0)
    layer = CrossAttention(16, heads=4, mode=mode)
    body, hand = torch.randn(2, 16, 3, 25), torch.randn(2, 16, 3, 42)
    out = layer(body, hand)
    assert out.shape == body.shape
    # frame mode: changing frame 2 of the hand leaves frames 0-1 of the output unchanged
    hand2 = hand.clone()
    hand2[:, :, 2] += torch.randn_like(hand2[:, :, 2])
    changed = (layer(body, hand2) - out).abs().amax(dim=(0, 1, 3)) > 1e-6
    assert changed.tolist() == ([False, False, True] if mode == "frame" else [True, True, True])


def test_cross_attention_key_mask_must_be_b_t_v():
    layer = CrossAttention(16, heads=4)
    body, hand = torch.randn(2, 16, 3, 25), torch.randn(2, 16, 3, 42)
    mask = torch.rand(2, 3, 42) > 0.3
    layer(body, hand, mask)
    for wrong in (mask.transpose(1, 2), mask.flatten()):  # as many elements, in another layout
        with pytest.raises(ValueError, match=r"key_mask must have shape \(B, T, V_kv\) = \(2, 3, 42\)"):
            layer(body, hand, wrong)


def test_pooling_attention_shapes_and_errors():
    pam = PoolingAttention(16, heads=4)
    pooled = pam(torch.randn(2, 16, 5, 25), torch.randn(2, 16, 5, 42))
    assert pooled.shape == (2, 16)
    with pytest.raises(ValueError, match="equal B, C, T"):
        pam(torch.randn(2, 16, 5, 25), torch.randn(2, 16, 4, 42))
    with pytest.raises(ValueError, match="mode must be one of"):
        CrossAttention(16, mode="clip")


def test_cross_attention_keeps_channels_last_features_channels_last():
    """(B, C, T, V) features in channels-last layout (a fused CPU model's) come back in it, with
    the values of the channels-first call."""
    torch.manual_seed(0)
    for mode in ("frame", "sequence"):
        layer = CrossAttention(16, heads=4, mode=mode).double()
        x_q = torch.randn(2, 16, 3, 5, dtype=torch.float64)
        x_kv = torch.randn(2, 16, 3, 7, dtype=torch.float64)
        out = layer(x_q.contiguous(memory_format=torch.channels_last), x_kv.contiguous(memory_format=torch.channels_last))
        assert not out.is_contiguous() and out.is_contiguous(memory_format=torch.channels_last)
        expected = layer(x_q, x_kv)
        assert expected.is_contiguous()
        torch.testing.assert_close(out, expected, rtol=0, atol=0)
