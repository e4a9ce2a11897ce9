"""NTU RGB+D reader: parsing quirks, errors, body selection, benchmarks, missing lists."""
import numpy as np
import pytest

from bharnet.data import ntu
from bharnet.data.ntu import SampleName, SkeletonFormatError, read_skeleton
from ntu_samples import skeleton_text, standing_body, wide_body

NAME = "S001C002P003R002A013"


def _frames_two_bodies():
    a, b = standing_body(3, seed=1), standing_body(3, offset=(1, 0, 3), seed=2)
    return [[("111", a[0])], [("222", b[1]), ("111", a[1])], [("222", b[2])]], a, b


def test_reads_bodies_in_order_of_first_appearance(write_skeleton):
    frames, a, b = _frames_two_bodies()
    skeleton = read_skeleton(write_skeleton(NAME, frames))
    assert skeleton.xyz.shape == (3, 2, 25, 3) and skeleton.xyz.dtype == np.float32
    assert skeleton.body_ids == ("111", "222")
    np.testing.assert_allclose(skeleton.xyz[:2, 0], a[:2], atol=1e-6)
    np.testing.assert_allclose(skeleton.xyz[1:, 1], b[1:], atol=1e-6)
    assert not skeleton.xyz[2, 0].any() and not skeleton.xyz[0, 1].any()
    np.testing.assert_array_equal(skeleton.present, [[True, False], [True, True], [False, True]])
    np.testing.assert_allclose(skeleton.color_xy[1, 1], 100 * b[1, :, :2], atol=1e-3)
    assert skeleton.sample == SampleName(setup=1, camera=2, performer=3, replication=2, action=13)
    assert not skeleton.is_empty


def test_sample_name_round_trip_and_rejects_other_names():
    sample = SampleName.parse("/data/nturgbd/S017C003P020R002A060.skeleton")
    assert (sample.setup, sample.camera, sample.performer, sample.replication, sample.action) \
        == (17, 3, 20, 2, 60)
    assert str(sample) == "S017C003P020R002A060"
    with pytest.raises(ValueError, match="SsssCcccPpppRrrrAaaa"):
        SampleName.parse("S01C003P020R002A060")


def test_unrecognised_file_name_gives_no_sample(write_skeleton):
    skeleton = read_skeleton(write_skeleton("clip", [[("1", standing_body(1)[0])]]))
    assert skeleton.sample is None and skeleton.num_bodies == 1


def test_tolerates_crlf_trailing_spaces_and_zero_body_frames(write_skeleton):
    body = standing_body(4)
    frames = [[], [("7", body[1])], [], [("7", body[3])]]
    plain = read_skeleton(write_skeleton(NAME, frames))
    quirky = read_skeleton(write_skeleton("S001C002P003R002A014", frames, crlf=True,
                                          trailing_spaces=True))
    np.testing.assert_array_equal(plain.xyz, quirky.xyz)
    np.testing.assert_array_equal(quirky.present[:, 0], [False, True, False, True])
    assert quirky.xyz.shape == (4, 1, 25, 3) and not quirky.xyz[[0, 2]].any()


def test_all_frames_without_bodies_is_empty(write_skeleton):
    skeleton = read_skeleton(write_skeleton(NAME, [[], [], []]))
    assert skeleton.is_empty and skeleton.xyz.shape == (3, 0, 25, 3)
    assert read_skeleton(write_skeleton("S001C001P001R001A001", [])).is_empty


def test_repeated_body_id_in_one_frame_becomes_a_second_body(write_skeleton):
    body = standing_body(1)[0]
    skeleton = read_skeleton(write_skeleton(NAME, [[("5", body), ("5", body + 1)]]))
    assert skeleton.body_ids == ("5", "5#1")
    np.testing.assert_allclose(skeleton.xyz[0, 1], body + 1, atol=1e-6)


def _error_for(tmp_path, text):
    path = tmp_path / f"{NAME}.skeleton"
    path.write_text(text)
    with pytest.raises(SkeletonFormatError) as info:
        read_skeleton(path)
    assert isinstance(info.value, ValueError)
    assert str(path) in str(info.value)
    return str(info.value)


def test_truncated_file_names_file_and_line(tmp_path):
    text = skeleton_text([[("1", standing_body(1)[0])]] * 2)
    lines = text.splitlines()
    message = _error_for(tmp_path, "\n".join(lines[:-5]) + "\n")  # last body loses 5 joints
    assert "line" in message and "ends early" in message
    assert f"line {len(lines) - 4}:" in message


