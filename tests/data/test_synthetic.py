"""The built-in synthetic dataset: format, determinism, anatomy and the hand-centric design."""
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from bharnet.data import read_manifest
from bharnet.data.synthetic import BODY_CLASSES, HAND_CLASSES, make_synthetic
from bharnet.graphs import NTU_LEFT_WRIST, NTU_RIGHT_WRIST

ARRAYS = ("body", "hand", "hand_valid", "length", "label")


def _load(root, split):
    return {name: np.load(os.path.join(root, split, name + ".npy")) for name in ARRAYS}


def _files(root):
    return {os.path.join(split, name + ".npy"): open(os.path.join(root, split, name + ".npy"), "rb").read()
            for split in ("train", "test") for name in ARRAYS}


def test_default_is_fast_and_described_by_its_manifest(synthetic_default):
    root, seconds = synthetic_default
    assert seconds < 30  # about 1.5 s on a 2-core machine
    manifest = read_manifest(root)
    assert manifest["num_classes"] == 10 and manifest["hand_centric_classes"] == [5, 6, 7, 8, 9]
    assert manifest["class_names"][:2] == ["wave right hand", "raise both arms"]
    assert manifest["class_names"][5] == "clench fist"
    assert manifest["splits"]["train"] == {"count": 480, "class_counts": [48] * 10}
    assert manifest["splits"]["test"] == {"count": 160, "class_counts": [16] * 10}
    assert manifest["source"]["kind"] == "synthetic" and manifest["has_hands"]
    train = _load(root, "train")
    assert train["body"].shape == (480, 3, 64, 25, 2) and train["body"].dtype == np.float32
    assert train["hand"].shape == (480, 3, 64, 42, 2) and train["hand"].dtype == np.float32
    assert train["hand_valid"].shape == (480, 64, 2, 2) and train["hand_valid"].dtype == bool
    assert train["length"].dtype == np.int32 and train["label"].dtype == np.int64
    assert train["length"].min() >= 52 and train["length"].max() == 64
    for i in np.flatnonzero(train["length"] < 64)[:20]:  # zero padding after the length
        assert not train["body"][i, :, train["length"][i]:].any()


def test_rerunning_reuses_the_output(synthetic_small):
    before = {path: os.stat(os.path.join(synthetic_small, path)).st_mtime_ns
              for path in _files(synthetic_small)}
    assert make_synthetic(synthetic_small, num_classes=4, num_hand_centric=2,
                          samples_per_class_train=3, samples_per_class_test=2, frames=24,
                          seed=3) == str(synthetic_small)
    after = {path: os.stat(os.path.join(synthetic_small, path)).st_mtime_ns for path in before}
    assert before == after


def test_deterministic_by_seed_and_rewritten_for_new_arguments(tmp_path, synthetic_small):
    args = dict(num_classes=4, num_hand_centric=2, samples_per_class_train=3,
                samples_per_class_test=2, frames=24)
    again = make_synthetic(tmp_path / "again", seed=3, **args)
    assert _files(again) == _files(synthetic_small)
    other = make_synthetic(tmp_path / "other", seed=4, **args)
    assert _files(other)["train/body.npy"] != _files(synthetic_small)["train/body.npy"]
    make_synthetic(tmp_path / "other", seed=4, **{**args, "frames": 30})
    assert read_manifest(tmp_path / "other")["max_frames"] == 30
    assert _load(tmp_path / "other", "train")["body"].shape[2] == 30


def test_processes_making_the_same_dataset_at_once_all_get_it(tmp_path):
    """The ranks of a torchrun demo each call make_synthetic on one folder: one writes it, the
    others wait and find it complete (they used to remove and rename each other's files)."""
    args = dict(num_classes=4, num_hand_centric=2, samples_per_class_train=40, samples_per_class_test=10, seed=3)
    script = textwrap.dedent(f"""
        from bharnet.data.synthetic import make_synthetic
        make_synthetic({str(tmp_path / "shared")!r}, **{args!r})
    """)
    processes = [subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.PIPE, text=True)
                 for _ in range(3)]
    errors = [p.communicate(timeout=300)[1] for p in processes]
    assert [p.returncode for p in processes] == [0, 0, 0], errors
    assert _files(tmp_path / "shared") == _files(make_synthetic(tmp_path / "alone", **args))


def test_argument_errors(tmp_path):
    with pytest.raises(ValueError, match="num_hand_centric"):
        make_synthetic(tmp_path, num_classes=12, num_hand_centric=len(HAND_CLASSES) + 1)
    with pytest.raises(ValueError, match="body classes"):
        make_synthetic(tmp_path, num_classes=len(BODY_CLASSES) + 3, num_hand_centric=2)
    with pytest.raises(ValueError, match="frames"):
        make_synthetic(tmp_path, frames=1)
    assert not os.path.exists(tmp_path / "manifest.json")


def test_bodies_and_hands_are_anatomically_plausible(synthetic_default):
    data = _load(synthetic_default[0], "train")
    body, hand, valid, length = data["body"], data["hand"], data["hand_valid"], data["length"]
    for i in range(0, len(length), 7):
        frames = slice(0, length[i])
        b, h, v = body[i, :, frames, :, 0], hand[i, :, frames, :, 0], valid[i, frames, :, 0]
        height = (b[1, :, 3] - b[1][:, [15, 19]].mean(1)).max()  # head above feet, upright
        assert 1.3 < height < 2.0
        assert 1.5 < b[2].mean() < 4.5  # metres in front of the camera
        for side, wrist in enumerate((NTU_LEFT_WRIST, NTU_RIGHT_WRIST)):
            nodes = slice(21 * side, 21 * side + 21)
            hand_wrist = h[:, v[:, side], 21 * side]
            gap = np.linalg.norm(hand_wrist - b[:, v[:, side], wrist], axis=0)
            assert gap.max() < 0.06  # hand wrist = Kinect wrist + noise
            size = np.linalg.norm(h[:, v[:, side], nodes] - hand_wrist[:, :, None], axis=0).max()
            assert 0.13 < size < 0.26  # wrist to the farthest fingertip
            assert not h[:, ~v[:, side], nodes].any()  # dropped detections are zero


