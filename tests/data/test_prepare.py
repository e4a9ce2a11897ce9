"""prepare_ntu: conversion, skip reasons, hands, resume, atomicity, workers and the CLI hooks."""
import argparse
import json
import os

import numpy as np
import pytest

from bharnet.data import SkeletonDataset, dataset, hands, prepare, read_manifest
from bharnet.data.prepare import prepare_ntu
from ntu_samples import standing_body, wide_body

FRAMES = 30


@pytest.fixture
def ntu_source(tmp_path, write_skeleton):
    """A folder of NTU samples covering every path of prepare (xsub60, max_frames=40)."""
    src, hand_dir = tmp_path / "skeletons", tmp_path / "hands"
    hand_dir.mkdir()
    info = {}

    # Train (P001): one person, hands from JSON for even frames (right hand only).
    one = standing_body(FRAMES, amplitude=0.3, seed=1)
    write_skeleton("S001C001P001R001A001", [[("10", one[t])] for t in range(FRAMES)], src)
    detections = [[hands.HandDetection("right", (one[t, 10] + 0.01 + 0.05 * np.random.default_rng(t)
                                                 .uniform(-1, 1, (21, 3))).astype(np.float32))]
                  if t % 2 == 0 else [] for t in range(FRAMES)]
    hands.write_mediapipe_json(hand_dir / "S001C001P001R001A001.json", detections)
    info["json"] = (one, detections)

    # Test (P003): a still person, an active person and a noise body; hands from NPZ.
    still = standing_body(FRAMES, seed=2)
    active = standing_body(FRAMES, offset=(1, 0, 3), amplitude=0.4, seed=3)
    noise = wide_body(FRAMES, amplitude=0.8)
    write_skeleton("S001C002P003R001A002",
                   [[("1", still[t]), ("2", active[t]), ("3", noise[t])] for t in range(FRAMES)], src)
    keypoints = np.random.default_rng(0).normal(size=(FRAMES, 3, 2, 21, 3)).astype(np.float32)
    valid = np.zeros((FRAMES, 3, 2), bool)
    valid[:, 0, 0] = True  # the still person's left hand (raw body 0)
    valid[:, 2, 1] = True  # the noise body's right hand: dropped with the noise body
    hands.write_hand_npz(hand_dir / "S001C002P003R001A002.npz", hands.HandSequence(keypoints, valid))
    info["npz"] = (still, active, keypoints)

    # Train (P002): zero-body frames at both ends, CRLF and trailing spaces; no hand file.
    body = standing_body(20, amplitude=0.2, seed=4)
    write_skeleton("S001C003P002R002A003", [[]] * 3 + [[("5", b)] for b in body] + [[]] * 2,
                   src, crlf=True, trailing_spaces=True)
    info["trimmed"] = body

    # Train (P008): longer than max_frames=40: resampled.
    long = standing_body(50, amplitude=0.2, seed=5)
    write_skeleton("S001C001P008R001A007", [[("6", b)] for b in long], src)
    info["long"] = long

    # Test (P006): an unreadable hand file: kept without hands.
    write_skeleton("S001C001P006R001A008", [[("7", b)] for b in standing_body(FRAMES, seed=6)], src)
    (hand_dir / "S001C001P006R001A008.json").write_text("{not json")

    # Skipped: truncated, empty, listed missing, not NTU-60, not a sample name.
    truncated = src / "S002C001P004R001A004.skeleton"
    write_skeleton("S002C001P004R001A004", [[("8", b)] for b in standing_body(FRAMES)], src)
    truncated.write_text("\n".join(truncated.read_text().splitlines()[:-3]))
    write_skeleton("S002C001P005R001A005", [[]] * 10, src)
    write_skeleton("S001C001P007R001A006", [[("9", b)] for b in standing_body(FRAMES)], src)
    write_skeleton("S018C001P001R001A061", [[("9", b)] for b in standing_body(FRAMES)], src / "nested")
    write_skeleton("notes", [[("9", b)] for b in standing_body(FRAMES)], src)
    missing = tmp_path / "missing.txt"
    missing.write_text("# published list\nS001C001P007R001A006\n")
    return src, hand_dir, missing, info


def _prepare(source, out, **kwargs):
    src, hand_dir, missing, _ = source
    kwargs = {"workers": 0, "max_frames": 40, "missing_skeleton": missing, "progress": False,
              **kwargs}
    return prepare_ntu(src, out, hands_dir=hand_dir, **kwargs)