def test_non_numeric_field_names_its_line(tmp_path):
    lines = skeleton_text([[("1", standing_body(1)[0])]]).splitlines()
    lines[9] = lines[9].replace("250.1", "abc")  # the 7th joint line
    message = _error_for(tmp_path, "\n".join(lines))
    assert "line 10:" in message and "'abc'" in message


@pytest.mark.parametrize("token", ["nan", "inf", "-1e999"])
def test_non_finite_field_names_its_line(tmp_path, token):
    lines = skeleton_text([[("1", standing_body(1)[0])]]).splitlines()
    lines[9] = lines[9].replace("250.1", token)  # the 7th joint line
    message = _error_for(tmp_path, "\n".join(lines))
    assert "line 10:" in message and "non-finite" in message


@pytest.mark.parametrize("line, replacement, expected", [
    (0, "2 3", "single integer"),          # frame count with two fields
    (1, "x", "expected an integer"),       # body count not a number
    (2, "1 0 1 2", "body info fields"),    # short body info line
    (3, "24", "expected 25 (the number of joints)"),       # wrong joint count
    (4, "0.1 0.2 0.3", "joint fields"),    # short joint line
])
def test_malformed_lines_are_reported(tmp_path, line, replacement, expected):
    lines = skeleton_text([[("1", standing_body(1)[0])]]).splitlines()
    lines[line] = replacement
    message = _error_for(tmp_path, "\n".join(lines))
    assert expected in message and f"line {line + 1}:" in message


def test_content_after_last_frame_is_an_error(tmp_path):
    text = skeleton_text([[("1", standing_body(1)[0])]]) + "1\n"
    assert "after the last frame" in _error_for(tmp_path, text)


def _skeleton_from(bodies):
    """A Skeleton of bodies given as (frames, 25, 3) arrays with NaN for absent frames."""
    xyz = np.stack(bodies, axis=1)
    present = ~np.isnan(xyz).any(axis=(2, 3))
    xyz = np.nan_to_num(xyz).astype(np.float32)
    return ntu.Skeleton("x", xyz, xyz[..., :2], present,
                        tuple(str(i) for i in range(len(bodies))), None)


def test_select_bodies_drops_noise_and_ranks_by_motion():
    frames = 40
    still = standing_body(frames, amplitude=0.0, seed=3)
    active = standing_body(frames, offset=(1, 0, 3), amplitude=0.3, seed=4)
    flicker = standing_body(frames, offset=(-1, 0, 3), amplitude=0.8, seed=5)
    flicker[5:] = np.nan  # present in 5 frames only
    furniture = wide_body(frames, amplitude=0.6)
    skeleton = _skeleton_from([flicker, still, furniture, active])
    assert list(ntu.select_bodies(skeleton, max_bodies=2, min_frames=11)) == [3, 1]
    assert list(ntu.select_bodies(skeleton, max_bodies=1, min_frames=11)) == [3]
    # Without denoising the flickering and the wide bodies would win on motion.
    energy = ntu.motion_energy(skeleton.xyz, skeleton.present)
    assert energy[2] > energy[3] > energy[1]
    np.testing.assert_allclose(ntu.noisy_spread_fraction(skeleton.xyz, skeleton.present),
                               [0, 0, 1, 0])


def test_select_bodies_keeps_something_when_every_body_looks_like_noise():
    frames = 20
    short = standing_body(frames, amplitude=0.2)
    short[4:] = np.nan
    wide = wide_body(frames)
    # The length filter drops the short body; the spread filter would drop the rest: skipped.
    assert list(ntu.select_bodies(_skeleton_from([short, wide]), min_frames=11)) == [1]
    still_short = standing_body(frames, offset=(1, 0, 3), seed=7)
    still_short[6:] = np.nan
    assert list(ntu.select_bodies(_skeleton_from([still_short, short]), min_frames=11)) == [1, 0]
    only_wide = _skeleton_from([wide])
    assert list(ntu.select_bodies(only_wide)) == [0]
    empty = ntu.Skeleton("x", np.zeros((3, 0, 25, 3), np.float32),
                         np.zeros((3, 0, 25, 2), np.float32), np.zeros((3, 0), bool), (), None)
    assert len(ntu.select_bodies(empty)) == 0
    with pytest.raises(ValueError, match="max_bodies"):
        ntu.select_bodies(only_wide, max_bodies=0)


