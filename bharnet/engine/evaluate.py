"""Evaluation: scores, top-1/top-5, per-class accuracy, hand-centric accuracy, confusion matrix."""
from __future__ import annotations

import json
import os
import warnings
from typing import Dict, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader
from safetensors import SafetensorError
from tqdm import tqdm

from ..fast import fuse_for_inference, swap_layers
from ..models import create_model
from . import checkpoint
from .config import TrainConfig
from .trainer import autocast, check_backends_run, check_inputs_exist, resolve_device


SAMPLE_NAMES = "names.txt"  # in an evaluation folder: the sample of each row of scores.npy


def read_description(path: str) -> dict:
    """The model description of a ``model.safetensors`` (what :func:`model_description` wrote);
    ValueError for a file without one, e.g. a training checkpoint, or not a safetensors file."""
    try:
        meta = checkpoint.read_metadata(path)
    except (SafetensorError, json.JSONDecodeError) as error:
        raise ValueError(f"{path} is not a model.safetensors written by bharnet train ({error})") from None
    return _described(path, meta)


# what every description holds (later keys are optional: files written before them lack them)
MODEL_DESCRIPTION_KEYS = ("model", "num_classes", "preset", "model_options", "label_smoothing", "modality",
                    "preprocessing", "window")


def _described(path: str, meta: dict) -> dict:
    """``meta``, the metadata of the file ``path``, checked to hold a model description."""
    missing = set(MODEL_DESCRIPTION_KEYS) - meta.keys()
    if missing:
        raise ValueError(f"{path} has no model description ({', '.join(sorted(missing))} missing): pass the "
                         "model.safetensors that bharnet train writes, not a training checkpoint")
    return meta


def load_model(path: str, device="cpu", backend: Optional[str] = None):
    """Rebuild a model from ``model.safetensors`` (weights + description); returns
    ``(model, description)``. A model from a file written before ``mask_missing_hands`` existed
    was trained without the mask and is rebuilt without it."""
    state, meta = checkpoint.load_weights(path)
    _described(path, meta)
    options = dict(meta["model_options"])
    options.setdefault("label_smoothing", meta["label_smoothing"])
    options.setdefault("mask_missing_hands", meta.get("mask_missing_hands", False))
    with warnings.catch_warnings():  # options the variant ignores were reported when it trained
        warnings.filterwarnings("ignore", message="bharnet: .* does not use the model option")
        model = create_model(meta["model"], meta["num_classes"], preset=meta["preset"], **options)
    model.load_state_dict(state)
    if backend is not None:
        swap_layers(model, backend)
    return model.to(device).eval(), meta


@torch.no_grad()
def predict(model, dataset, batch_size: int = 64, device="cpu", amp: str = "none",
            progress: bool = True) -> np.ndarray:
    """Class scores (N, K) as float32, in dataset order."""
    device = torch.device(device)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
    config = TrainConfig(amp=amp)
    scores = []
    model.eval()
    for body, hand, hand_valid, _ in tqdm(loader, desc="evaluating", leave=False, disable=not progress):
        with autocast(config, device):
            scores.append(model(body.to(device), hand.to(device), hand_valid.to(device)).logits.float().cpu())
    return torch.cat(scores).numpy()


