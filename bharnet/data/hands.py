"""Hand keypoints: the per-sample on-disk format, MediaPipe-style JSON, and alignment to bodies.

**Per-sample format** (``<sample name>.npz``, read by :func:`read_hand_npz`):

* ``keypoints``: float32 (T, M, 2, 21, C), C = 2 (x, y) or 3 (x, y, z); hand axis 0 is
  the person's left hand, 1 the right; keypoints in MediaPipe order (0 wrist, thumb 1-4,
  index 5-8, middle 9-12, ring 13-16, pinky 17-20);
* ``valid``: bool (T, M, 2), False where the hand was not detected (keypoints are zero there).

Person ``m`` is body ``m`` of the matching ``.skeleton`` file in order of first appearance
(the order :func:`bharnet.data.ntu.read_skeleton` returns). In memory (:class:`HandSequence`)
keypoints always have C = 3; 2-D files get z = 0.

**MediaPipe-style JSON** (:func:`read_mediapipe_json`), detections not yet assigned to people::

    {"frames": [{"hands": [{"handedness": "Left", "score": 0.97,
                            "landmarks": [[x, y, z], ... 21 entries]}, ...]}, ...]}

A top-level list of frames and frames given directly as lists of hands are accepted too;
a landmark is ``[x, y]``, ``[x, y, z]``, ``[x, y, z, score]`` or a dict with keys
``x, y[, z][, score|visibility|presence]``; ``label`` may replace ``handedness``. The hand's
``score`` defaults to the mean landmark score, or 1. A frame that is ``null`` or whose
``hands`` is ``null`` (what MediaPipe's Python API returns when it finds no hand) has no
detections.

**Alignment** (:func:`align_hands`): in each frame every detection is compared with the
Kinect wrists (joints 7 and 11, 1-based) of every body present in that frame, in the
coordinate space of the detections (camera metres, or colour-image pixels). All admissible
(detection, person, side) pairs are sorted by the distance between the detection's wrist
landmark and that Kinect wrist, and taken greedily, nearest first, each detection and each
(person, side) slot at most once. ``handedness`` decides which sides are admissible:
``"nearest"`` (any side; the Kinect wrist decides), ``"label"`` (the detector's label) or
``"mirrored"`` (the opposite of the label, for MediaPipe run on non-mirrored images).
Pairs farther than ``max_distance`` and detections scoring below ``min_score`` are dropped.
When the detections have a different frame count than the body, body frame ``t`` takes
detection frame ``round(t · (T_hand − 1) / (T_body − 1))`` (frames are repeated or skipped,
never interpolated). Slots without a detection stay zero and invalid.
"""
from __future__ import annotations

import json
import zipfile
from dataclasses import dataclass
from typing import List, Optional, Sequence

import numpy as np

from ..graphs import HAND_NODES, NTU_LEFT_WRIST, NTU_RIGHT_WRIST

SIDES = ("left", "right")
HANDEDNESS_MODES = ("nearest", "label", "mirrored")
_LANDMARK_SCORE_KEYS = ("score", "visibility", "presence")


@dataclass
class HandDetection:
    """One detected hand: ``side`` as labelled by the detector ("left", "right" or None),
    ``landmarks`` float32 (21, 3) and an overall ``score``."""

    side: Optional[str]
    landmarks: np.ndarray
    score: float = 1.0


