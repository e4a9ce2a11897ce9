"""Crop-resize and rotation: exactness, validity handling and randomness."""
import math

import pytest
import torch

from bharnet.data import augment, features
from bharnet.graphs import BODY, HANDS


def _linear(frames, seed=0):
    generator = torch.Generator().manual_seed(seed)
    slope = torch.randn(3, 1, 25, 2, generator=generator, dtype=torch.float64)
    offset = torch.randn(3, 1, 25, 2, generator=generator, dtype=torch.float64)
    return offset + slope * torch.arange(frames, dtype=torch.float64).view(1, -1, 1, 1), slope, offset


@pytest.mark.parametrize("start, size, window", [(0, 40, 64), (7, 23, 64), (3, 30, 10), (0, 64, 64)])
def test_crop_resize_of_a_linear_sequence_stays_linear(start, size, window):
    x, slope, offset = _linear(64)
    out, valid = augment.crop_resize(x, start, size, window)
    assert out.shape == (3, window, 25, 2) and valid is None
    positions = start + torch.arange(window, dtype=torch.float64) * (size - 1) / (window - 1)
    torch.testing.assert_close(out, offset + slope * positions.view(1, -1, 1, 1))
    torch.testing.assert_close(out[:, 0], x[:, start])
    torch.testing.assert_close(out[:, -1], x[:, start + size - 1])


def test_crop_resize_to_the_same_length_is_the_identity_and_window_one_takes_the_middle():
    x, _, _ = _linear(12)
    torch.testing.assert_close(augment.crop_resize(x, 0, 12, 12)[0], x)
    torch.testing.assert_close(augment.crop_resize(x, 2, 5, 1)[0][:, 0], x[:, 4])


def test_crop_resize_never_blends_invalid_frames():
    x = torch.ones(3, 10, 25, 2)
    valid = torch.ones(10, 1, 2, dtype=torch.bool)
    x[:, 5, :, 0] = 0
    valid[5, 0, 0] = False
    out, out_valid = augment.crop_resize(x, 0, 10, 19, valid)  # output k samples frame k / 2
    assert out_valid.shape == (19, 1, 2)
    # Outputs 9, 10, 11 sample frames 4.5, 5, 5.5; outputs 8 and 12 hit frames 4 and 6 exactly.
    assert not out_valid[9:12, 0, 0].any() and out_valid[[8, 12], 0, 0].all()
    assert not out[:, 9:12, :, 0].any()
    assert (out[:, :9, :, 0] == 1).all() and (out[:, 12:] == 1).all() and out_valid[:, 0, 1].all()


@pytest.mark.parametrize("frames, size, window", [(80, 70, 64), (160, 154, 64), (300, 262, 64)])
def test_crop_resize_hits_whole_frames_exactly(frames, size, window):
    # Output k samples frame k (size - 1) / (window - 1); where that is a whole frame it is a
    # copy of that frame alone, even when the next frame is invalid (in floating point the
    # position could come out a hair off it: 23.000000000000004 for output 21 of the first
    # case blended frame 24 in, 50.99999999999999 for output 21 of the second frame 50).
    x = torch.arange(frames, dtype=torch.float32).view(1, -1, 1, 1).expand(3, frames, 25, 2).clone()
    whole = [k for k in range(1, window - 1) if k * (size - 1) % (window - 1) == 0]
    assert whole
    for k in whole:
        frame = k * (size - 1) // (window - 1)
        valid = torch.ones(frames, 1, 2, dtype=torch.bool)
        valid[frame + 1, 0, 1] = valid[frame - 1, 0, 1] = False  # both neighbours invalid
        out, out_valid = augment.crop_resize(x, 0, size, window, valid)
        assert out_valid[k, 0, 1], (k, frame)
        assert (out[:, k] == frame).all()


def test_crop_resize_argument_errors():
    x = torch.zeros(3, 10, 25, 2)
    with pytest.raises(ValueError, match="within the 10 frames"):
        augment.crop_resize(x, 5, 6, 8)
    with pytest.raises(ValueError, match="window"):
        augment.crop_resize(x, 0, 5, 0)
    with pytest.raises(ValueError, match=r"\(C, T, V, M\)"):
        augment.crop_resize(x[0], 0, 5, 8)
    with pytest.raises(ValueError, match="bool tensor of shape"):
        augment.crop_resize(x, 0, 5, 8, torch.ones(9, 25, 2, dtype=torch.bool))


def test_random_crop_ratio_and_bounds():
    generator = torch.Generator().manual_seed(0)
    draws = [augment.random_crop(100, (0.5, 1.0), generator) for _ in range(300)]
    sizes = [size for _, size in draws]
    assert min(sizes) >= 50 and max(sizes) <= 100 and max(sizes) - min(sizes) > 35
    assert all(0 <= start and start + size <= 100 for start, size in draws)
    assert len({start for start, _ in draws}) > 10
    same = [augment.random_crop(100, generator=torch.Generator().manual_seed(5)) for _ in range(2)]
    assert same[0] == same[1]
    assert augment.random_crop(1, generator=generator) == (0, 1)
    with pytest.raises(ValueError, match="ratio_range"):
        augment.random_crop(100, (0.0, 1.0))
    with pytest.raises(ValueError, match="length"):
        augment.random_crop(0)


def test_centre_crop():
    assert augment.centre_crop(100, 0.95) == (2, 95)
    assert augment.centre_crop(64) == (2, 60)
    assert augment.centre_crop(3, 0.1) == (1, 1)
    with pytest.raises(ValueError, match="ratio"):
        augment.centre_crop(100, 1.5)


def test_rotation_is_proper_and_within_range():
    generator = torch.Generator().manual_seed(0)
    for _ in range(20):
        r = augment.random_rotation(0.3, generator, dtype=torch.float64)
        torch.testing.assert_close(r @ r.T, torch.eye(3, dtype=torch.float64))
        assert torch.linalg.det(r).item() == pytest.approx(1.0)
        # R = Rz Ry Rx: the pitch about y is -asin(R[2, 0]) and must lie within the range.
        assert abs(math.asin(-r[2, 0].item())) <= 0.3 + 1e-9
    assert torch.equal(augment.random_rotation(0.0), torch.eye(3))
    torch.testing.assert_close(augment.rotation_matrix(0, 0, math.pi / 2, torch.float64),
                               torch.tensor([[0.0, -1, 0], [1, 0, 0], [0, 0, 1]], dtype=torch.float64))
    with pytest.raises(ValueError, match="max_angle"):
        augment.random_rotation(-1)


def test_rotation_preserves_bone_lengths_and_zeros():
    generator = torch.Generator().manual_seed(1)
    body = torch.randn(3, 8, 25, 2, generator=generator, dtype=torch.float64)
    hand = torch.randn(3, 8, 42, 2, generator=generator, dtype=torch.float64)
    body[:, :, :, 1] = 0
    r = augment.random_rotation(0.3, generator, dtype=torch.float64)
    for x, graph in ((body, BODY), (hand, HANDS)):
        rotated = augment.rotate(x, r)
        torch.testing.assert_close(features.bone(rotated, graph.parents).norm(dim=0),
                                   features.bone(x, graph.parents).norm(dim=0))
    assert not augment.rotate(body, r)[..., 1].any()
    with pytest.raises(ValueError, match=r"\(3, T, V, M\)"):
        augment.rotate(torch.zeros(2, 8, 25, 2), r)
    with pytest.raises(ValueError, match=r"\(3, 3\)"):
        augment.rotate(body, torch.eye(2))
