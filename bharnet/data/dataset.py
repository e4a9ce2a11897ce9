"""The prepared-dataset format and :class:`SkeletonDataset`, a lazy, memory-mapped reader.

A dataset is a folder::

    manifest.json        written last: its presence marks a complete dataset
    train/  test/        one folder per split, each holding
        body.npy         float32 (N, 3, T_max, 25, M)  Kinect joints, metres; zero-padded
                         after each sample's length and where a person is absent
        hand.npy         float32 (N, 3, T_max, 42, M)  left hand nodes 0-20, right 21-41
                         (``graphs.HANDS``); zero where not detected
        hand_valid.npy   bool    (N, T_max, 2, M)      hand detected (axis 2: left, right)
        length.npy       int32   (N,)                  valid frames per sample (>= 1)
        label.npy        int64   (N,)                  class index, 0-based
        names.txt        N lines, the sample names in array order

M = 2 persons, person 0 the most active. Samples are stored padded to T_max frames
(simple, constant-stride memmaps; lengths give the valid part). Every ``.npy`` opens with
``np.load(path, mmap_mode="r")``. ``manifest.json`` holds ``format``, ``format_version``,
``bharnet_version``, ``numpy_version``, ``num_classes``, ``class_names``,
``hand_centric_classes``, ``max_frames``, ``num_persons``, ``hand_space`` ("camera": hands
in the body's camera metres; "color": colour-image pixels), ``has_hands``, ``splits``
(per split ``count`` and ``class_counts``), ``source`` (what produced it and with which
parameters) and ``skipped`` (the samples left out, by reason).

Writers (:class:`SplitWriter`, :func:`write_manifest`) fill arrays under ``.partial`` names and
``os.replace`` them into place; an interrupted write leaves no half-written array.
"""
from __future__ import annotations

import contextlib
import json
import os
import warnings
from typing import Optional, Sequence, Tuple

import numpy as np
import torch

from .. import __version__ as BHARNET_VERSION
from ..graphs import BODY, HANDS
from . import augment, features

FORMAT_NAME = "bharnet-skeleton"
FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
SPLITS = ("train", "test")
NUM_PERSONS = 2
PARTIAL_SUFFIX = ".partial"
ARRAY_FILES = ("body.npy", "hand.npy", "hand_valid.npy", "length.npy", "label.npy")
NAMES_FILE = "names.txt"


def array_layout(num_samples: int, max_frames: int, persons: int = NUM_PERSONS) -> dict:
    """File name -> (dtype, shape) of one split."""
    return {
        "body.npy": (np.float32, (num_samples, 3, max_frames, BODY.num_nodes, persons)),
        "hand.npy": (np.float32, (num_samples, 3, max_frames, HANDS.num_nodes, persons)),
        "hand_valid.npy": (np.bool_, (num_samples, max_frames, 2, persons)),
        "length.npy": (np.int32, (num_samples,)),
        "label.npy": (np.int64, (num_samples,)),
    }


def _replace_atomically(path: str, write) -> None:
    partial = path + PARTIAL_SUFFIX
    try:
        with open(partial, "w", encoding="utf-8") as handle:
            write(handle)
        os.replace(partial, path)
    finally:
        if os.path.exists(partial):
            os.remove(partial)


