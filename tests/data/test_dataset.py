"""SkeletonDataset: item shapes and dtypes, modalities, preprocessing, randomness, format checks."""
import json
import os
import pickle

import numpy as np
import pytest
import torch

from bharnet.data import SkeletonDataset, augment, clip_input, dataset, features
from bharnet.graphs import BODY, HANDS


@pytest.mark.parametrize("modality", features.MODALITIES)
@pytest.mark.parametrize("split", ["train", "test"])
def test_item_shapes_and_dtypes(synthetic_small, modality, split):
    data = SkeletonDataset(synthetic_small, split, modality=modality, window=16, seed=0)
    assert len(data) == (12 if split == "train" else 8) and data.train == (split == "train")
    body, hand, hand_valid, label = data[len(data) - 1]
    assert body.shape == (3, 16, 25, 2) and hand.shape == (3, 16, 42, 2) and hand_valid.shape == (16, 2, 2)
    assert body.dtype == hand.dtype == torch.float32 and hand_valid.dtype == torch.bool and isinstance(label, int)
    assert label == 3 and torch.isfinite(body).all() and torch.isfinite(hand).all()
    assert hand_valid.any() and not hand_valid.all()
    if modality == "joint":  # a detected hand has non-zero keypoints, an undetected one none
        assert torch.equal(hand.ne(0).any(0).unflatten(1, (2, 21)).any(2), hand_valid)


def test_metadata(synthetic_small):
    data = SkeletonDataset(synthetic_small, "train")
    assert data.num_classes == 4 and data.hand_centric_classes == [2, 3]
    assert len(data.class_names) == 4 and data.names[0] == "synthetic_train_00000"
    np.testing.assert_array_equal(data.labels, np.repeat(np.arange(4), 3))
    assert data.lengths.min() >= 20


def test_modalities_are_computed_after_the_crop(synthetic_small):
    # (Bones and motion are linear in the coordinates, so they commute with the rotation: the
    # order of those two cannot show in the output and is not what this test checks.)
    kwargs = dict(root=synthetic_small, split="train", window=16, seed=7)
    body, hand, detected, _ = SkeletonDataset(modality="joint", **kwargs)[4]
    # Missing people and undetected hands are exactly zero in the joint item.
    body_valid, hand_valid = body.abs().sum(0) > 0, hand.abs().sum(0) > 0
    assert not hand_valid.all() and hand_valid.any()
    assert torch.equal(hand_valid, detected.repeat_interleave(21, dim=1))
    for name in ("bone", "motion", "bone_motion"):
        other_body, other_hand, other_detected, _ = SkeletonDataset(modality=name, **kwargs)[4]
        assert torch.equal(other_detected, detected)
        torch.testing.assert_close(other_body, features.modality(body, name, BODY.parents,
                                                                 body_valid))
        torch.testing.assert_close(other_hand, features.modality(hand, name, HANDS.parents,
                                                                 hand_valid))


def test_calibration_free_test_item_is_the_stored_data(synthetic_small):
    data = SkeletonDataset(synthetic_small, "test", preprocessing="calibration-free",
                           test_crop_ratio=1.0, window=24)
    stored_body, stored_hand, _ = data.raw(0)
    length = stored_body.shape[1]
    body, hand, _, _ = data[0]
    expected_body, _ = augment.crop_resize(stored_body, 0, length, 24)
    torch.testing.assert_close(body, expected_body)
    assert body[2].mean() > 1.0  # native camera coordinates: metres in front of the sensor
    canonical = SkeletonDataset(synthetic_small, "test", test_crop_ratio=1.0, window=24)
    body_c, hand_c, _, _ = canonical[0]
    origin = stored_body[:, 0, features.CENTRE_JOINT, 0]
    assert torch.allclose(body_c[:, 0, features.CENTRE_JOINT, 0], torch.zeros(3), atol=1e-6)
    present = body.abs().sum(dim=(0, 2)) > 0
    torch.testing.assert_close(body_c[..., 0], body[..., 0] - origin.view(3, 1, 1) * present[:, 0].view(1, -1, 1))
    detected = hand.abs().sum(dim=0) > 0
    torch.testing.assert_close(hand_c, hand - origin.view(3, 1, 1, 1) * detected)


@pytest.mark.parametrize("modality", features.MODALITIES)
def test_clip_input_of_a_raw_clip_is_the_evaluation_item(synthetic_small, modality):
    """clip_input (the transform for new skeletons) gives a test split's items from their raw
    clips; a person absent from the raw clip stays exactly zero (fused inference skips it)."""
    data = SkeletonDataset(synthetic_small, "test", modality=modality, window=16)
    for index in range(len(data)):
        raw_body, raw_hand, raw_valid = data.raw(index)
        body, hand, hand_valid = clip_input(raw_body, raw_hand, raw_valid, modality, 16)
        expected_body, expected_hand, expected_valid, _ = data[index]
        assert torch.equal(body, expected_body) and torch.equal(hand, expected_hand)
        assert torch.equal(hand_valid, expected_valid)
    raw_body[..., 1], raw_hand[..., 1], raw_valid[..., 1] = 0, 0, False
    body, hand, hand_valid = clip_input(raw_body, raw_hand, raw_valid, modality, 16)
    assert not body[..., 1].any() and not hand[..., 1].any() and body[..., 0].any()
    assert not hand_valid[..., 1].any()
    with pytest.raises(ValueError, match="modality must be one of"):
        clip_input(raw_body, raw_hand, raw_valid, "joints")