def _output_bytes(out):
    return {os.path.join(split, file): open(os.path.join(out, split, file), "rb").read()
            for split in dataset.SPLITS for file in dataset.ARRAY_FILES + (dataset.NAMES_FILE,)}


def test_prepare_end_to_end(ntu_source, tmp_path):
    out = tmp_path / "out"
    summary = _prepare(ntu_source, out, hand_centric_classes=[7])
    _, _, _, info = ntu_source
    assert summary.counts == {"train": 3, "test": 2} and summary.converted == 7
    assert summary.skipped == {"malformed": ["S002C001P004R001A004"], "empty": ["S002C001P005R001A005"],
                               "listed_missing": ["S001C001P007R001A006"], "bad_name": ["notes"]}
    assert summary.outside_benchmark == 1
    assert summary.notes == {"resampled": ["S001C001P008R001A007"],
                             "no_hand_file": ["S001C001P008R001A007", "S001C003P002R002A003"],
                             "invalid_hand_file": ["S001C001P006R001A008"], "joined_bodies": [],
                             "hand_frames_differ": []}
    assert "S002C001P004R001A004.skeleton: line" in summary.errors["S002C001P004R001A004"]
    assert "malformed" in summary.report() and "train 3" in summary.report()

    manifest = read_manifest(out)
    assert manifest["num_classes"] == 60 and manifest["class_names"][0] == "drink water"
    assert manifest["hand_centric_classes"] == [7] and manifest["has_hands"]
    assert manifest["splits"]["train"]["count"] == 3 and sum(manifest["splits"]["test"]["class_counts"]) == 2
    assert manifest["skipped"] == summary.skipped and manifest["source"]["benchmark"] == "xsub60"
    assert not [f for f in os.listdir(out) if f.startswith(".cache")]

    train = {f: np.load(out / "train" / f, mmap_mode="r") for f in dataset.ARRAY_FILES}
    names = (out / "train" / "names.txt").read_text().split()
    assert names == ["S001C001P001R001A001", "S001C001P008R001A007", "S001C003P002R002A003"]
    np.testing.assert_array_equal(train["label.npy"], [0, 6, 2])
    np.testing.assert_array_equal(train["length.npy"], [30, 40, 20])
    assert train["body.npy"].shape == (3, 3, 40, 25, 2)
    one, detections = info["json"]
    np.testing.assert_allclose(train["body.npy"][0, :, :30, :, 0], one.transpose(2, 0, 1), atol=1e-6)
    assert not train["body.npy"][0, ..., 1].any() and not train["body.npy"][0, :, 30:].any()
    np.testing.assert_allclose(train["body.npy"][2, :, :20, :, 0], info["trimmed"].transpose(2, 0, 1),
                               atol=1e-6)
    np.testing.assert_allclose(train["body.npy"][1, :, 39, :, 0], info["long"][49].T, atol=1e-6)
    hand_valid = train["hand_valid.npy"]
    np.testing.assert_array_equal(hand_valid[0, :30, 1, 0], np.arange(30) % 2 == 0)
    assert not hand_valid[0, :, 0].any() and not hand_valid[2].any()
    np.testing.assert_allclose(train["hand.npy"][0, :, 4, 21:, 0], detections[4][0].landmarks.T,
                               atol=1e-6)
    assert not train["hand.npy"][0, :, 5].any()

    test = {f: np.load(out / "test" / f) for f in ("body.npy", "hand.npy", "hand_valid.npy")}
    assert (out / "test" / "names.txt").read_text().split() == ["S001C001P006R001A008",
                                                                "S001C002P003R001A002"]
    assert not test["hand_valid.npy"][0].any()  # the unreadable hand file
    still, active, keypoints = info["npz"]  # raw bodies: still, active, noise
    np.testing.assert_allclose(test["body.npy"][1, :, :30, :, 0], active.transpose(2, 0, 1), atol=1e-6)
    np.testing.assert_allclose(test["body.npy"][1, :, :30, :, 1], still.transpose(2, 0, 1), atol=1e-6)
    assert test["hand_valid.npy"][1, :30, 0, 1].all() and test["hand_valid.npy"][1].sum() == 30
    np.testing.assert_allclose(test["hand.npy"][1, :, 7, :21, 1], keypoints[7, 0, 0].T)

    body, hand, _, label = SkeletonDataset(out, "train", modality="bone", window=16)[1]
    assert body.shape == (3, 16, 25, 2) and hand.shape == (3, 16, 42, 2) and label == 6


