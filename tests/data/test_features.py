"""Modalities and preprocessing: exact properties on (C, T, V, M) tensors."""
import numpy as np
import pytest
import torch

from bharnet.data import features
from bharnet.graphs import BODY, HANDS


def _random(shape, seed=0, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


@pytest.mark.parametrize("graph", [BODY, HANDS], ids=lambda g: g.name)
def test_bone_is_joint_minus_parent_and_zero_at_roots(graph):
    x = _random((3, 7, graph.num_nodes, 2))
    bones = features.bone(x, graph.parents)
    for child, parent in graph.inward:
        torch.testing.assert_close(bones[:, :, child], x[:, :, child] - x[:, :, parent])
    roots = [v for v in range(graph.num_nodes) if graph.parents[v] == v]
    assert roots == ([20] if graph is BODY else [0, 21])
    assert not bones[:, :, roots].any()


def test_bone_accepts_batch_dimensions_and_checks_parents():
    x = _random((4, 3, 5, 25, 2))
    torch.testing.assert_close(features.bone(x, BODY.parents)[1], features.bone(x[1], BODY.parents))
    with pytest.raises(ValueError, match="one entry per node"):
        features.bone(x, HANDS.parents)
    with pytest.raises(TypeError, match="torch.Tensor"):
        features.bone(np.zeros((3, 5, 25, 2)), BODY.parents)
    with pytest.raises(ValueError, match=r"\(\.\.\., C, T, V, M\)"):
        features.bone(torch.zeros(5, 25, 2), BODY.parents)


def test_motion_of_constant_is_zero_and_of_linear_is_constant():
    constant = _random((3, 1, 25, 2)).expand(3, 9, 25, 2).contiguous()
    assert not features.motion(constant).any()
    slope, offset = _random((3, 1, 25, 2), 1), _random((3, 1, 25, 2), 2)
    linear = offset + slope * torch.arange(9, dtype=torch.float64).view(1, 9, 1, 1)
    velocity = features.motion(linear)
    torch.testing.assert_close(velocity[:, :-1], slope.expand(3, 8, 25, 2))
    assert not velocity[:, -1].any()


def test_motion_is_zero_where_either_frame_is_invalid():
    x = _random((3, 6, 42, 2))
    valid = torch.ones(6, 42, 2, dtype=torch.bool)
    valid[2, :21, 0] = False  # the left hand of person 0 is missing in frame 2
    out = features.motion(x, valid)
    assert not out[:, 1:3, :21, 0].any()  # the transitions 1->2 and 2->3
    torch.testing.assert_close(out[:, 3, :21, 0], x[:, 4, :21, 0] - x[:, 3, :21, 0])
    torch.testing.assert_close(out[:, 1, 21:, 0], x[:, 2, 21:, 0] - x[:, 1, 21:, 0])
    with pytest.raises(ValueError, match="does not broadcast"):
        features.motion(x, valid[:, :5])
    with pytest.raises(TypeError, match="bool"):
        features.motion(x, valid.float())


@pytest.mark.parametrize("name", features.MODALITIES)
def test_modality_dispatch(name):
    x = _random((3, 5, 25, 2))
    expected = {"joint": x, "bone": features.bone(x, BODY.parents),
                "motion": features.motion(x),
                "bone_motion": features.motion(features.bone(x, BODY.parents))}[name]
    torch.testing.assert_close(features.modality(x, name, BODY.parents), expected)


def test_unknown_modality():
    with pytest.raises(ValueError, match="modality must be one of"):
        features.modality(_random((3, 5, 25, 2)), "velocity", BODY.parents)


def _sample(frames=5):
    body = _random((3, frames, 25, 2), 3)
    hand = _random((3, frames, 42, 2), 4)
    hand_valid = torch.ones(frames, 2, 2, dtype=torch.bool)
    return body, hand, hand_valid


def test_canonical_moves_the_centre_joint_of_person_0_frame_0_to_the_origin():
    body, hand, hand_valid = _sample()
    body[:, :, :, 1] = 0          # person 1 absent
    hand[:, 3, 21:, 0] = 0        # right hand of person 0 lost in frame 3
    hand_valid[3, 1, 0] = False
    out_body, out_hand = features.canonicalize(body, hand, hand_valid)
    origin = body[:, 0, features.CENTRE_JOINT, 0].view(3, 1, 1)
    assert not out_body[:, 0, features.CENTRE_JOINT, 0].any()
    torch.testing.assert_close(out_body[..., 0], body[..., 0] - origin)
    assert not out_body[..., 1].any() and not out_hand[:, 3, 21:, 0].any()
    torch.testing.assert_close(out_hand[:, :3, :, 0], hand[:, :3, :, 0] - origin)
    # Hands keep their place relative to the body: hand wrist minus Kinect wrist is unchanged.
    torch.testing.assert_close(out_hand[:, :, 0, 0] - out_body[:, :, 6, 0],
                               hand[:, :, 0, 0] - body[:, :, 6, 0])


def test_a_non_finite_origin_does_not_reach_absent_persons_or_lost_hands():
    body, hand, hand_valid = _sample()
    body[:, :, :, 1] = 0
    hand_valid[3, 1, 0] = False
    hand[:, 3, 21:, 0] = 0
    body[0, 0, features.CENTRE_JOINT, 0] = float("nan")
    out_body, out_hand = features.canonicalize(body, hand, hand_valid)
    assert not out_body[..., 1].any() and not out_hand[:, 3, 21:, 0].any()
    assert out_body[0, :, :, 0].isnan().all()


def test_canonical_origin_is_the_first_frame_where_person_0_is_present():
    body, hand, hand_valid = _sample()
    body[:, :2, :, 0] = 0
    torch.testing.assert_close(features.canonical_origin(body), body[:, 2, 1, 0])
    assert not features.canonical_origin(torch.zeros(3, 4, 25, 2)).any()
    with pytest.raises(ValueError, match="must agree"):
        features.canonicalize(body, hand[:, :4], hand_valid)


def test_presence_and_hand_node_validity():
    body, _, hand_valid = _sample()
    body[:, 1, :, 0] = 0
    presence = features.body_presence(body)
    assert presence.shape == (5, 1, 2) and presence.dtype == torch.bool
    assert not presence[1, 0, 0] and presence[0, 0, 0] and presence[1, 0, 1]
    hand_valid[2, 1, 1] = False
    nodes = features.hand_node_validity(hand_valid)
    assert nodes.shape == (5, 42, 2)
    assert not nodes[2, 21:, 1].any() and nodes[2, :21, 1].all() and nodes[2, 21:, 0].all()
    with pytest.raises(ValueError, match=r"\(\.\.\., T, 2, M\)"):
        features.hand_node_validity(torch.ones(5, 42, 2, dtype=torch.bool))