def test_bodies_tracked_for_11_frames_or_fewer_are_noise_by_default():
    """As in the common NTU preprocessing (length <= 11 is noise): 11 frames dropped, 12 kept."""
    frames = 30
    steady = standing_body(frames, amplitude=0.05, seed=3)
    for length, kept in ((11, [0]), (12, [1, 0])):
        brief = standing_body(frames, offset=(1, 0, 3), amplitude=0.5, seed=4)
        brief[length:] = np.nan
        assert list(ntu.select_bodies(_skeleton_from([steady, brief]))) == kept, length


def test_assign_actors_joins_successive_bodies_and_keeps_the_most_active_actors():
    frames = 30
    a = standing_body(frames, amplitude=0.4, seed=3)
    b = a.copy()
    a[15:], b[:15] = np.nan, np.nan  # one person, re-tracked under a new id at frame 15
    second = standing_body(frames, offset=(1, 0, 3), amplitude=0.2, seed=4)
    third = standing_body(frames, offset=(-1, 0, 3), amplitude=0.1, seed=5)
    skeleton = _skeleton_from([a, second, b, third])
    owner = ntu.assign_actors(skeleton, max_actors=2, min_frames=11)
    np.testing.assert_array_equal(owner[:, 0], [0] * 15 + [2] * 15)
    np.testing.assert_array_equal(owner[:, 1], [1] * frames)  # the third, least active, dropped
    gathered = ntu.gather_actors(skeleton.xyz, owner)
    np.testing.assert_array_equal(gathered[:, 0], np.nan_to_num(np.where(np.isnan(a), b, a)))
    assert ntu.assign_actors(skeleton, max_actors=1, min_frames=11).shape == (frames, 1)
    partial = owner.copy()
    partial[:5, 1] = -1
    assert not ntu.gather_actors(skeleton.xyz, partial)[:5, 1].any()  # zeros where absent
    with pytest.raises(ValueError, match="max_actors"):
        ntu.assign_actors(skeleton, max_actors=0)


def test_official_benchmark_splits():
    assert len(ntu.NTU60_XSUB_TRAIN_SUBJECTS) == 20 and len(ntu.NTU120_XSUB_TRAIN_SUBJECTS) == 53
    split = ntu.benchmark_split
    assert split(SampleName.parse("S001C001P001R001A001"), "xsub60") == "train"
    assert split(SampleName.parse("S001C001P003R001A001"), "xsub60") == "test"
    assert split(SampleName.parse("S001C001P001R001A001"), "xview60") == "test"
    assert split(SampleName.parse("S001C002P003R001A001"), "xview60") == "train"
    assert split(SampleName.parse("S001C003P003R001A001"), "xview60") == "train"
    assert split(SampleName.parse("S018C001P001R001A001"), "xsub60") is None
    assert split(SampleName.parse("S001C001P001R001A061"), "xview60") is None
    assert split(SampleName.parse("S018C001P045R001A061"), "xsub120") == "train"
    assert split(SampleName.parse("S018C001P044R001A061"), "xsub120") == "test"
    assert split(SampleName.parse("S018C001P044R001A061"), "xset120") == "train"
    assert split(SampleName.parse("S019C001P001R001A001"), "xset120") == "test"
    assert ntu.benchmark_num_classes("xview60") == 60 and ntu.benchmark_num_classes("xset120") == 120
    with pytest.raises(ValueError, match="xsub60"):
        split(SampleName.parse("S001C001P001R001A001"), "cross-subject")


def test_class_names_cover_ntu120():
    assert len(ntu.NTU_CLASS_NAMES) == 120 == len(set(ntu.NTU_CLASS_NAMES))
    assert ntu.NTU_CLASS_NAMES[0] == "drink water" and ntu.NTU_CLASS_NAMES[59].startswith("walking apart")


def test_missing_skeleton_list_loader(tmp_path):
    path = tmp_path / "missing.txt"
    path.write_text("# NTU samples with missing skeletons\n\nS001C002P005R002A008\n"
                    "S001C002P006R001A008.skeleton  # trailing comment\r\n")
    expected = {"S001C002P005R002A008", "S001C002P006R001A008"}
    assert ntu.load_missing_skeletons(path) == expected
    assert ntu.missing_skeleton_names(str(path)) == expected
    assert ntu.missing_skeleton_names(["S001C002P005R002A008"]) == {"S001C002P005R002A008"}
    assert ntu.missing_skeleton_names(None) == frozenset()
    path.write_text("S001C002P005R002A008\nnot-a-sample\n")
    with pytest.raises(ValueError, match="line 2"):
        ntu.load_missing_skeletons(path)
    with pytest.raises(TypeError, match="missing_skeleton"):
        ntu.missing_skeleton_names(3)
