"""A built-in synthetic fine-grained body + hands dataset, written in the prepared format.

Every sample is procedurally generated from a seed, so the same arguments give the same
bytes. Two kinds of classes:

* **body classes** differ in body motion (waving, raising both arms, squatting, punching, a
  two-person handshake, ...); their hands hold a random relaxed articulation;
* **hand-centric classes** share one body-motion distribution (a "gesture posture": the
  right forearm raised in front of the chest, the left arm relaxed or raised, slight sway)
  and differ only in the right hand's finger motion: fist clench, index tap, finger
  spread, finger wave, pinch, scissors, thumb wiggle, pinky tap. A body-only model is at
  chance among them; the finger patterns are periodic (2.5-4 cycles per sample, so a
  half-length crop still shows more than one) and large (centimetres of fingertip motion).

Body: the 25 Kinect joints from forward kinematics with person-specific height
(1.55-1.9 m) and bone lengths (+-4 %), placed in front of a virtual Kinect with random
distance (2.2-3.8 m), lateral offset, sensor height, yaw and pitch, plus joint jitter
(1 cm; 1.5 cm for the Kinect hand joints). Hands: 21 MediaPipe keypoints per hand
(wrist to middle fingertip about 0.18 m, scaled with the person), oriented along the
forearm, the hand wrist at the Kinect wrist plus 5 mm noise, 2 mm landmark jitter. Hand
detections drop out in bursts (about 10 % of frames per hand); dropped frames are zero and
flagged invalid. Sample lengths vary between 80 % and 100 % of ``frames``.
"""
from __future__ import annotations

import os
from typing import Callable, Dict, Tuple

import numpy as np

from .dataset import (NUM_PERSONS, SPLITS, SplitWriter, exclusive, invalidate, read_manifest,
                      remove_partial_files, split_summary, write_manifest)

SPLIT_SEEDS = {"train": 1, "test": 2}
# Bumped when the same arguments generate different samples, so that a dataset written by an
# older version is written again (2: left hands are the mirror image of right ones; before,
# two mirrorings cancelled and left hands had right-hand chirality).
GENERATOR_VERSION = 2

# Person-local frame: x = the person's left, y = up, z = forward; metres for a 1.7 m person.
_TORSO = {"spine_mid": 0.25, "spine_shoulder": 0.22, "neck": 0.08, "head": 0.10,
          "shoulder": 0.18, "hip": 0.09}
_LIMBS = {"upper_arm": 0.29, "forearm": 0.25, "thigh": 0.42, "shank": 0.42}
_FOOT, _ANKLE_HEIGHT, _HIP_DROP = 0.12, 0.07, 0.05

# MediaPipe hand, right hand (thumb towards +x), metres for an 18 cm hand; fingers lie in
# the palm plane (z = 0) and curl towards +z (the palm side).
_FINGER_BASES = np.array([[0.025, 0.085, 0.0], [0.005, 0.090, 0.0],
                          [-0.014, 0.085, 0.0], [-0.030, 0.075, 0.0]])
_FINGER_SEGMENTS = np.array([[0.040, 0.024, 0.020], [0.045, 0.028, 0.021],
                             [0.042, 0.026, 0.020], [0.033, 0.020, 0.018]])
_FINGER_SPLAY = np.array([1.0, 0.0, -0.9, -1.6])
_FINGER_FLEX = np.array([1.4, 1.7, 1.1])
_THUMB_BASE = np.array([0.025, 0.025, 0.010])
_THUMB_SEGMENTS = np.array([0.040, 0.032, 0.028])
_THUMB_FLEX = np.array([0.5, 0.9, 0.9])
_THUMB_REST = np.array([0.75, 0.6, 0.25]) / np.linalg.norm([0.75, 0.6, 0.25])
_THUMB_ACROSS = np.array([-0.6, 0.1, 0.8])


# --------------------------------------------------------------------------- kinematics

