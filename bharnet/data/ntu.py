"""NTU RGB+D 60/120 skeleton reader, body selection and the official benchmarks.

The raw ``.skeleton`` text format (one file per sample, named ``SsssCcccPpppRrrrAaaa``)::

    <number of frames>
    per frame:  <number of bodies>
      per body: <bodyID clippedEdges handLeftConfidence handLeftState handRightConfidence
                 handRightState isRestricted leanX leanY trackingState>     (10 fields)
                <number of joints>                                          (25)
                25 x <x y z depthX depthY colorX colorY
                      orientationW orientationX orientationY orientationZ trackingState>

``x y z`` are camera coordinates in metres; ``colorX colorY`` are pixel coordinates in the
1920x1080 colour image. :func:`read_skeleton` tolerates CRLF line ends, trailing spaces,
blank lines and frames with zero bodies; anything else that deviates raises
:class:`SkeletonFormatError` naming the file and the line.

Body selection (:func:`select_bodies`) follows common NTU preprocessing practice: drop noise
bodies (present in too few frames, or mostly wider than tall), then rank the rest by motion
energy; :func:`assign_actors` joins bodies that follow one another in time (Kinect re-tracking
one person under a new id) into one actor and keeps the most active actors. The benchmarks are the official cross-subject/cross-view (NTU-60)
and cross-subject/cross-setup (NTU-120) protocols.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Iterable, Optional, Tuple

import numpy as np

NUM_JOINTS = 25
BODY_INFO_FIELDS = 10
JOINT_FIELDS = 12
SAMPLE_NAME_PATTERN = re.compile(r"S(\d{3})C(\d{3})P(\d{3})R(\d{3})A(\d{3})")


class SkeletonFormatError(ValueError):
    """A ``.skeleton`` file is malformed or truncated; the message names the file and line."""


@dataclass(frozen=True)
class SampleName:
    """The fields of an NTU sample name ``SsssCcccPpppRrrrAaaa`` (all 1-based)."""

    setup: int
    camera: int
    performer: int
    replication: int
    action: int

    @classmethod
    def parse(cls, name: str) -> "SampleName":
        """Parse a sample name or file name (directory and extensions are ignored)."""
        stem = os.path.basename(str(name)).split(".", 1)[0]
        match = SAMPLE_NAME_PATTERN.fullmatch(stem)
        if match is None:
            raise ValueError(f"sample name {name!r} does not match SsssCcccPpppRrrrAaaa")
        fields = [int(group) for group in match.groups()]
        if 0 in fields:
            raise ValueError(f"sample name {name!r}: its fields count from 1 (000 is none)")
        return cls(*fields)

    def __str__(self) -> str:
        return (f"S{self.setup:03d}C{self.camera:03d}P{self.performer:03d}"
                f"R{self.replication:03d}A{self.action:03d}")


@dataclass(frozen=True)
class Skeleton:
    """One parsed ``.skeleton`` file.

    ``xyz`` (frames, bodies, 25, 3) float32 camera coordinates in metres and ``color_xy``
    (frames, bodies, 25, 2) float32 colour-image pixels, with bodies in order of first
    appearance and zeros where a body is absent; ``present`` (frames, bodies) bool;
    ``body_ids`` the Kinect body ids (a repeated id within one frame gets a ``#k`` suffix);
    ``sample`` the parsed file name, or None when the name does not follow the NTU pattern.
    """

    path: str
    xyz: np.ndarray
    color_xy: np.ndarray
    present: np.ndarray
    body_ids: Tuple[str, ...]
    sample: Optional[SampleName]

    @property
    def num_frames(self) -> int:
        return self.xyz.shape[0]

    @property
    def num_bodies(self) -> int:
        return self.xyz.shape[1]

    @property
    def is_empty(self) -> bool:
        """True when no frame holds a body (the NTU "missing skeleton" case)."""
        return not self.present.any()


class _Lines:
    """A cursor over the non-blank lines of a file, keeping 1-based line numbers for errors.

    Lines are split only when read (holding thousands of token lists alive would wake the
    garbage collector over and over in a process that has torch loaded).
    """

    def __init__(self, path: str, text: str):
        self.path = path
        self._lines = text.splitlines()
        self._next = 0

    def error(self, message: str, line: Optional[int] = None) -> SkeletonFormatError:
        line = len(self._lines) + 1 if line is None else line
        return SkeletonFormatError(f"{self.path}: line {line}: {message}")

    def _skip_blank(self) -> None:
        while self._next < len(self._lines) and not self._lines[self._next].strip():
            self._next += 1

    def take(self, count: int, what: str):
        """The next ``count`` non-blank lines as (line number, text); raises at end of file."""
        block = []
        for _ in range(count):
            self._skip_blank()
            if self._next >= len(self._lines):
                raise self.error(f"file ends early: expected {what}")
            block.append((self._next + 1, self._lines[self._next]))
            self._next += 1
        return block

    def fields(self, count: int, what: str):
        """The next line split into exactly ``count`` fields, and its line number."""
        (number, line), = self.take(1, what)
        tokens = line.split()
        if len(tokens) != count:
            raise self.error(f"expected {count} {what} fields, got {len(tokens)}", number)
        return tokens, number

    def integer(self, what: str, expected: Optional[int] = None) -> int:
        """The next line as a non-negative integer (equal to ``expected`` if given)."""
        (number, line), = self.take(1, what)
        tokens = line.split()
        if len(tokens) != 1:
            raise self.error(f"expected a single integer ({what}), got {len(tokens)} fields",
                             number)
        try:
            value = int(tokens[0])
        except ValueError:
            raise self.error(f"expected an integer ({what}), got {tokens[0]!r}", number) from None
        if value < 0:
            raise self.error(f"{what} must be non-negative, got {value}", number)
        if expected is not None and value != expected:
            raise self.error(f"expected {expected} ({what}), got {value}", number)
        return value

    def finish(self) -> None:
        self._skip_blank()
        if self._next < len(self._lines):
            raise self.error("unexpected content after the last frame", self._next + 1)


def _parse_joints(lines: _Lines) -> np.ndarray:
    """The next 25 joint lines as a (25, 12) float64 array."""
    block = lines.take(NUM_JOINTS, f"{NUM_JOINTS} joint lines")
    for number, line in block:
        count = len(line.split())
        if count != JOINT_FIELDS:
            raise lines.error(f"expected {JOINT_FIELDS} joint fields, got {count}", number)
    try:
        values = np.array(" ".join(line for _, line in block).split(), dtype=np.float64)
    except ValueError:
        for number, line in block:
            for token in line.split():
                try:
                    float(token)
                except ValueError:
                    raise lines.error(f"non-numeric joint field {token!r}", number) from None
        raise
    values = values.reshape(NUM_JOINTS, JOINT_FIELDS)
    finite = np.isfinite(values).all(axis=1)
    if not finite.all():
        number, line = block[int(np.argmin(finite))]
        raise lines.error(f"non-finite joint field in {line.strip()!r}", number)
    return values


def read_skeleton(path: str) -> Skeleton:
    """Parse an NTU RGB+D ``.skeleton`` file (see the module docstring for the format)."""
    path = os.fspath(path)
    with open(path, "r", encoding="ascii", errors="replace", newline=None) as handle:
        lines = _Lines(path, handle.read())
    num_frames = lines.integer("the number of frames")
    body_index: dict = {}
    records = []  # (frame, body slot, joints (25, 12))
    for t in range(num_frames):
        num_bodies = lines.integer("the number of bodies")
        seen_in_frame: dict = {}
        for _ in range(num_bodies):
            info, _ = lines.fields(BODY_INFO_FIELDS, "body info")
            lines.integer("the number of joints", expected=NUM_JOINTS)
            repeat = seen_in_frame.get(info[0], 0)
            seen_in_frame[info[0]] = repeat + 1
            body_id = info[0] if repeat == 0 else f"{info[0]}#{repeat}"
            slot = body_index.setdefault(body_id, len(body_index))
            records.append((t, slot, _parse_joints(lines)))
    lines.finish()

    xyz = np.zeros((num_frames, len(body_index), NUM_JOINTS, 3), dtype=np.float32)
    color_xy = np.zeros((num_frames, len(body_index), NUM_JOINTS, 2), dtype=np.float32)
    present = np.zeros((num_frames, len(body_index)), dtype=bool)
    for t, slot, joints in records:
        xyz[t, slot] = joints[:, 0:3]
        color_xy[t, slot] = joints[:, 5:7]
        present[t, slot] = True
    try:
        sample = SampleName.parse(path)
    except ValueError:
        sample = None
    return Skeleton(path, xyz, color_xy, present, tuple(body_index), sample)


# --------------------------------------------------------------------------- body selection

def motion_energy(xyz: np.ndarray, present: np.ndarray) -> np.ndarray:
    """Per body: the sum over joints and axes of the position variance over its frames.

    ``xyz`` (frames, bodies, 25, 3), ``present`` (frames, bodies) -> (bodies,) float64.
    A body present in fewer than two frames has zero energy.
    """
    energy = np.zeros(xyz.shape[1])
    for b in range(xyz.shape[1]):
        frames = xyz[present[:, b], b].astype(np.float64)
        if len(frames) > 1:
            energy[b] = frames.var(axis=0).sum()
    return energy


def noisy_spread_fraction(xyz: np.ndarray, present: np.ndarray, ratio: float = 0.8) -> np.ndarray:
    """Per body: the fraction of its frames whose x-extent exceeds ``ratio`` times its y-extent.

    A standing person is taller than wide; Kinect's phantom bodies (furniture, a second
    silhouette) often are not. Returns (bodies,) float64; 0 for a body with no frames.
    """
    extent = xyz.max(axis=2) - xyz.min(axis=2)  # (frames, bodies, 3)
    noisy = (extent[..., 0] > ratio * extent[..., 1]) & present
    counts = present.sum(axis=0)
    return np.where(counts > 0, noisy.sum(axis=0) / np.maximum(counts, 1), 0.0)


# bodies tracked in fewer frames are noise: the common NTU preprocessing (CTR-GCN's
# get_raw_denoised_data.py) drops those tracked for 11 frames or fewer
MIN_BODY_FRAMES = 12


def select_bodies(skeleton: Skeleton, max_bodies: int = 2, min_frames: int = MIN_BODY_FRAMES,
                  spread_ratio: float = 0.8, max_noisy_fraction: float = 0.69) -> np.ndarray:
    """Indices of the bodies to keep, most active first (at most ``max_bodies``).

    Noise bodies are dropped first: bodies present in fewer than ``min_frames`` frames, then
    bodies whose fraction of frames wider than ``spread_ratio`` x their height exceeds
    ``max_noisy_fraction``. Each filter is skipped when it would drop every remaining body,
    so a non-empty file always keeps at least one body. The survivors are ranked by
    :func:`motion_energy`.
    """
    if max_bodies < 1:
        raise ValueError(f"max_bodies must be >= 1, got {max_bodies}")
    candidates = np.flatnonzero(skeleton.present.any(axis=0))
    if len(candidates) == 0:
        return candidates
    long_enough = candidates[skeleton.present[:, candidates].sum(axis=0) >= min_frames]
    if len(long_enough):
        candidates = long_enough
    noisy = noisy_spread_fraction(skeleton.xyz, skeleton.present, spread_ratio)
    plausible = candidates[noisy[candidates] <= max_noisy_fraction]
    if len(plausible):
        candidates = plausible
    energy = motion_energy(skeleton.xyz, skeleton.present)[candidates]
    order = np.argsort(-energy, kind="stable")
    return candidates[order[:max_bodies]]


def assign_actors(skeleton: Skeleton, max_actors: int = 2, min_frames: int = MIN_BODY_FRAMES) -> np.ndarray:
    """Which body is each actor in each frame: ``owner`` (frames, actors) int, a body index or
    -1 where the actor is absent; at most ``max_actors`` actors, the most active first.

    Kinect gives an actor a new body id when it loses and re-finds them, so one person can be
    several bodies one after another. The bodies kept by :func:`select_bodies` are taken in its
    order (most active first); each joins the first actor whose frames it does not overlap, else
    becomes a new actor while there are fewer than ``max_actors``, else is dropped (as in the
    common NTU preprocessing, which merges an actor's successive bodies)."""
    if max_actors < 1:
        raise ValueError(f"max_actors must be >= 1, got {max_actors}")
    present = skeleton.present
    owner = np.full((present.shape[0], 0), -1, dtype=np.int64)
    for body in select_bodies(skeleton, max(present.shape[1], 1), min_frames):
        frames = present[:, body]
        free = [a for a in range(owner.shape[1]) if (owner[frames, a] < 0).all()]
        if free:
            owner[frames, free[0]] = body
        elif owner.shape[1] < max_actors:
            owner = np.concatenate([owner, np.where(frames, body, -1)[:, None]], axis=1)
    return owner


def gather_actors(values: np.ndarray, owner: np.ndarray) -> np.ndarray:
    """``values`` (frames, bodies, ...) per actor: (frames, actors, ...) with the owning body's
    values, zeros where the actor is absent (``owner`` from :func:`assign_actors`)."""
    out = np.zeros(owner.shape + values.shape[2:], values.dtype)
    frames, actors = np.nonzero(owner >= 0)
    out[frames, actors] = values[frames, owner[frames, actors]]
    return out


# --------------------------------------------------------------------------- benchmarks

NTU60_XSUB_TRAIN_SUBJECTS = frozenset(
    (1, 2, 4, 5, 8, 9, 13, 14, 15, 16, 17, 18, 19, 25, 27, 28, 31, 34, 35, 38))
NTU60_XVIEW_TRAIN_CAMERAS = frozenset((2, 3))
NTU120_XSUB_TRAIN_SUBJECTS = NTU60_XSUB_TRAIN_SUBJECTS | frozenset(
    (45, 46, 47, 49, 50, 52, 53, 54, 55, 56, 57, 58, 59, 70, 74, 78, 80, 81, 82, 83, 84, 85,
     86, 89, 91, 92, 93, 94, 95, 97, 98, 100, 103))
NTU60_MAX_SETUP, NTU60_CLASSES, NTU120_CLASSES = 17, 60, 120

BENCHMARKS = {
    "xsub60": "NTU-60 cross-subject",
    "xview60": "NTU-60 cross-view",
    "xsub120": "NTU-120 cross-subject",
    "xset120": "NTU-120 cross-setup",
}


def check_benchmark(benchmark: str) -> str:
    if benchmark not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {benchmark!r}; expected one of {sorted(BENCHMARKS)}")
    return benchmark


def benchmark_num_classes(benchmark: str) -> int:
    return NTU60_CLASSES if check_benchmark(benchmark).endswith("60") else NTU120_CLASSES


def benchmark_split(sample: SampleName, benchmark: str) -> Optional[str]:
    """``"train"`` or ``"test"`` for a sample of the benchmark; None if not part of it
    (an NTU-120-only setup or action under an NTU-60 benchmark)."""
    check_benchmark(benchmark)
    if benchmark.endswith("60") and (sample.setup > NTU60_MAX_SETUP
                                     or sample.action > NTU60_CLASSES):
        return None
    if sample.action > NTU120_CLASSES:
        return None
    if benchmark == "xsub60":
        train = sample.performer in NTU60_XSUB_TRAIN_SUBJECTS
    elif benchmark == "xview60":
        train = sample.camera in NTU60_XVIEW_TRAIN_CAMERAS
    elif benchmark == "xsub120":
        train = sample.performer in NTU120_XSUB_TRAIN_SUBJECTS
    else:
        train = sample.setup % 2 == 0
    return "train" if train else "test"


NTU_CLASS_NAMES = (
    "drink water", "eat meal/snack", "brushing teeth", "brushing hair", "drop", "pickup",
    "throw", "sitting down", "standing up (from sitting position)", "clapping", "reading",
    "writing", "tear up paper", "wear jacket", "take off jacket", "wear a shoe",
    "take off a shoe", "wear on glasses", "take off glasses", "put on a hat/cap",
    "take off a hat/cap", "cheer up", "hand waving", "kicking something",
    "reach into pocket", "hopping (one foot jumping)", "jump up",
    "make a phone call/answer phone", "playing with phone/tablet", "typing on a keyboard",
    "pointing to something with finger", "taking a selfie", "check time (from watch)",
    "rub two hands together", "nod head/bow", "shake head", "wipe face", "salute",
    "put the palms together", "cross hands in front (say stop)", "sneeze/cough",
    "staggering", "falling", "touch head (headache)", "touch chest (stomachache/heart pain)",
    "touch back (backache)", "touch neck (neckache)", "nausea or vomiting condition",
    "use a fan (with hand or paper)/feeling warm", "punching/slapping other person",
    "kicking other person", "pushing other person", "pat on back of other person",
    "point finger at the other person", "hugging other person",
    "giving something to other person", "touch other person's pocket", "handshaking",
    "walking towards each other", "walking apart from each other",
    "put on headphone", "take off headphone", "shoot at the basket", "bounce ball",
    "tennis bat swing", "juggling table tennis balls", "hush (quite)", "flick hair",
    "thumb up", "thumb down", "make ok sign", "make victory sign", "staple book",
    "counting money", "cutting nails", "cutting paper (using scissors)", "snapping fingers",
    "open bottle", "sniff (smell)", "squat down", "toss a coin", "fold paper",
    "ball up paper", "play magic cube", "apply cream on face", "apply cream on hand back",
    "put on bag", "take off bag", "put something into a bag", "take something out of a bag",
    "open a box", "move heavy objects", "shake fist", "throw up cap/hat",
    "hands up (both hands)", "cross arms", "arm circles", "arm swings", "running on the spot",
    "butt kicks (kick backward)", "cross toe touch", "side kick", "yawn", "stretch oneself",
    "blow nose", "hit other person with something", "wield knife towards other person",
    "knock over other person (hit with body)", "grab other person's stuff",
    "shoot at other person with a gun", "step on foot", "high-five", "cheers and drink",
    "carry something with other person", "take a photo of other person",
    "follow other person", "whisper in other person's ear",
    "exchange things with other person", "support somebody with hand",
    "finger-guessing game (playing rock-paper-scissors)",
)


# --------------------------------------------------------------------------- missing skeletons

def load_missing_skeletons(path: str) -> frozenset:
    """Read a list of sample names with missing skeletons (the NTU authors publish one per
    dataset: 302 names for NTU-60, 535 for NTU-120), one name per line.

    Blank lines and ``#`` comments are ignored; a ``.skeleton`` suffix is allowed. Returns
    the names as ``SsssCcccPpppRrrrAaaa`` strings; a line that is not a sample name raises
    ValueError naming the file and line.
    """
    names = set()
    with open(path, "r", encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            entry = line.split("#", 1)[0].strip()
            if not entry:
                continue
            try:
                names.add(str(SampleName.parse(entry)))
            except ValueError:
                raise ValueError(f"{path}: line {number}: {entry!r} is not an NTU sample name "
                                 "(SsssCcccPpppRrrrAaaa)") from None
    return frozenset(names)


def missing_skeleton_names(missing_skeleton: Optional[object]) -> frozenset:
    """Normalise the ``missing_skeleton=`` option: None (no list), a path to a list file
    (see :func:`load_missing_skeletons`) or an iterable of sample names."""
    if missing_skeleton is None:
        return frozenset()
    if isinstance(missing_skeleton, (str, os.PathLike)):
        return load_missing_skeletons(os.fspath(missing_skeleton))
    if isinstance(missing_skeleton, Iterable):
        return frozenset(str(SampleName.parse(name)) for name in missing_skeleton)
    raise TypeError("missing_skeleton must be None, a path or an iterable of sample names, "
                    f"got {type(missing_skeleton).__name__}")