@dataclass
class HandSequence:
    """Hands assigned to people: ``keypoints`` float32 (T, M, 2, 21, 3) and ``valid`` bool
    (T, M, 2)."""

    keypoints: np.ndarray
    valid: np.ndarray

    def __post_init__(self):
        keypoints = np.asarray(self.keypoints, dtype=np.float32)
        valid = np.asarray(self.valid, dtype=bool)
        if keypoints.ndim != 5 or keypoints.shape[2:4] != (2, HAND_NODES) \
                or keypoints.shape[4] not in (2, 3):
            raise ValueError("keypoints must have shape (T, M, 2, 21, C) with C = 2 or 3, "
                             f"got {keypoints.shape}")
        if valid.shape != keypoints.shape[:3]:
            raise ValueError(f"valid must have shape (T, M, 2) = {keypoints.shape[:3]}, "
                             f"got {valid.shape}")
        if not np.isfinite(keypoints[valid]).all():
            raise ValueError("the keypoints of valid hands must be finite (NaN or inf found)")
        if keypoints.shape[4] == 2:
            keypoints = np.concatenate([keypoints, np.zeros_like(keypoints[..., :1])], axis=-1)
        self.keypoints = np.where(valid[..., None, None], keypoints, 0).astype(np.float32)
        self.valid = valid

    @classmethod
    def empty(cls, frames: int, persons: int) -> "HandSequence":
        """A sequence with no detected hand."""
        return cls(np.zeros((frames, persons, 2, HAND_NODES, 3), np.float32),
                   np.zeros((frames, persons, 2), bool))

    @property
    def num_frames(self) -> int:
        return self.keypoints.shape[0]

    @property
    def num_persons(self) -> int:
        return self.keypoints.shape[1]

    def select(self, frames=slice(None), persons=slice(None)) -> "HandSequence":
        """Index frames and persons (e.g. the bodies kept by body selection)."""
        return HandSequence(self.keypoints[frames][:, persons], self.valid[frames][:, persons])

    def with_persons(self, persons: int) -> "HandSequence":
        """Drop or add (invalid) persons so that there are exactly ``persons``."""
        keep = min(persons, self.num_persons)
        out = HandSequence.empty(self.num_frames, persons)
        out.keypoints[:, :keep] = self.keypoints[:, :keep]
        out.valid[:, :keep] = self.valid[:, :keep]
        return out

    def with_frames(self, frames: int) -> "HandSequence":
        """Match a frame count by nearest-frame resampling (see the module docstring)."""
        index = resample_indices(self.num_frames, frames)
        return HandSequence(self.keypoints[index], self.valid[index])

    def graph_arrays(self):
        """The dataset layout: hands (3, T, 42, M) float32 (left hand nodes 0-20, right
        21-41, as in ``graphs.HANDS``) and validity (T, 2, M) bool."""
        t, m = self.num_frames, self.num_persons
        hands = self.keypoints.transpose(4, 0, 2, 3, 1).reshape(3, t, 2 * HAND_NODES, m)
        return np.ascontiguousarray(hands), np.ascontiguousarray(self.valid.transpose(0, 2, 1))


def resample_indices(source_frames: int, target_frames: int) -> np.ndarray:
    """Nearest source frame for each of ``target_frames`` frames spanning the same interval."""
    if source_frames < 1 or target_frames < 0:
        raise ValueError(f"cannot resample {source_frames} frames to {target_frames}")
    if target_frames <= 1:
        return np.zeros(target_frames, dtype=np.int64)
    positions = np.arange(target_frames) * ((source_frames - 1) / (target_frames - 1))
    return np.clip(np.floor(positions + 0.5).astype(np.int64), 0, source_frames - 1)


# --------------------------------------------------------------------------- NPZ

def write_hand_npz(path: str, hands: HandSequence) -> None:
    """Write ``hands`` in the per-sample format (see the module docstring)."""
    with open(path, "wb") as handle:
        np.savez(handle, keypoints=hands.keypoints, valid=hands.valid)


def read_hand_npz(path: str) -> HandSequence:
    """Read a per-sample hand file; raises ValueError naming the file on a bad layout or a file
    that is not a readable .npz (empty, truncated)."""
    try:
        archive = np.load(path)
    except (EOFError, zipfile.BadZipFile, ValueError) as error:
        raise ValueError(f"{path}: not a readable .npz file ({type(error).__name__}: {error})") from None
    with archive as data:
        missing = {"keypoints", "valid"} - set(data.files)
        if missing:
            raise ValueError(f"{path}: missing arrays {sorted(missing)}; "
                             "expected 'keypoints' (T, M, 2, 21, C) and 'valid' (T, M, 2)")
        try:
            return HandSequence(data["keypoints"], data["valid"])
        except ValueError as error:
            raise ValueError(f"{path}: {error}") from None


# --------------------------------------------------------------------------- JSON

def _side(label) -> Optional[str]:
    if label is None:
        return None
    side = str(label).strip().lower()
    if side not in SIDES:
        raise ValueError(f"handedness must be 'Left' or 'Right', got {label!r}")
    return side


def _landmarks(entries) -> tuple:
    """(21, 3) coordinates and the mean landmark score (None when no scores are given)."""
    if not isinstance(entries, list) or len(entries) != HAND_NODES:
        count = len(entries) if isinstance(entries, list) else type(entries).__name__
        raise ValueError(f"expected {HAND_NODES} landmarks, got {count}")
    coords = np.zeros((HAND_NODES, 3), np.float32)
    scores = []
    for j, entry in enumerate(entries):
        if isinstance(entry, dict):
            values = [entry["x"], entry["y"], entry.get("z", 0.0)]
            score = next((entry[k] for k in _LANDMARK_SCORE_KEYS if k in entry), None)
        else:
            if not 2 <= len(entry) <= 4:
                raise ValueError(f"landmark {j} must be [x, y(, z)(, score)], got {entry!r}")
            values = list(entry[:3]) + [0.0] * (3 - len(entry[:3]))
            score = entry[3] if len(entry) == 4 else None
        coords[j] = [float(v) for v in values]
        if not np.isfinite(coords[j]).all():
            raise ValueError(f"landmark {j} has a non-finite coordinate: {entry!r}")
        if score is not None:
            scores.append(float(score))
    return coords, (float(np.mean(scores)) if scores else None)