def test_rerun_skips_finished_work(ntu_source, tmp_path):
    out = tmp_path / "out"
    _prepare(ntu_source, out)
    stamps = {f: os.stat(out / f).st_mtime_ns for f in _output_bytes(out)}
    again = _prepare(ntu_source, out)
    assert again.up_to_date and again.counts == {"train": 3, "test": 2}
    assert again.skipped["empty"] == ["S002C001P005R001A005"] and "up to date" in again.report()
    assert {f: os.stat(out / f).st_mtime_ns for f in stamps} == stamps
    rebuilt = _prepare(ntu_source, out, max_frames=60)  # new options: rebuilt
    assert not rebuilt.up_to_date and rebuilt.notes["resampled"] == []
    assert np.load(out / "train" / "body.npy", mmap_mode="r").shape[2] == 60


def test_new_hand_centric_classes_rewrite_only_the_manifest(ntu_source, tmp_path):
    out = tmp_path / "out"
    _prepare(ntu_source, out)
    stamps = {f: os.stat(out / f).st_mtime_ns for f in _output_bytes(out)}
    relabelled = _prepare(ntu_source, out, hand_centric_classes=[3, 1])
    assert relabelled.up_to_date and relabelled.counts == {"train": 3, "test": 2}
    assert {f: os.stat(out / f).st_mtime_ns for f in stamps} == stamps  # nothing converted or written again
    assert dataset.read_manifest(out)["hand_centric_classes"] == [1, 3]
    assert _prepare(ntu_source, out, hand_centric_classes=[1, 3]).up_to_date
    assert _prepare(ntu_source, tmp_path / "fresh", hand_centric_classes=[1, 3]).up_to_date is False
    assert dataset.read_manifest(out) == dataset.read_manifest(tmp_path / "fresh")  # as if prepared so


def test_the_cache_is_removed_under_a_folder_name_with_glob_characters(ntu_source, tmp_path):
    out = tmp_path / "ntu[60]*"
    _prepare(ntu_source, out)
    assert not [f for f in os.listdir(out) if f.startswith(".cache")]


def test_workers_give_identical_output(ntu_source, tmp_path):
    _prepare(ntu_source, tmp_path / "serial")
    _prepare(ntu_source, tmp_path / "parallel", workers=2)
    assert _output_bytes(tmp_path / "serial") == _output_bytes(tmp_path / "parallel")


def _leftovers(out):
    """Files that would make a half-written dataset look usable or that leak temp data."""
    found = []
    for folder, _, files in os.walk(out):
        found += [os.path.join(folder, f) for f in files
                  if f.endswith(".partial") or ".partial." in f or f == "manifest.json"
                  or (f in dataset.ARRAY_FILES and ".cache" not in folder)]
    return found