def _limb_direction(flexion, abduction, side):
    """Unit vectors (T, 3): hanging down, raised forward by ``flexion`` and out to the
    person's ``side`` (+1 left, -1 right) by ``abduction``."""
    return np.stack([side * np.cos(flexion) * np.sin(abduction),
                     -np.cos(flexion) * np.cos(abduction), np.sin(flexion)], axis=-1)


def _bend_forward(vectors, lean):
    """Rotate (T, 3) vectors about the x axis so that +y tilts towards +z by ``lean``."""
    c, s = np.cos(lean), np.sin(lean)
    x, y, z = vectors[..., 0], vectors[..., 1], vectors[..., 2]
    return np.stack([x, c * y - s * z, s * y + c * z], axis=-1)


def _rotation_y(angle):
    c, s = np.cos(angle), np.sin(angle)
    return np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]])


def _rotation_x(angle):
    c, s = np.cos(angle), np.sin(angle)
    return np.array([[1, 0, 0], [0, c, -s], [0, s, c]])


def _body_joints(pose: Dict[str, np.ndarray], scale: float, bones: Dict[str, float]):
    """The 25 Kinect joints (T, 25, 3) in the person-local frame for a pose (arrays of T)."""
    length = {k: v * scale * bones[k] for k, v in {**_TORSO, **_LIMBS}.items()}
    frames = len(pose["lean"])
    joints = np.zeros((frames, 25, 3))
    lean = pose["lean"]
    up = _bend_forward(np.tile([0.0, 1.0, 0.0], (frames, 1)), lean)
    hip_height = _LIMBS["thigh"] + _LIMBS["shank"] + _ANKLE_HEIGHT
    root = pose["root"] + [0.0, scale * (hip_height + _HIP_DROP), 0.0]
    joints[:, 0] = root
    joints[:, 1] = root + up * length["spine_mid"]
    joints[:, 20] = joints[:, 1] + up * length["spine_shoulder"]
    joints[:, 2] = joints[:, 20] + up * length["neck"]
    joints[:, 3] = joints[:, 2] + up * length["head"]
    for side, (shoulder, elbow, wrist, hand, tip, thumb) in (
            (1, (4, 5, 6, 7, 21, 22)), (-1, (8, 9, 10, 11, 23, 24))):
        arm = pose["left_arm" if side > 0 else "right_arm"]  # flexion, abduction, elbow
        lateral = _bend_forward(np.tile([side * 1.0, 0.0, 0.0], (frames, 1)), lean)
        joints[:, shoulder] = joints[:, 20] + lateral * length["shoulder"] - up * 0.03 * scale
        upper = _bend_forward(_limb_direction(arm[0], arm[1], side), lean)
        fore = _bend_forward(_limb_direction(arm[0] + arm[2], arm[1], side), lean)
        joints[:, elbow] = joints[:, shoulder] + upper * length["upper_arm"]
        joints[:, wrist] = joints[:, elbow] + fore * length["forearm"]
        joints[:, hand] = joints[:, wrist] + fore * 0.08 * scale
        joints[:, tip] = joints[:, wrist] + fore * 0.15 * scale
        joints[:, thumb] = joints[:, wrist] + (fore * 0.05 - lateral * 0.03) * scale
    for side, (hip, knee, ankle, foot) in ((1, (12, 13, 14, 15)), (-1, (16, 17, 18, 19))):
        leg = pose["left_leg" if side > 0 else "right_leg"]  # hip flexion, knee flexion
        joints[:, hip] = root + [side * length["hip"], -_HIP_DROP * scale, 0.0]
        joints[:, knee] = joints[:, hip] + _limb_direction(leg[0], 0.0, side) * length["thigh"]
        joints[:, ankle] = (joints[:, knee]
                            + _limb_direction(leg[0] - leg[1], 0.0, side) * length["shank"])
        joints[:, foot] = joints[:, ankle] + np.array([0.0, -0.05, _FOOT]) * scale
    return joints