def test_randomness_is_seeded_per_item_and_epoch(synthetic_small):
    data = SkeletonDataset(synthetic_small, "train", window=16, seed=1)
    first = data[3][0]
    torch.testing.assert_close(data[3][0], first)
    torch.testing.assert_close(SkeletonDataset(synthetic_small, "train", window=16, seed=1)[3][0], first)
    data.set_epoch(1)
    assert not torch.allclose(data[3][0], first)
    assert not torch.allclose(SkeletonDataset(synthetic_small, "train", window=16, seed=2)[3][0], first)
    unseeded = SkeletonDataset(synthetic_small, "train", window=16)
    assert not torch.allclose(unseeded[3][0], unseeded[3][0])
    evaluation = SkeletonDataset(synthetic_small, "test", window=16)
    torch.testing.assert_close(evaluation[1][1], evaluation[1][1])
    assert not SkeletonDataset(synthetic_small, "train", train=False).train


def test_set_epoch_reaches_persistent_dataloader_workers(synthetic_small):
    data = SkeletonDataset(synthetic_small, "train", window=8, seed=5)
    loader = torch.utils.data.DataLoader(data, batch_size=4, num_workers=1,
                                         persistent_workers=True)
    for epoch in range(2):
        data.set_epoch(epoch)
        body = next(iter(loader))[0]
        torch.testing.assert_close(body[2], data[2][0])
        if epoch == 0:
            first_epoch = body
    assert not torch.allclose(body, first_epoch)


def test_lazy_memmaps_pickle_and_dataloader(synthetic_small):
    data = SkeletonDataset(synthetic_small, "test", window=16)
    assert data._arrays is None
    data[0]
    assert all(isinstance(a, np.memmap) for a in data._arrays.values())
    clone = pickle.loads(pickle.dumps(data))
    assert clone._arrays is None
    torch.testing.assert_close(clone[2][1], data[2][1])
    body, hand, hand_valid, labels = next(iter(torch.utils.data.DataLoader(data, batch_size=4)))
    assert body.shape == (4, 3, 16, 25, 2) and hand.shape == (4, 3, 16, 42, 2) and hand_valid.shape == (4, 16, 2, 2)
    assert labels.tolist() == [0, 0, 1, 1]
    with pytest.raises(IndexError):
        data[len(data)]


def test_argument_and_format_errors(synthetic_small, tmp_path):
    for kwargs, message in ((dict(split="val"), "split"), (dict(modality="depth"), "modality"),
                            (dict(preprocessing="centre"), "preprocessing"),
                            (dict(window=0), "window")):
        with pytest.raises(ValueError, match=message):
            SkeletonDataset(synthetic_small, **kwargs)
    with pytest.raises(FileNotFoundError, match="not a complete bharnet dataset"):
        SkeletonDataset(tmp_path)
    manifest = json.load(open(os.path.join(synthetic_small, "manifest.json")))
    (tmp_path / "manifest.json").write_text(json.dumps({**manifest, "format_version": 99}))
    with pytest.raises(ValueError, match="version"):
        SkeletonDataset(tmp_path)


def test_split_writer_commits_atomically_and_checks_shapes(tmp_path):
    split_dir = str(tmp_path / "train")
    body = np.ones((3, 5, 25, 2), np.float32)
    hand = np.ones((3, 5, 42, 2), np.float32)
    valid = np.ones((5, 2, 2), bool)
    with pytest.raises(RuntimeError):
        with dataset.SplitWriter(split_dir, 2, 8) as writer:
            writer.add(0, body, hand, valid, 1, "a")
            raise RuntimeError("interrupted")
    assert os.listdir(split_dir) == []
    with dataset.SplitWriter(split_dir, 2, 8) as writer:
        with pytest.raises(ValueError, match=r"body must have shape \(3, 5, 25, 2\)"):
            writer.add(0, body[:, :, :24], hand, valid, 1, "a")
        with pytest.raises(ValueError, match="length must be in"):
            writer.add(0, np.ones((3, 9, 25, 2), np.float32), np.ones((3, 9, 42, 2), np.float32),
                       np.ones((9, 2, 2), bool), 1, "a")
        writer.add(1, body, hand, valid, 1, "b")
        with pytest.raises(ValueError, match="never added"):
            writer.commit()
        writer.add(0, body[:, :3], hand[:, :3], valid[:3], 0, "a")
        writer.commit()
    assert sorted(os.listdir(split_dir)) == sorted(dataset.ARRAY_FILES + (dataset.NAMES_FILE,))
    stored = np.load(os.path.join(split_dir, "body.npy"), mmap_mode="r")
    assert stored.shape == (2, 3, 8, 25, 2) and not stored[0, :, 3:].any() and stored[0, :, :3].all()
    np.testing.assert_array_equal(np.load(os.path.join(split_dir, "length.npy")), [3, 5])