def _detection(entry) -> HandDetection:
    if not isinstance(entry, dict) or "landmarks" not in entry:
        raise ValueError("each hand must be an object with 'landmarks'")
    coords, landmark_score = _landmarks(entry["landmarks"])
    score = entry.get("score", landmark_score if landmark_score is not None else 1.0)
    return HandDetection(_side(entry.get("handedness", entry.get("label"))), coords, float(score))


def read_mediapipe_json(path: str) -> List[List[HandDetection]]:
    """Read per-frame hand detections (see the module docstring for the accepted layouts)."""
    with open(path, "r", encoding="utf-8") as handle:
        data = json.load(handle)
    frames = data.get("frames") if isinstance(data, dict) else data
    if not isinstance(frames, list):
        raise ValueError(f"{path}: expected a list of frames or an object with 'frames'")
    detections = []
    for t, frame in enumerate(frames):
        hands = frame.get("hands", []) if isinstance(frame, dict) else frame
        if hands is None:  # no hand found in this frame
            hands = []
        try:
            if not isinstance(hands, list):
                raise ValueError("a frame must be a list of hands or an object with 'hands'")
            detections.append([_detection(hand) for hand in hands])
        except (ValueError, KeyError, TypeError) as error:
            raise ValueError(f"{path}: frame {t}: {error}") from None
    return detections


def write_mediapipe_json(path: str, detections: Sequence[Sequence[HandDetection]]) -> None:
    """Write detections in the layout :func:`read_mediapipe_json` reads."""
    frames = [{"hands": [{"handedness": None if d.side is None else d.side.capitalize(),
                          "score": float(d.score),
                          "landmarks": np.asarray(d.landmarks, np.float64).tolist()}
                         for d in frame]} for frame in detections]
    with open(path, "w", encoding="utf-8") as handle:
        json.dump({"frames": frames}, handle)


# --------------------------------------------------------------------------- alignment

def kinect_wrists(joints: np.ndarray) -> np.ndarray:
    """Left and right Kinect wrists: (T, M, 25, D) -> (T, M, 2, D)."""
    joints = np.asarray(joints)
    if joints.ndim != 4 or joints.shape[2] != 25:
        raise ValueError(f"joints must have shape (T, M, 25, D), got {joints.shape}")
    return joints[:, :, [NTU_LEFT_WRIST, NTU_RIGHT_WRIST]]


def _admissible_sides(detection: HandDetection, handedness: str):
    if handedness == "nearest" or detection.side is None:
        return (0, 1)
    side = SIDES.index(detection.side)
    return (side,) if handedness == "label" else (1 - side,)


def align_hands(detections: Sequence[Sequence[HandDetection]], wrists: np.ndarray,
                present: np.ndarray, handedness: str = "nearest",
                max_distance: Optional[float] = None, min_score: float = 0.0) -> HandSequence:
    """Assign per-frame detections to people's hands (see the module docstring).

    ``wrists`` (T, M, 2, D) are the Kinect wrists (left, right) in the detections' space,
    compared with the first D landmark coordinates; ``present`` (T, M) marks the frames
    where each body exists. Returns a :class:`HandSequence` with T frames and M persons.
    """
    wrists = np.asarray(wrists, dtype=np.float64)
    present = np.asarray(present, dtype=bool)
    if wrists.ndim != 4 or wrists.shape[2] != 2 or wrists.shape[3] not in (2, 3):
        raise ValueError(f"wrists must have shape (T, M, 2, D) with D = 2 or 3, got {wrists.shape}")
    if present.shape != wrists.shape[:2]:
        raise ValueError(f"present must have shape (T, M) = {wrists.shape[:2]}, "
                         f"got {present.shape}")
    if handedness not in HANDEDNESS_MODES:
        raise ValueError(f"handedness must be one of {HANDEDNESS_MODES}, got {handedness!r}")
    frames, persons, _, dims = wrists.shape
    out = HandSequence.empty(frames, persons)
    if frames == 0 or len(detections) == 0:
        return out
    source = resample_indices(len(detections), frames)
    for t in range(frames):
        candidates = [d for d in detections[source[t]] if d.score >= min_score]
        pairs = []
        for k, detection in enumerate(candidates):
            for m in np.flatnonzero(present[t]):
                for side in _admissible_sides(detection, handedness):
                    distance = np.linalg.norm(detection.landmarks[0, :dims] - wrists[t, m, side])
                    if max_distance is None or distance <= max_distance:
                        pairs.append((distance, k, m, side))
        used_detections, used_slots = set(), set()
        for _, k, m, side in sorted(pairs):
            if k in used_detections or (m, side) in used_slots:
                continue
            used_detections.add(k)
            used_slots.add((m, side))
            out.keypoints[t, m, side] = candidates[k].landmarks
            out.valid[t, m, side] = True
    return out
