"""Weighted score fusion across models (e.g. the joint, bone, joint-motion and bone-motion
models of one architecture): ``s = Σ_m w_m · softmax(scores_m)``."""
from __future__ import annotations

import os
from typing import Dict, Sequence

import numpy as np

from .evaluate import SAMPLE_NAMES, metrics


def softmax(scores: np.ndarray) -> np.ndarray:
    shifted = scores - scores.max(axis=1, keepdims=True)
    e = np.exp(shifted)
    return e / e.sum(axis=1, keepdims=True)


def fuse(score_sets: Sequence[np.ndarray], weights: Sequence[float]) -> np.ndarray:
    if len(score_sets) != len(weights) or not score_sets:
        raise ValueError(f"need one weight per score set, got {len(score_sets)} sets and {len(weights)} weights")
    if any(not w >= 0 for w in weights) or not sum(weights) > 0:
        raise ValueError(f"weights must be >= 0 with a positive sum, got {list(weights)}")
    shapes = {s.shape for s in score_sets}
    if len(shapes) != 1:
        raise ValueError(f"score sets must have the same shape, got {sorted(shapes)}")
    return sum(w * softmax(s) for s, w in zip(score_sets, weights))


def ensemble_dirs(eval_dirs: Sequence[str], weights: Sequence[float], hand_centric=()) -> Dict:
    """Fuse the ``scores.npy`` of several evaluation folders, made on the same samples in the
    same order: their ``labels.npy`` must agree, and so must their ``names.txt`` where every
    folder has one (evaluations before bharnet wrote it have none)."""
    for d in eval_dirs:
        missing = [name for name in ("scores.npy", "labels.npy") if not os.path.isfile(os.path.join(d, name))]
        if missing:
            raise FileNotFoundError(f"{d} has no {' or '.join(missing)}: pass evaluation folders (a run's eval/, "
                                    "written by bharnet train or bharnet eval)")
    labels = [np.load(os.path.join(d, "labels.npy")) for d in eval_dirs]
    if any(not np.array_equal(labels[0], other) for other in labels[1:]):
        raise ValueError("the evaluation folders were made on different samples (labels.npy differ)")
    names = [os.path.join(d, SAMPLE_NAMES) for d in eval_dirs]
    if all(os.path.isfile(path) for path in names):
        first = _read_lines(names[0])
        for d, path in zip(eval_dirs[1:], names[1:]):
            if _read_lines(path) != first:
                raise ValueError(f"{d} was made on other samples, or in another order, than {eval_dirs[0]} "
                                 f"({SAMPLE_NAMES} differ)")
    fused = fuse([np.load(os.path.join(d, "scores.npy")) for d in eval_dirs], weights)
    return metrics(fused, labels[0], hand_centric)


def _read_lines(path: str):
    with open(path, encoding="utf-8") as handle:
        return handle.read().splitlines()