def test_left_hands_are_the_mirror_image_of_right_hands(synthetic_default):
    # Chirality: the sign of det(index base, pinky base, thumb tip), each minus the wrist
    # (MediaPipe nodes 5, 17, 4, 0); a mirror image flips it, a rotation does not.
    data = _load(synthetic_default[0], "train")
    for i in range(0, len(data["length"]), 11):
        frames = slice(0, data["length"][i])
        h, v = data["hand"][i, :, frames, :, 0], data["hand_valid"][i, frames, :, 0]
        signs = []
        for side in (0, 1):
            nodes = h[:, v[:, side], 21 * side:21 * side + 21]
            vectors = nodes[:, :, [5, 17, 4]] - nodes[:, :, :1]  # (3, T, 3)
            signs.append(np.sign(np.linalg.det(vectors.transpose(1, 2, 0))))
        assert (signs[0] == -1).all() and (signs[1] == 1).all(), i


def test_hand_detections_drop_out_in_some_frames(synthetic_default):
    data = _load(synthetic_default[0], "train")
    mask = np.arange(64)[None, :] < data["length"][:, None]
    person0 = data["hand_valid"][:, :, :, 0][mask]
    assert 0.03 < 1 - person0.mean() < 0.25
    assert (~data["hand_valid"][:, :, :, 1][mask]).any()


def test_only_the_two_person_class_has_a_second_person(synthetic_default):
    data = _load(synthetic_default[0], "train")
    second = data["body"][..., 1].any(axis=(1, 2, 3))
    two_person = [i for i, (_, _, persons) in enumerate(BODY_CLASSES[:5]) if persons == 2]
    np.testing.assert_array_equal(second, np.isin(data["label"], two_person))


def _centred_body(data):
    """Bodies minus the SpineMid of frame 0, person 0 only, resampled to 32 frames."""
    out = []
    for body, length in zip(data["body"], data["length"]):
        index = np.linspace(0, length - 1, 32).round().astype(int)
        person0 = body[..., 0]
        out.append(person0[:, index] - person0[:, :1, 1:2])
    return np.stack(out)


def _hand_features(data):
    """Per sample: mean and std over valid frames of the right hand's fingertip-to-wrist
    and fingertip-to-fingertip distances (rotation and translation invariant)."""
    tips = [4, 8, 12, 16, 20]
    rows = []
    for hand, valid, length in zip(data["hand"], data["hand_valid"], data["length"]):
        h = hand[:, :length, 21:, 0][:, valid[:length, 1, 0]]
        points = h[:, :, [0] + tips]
        distances = np.linalg.norm(points[:, :, :, None] - points[:, :, None, :], axis=0)
        upper = distances[:, *np.triu_indices(6, 1)]
        rows.append(np.concatenate([upper.mean(0), upper.std(0)]))
    return np.array(rows)


def _body_features(data):
    distances = np.linalg.norm(_centred_body(data), axis=1)  # (N, 32, 25) joint to origin
    return np.concatenate([distances.mean(1), distances.std(1)], axis=1)


def _nearest_centroid_accuracy(train_x, train_y, test_x, test_y, classes):
    keep_train, keep_test = np.isin(train_y, classes), np.isin(test_y, classes)
    train_x, train_y = train_x[keep_train], train_y[keep_train]
    test_x, test_y = test_x[keep_test], test_y[keep_test]
    mean, std = train_x.mean(0), train_x.std(0) + 1e-9
    centroids = np.stack([((train_x[train_y == c] - mean) / std).mean(0) for c in classes])
    distances = ((((test_x - mean) / std)[:, None] - centroids[None]) ** 2).sum(-1)
    return (np.asarray(classes)[distances.argmin(1)] == test_y).mean()


def test_hand_centric_classes_differ_only_in_the_hands(synthetic_default):
    root = synthetic_default[0]
    hand_centric = read_manifest(root)["hand_centric_classes"]
    body_classes = [c for c in range(10) if c not in hand_centric]
    train, test = _load(root, "train"), _load(root, "test")

    # Class-mean body trajectories: nearly identical across hand-centric classes.
    bodies = _centred_body(train)
    means = {c: bodies[train["label"] == c].mean(0) for c in range(10)}
    def spread(classes):
        return np.mean([np.abs(means[a] - means[b]).mean() for a in classes for b in classes if a < b])
    assert spread(hand_centric) < 0.25 * spread(body_classes)

    # The same with simple classifiers: body features separate body classes but are at
    # chance (0.2) among the hand-centric ones; hand features separate those perfectly.
    body_train, body_test = _body_features(train), _body_features(test)
    hand_train, hand_test = _hand_features(train), _hand_features(test)
    assert _nearest_centroid_accuracy(body_train, train["label"], body_test, test["label"],
                                      body_classes) > 0.9
    assert _nearest_centroid_accuracy(body_train, train["label"], body_test, test["label"],
                                      hand_centric) < 0.4
    assert _nearest_centroid_accuracy(hand_train, train["label"], hand_test, test["label"],
                                      hand_centric) > 0.95