def metrics(scores: np.ndarray, labels: np.ndarray, hand_centric: Sequence[int] = ()) -> Dict:
    """Accuracies in percent: ``top1``, ``top5`` (top-k with k = min(5, K)), ``per_class``
    (NaN-free: classes without samples are omitted as None), ``hand_centric_top1`` (over the
    samples of the hand-centric classes; None when there are none), and ``confusion`` (K, K)
    counts with rows = true class."""
    if scores.ndim != 2 or scores.shape[0] != labels.shape[0]:
        raise ValueError(f"scores must be (N, K) with N = len(labels), got {scores.shape} and {labels.shape}")
    finite = np.isfinite(scores).all(1)
    if not finite.all():  # argmax would count NaN rows as class 0
        raise FloatingPointError(f"the scores of {int((~finite).sum())} of {len(finite)} samples are NaN or "
                                 "infinite (a diverged model?): no accuracy computed")
    num_classes = scores.shape[1]
    prediction = scores.argmax(1)
    k = min(5, num_classes)
    topk = np.argsort(-scores, axis=1)[:, :k]
    confusion = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(confusion, (labels, prediction), 1)
    support = confusion.sum(1)
    per_class = [100.0 * confusion[c, c] / support[c] if support[c] else None for c in range(num_classes)]
    hand_mask = np.isin(labels, np.asarray(list(hand_centric), dtype=np.int64))
    return {
        "top1": 100.0 * float((prediction == labels).mean()),
        "top5": 100.0 * float((topk == labels[:, None]).any(1).mean()),
        "hand_centric_top1": 100.0 * float((prediction[hand_mask] == labels[hand_mask]).mean())
        if hand_mask.any() else None,
        "per_class": per_class,
        "confusion": confusion.tolist(),
        "samples": int(labels.shape[0]),
    }


def plot_confusion(confusion: np.ndarray, class_names: Sequence[str], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    confusion = np.asarray(confusion, dtype=np.float64)
    rates = confusion / np.maximum(confusion.sum(1, keepdims=True), 1)
    size = max(4.0, 0.45 * len(class_names) + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    image = ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(class_names)), class_names, rotation=90, fontsize=7)
    ax.set_yticks(range(len(class_names)), class_names, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.colorbar(image, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def evaluate_run(weights: str, dataset, out_dir: str, batch_size: int = 64, device="auto",
                 amp: str = "none", backend: Optional[str] = None, progress: bool = True) -> Dict:
    """Evaluate ``weights`` on ``dataset``; write ``scores.npy``, ``labels.npy``, ``names.txt``
    (the sample names, one per line, in score order), ``metrics.json`` and ``confusion.png`` to
    ``out_dir``; return the metrics.

    The model runs fused for inference (:func:`bharnet.fast.fuse_for_inference`: BatchNorm
    folded, absent persons skipped; the same scores up to rounding) on ``backend``, or else on
    the model's ``impl`` option (None: the global default, see ``bharnet.ops.use_backend``)."""
    if len(dataset) == 0:
        raise ValueError(f"the {dataset.split} split of {dataset.root} has no samples: nothing to evaluate")
    device = resolve_device(device)
    model, meta = load_model(weights, device)
    if meta["num_classes"] != dataset.num_classes:
        raise ValueError(f"{weights} classifies {meta['num_classes']} classes, the dataset at {dataset.root} "
                         f"has {dataset.num_classes}")
    named = meta.get("class_names")
    if named is not None and list(named) != list(dataset.class_names):
        index = next(i for i, (a, b) in enumerate(zip(named, dataset.class_names)) if a != b)
        raise ValueError(f"{weights} was trained on other classes than the dataset at {dataset.root} has: "
                         f"class {index} is {named[index]!r} there and {dataset.class_names[index]!r} here")
    check_inputs_exist(model, meta["model"], dataset)
    model = fuse_for_inference(model, backend if backend is not None else model.config.impl)
    check_backends_run(model, device)
    scores = predict(model, dataset, batch_size, device, amp, progress)
    labels = np.asarray(dataset.labels, dtype=np.int64)
    result = metrics(scores, labels, dataset.hand_centric_classes)
    os.makedirs(out_dir, exist_ok=True)
    np.save(os.path.join(out_dir, "scores.npy"), scores)
    np.save(os.path.join(out_dir, "labels.npy"), labels)
    with open(os.path.join(out_dir, SAMPLE_NAMES), "w", encoding="utf-8") as handle:
        handle.write("".join(name + "\n" for name in dataset.names))
    with open(os.path.join(out_dir, "metrics.json"), "w", encoding="utf-8") as handle:
        json.dump({"model": meta["model"], **result}, handle, indent=2)
    plot_confusion(np.asarray(result["confusion"]), dataset.class_names,
                   os.path.join(out_dir, "confusion.png"), f"{meta['model']}: top-1 {result['top1']:.1f}%")
    return result