def _hand_keypoints(curl: np.ndarray, spread: np.ndarray) -> np.ndarray:
    """Right-hand keypoints (T, 21, 3) in the hand frame for finger curls (T, 5: thumb,
    index, middle, ring, pinky; 0 straight, 1 fully curled) and spread (T,) in [0, 1]."""
    frames = len(spread)
    points = np.zeros((frames, 21, 3))
    palm_normal = np.array([0.0, 0.0, 1.0])
    splay = (0.05 + 0.3 * spread)[:, None] * _FINGER_SPLAY  # (T, 4)
    rest = np.stack([np.sin(splay), np.cos(splay), np.zeros_like(splay)], axis=-1)  # (T, 4, 3)
    angle = np.zeros((frames, 4))
    position = np.broadcast_to(_FINGER_BASES, (frames, 4, 3)).copy()
    for finger in range(4):
        points[:, 5 + 4 * finger] = position[:, finger]
    for joint in range(3):
        angle = angle + curl[:, 1:] * _FINGER_FLEX[joint]
        direction = np.cos(angle)[..., None] * rest + np.sin(angle)[..., None] * palm_normal
        position = position + direction * _FINGER_SEGMENTS[:, joint][None, :, None]
        for finger in range(4):
            points[:, 6 + 4 * finger + joint] = position[:, finger]
    across = _THUMB_ACROSS - _THUMB_ACROSS.dot(_THUMB_REST) * _THUMB_REST
    across /= np.linalg.norm(across)
    position = np.broadcast_to(_THUMB_BASE, (frames, 3)).copy()
    points[:, 1] = position
    angle = np.zeros(frames)
    for joint in range(3):
        angle = angle + curl[:, 0] * _THUMB_FLEX[joint]
        direction = np.cos(angle)[:, None] * _THUMB_REST + np.sin(angle)[:, None] * across
        position = position + direction * _THUMB_SEGMENTS[joint]
        points[:, 2 + joint] = position
    return points


def _hand_frames(forearm: np.ndarray, roll: float, side: int) -> np.ndarray:
    """Rotations (T, 3, 3) taking hand-frame vectors to camera space: +y along the forearm,
    the palm (+z) facing the camera turned by ``roll`` about the forearm; the left hand
    (``side`` +1) is the mirror image of the right."""
    along = forearm / np.linalg.norm(forearm, axis=-1, keepdims=True)
    towards_camera = np.array([0.0, 0.0, -1.0])
    normal = towards_camera - (along @ towards_camera)[:, None] * along
    normal /= np.maximum(np.linalg.norm(normal, axis=-1, keepdims=True), 1e-9)
    across = np.cross(along, normal)
    normal, across = (np.cos(roll) * normal + np.sin(roll) * across,
                      np.cos(roll) * across - np.sin(roll) * normal)
    thumb_side = across * (-1.0 if side > 0 else 1.0)
    return np.stack([thumb_side, along, normal], axis=-1)


# --------------------------------------------------------------------------- motions

class _Clock:
    """Sample timing: ``phase`` for periodic motion, ``bump`` for a one-off rise and fall."""

    def __init__(self, frames: int, rng: np.random.Generator, cycles=(2.0, 3.5)):
        self.t = np.arange(frames) / max(frames - 1, 1)
        self.phase = 2 * np.pi * rng.uniform(*cycles) * self.t + rng.uniform(0, 2 * np.pi)
        start, stop = rng.uniform(0.0, 0.2), rng.uniform(0.8, 1.0)
        self.bump = np.sin(np.pi * np.clip((self.t - start) / (stop - start), 0, 1)) ** 2


def _rest_pose(frames: int, rng: np.random.Generator) -> Dict[str, np.ndarray]:
    """Standing, arms hanging, with a slight random sway (shared by every class)."""
    sway = 2 * np.pi * rng.uniform(0.3, 1.0) * np.arange(frames) / max(frames - 1, 1)
    phase = rng.uniform(0, 2 * np.pi, size=3)
    const = np.ones(frames)
    arm = lambda: np.stack([const * rng.uniform(0.0, 0.2), const * rng.uniform(0.05, 0.2),
                            const * rng.uniform(0.1, 0.4)])
    return {"root": np.stack([0.02 * np.sin(sway + phase[0]), np.zeros(frames),
                              0.02 * np.sin(sway + phase[1])], axis=-1),
            "lean": rng.uniform(-0.05, 0.1) + 0.02 * np.sin(sway + phase[2]),
            "left_arm": arm(), "right_arm": arm(),
            "left_leg": np.zeros((2, frames)), "right_leg": np.zeros((2, frames))}