def test_interrupted_conversion_resumes(ntu_source, tmp_path, monkeypatch):
    out = tmp_path / "out"
    real, calls = prepare.process_sample, []

    def interrupted(task, options):
        if len(calls) == 3:
            raise KeyboardInterrupt
        calls.append(task.name)
        return real(task, options)

    monkeypatch.setattr(prepare, "process_sample", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _prepare(ntu_source, out)
    assert _leftovers(out) == []
    cache = [f for f in os.listdir(out) if f.startswith(".cache")]
    assert len(cache) == 1 and len(os.listdir(out / cache[0])) == 3
    monkeypatch.setattr(prepare, "process_sample", real)
    stale = out / ".cache-0123456789abcdef"  # of an interrupted run with other options
    stale.mkdir()
    resumed = _prepare(ntu_source, out)
    assert resumed.resumed == 3 and resumed.converted == 4
    assert not [f for f in os.listdir(out) if f.startswith(".cache")]  # every cache is removed once done
    _prepare(ntu_source, tmp_path / "clean")
    assert _output_bytes(out) == _output_bytes(tmp_path / "clean")


def test_interrupted_write_leaves_no_partial_output(ntu_source, tmp_path, monkeypatch):
    out = tmp_path / "out"
    _prepare(ntu_source, out)
    real_add = dataset.SplitWriter.add

    def failing_add(self, index, *args):
        if index == 1:
            raise OSError("disk full")
        return real_add(self, index, *args)

    monkeypatch.setattr(dataset.SplitWriter, "add", failing_add)
    with pytest.raises(OSError, match="disk full"):
        _prepare(ntu_source, out, max_frames=50)
    assert not os.path.exists(out / "manifest.json")  # the old dataset is no longer complete
    assert [f for f in _leftovers(out) if "partial" in f] == []
    with pytest.raises(FileNotFoundError):
        SkeletonDataset(out, "train")
    monkeypatch.setattr(dataset.SplitWriter, "add", real_add)
    assert _prepare(ntu_source, out, max_frames=50).counts == {"train": 3, "test": 2}
    assert read_manifest(out)["max_frames"] == 50


def test_argument_errors(ntu_source, tmp_path):
    src, hand_dir, _, _ = ntu_source
    with pytest.raises(ValueError, match="benchmark"):
        prepare_ntu(src, tmp_path / "o", benchmark="xsub")
    with pytest.raises(ValueError, match="hand_centric_classes"):
        prepare_ntu(src, tmp_path / "o", hand_centric_classes=[60])
    with pytest.raises(ValueError, match="handedness"):
        prepare_ntu(src, tmp_path / "o", handedness="left")
    with pytest.raises(FileNotFoundError, match="no .skeleton files"):
        prepare_ntu(hand_dir, tmp_path / "o")
    with pytest.raises(FileNotFoundError, match="hands_dir"):
        prepare_ntu(src, tmp_path / "o", hands_dir=tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="src_dir .* is not a directory"):
        prepare_ntu(tmp_path / "nowhere", tmp_path / "o")
    with pytest.raises(ValueError, match="max_frames must be >= 1"):
        prepare_ntu(src, tmp_path / "o", max_frames=0)
    assert not (tmp_path / "o").exists()  # the arguments are checked before the output folder is made


def test_command_line_hooks(ntu_source, tmp_path, capsys):
    src, hand_dir, missing, _ = ntu_source
    parser = argparse.ArgumentParser(prog="bharnet prepare")
    prepare.add_arguments(parser)
    args = parser.parse_args([str(src), str(tmp_path / "cli"), "--hands", str(hand_dir),
                              "--benchmark", "xview60", "--workers", "0", "--max-frames", "40",
                              "--missing-skeleton", str(missing), "--hand-centric-classes", "1,3",
                              "--no-progress"])
    assert prepare.run(args) == 0
    assert "samples: train" in capsys.readouterr().out
    manifest = json.loads((tmp_path / "cli" / "manifest.json").read_text())
    assert manifest["source"]["benchmark"] == "xview60" and manifest["hand_centric_classes"] == [1, 3]
    assert manifest["splits"]["train"]["count"] == 2  # cameras 2 and 3
    bad = parser.parse_args([str(tmp_path / "nowhere"), str(tmp_path / "o")])
    assert prepare.run(bad) == 2 and "error" in capsys.readouterr().err


def test_image_space_hands_align_with_kinect_colour_coordinates(tmp_path, write_skeleton):
    src, hand_dir = tmp_path / "src", tmp_path / "hands"
    hand_dir.mkdir()
    body = standing_body(FRAMES, seed=8)  # still: the one detection fits every frame
    write_skeleton("S001C001P001R001A001", [[("1", b)] for b in body], src)
    # ntu_samples writes colour coordinates = 100 * (x, y): a hand at the right wrist's pixel.
    landmarks = np.zeros((21, 3), np.float32)
    landmarks[:, :2] = 100 * body[0, 10, :2] + np.arange(21)[:, None]
    hands.write_mediapipe_json(hand_dir / "S001C001P001R001A001.json",
                               [[hands.HandDetection("left", landmarks)]])
    out = tmp_path / "out"
    prepare_ntu(src, out, hands_dir=hand_dir, hand_space="color", workers=0, progress=False,
                handedness="nearest", hand_max_distance=5.0)
    stored = np.load(out / "train" / "hand.npy")
    np.testing.assert_allclose(stored[0, :, 0, 21:, 0], landmarks.T)  # right hand, pixels
    assert np.load(out / "train" / "hand_valid.npy")[0, :FRAMES, 1, 0].all()  # every frame
    with pytest.warns(UserWarning, match="calibration-free"):  # canonical cannot place pixels
        withheld = SkeletonDataset(out, "train")[0]
    assert not withheld[1].any() and not withheld[2].any()  # hands zero and undetected
    body_item, hand_item, _, _ = SkeletonDataset(out, "train", preprocessing="calibration-free")[0]
    assert hand_item.abs().max() > 10  # pixels, untouched


def test_an_actor_tracked_under_several_kinect_ids_is_one_person(tmp_path, write_skeleton):
    """One person whose Kinect id changes twice (A, B, C in turn) beside a second person
    present throughout: every frame of the first is stored as person 0 (two of its three
    ids used to be kept as persons 0 and 1, the third dropped with its frames), with the npz
    hands of the body that owns each frame."""
    frames = 36
    person = standing_body(frames, amplitude=0.3, seed=11)
    other = standing_body(frames, offset=(1.5, 0, 3), amplitude=0.05, seed=12)
    ids = ["A"] * 12 + ["B"] * 12 + ["C"] * 12
    src, hand_dir = tmp_path / "src", tmp_path / "hands"
    write_skeleton("S001C001P001R001A050", [[(ids[t], person[t]), ("O", other[t])] for t in range(frames)], src)
    hand_dir.mkdir()
    bodies = 4  # in order of first appearance: A, O, B, C
    keypoints = np.zeros((frames, bodies, 2, 21, 3), np.float32)
    valid = np.zeros((frames, bodies, 2), bool)
    for t in range(frames):
        b = (0, 2, 3)[t // 12]
        keypoints[t, b, 0] = b + 1  # each body's left hand marked with its index
        valid[t, b, 0] = True
    np.savez(hand_dir / "S001C001P001R001A050.npz", keypoints=keypoints, valid=valid)
    summary = prepare_ntu(src, tmp_path / "out", hands_dir=hand_dir, workers=0, progress=False)
    assert summary.notes["joined_bodies"] == ["S001C001P001R001A050"]
    stored = np.load(tmp_path / "out" / "train" / "body.npy")[0]  # (3, T, 25, M)
    np.testing.assert_allclose(stored[:, :frames, :, 0].transpose(1, 2, 0), person, atol=1e-5)
    np.testing.assert_allclose(stored[:, :frames, :, 1].transpose(1, 2, 0), other, atol=1e-5)
    assert np.load(tmp_path / "out" / "train" / "length.npy")[0] == frames
    hand = np.load(tmp_path / "out" / "train" / "hand.npy")[0]  # (3, T, 42, M)
    np.testing.assert_array_equal(hand[0, :frames, 0, 0], np.repeat([1, 3, 4], 12))
    assert np.load(tmp_path / "out" / "train" / "hand_valid.npy")[0, :frames, 0, 0].all()


def test_names_that_are_not_exactly_a_sample_and_hand_files_of_another_length(tmp_path, write_skeleton):
    """A copy "S001C001P001R001A001.orig" would have been a second sample of the same name, and
    action 000 gave label -1 (and a bincount error after the old dataset was removed): both are
    bad names. A hand file shorter than its skeleton is resampled, with a note."""
    src, hand_dir = tmp_path / "skeletons", tmp_path / "hands"
    hand_dir.mkdir()
    body = standing_body(FRAMES, amplitude=0.3, seed=1)
    for name in ("S001C001P001R001A001", "S001C001P001R001A001.orig", "S001C001P003R001A000"):
        write_skeleton(name, [[("10", body[t])] for t in range(FRAMES)], src)
    detections = [[hands.HandDetection("right", (body[t, 10] + 0.01).repeat(21, 0).reshape(21, 3).astype(np.float32))]
                  for t in range(FRAMES // 2)]  # the detector stopped half-way
    hands.write_mediapipe_json(hand_dir / "S001C001P001R001A001.json", detections)
    summary = prepare_ntu(src, tmp_path / "out", hands_dir=hand_dir, workers=0, progress=False)
    assert summary.counts == {"train": 1, "test": 0}
    assert sorted(summary.skipped["bad_name"]) == ["S001C001P001R001A001.orig", "S001C001P003R001A000"]
    assert summary.notes["hand_frames_differ"] == ["S001C001P001R001A001"]
    manifest = read_manifest(str(tmp_path / "out"))
    assert manifest["notes"]["hand_frames_differ"] == ["S001C001P001R001A001"]