class SplitWriter:
    """Writes one split: ``add`` samples by index, then ``commit`` (or ``discard``).

    Use as a context manager: leaving the block by an exception discards the partial files.
    """

    def __init__(self, split_dir: str, num_samples: int, max_frames: int,
                 persons: int = NUM_PERSONS):
        if num_samples < 0 or max_frames < 1:
            raise ValueError(f"need num_samples >= 0 and max_frames >= 1, got {num_samples}, "
                             f"{max_frames}")
        os.makedirs(split_dir, exist_ok=True)
        self.split_dir, self.max_frames, self.persons = split_dir, max_frames, persons
        self.names = [None] * num_samples
        self.arrays = {}
        for file, (dtype, shape) in array_layout(num_samples, max_frames, persons).items():
            self.arrays[file] = np.lib.format.open_memmap(
                self._partial(file), mode="w+", dtype=dtype, shape=shape)

    def _partial(self, file: str) -> str:
        return os.path.join(self.split_dir, file + PARTIAL_SUFFIX)

    def add(self, index: int, body: np.ndarray, hand: np.ndarray, hand_valid: np.ndarray,
            label: int, name: str) -> None:
        """Store sample ``index``: body (3, L, 25, M), hand (3, L, 42, M), hand_valid (L, 2, M)."""
        length = body.shape[1] if body.ndim == 4 else 0
        expected = {"body": (3, length, BODY.num_nodes, self.persons),
                    "hand": (3, length, HANDS.num_nodes, self.persons),
                    "hand_valid": (length, 2, self.persons)}
        for key, array in (("body", body), ("hand", hand), ("hand_valid", hand_valid)):
            if array.shape != expected[key]:
                raise ValueError(f"{key} must have shape {expected[key]} (C, L, V, M with "
                                 f"1 <= L <= {self.max_frames}), got {array.shape}")
        if not 1 <= length <= self.max_frames:
            raise ValueError(f"sample length must be in [1, {self.max_frames}], got {length}")
        self.arrays["body.npy"][index, :, :length] = body
        self.arrays["hand.npy"][index, :, :length] = hand
        self.arrays["hand_valid.npy"][index, :length] = hand_valid
        self.arrays["length.npy"][index] = length
        self.arrays["label.npy"][index] = label
        self.names[index] = name

    def commit(self) -> None:
        """Flush and move every file into place (all samples must have been added)."""
        missing = [i for i, name in enumerate(self.names) if name is None]
        if missing:
            raise ValueError(f"{len(missing)} samples were never added (first: index {missing[0]})")
        for array in self.arrays.values():
            array.flush()
        self.arrays.clear()
        _replace_atomically(os.path.join(self.split_dir, NAMES_FILE),
                            lambda handle: handle.write("".join(n + "\n" for n in self.names)))
        for file in ARRAY_FILES:
            os.replace(self._partial(file), os.path.join(self.split_dir, file))

    def discard(self) -> None:
        self.arrays.clear()
        for file in ARRAY_FILES:
            if os.path.exists(self._partial(file)):
                os.remove(self._partial(file))

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, traceback):
        if exc_type is not None:
            self.discard()
        return False


@contextlib.contextmanager
def exclusive(root: str):
    """Hold an exclusive lock on the dataset folder ``root`` (created if missing; a ``flock`` on
    ``<root>/.lock``, which other processes wait for): e.g. the ranks of a ``torchrun`` job that
    each make the same dataset, of which one writes it and the others then find it complete.
    Without ``fcntl`` (Windows) nothing is locked."""
    os.makedirs(root, exist_ok=True)
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(os.path.join(root, ".lock"), "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def remove_partial_files(root: str) -> None:
    """Delete ``*.partial`` files left by a killed writer."""
    for folder in [root] + [os.path.join(root, split) for split in SPLITS]:
        if os.path.isdir(folder):
            for file in os.listdir(folder):
                if file.endswith(PARTIAL_SUFFIX):
                    os.remove(os.path.join(folder, file))


def invalidate(root: str) -> None:
    """Remove the manifest so that a dataset being rewritten never looks complete."""
    path = os.path.join(root, MANIFEST_FILE)
    if os.path.exists(path):
        os.remove(path)


def write_manifest(root: str, manifest: dict) -> None:
    """Write ``manifest.json`` atomically, adding the format and version fields."""
    full = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION,
            "bharnet_version": BHARNET_VERSION, "numpy_version": np.__version__}
    full.update(manifest)
    _replace_atomically(os.path.join(root, MANIFEST_FILE),
                        lambda handle: json.dump(full, handle, indent=1))


def read_manifest(root: str) -> dict:
    """Read and check ``manifest.json``; raises FileNotFoundError for an incomplete dataset."""
    path = os.path.join(root, MANIFEST_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: {root!r} is not a complete bharnet dataset "
                                "(prepare it with `bharnet prepare` or make_synthetic)")
    with open(path, "r", encoding="utf-8") as handle:
        manifest = json.load(handle)
    if manifest.get("format") != FORMAT_NAME or manifest.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: expected format {FORMAT_NAME!r} version {FORMAT_VERSION}, got "
                         f"{manifest.get('format')!r} version {manifest.get('format_version')}")
    return manifest


def split_summary(labels: np.ndarray, num_classes: int) -> dict:
    """The manifest's per-split entry: sample count and per-class counts."""
    return {"count": int(len(labels)),
            "class_counts": np.bincount(labels, minlength=num_classes).astype(int).tolist()}