def _wave(pose, clock, rng):
    pose["right_arm"] = np.stack([np.full_like(clock.t, rng.uniform(0.3, 0.7)),
                                  np.full_like(clock.t, rng.uniform(1.1, 1.5)),
                                  rng.uniform(1.0, 1.4) + 0.5 * np.sin(clock.phase)])


def _raise_arms(pose, clock, rng):
    height = rng.uniform(2.4, 2.9)
    for arm in ("left_arm", "right_arm"):
        pose[arm] = np.stack([height * clock.bump, 0.2 * clock.bump + 0.1, 0.2 * (1 - clock.bump)])


def _squat(pose, clock, rng):
    depth = rng.uniform(0.8, 1.2) * clock.bump
    pose["left_leg"] = pose["right_leg"] = np.stack([depth, 2 * depth])
    pose["root"] = pose["root"] + np.stack(
        [np.zeros_like(depth), -0.84 * (1 - np.cos(depth)), -0.1 * depth], axis=-1)
    pose["lean"] = pose["lean"] + 0.4 * depth
    for arm in ("left_arm", "right_arm"):
        pose[arm] = np.stack([1.3 * depth, np.full_like(depth, 0.1), 0.2 * depth])


def _punch(pose, clock, rng):
    for arm, sign in (("right_arm", 1.0), ("left_arm", -1.0)):
        strike = np.maximum(0.0, sign * np.sin(clock.phase)) ** 2
        pose[arm] = np.stack([0.6 + 0.9 * strike, np.full_like(strike, 0.15), 2.0 * (1 - strike)])


def _clap(pose, clock, rng):
    opening = 0.35 + 0.35 * np.cos(clock.phase)
    for arm in ("left_arm", "right_arm"):
        pose[arm] = np.stack([np.full_like(opening, rng.uniform(0.9, 1.2)), opening,
                              np.full_like(opening, 0.6)])


def _bow(pose, clock, rng):
    pose["lean"] = pose["lean"] + rng.uniform(0.7, 1.0) * clock.bump


def _kick(pose, clock, rng):
    pose["right_leg"] = np.stack([rng.uniform(1.0, 1.4) * clock.bump, 0.3 * clock.bump])
    pose["lean"] = pose["lean"] - 0.15 * clock.bump


def _arm_circles(pose, clock, rng):
    for arm in ("left_arm", "right_arm"):
        pose[arm] = np.stack([1.5 + 1.0 * np.sin(clock.phase), 1.2 + 0.4 * np.cos(clock.phase),
                              np.full_like(clock.t, 0.1)])


def _side_step(pose, clock, rng):
    pose["root"] = pose["root"] + np.stack(
        [rng.uniform(0.3, 0.5) * np.sin(clock.phase), np.zeros_like(clock.t),
         np.zeros_like(clock.t)], axis=-1)
    lift = 0.3 * np.maximum(0.0, np.cos(clock.phase))
    pose["left_leg"], pose["right_leg"] = np.stack([lift, 2 * lift]), np.stack([lift, 2 * lift])


def _handshake(pose, clock, rng):
    shake = 0.12 * np.sin(2 * clock.phase) * clock.bump
    pose["right_arm"] = np.stack([0.2 + 0.8 * clock.bump + shake, np.full_like(shake, 0.1),
                                  0.3 + 0.5 * (1 - clock.bump)])


