"""Hand keypoints: JSON and NPZ round trips, layout, frame matching and wrist alignment."""
import json

import numpy as np
import pytest

from bharnet.data import hands
from bharnet.data.hands import HandDetection, HandSequence, align_hands


def _hand_at(wrist, side=None, score=1.0, seed=0):
    """A detection whose wrist landmark is at ``wrist`` (fingers within 20 cm)."""
    landmarks = np.random.default_rng(seed).uniform(-0.1, 0.1, (21, 3)).astype(np.float32)
    landmarks[0] = 0
    return HandDetection(side, landmarks + np.asarray(wrist, np.float32), score)


def test_json_round_trip(tmp_path):
    detections = [[_hand_at([0, 0, 2], "left", 0.9, seed=1), _hand_at([0.5, 0, 2], "right")],
                  [], [_hand_at([0.2, 0.1, 2], None, 0.5, seed=2)]]
    path = tmp_path / "S001C001P001R001A001.json"
    hands.write_mediapipe_json(path, detections)
    loaded = hands.read_mediapipe_json(path)
    assert [len(frame) for frame in loaded] == [2, 0, 1]
    for frame, frame_loaded in zip(detections, loaded):
        for d, e in zip(frame, frame_loaded):
            assert e.side == d.side and e.score == pytest.approx(d.score)
            np.testing.assert_allclose(e.landmarks, d.landmarks, atol=1e-6)


def test_json_variants(tmp_path):
    xy = [[j * 0.01, 1 - j * 0.01] for j in range(21)]
    frames = [
        [{"label": "Right", "landmarks": [x + [0.3, 0.8] for x in xy]}],      # x,y,z,score
        {"hands": [{"handedness": "left", "score": 0.7,
                    "landmarks": [{"x": a, "y": b, "visibility": 0.1} for a, b in xy]}]},
        {"hands": [{"landmarks": xy}]},                                          # 2-D
        None, {"hands": None}, [],                           # no hand found (MediaPipe: None)
    ]
    path = tmp_path / "hands.json"
    path.write_text(json.dumps(frames))
    loaded = hands.read_mediapipe_json(path)
    assert loaded[0][0].side == "right" and loaded[0][0].score == pytest.approx(0.8)
    np.testing.assert_allclose(loaded[0][0].landmarks[:, 2], 0.3)
    assert loaded[1][0].side == "left" and loaded[1][0].score == pytest.approx(0.7)
    assert loaded[2][0].side is None and loaded[2][0].score == 1.0
    np.testing.assert_allclose(loaded[2][0].landmarks[:, :2], xy, atol=1e-6)
    assert not loaded[2][0].landmarks[:, 2].any()
    assert loaded[3:] == [[], [], []]


@pytest.mark.parametrize("frame, message", [
    ([{"landmarks": [[0, 0, 0]] * 20}], "21 landmarks"),
    ([{"handedness": "both", "landmarks": [[0, 0, 0]] * 21}], "handedness"),
    ([{"landmarks": [[0]] * 21}], "landmark 0"),
    ([{"points": []}], "'landmarks'"),
    ([{"landmarks": [[0, 0, 0]] * 20 + [[0, float("nan"), 0]]}], "landmark 20 has a non-finite"),
    ([{"landmarks": [[float("inf"), 0]] + [[0, 0]] * 20}], "landmark 0 has a non-finite"),
])
def test_json_errors_name_file_and_frame(tmp_path, frame, message):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"frames": [[], frame]}))
    with pytest.raises(ValueError, match=message) as info:
        hands.read_mediapipe_json(path)
    assert str(path) in str(info.value) and "frame 1" in str(info.value)


def _random_sequence(frames=5, persons=3, seed=0):
    rng = np.random.default_rng(seed)
    valid = rng.random((frames, persons, 2)) < 0.7
    return HandSequence(rng.normal(size=(frames, persons, 2, 21, 3)), valid)


def test_valid_hands_must_be_finite_and_invalid_ones_become_zero():
    keypoints = np.ones((3, 1, 2, 21, 3))
    valid = np.ones((3, 1, 2), bool)
    keypoints[1, 0, 0, 4, 2] = np.nan
    with pytest.raises(ValueError, match="must be finite"):
        HandSequence(keypoints, valid)
    valid[1, 0, 0] = False  # a lost hand's slot may hold anything: it is zeroed
    sequence = HandSequence(keypoints, valid)
    assert np.isfinite(sequence.keypoints).all() and not sequence.keypoints[1, 0, 0].any()