def _check_transform(modality: str, preprocessing: str) -> None:
    if modality not in features.MODALITIES:
        raise ValueError(f"modality must be one of {features.MODALITIES}, got {modality!r}")
    if preprocessing not in features.PREPROCESSINGS:
        raise ValueError(f"preprocessing must be one of {features.PREPROCESSINGS}, got {preprocessing!r}")


class SkeletonDataset(torch.utils.data.Dataset):
    """A prepared dataset split as a torch Dataset of ``(body, hand, hand_valid, label)``.

    ``body`` is float32 (3, window, 25, M) and ``hand`` float32 (3, window, 42, M), both in
    the chosen ``modality`` (see :mod:`bharnet.data.features`) after ``preprocessing``,
    crop-resize to ``window`` frames and, when ``train``, a random rotation within
    ``max_rotation`` rad (the same crop and rotation for body and hands); ``hand_valid`` bool
    (window, 2, M) says where each hand is detected (see :func:`clip_input`). ``train`` defaults
    to ``split == "train"``; evaluation takes the centred ``test_crop_ratio`` crop. Hands in
    colour-image pixels (``prepare --hand-space color``) cannot be placed by ``canonical``
    preprocessing: under it they are served as undetected (zero), with a warning, for body-only
    models (``hands_withheld`` says why; training and evaluation refuse models that read hands).

    Randomness: with ``seed=None`` each item draws from torch's global generator (which
    DataLoader seeds per worker); with an integer ``seed`` item ``i`` of epoch ``e`` (see
    :meth:`set_epoch`; call it every epoch) is a pure function of ``(seed, e, i)``, whatever
    the worker layout.

    Arrays are memory-mapped on first access in each process, so the dataset pickles cheaply
    into DataLoader workers.
    """

    def __init__(self, root: str, split: str = "train", modality: str = "joint",
                 window: int = 64, train: Optional[bool] = None,
                 preprocessing: str = "canonical", seed: Optional[int] = None,
                 crop_ratio: Tuple[float, float] = (0.5, 1.0), test_crop_ratio: float = 0.95,
                 max_rotation: float = 0.3):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        _check_transform(modality, preprocessing)
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self.root, self.split, self.modality, self.window = os.fspath(root), split, modality, window
        self.train = split == "train" if train is None else bool(train)
        self.preprocessing, self.seed = preprocessing, seed
        # In shared memory so that set_epoch reaches persistent DataLoader workers too.
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()
        self.crop_ratio, self.test_crop_ratio, self.max_rotation = (
            tuple(crop_ratio), test_crop_ratio, max_rotation)
        self.manifest = read_manifest(self.root)
        # why the hands are served as undetected (zero) under this preprocessing, or None
        self.hands_withheld: Optional[str] = None
        if (preprocessing == "canonical" and self.manifest.get("has_hands")
                and self.manifest.get("hand_space", "camera") != "camera"):
            self.hands_withheld = (
                f"canonical preprocessing translates hands by the body's origin in camera metres, but "
                f"{self.root}'s hands are in {self.manifest['hand_space']!r} space (bharnet prepare --hand-space); "
                "train with calibration-free preprocessing (bharnet train --preprocessing calibration-free, "
                "or preprocessing='calibration-free')")
            warnings.warn(f"SkeletonDataset: its hands are served as undetected (zero), for body-only models: "
                          f"{self.hands_withheld}", stacklevel=2)
        self.split_dir = os.path.join(self.root, split)
        self.lengths = np.load(os.path.join(self.split_dir, "length.npy"))
        self.labels = np.load(os.path.join(self.split_dir, "label.npy"))
        with open(os.path.join(self.split_dir, NAMES_FILE), "r", encoding="utf-8") as handle:
            self.names = handle.read().splitlines()
        if not len(self.lengths) == len(self.labels) == len(self.names):
            raise ValueError(f"{self.split_dir}: length.npy, label.npy and {NAMES_FILE} "
                             "disagree on the number of samples")
        self._arrays = None

    @property
    def num_classes(self) -> int:
        return int(self.manifest["num_classes"])

    @property
    def class_names(self) -> Sequence[str]:
        return self.manifest["class_names"]

    @property
    def hand_centric_classes(self) -> Sequence[int]:
        return self.manifest["hand_centric_classes"]

    @property
    def epoch(self) -> int:
        return int(self._epoch)

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch that seeds augmentation when ``seed`` is an integer (seen by
        DataLoader workers, persistent ones included)."""
        self._epoch.fill_(int(epoch))

    def __len__(self) -> int:
        return len(self.labels)

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_arrays"] = None
        return state

    def _memmaps(self) -> dict:
        if self._arrays is None:
            self._arrays = {key: np.load(os.path.join(self.split_dir, key + ".npy"), mmap_mode="r")
                            for key in ("body", "hand", "hand_valid")}
        return self._arrays

    def raw(self, index: int):
        """The stored valid part of sample ``index``: body (3, L, 25, M), hand (3, L, 42, M),
        hand_valid (L, 2, M), as torch tensors."""
        arrays, length = self._memmaps(), int(self.lengths[index])
        return (torch.from_numpy(np.array(arrays["body"][index, :, :length])),
                torch.from_numpy(np.array(arrays["hand"][index, :, :length])),
                torch.from_numpy(np.array(arrays["hand_valid"][index, :length])))

    def _generator(self, index: int) -> Optional[torch.Generator]:
        if not self.train:
            return None
        generator = torch.Generator()
        if self.seed is None:
            generator.manual_seed(int(torch.randint(0, 2 ** 62, ())))
        else:
            state = np.random.SeedSequence([self.seed, self.epoch, index]).generate_state(2)
            generator.manual_seed(int(state[0]) << 31 ^ int(state[1]))
        return generator

    def __getitem__(self, index: int):
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} samples")
        index = index % len(self)
        body, hand, hand_valid = self.raw(index)
        if self.hands_withheld is not None:
            hand, hand_valid = torch.zeros_like(hand), torch.zeros_like(hand_valid)
        generator = self._generator(index)
        crop = rotation = None
        if self.train:
            crop = augment.random_crop(body.shape[1], self.crop_ratio, generator)
            if self.max_rotation > 0:
                rotation = augment.random_rotation(self.max_rotation, generator)
        body, hand, hand_valid = clip_input(body, hand, hand_valid, self.modality, self.window, self.preprocessing,
                                            crop or self.test_crop_ratio, rotation)
        return body, hand, hand_valid, int(self.labels[index])


def clip_input(body: torch.Tensor, hand: torch.Tensor, hand_valid: torch.Tensor, modality: str = "joint",
               window: int = 64, preprocessing: str = "canonical", crop=0.95,
               rotation: Optional[torch.Tensor] = None):
    """A model's input from one raw clip, as :class:`SkeletonDataset` makes it (for new skeletons,
    e.g. a live stream, fed to a model trained on a prepared dataset).

    ``body`` (3, L, 25, M) Kinect joints in metres, ``hand`` (3, L, 42, M) hand keypoints and
    ``hand_valid`` (L, 2, M) bool, absent persons and undetected hands zero (the layout of
    :meth:`SkeletonDataset.raw`). Steps: ``preprocessing`` ("canonical": centred on the spine of
    the first frame; "calibration-free": as given), crop-resize to ``window`` frames (``crop`` a
    ratio: the centred crop of evaluation; or ``(start, size)``), ``rotation`` (3, 3) if given,
    then the ``modality``. Use the ``modality``, ``window`` and ``preprocessing`` the model was
    trained with (a checkpoint's description has them, see
    :func:`bharnet.engine.evaluate.load_model`). Returns ``(body, hand, hand_valid)``: float32
    body (3, window, 25, M) and hand (3, window, 42, M), and bool hand_valid (window, 2, M),
    the hands' detections resampled with them (a frame that blends in an undetected frame is
    undetected); add the batch dimension and call ``model(body, hand, hand_valid)``."""
    _check_transform(modality, preprocessing)
    if preprocessing == "canonical":
        body, hand = features.canonicalize(body, hand, hand_valid)
    start, size = augment.centre_crop(body.shape[1], crop) if isinstance(crop, (int, float)) else crop
    body, body_valid = augment.crop_resize(body, start, size, window, features.body_presence(body))
    hand, hand_nodes_valid = augment.crop_resize(hand, start, size, window, features.hand_node_validity(hand_valid))
    if rotation is not None:
        body, hand = augment.rotate(body, rotation), augment.rotate(hand, rotation)
    body = features.modality(body, modality, BODY.parents, body_valid)
    hand = features.modality(hand, modality, HANDS.parents, hand_nodes_valid)
    hand_valid = hand_nodes_valid.unflatten(1, (2, HANDS.num_nodes // 2)).all(dim=2)
    return body.float().contiguous(), hand.float().contiguous(), hand_valid.contiguous()