def _gesture_posture(pose, clock, rng):
    """The body of every hand-centric class: right forearm up in front of the chest."""
    sway = 0.05 * np.sin(clock.phase / 3)
    pose["right_arm"] = np.stack([rng.uniform(0.4, 0.8) + sway,
                                  np.full_like(sway, rng.uniform(0.0, 0.3)),
                                  np.full_like(sway, rng.uniform(1.1, 1.6))])
    if rng.random() < 0.5:
        pose["left_arm"] = np.stack([np.full_like(sway, rng.uniform(0.3, 0.7)),
                                     np.full_like(sway, rng.uniform(0.0, 0.3)),
                                     np.full_like(sway, rng.uniform(0.8, 1.4)) - sway])


# Name, motion, number of people.
BODY_CLASSES: Tuple[Tuple[str, Callable, int], ...] = (
    ("wave right hand", _wave, 1), ("raise both arms", _raise_arms, 1), ("squat", _squat, 1),
    ("punch forward", _punch, 1), ("handshake", _handshake, 2), ("clap", _clap, 1),
    ("bow", _bow, 1), ("kick", _kick, 1), ("arm circles", _arm_circles, 1),
    ("side step", _side_step, 1),
)


def _relaxed_fingers(clock, rng):
    curl = rng.uniform(0.1, 0.6, size=5) + 0.05 * np.sin(clock.phase / 4)[:, None]
    return curl, np.full_like(clock.t, rng.uniform(0.2, 0.6))


def _osc(clock, offset=0.0):
    return 0.5 + 0.5 * np.sin(clock.phase - offset)


def _fingers(clock, *curls):
    """Curls (T, 5) from per-finger constants or (T,) arrays: thumb, index, middle, ring, pinky."""
    return np.stack([np.broadcast_to(curl, clock.t.shape) for curl in curls], axis=-1)


# Name, (clock -> finger curls (T, 5), spread (T,)).
HAND_CLASSES: Tuple[Tuple[str, Callable], ...] = (
    ("clench fist", lambda c: (_fingers(c, 0.1 + 0.6 * _osc(c), *[0.05 + 0.85 * _osc(c)] * 4),
                               np.full_like(c.t, 0.3))),
    ("tap index finger", lambda c: (_fingers(c, 0.7, 0.1 + 0.6 * _osc(c), 0.85, 0.85, 0.85),
                                    np.full_like(c.t, 0.2))),
    ("spread fingers", lambda c: (_fingers(c, 0.1, 0.05, 0.05, 0.05, 0.05), _osc(c))),
    ("finger wave", lambda c: (_fingers(c, 0.3, *[0.1 + 0.7 * _osc(c, k * np.pi / 2)
                                                  for k in range(4)]),
                               np.full_like(c.t, 0.4))),
    ("pinch", lambda c: (_fingers(c, 0.2 + 0.6 * _osc(c), 0.15 + 0.45 * _osc(c), 0.1, 0.1, 0.1),
                         np.full_like(c.t, 0.5))),
    ("scissors", lambda c: (_fingers(c, 0.7, 0.05, 0.05, 0.85, 0.85), _osc(c))),
    ("wiggle thumb", lambda c: (_fingers(c, 0.6 * _osc(c), 0.85, 0.85, 0.85, 0.85),
                                np.full_like(c.t, 0.2))),
    ("tap pinky", lambda c: (_fingers(c, 0.2, 0.05, 0.05, 0.05, 0.1 + 0.7 * _osc(c)),
                             np.full_like(c.t, 0.4))),
)


# --------------------------------------------------------------------------- one sample

def _dropout(frames: int, rng: np.random.Generator, start=0.04, stay=0.65) -> np.ndarray:
    """Bursty detection loss: a two-state Markov chain; returns per-frame validity."""
    valid = np.ones(frames, dtype=bool)
    dropped = False
    draws = rng.random(frames)
    for t in range(frames):
        dropped = draws[t] < (stay if dropped else start)
        valid[t] = not dropped
    return valid