def test_npz_round_trip_and_invalid_hands_are_zero(tmp_path):
    sequence = _random_sequence()
    assert not sequence.keypoints[~sequence.valid].any()
    path = tmp_path / "S001C001P001R001A001.npz"
    hands.write_hand_npz(path, sequence)
    loaded = hands.read_hand_npz(path)
    np.testing.assert_array_equal(loaded.keypoints, sequence.keypoints)
    np.testing.assert_array_equal(loaded.valid, sequence.valid)
    assert loaded.keypoints.dtype == np.float32 and loaded.valid.dtype == bool


def test_npz_two_dimensional_keypoints_get_zero_depth(tmp_path):
    path = tmp_path / "flat.npz"
    np.savez(path, keypoints=np.ones((2, 1, 2, 21, 2)), valid=np.ones((2, 1, 2), bool))
    loaded = hands.read_hand_npz(path)
    assert loaded.keypoints.shape == (2, 1, 2, 21, 3)
    assert (loaded.keypoints[..., :2] == 1).all() and not loaded.keypoints[..., 2].any()


def test_unreadable_npz_files_are_value_errors_naming_the_file(tmp_path):
    """An empty or truncated hand file is a ValueError (prepare notes it as invalid_hand_file and
    goes on), not zipfile's or numpy's own exception, which stopped the whole prepare run."""
    good = tmp_path / "good.npz"
    np.savez(good, keypoints=np.ones((2, 1, 2, 21, 3)), valid=np.ones((2, 1, 2), bool))
    empty, truncated = tmp_path / "empty.npz", tmp_path / "truncated.npz"
    empty.write_bytes(b"")
    truncated.write_bytes(good.read_bytes()[:100])
    for path in (empty, truncated):
        with pytest.raises(ValueError, match="not a readable .npz file") as info:
            hands.read_hand_npz(path)
        assert str(path) in str(info.value)


def test_npz_errors_name_the_file(tmp_path):
    path = tmp_path / "bad.npz"
    np.savez(path, keypoints=np.ones((2, 1, 21, 3)), valid=np.ones((2, 1, 2), bool))
    with pytest.raises(ValueError, match="T, M, 2, 21, C") as info:
        hands.read_hand_npz(path)
    assert str(path) in str(info.value)
    np.savez(path, keypoints=np.ones((2, 1, 2, 21, 3)))
    with pytest.raises(ValueError, match="valid"):
        hands.read_hand_npz(path)
    with pytest.raises(ValueError, match=r"\(T, M, 2\)"):
        HandSequence(np.ones((2, 1, 2, 21, 3)), np.ones((3, 1, 2), bool))


def test_graph_arrays_layout():
    sequence = _random_sequence()
    graph, valid = sequence.graph_arrays()
    assert graph.shape == (3, 5, 42, 3) and valid.shape == (5, 2, 3)
    np.testing.assert_array_equal(graph[:, 4, :21, 2], sequence.keypoints[4, 2, 0].T)   # left
    np.testing.assert_array_equal(graph[:, 1, 21:, 0], sequence.keypoints[1, 0, 1].T)   # right
    np.testing.assert_array_equal(valid[3, :, 1], sequence.valid[3, 1])


def test_resample_indices_and_frame_matching():
    np.testing.assert_array_equal(hands.resample_indices(5, 5), np.arange(5))
    np.testing.assert_array_equal(hands.resample_indices(3, 5), [0, 1, 1, 2, 2])
    np.testing.assert_array_equal(hands.resample_indices(9, 3), [0, 4, 8])
    np.testing.assert_array_equal(hands.resample_indices(4, 1), [0])
    sequence = _random_sequence(frames=3)
    longer = sequence.with_frames(5)
    np.testing.assert_array_equal(longer.keypoints[2], sequence.keypoints[1])
    np.testing.assert_array_equal(longer.valid[3], sequence.valid[2])
    assert sequence.with_persons(1).num_persons == 1
    padded = sequence.with_persons(4)
    assert not padded.valid[:, 3].any() and not padded.keypoints[:, 3].any()


