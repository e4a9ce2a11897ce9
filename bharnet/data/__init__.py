"""Data: the NTU RGB+D reader (:mod:`.ntu`), hand keypoints (:mod:`.hands`), dataset
preparation (:mod:`.prepare`), the prepared format and its torch Dataset (:mod:`.dataset`),
input modalities (:mod:`.features`), augmentation (:mod:`.augment`) and the built-in
synthetic dataset (:mod:`.synthetic`)."""
from . import augment, dataset, features, hands, ntu, prepare, synthetic
from .dataset import SkeletonDataset, clip_input, read_manifest
from .features import MODALITIES, PREPROCESSINGS
from .ntu import SkeletonFormatError, read_skeleton
from .prepare import prepare_ntu
from .synthetic import make_synthetic

__all__ = [
    "augment", "dataset", "features", "hands", "ntu", "prepare", "synthetic",
    "SkeletonDataset", "clip_input", "read_manifest", "MODALITIES", "PREPROCESSINGS",
    "SkeletonFormatError", "read_skeleton", "prepare_ntu", "make_synthetic",
]