def _person(motion: Callable, frames: int, rng: np.random.Generator):
    """One person's local joints (T, 25, 3) and height scale."""
    scale = rng.uniform(1.55, 1.9) / 1.7
    bones = {k: rng.normal(1.0, 0.04) for k in {**_TORSO, **_LIMBS}}
    pose = _rest_pose(frames, rng)
    motion(pose, _Clock(frames, rng), rng)
    return _body_joints(pose, scale, bones), scale


def generate_sample(class_index: int, num_body_classes: int, frames: int,
                    rng: np.random.Generator):
    """One sample of class ``class_index`` (body classes first, then hand-centric ones):
    body (3, frames, 25, 2), hand (3, frames, 42, 2) float32 and hand_valid (frames, 2, 2)."""
    body_rng, hand_rng, noise_rng = rng.spawn(3)
    hand_centric = class_index >= num_body_classes
    if hand_centric:
        motion, persons = _gesture_posture, 1
    else:
        _, motion, persons = BODY_CLASSES[class_index]
    people = [_person(motion, frames, body_rng) for _ in range(persons)]

    # Scene: one person faces the camera (yaw +-0.5 rad); two people face each other,
    # staggered in depth so that their right hands meet. Camera: x = the sensor's left.
    yaw = body_rng.uniform(-0.5, 0.5)
    placements = ([(np.pi + yaw, np.zeros(3))] if persons == 1 else
                  [(np.pi / 2 + yaw, np.array([-0.45, 0.0, -0.18])),
                   (3 * np.pi / 2 + yaw, np.array([0.45, 0.0, 0.18]))])
    camera = _rotation_x(body_rng.uniform(-0.15, 0.15))
    offset = np.array([body_rng.uniform(-0.6, 0.6), -body_rng.uniform(0.7, 1.3),
                       body_rng.uniform(2.2, 3.8)])
    world = [joints @ (camera @ _rotation_y(facing)).T
             + camera @ _rotation_y(yaw) @ position + offset
             for (joints, _), (facing, position) in zip(people, placements)]

    body = np.zeros((frames, NUM_PERSONS, 25, 3))
    hand = np.zeros((frames, NUM_PERSONS, 2, 21, 3))
    valid = np.zeros((frames, NUM_PERSONS, 2), dtype=bool)
    clock = _Clock(frames, hand_rng, cycles=(2.5, 4.0))
    for m, (joints, (_, scale)) in enumerate(zip(world, people)):
        jitter = noise_rng.normal(0.0, 0.01, size=joints.shape)
        jitter[:, [7, 11, 21, 22, 23, 24]] *= 1.5
        body[:, m] = joints + jitter
        hand_scale = scale * hand_rng.uniform(0.95, 1.05)
        for side, (elbow, wrist) in enumerate(((5, 6), (9, 10))):  # 0 left, 1 right
            if hand_centric and side == 1:
                curl, spread = HAND_CLASSES[class_index - num_body_classes][1](clock)
            else:
                curl, spread = _relaxed_fingers(clock, hand_rng)
            local = _hand_keypoints(curl, spread) * hand_scale  # a right hand; mirrored below
            rotation = _hand_frames(joints[:, wrist] - joints[:, elbow],
                                    hand_rng.uniform(-0.8, 0.8), 1 if side == 0 else -1)
            hand_wrist = body[:, m, wrist] + noise_rng.normal(0.0, 0.005, size=(frames, 3))
            hand[:, m, side] = (hand_wrist[:, None] + np.einsum("tij,tvj->tvi", rotation, local)
                                + noise_rng.normal(0.0, 0.002, size=local.shape))
            valid[:, m, side] = _dropout(frames, noise_rng)
    hand *= valid[..., None, None]
    body_out = body.transpose(3, 0, 2, 1).astype(np.float32)
    hand_out = hand.transpose(4, 0, 2, 3, 1).reshape(3, frames, 42, NUM_PERSONS)
    return body_out, hand_out.astype(np.float32), valid.transpose(0, 2, 1).copy()


# --------------------------------------------------------------------------- the dataset