def _two_people(frames=4):
    """Kinect wrists (T, M=2, 2, 3): person 0 at x = 0, person 1 at x = 1; left wrists at
    x - 0.2, right wrists at x + 0.2."""
    wrists = np.zeros((frames, 2, 2, 3))
    for m in range(2):
        wrists[:, m, 0] = [m - 0.2, 0, 3]
        wrists[:, m, 1] = [m + 0.2, 0, 3]
    return wrists, np.ones((frames, 2), bool)


def test_align_assigns_each_hand_to_the_nearest_kinect_wrist():
    wrists, present = _two_people()
    detections = [
        [_hand_at([1.21, 0, 3], "left"), _hand_at([-0.18, 0.01, 3], "right")],  # labels wrong
        [],
        [_hand_at([0.2, 0, 3]), _hand_at([0.22, 0, 3], seed=3)],  # both near one wrist
        [_hand_at([5, 5, 5])],
    ]
    aligned = align_hands(detections, wrists, present, handedness="nearest")
    assert aligned.keypoints.shape == (4, 2, 2, 21, 3)
    expected = np.zeros((4, 2, 2), bool)
    expected[0, 1, 1] = expected[0, 0, 0] = True
    expected[2, 0, 1] = expected[2, 0, 0] = True  # the nearest wins, the other takes the next slot
    expected[3, 1, 1] = True                      # no distance limit: the nearest wrist
    np.testing.assert_array_equal(aligned.valid, expected)
    np.testing.assert_allclose(aligned.keypoints[0, 1, 1], detections[0][0].landmarks)
    np.testing.assert_allclose(aligned.keypoints[2, 0, 1], detections[2][0].landmarks)
    np.testing.assert_allclose(aligned.keypoints[2, 0, 0], detections[2][1].landmarks)
    assert not aligned.keypoints[1].any()


def test_align_handedness_modes_distance_and_score_limits():
    wrists, present = _two_people(frames=1)
    detection = _hand_at([-0.15, 0, 3], "right", score=0.4)
    by_label = align_hands([[detection]], wrists, present, handedness="label")
    assert by_label.valid[0, 0, 1] and by_label.valid.sum() == 1
    mirrored = align_hands([[detection]], wrists, present, handedness="mirrored")
    assert mirrored.valid[0, 0, 0] and mirrored.valid.sum() == 1
    assert not align_hands([[detection]], wrists, present, max_distance=0.01).valid.any()
    assert align_hands([[detection]], wrists, present, max_distance=0.1).valid[0, 0, 0]
    assert not align_hands([[detection]], wrists, present, min_score=0.5).valid.any()
    with pytest.raises(ValueError, match="handedness"):
        align_hands([[detection]], wrists, present, handedness="left")


def test_align_ignores_absent_people_and_matches_frame_counts():
    wrists, present = _two_people(frames=4)
    present[:, 0] = False
    detections = [[_hand_at([-0.2, 0, 3])], [_hand_at([1.2, 0, 3])]]  # 2 frames for 4
    aligned = align_hands(detections, wrists, present)
    assert not aligned.valid[:, 0].any()
    np.testing.assert_array_equal(aligned.valid[:, 1], [[True, False], [True, False],
                                                        [False, True], [False, True]])


def test_align_in_image_space_and_shape_errors():
    wrists, present = _two_people(frames=1)
    detection = _hand_at([1.2, 0, 99])  # only x, y are compared with 2-D wrists
    aligned = align_hands([[detection]], wrists[..., :2], present)
    assert aligned.valid[0, 1, 1]
    with pytest.raises(ValueError, match=r"\(T, M, 2, D\)"):
        align_hands([[detection]], wrists[:, :, 0], present)
    with pytest.raises(ValueError, match=r"present must have shape \(T, M\)"):
        align_hands([[detection]], wrists, present[:, :1])
    joints = np.arange(2 * 3 * 25 * 3, dtype=float).reshape(2, 3, 25, 3)
    np.testing.assert_array_equal(hands.kinect_wrists(joints)[:, :, 1], joints[:, :, 10])
    with pytest.raises(ValueError, match=r"\(T, M, 25, D\)"):
        hands.kinect_wrists(joints[:, :, :20])