def class_names(num_classes: int, num_hand_centric: int):
    """Class names: the body classes first, then the hand-centric ones."""
    num_body = num_classes - num_hand_centric
    return ([name for name, _, _ in BODY_CLASSES[:num_body]]
            + [name for name, _ in HAND_CLASSES[:num_hand_centric]])


def make_synthetic(out_dir: str, num_classes: int = 10, num_hand_centric: int = 5,
                   samples_per_class_train: int = 48, samples_per_class_test: int = 16,
                   frames: int = 64, seed: int = 0) -> str:
    """Write the synthetic dataset to ``out_dir`` in the prepared format and return the path.

    Classes ``0 .. num_classes - num_hand_centric - 1`` are body classes, the rest are
    hand-centric (listed in the manifest's ``hand_centric_classes``). Re-running with the
    same arguments reuses a complete existing dataset.
    """
    num_body = num_classes - num_hand_centric
    if not 0 <= num_hand_centric <= len(HAND_CLASSES):
        raise ValueError(f"num_hand_centric must be in [0, {len(HAND_CLASSES)}], "
                         f"got {num_hand_centric}")
    if not 0 <= num_body <= len(BODY_CLASSES) or num_classes < 1:
        raise ValueError(f"num_classes - num_hand_centric (body classes) must be in "
                         f"[0, {len(BODY_CLASSES)}] and num_classes >= 1; got num_classes="
                         f"{num_classes}, num_hand_centric={num_hand_centric}")
    if samples_per_class_train < 1 or samples_per_class_test < 1 or frames < 2:
        raise ValueError("samples_per_class_train and samples_per_class_test must be >= 1 and "
                         f"frames >= 2; got {samples_per_class_train}, "
                         f"{samples_per_class_test}, {frames}")
    out_dir = os.fspath(out_dir)
    source = {"kind": "synthetic", "generator": GENERATOR_VERSION, "num_classes": num_classes,
              "num_hand_centric": num_hand_centric,
              "samples_per_class_train": samples_per_class_train,
              "samples_per_class_test": samples_per_class_test, "frames": frames, "seed": seed}
    with exclusive(out_dir):  # one writer; others wait, then find it complete
        _write_synthetic(out_dir, source, num_classes, num_hand_centric, num_body, samples_per_class_train,
                         samples_per_class_test, frames, seed)
    return out_dir


def _write_synthetic(out_dir: str, source: dict, num_classes: int, num_hand_centric: int, num_body: int,
                     samples_per_class_train: int, samples_per_class_test: int, frames: int, seed: int) -> None:
    """The body of :func:`make_synthetic`, under its lock: nothing when ``out_dir`` already holds
    this dataset."""
    try:
        if read_manifest(out_dir).get("source") == source:
            return
    except (FileNotFoundError, ValueError):
        pass
    os.makedirs(out_dir, exist_ok=True)
    remove_partial_files(out_dir)
    invalidate(out_dir)
    per_class = {"train": samples_per_class_train, "test": samples_per_class_test}
    splits = {}
    for split in SPLITS:
        labels = np.repeat(np.arange(num_classes), per_class[split])
        with SplitWriter(os.path.join(out_dir, split), len(labels), frames) as writer:
            for index, label in enumerate(labels):
                rng = np.random.default_rng([seed, SPLIT_SEEDS[split], index])
                length = int(rng.integers(int(np.ceil(0.8 * frames)), frames + 1))
                body, hand, hand_valid = generate_sample(int(label), num_body, length, rng)
                writer.add(index, body, hand, hand_valid, int(label),
                           f"synthetic_{split}_{index:05d}")
            writer.commit()
        splits[split] = split_summary(labels, num_classes)
    write_manifest(out_dir, {
        "num_classes": num_classes, "class_names": class_names(num_classes, num_hand_centric),
        "hand_centric_classes": list(range(num_body, num_classes)),
        "max_frames": frames, "num_persons": NUM_PERSONS, "hand_space": "camera",
        "has_hands": True, "splits": splits, "source": source,
        "skipped": {}, "outside_benchmark": 0, "notes": {}, "errors": {},
    })
