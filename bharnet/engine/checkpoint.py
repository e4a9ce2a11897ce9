"""Checkpoints as safetensors files: tensors plus JSON metadata, never pickles.

A checkpoint ``epoch-0007.safetensors``, written after the 7th epoch (counted from 1, as the
log and the progress lines count), holds the model weights (``model.*``) and the optimizer's
per-parameter state (``optim.<index>.<name>``); its metadata holds ``{"epochs_done", "step",
"config", "optimizer", "scaler", "mask_missing_hands"}`` as JSON (the optimizer's
hyper-parameters, the fp16 gradient scaler's state and the model's option; files written before
the option lack it: their runs were trained without the mask). Files of bharnet 0.1.0 before that numbering were named after the
0-based epoch index and hold ``"epoch"`` (= epochs done - 1) instead; they load alike. No generator state: training seeds
the generators behind dropout at each epoch (``trainer.epoch_seed``; files of bharnet 0.1.0
before that change hold ``rng.*`` tensors, which are ignored, and a run resumed across the change
draws other dropout masks than an uninterrupted one). Files are
written under a temporary name and ``os.replace``d into place, so a kill never leaves a
half-written checkpoint; only the newest ``keep`` are kept.
"""
from __future__ import annotations

import glob
import json
import os
import re
from typing import Optional, Tuple

import torch
from safetensors.torch import load_file, save_file
from safetensors import safe_open

PATTERN = re.compile(r"epoch-(\d+)\.safetensors$")


def _contiguous(tensors: dict) -> dict:
    return {k: v.detach().contiguous().cpu() for k, v in tensors.items()}


def unwrapped(model):
    """The module inside ``torch.compile``'s and (Distributed)DataParallel's wrappers."""
    while True:
        if isinstance(getattr(model, "_orig_mod", None), torch.nn.Module):
            model = model._orig_mod
        elif isinstance(model, (torch.nn.DataParallel, torch.nn.parallel.DistributedDataParallel)):
            model = model.module
        else:
            return model


def model_state(model: torch.nn.Module) -> dict:
    """State dict without a DistributedDataParallel/compile wrapper prefix."""
    return unwrapped(model).state_dict()


def save_atomically(path: str, tensors: dict, metadata: dict) -> None:
    """Write ``path`` under a temporary name, then rename it into place (a save that fails or is
    interrupted removes its temporary file)."""
    partial = path + ".partial"
    try:
        save_file(_contiguous(tensors), partial, metadata={k: json.dumps(v) for k, v in metadata.items()})
        os.replace(partial, path)
    except BaseException:
        if os.path.exists(partial):
            os.remove(partial)
        raise


def save_checkpoint(directory: str, epochs_done: int, step: int, model, optimizer, scaler, config: dict,
                    *, mask_missing_hands: bool, keep: int = 2) -> str:
    """Write ``epoch-<epochs_done>.safetensors`` into ``directory``; keep the newest ``keep``.
    ``mask_missing_hands``: the model's option (a resumed run keeps it)."""
    os.makedirs(directory, exist_ok=True)
    tensors = {f"model.{k}": v for k, v in model_state(model).items()}
    opt = optimizer.state_dict()
    for index, state in opt["state"].items():
        for name, value in state.items():
            tensors[f"optim.{index}.{name}"] = torch.as_tensor(value)
    scaler_state = scaler.state_dict() if scaler is not None and scaler.is_enabled() else {}
    path = os.path.join(directory, f"epoch-{epochs_done:04d}.safetensors")
    save_atomically(path, tensors, {"epochs_done": epochs_done, "step": step, "config": config,
                                    "optimizer": {"param_groups": opt["param_groups"]},
                                    "scaler": scaler_state, "mask_missing_hands": mask_missing_hands})
    for old in list_checkpoints(directory)[:-keep]:
        os.remove(old)
    return path


def list_checkpoints(directory: str):
    files = [p for p in glob.glob(os.path.join(directory, "epoch-*.safetensors")) if PATTERN.search(p)]
    return sorted(files, key=lambda p: int(PATTERN.search(p).group(1)))


def latest_checkpoint(directory: str) -> Optional[str]:
    files = list_checkpoints(directory)
    return files[-1] if files else None


def read_metadata(path: str) -> dict:
    with safe_open(path, framework="pt") as handle:
        return {k: json.loads(v) for k, v in (handle.metadata() or {}).items()}


def load_checkpoint(path: str, model, optimizer=None, scaler=None) -> Tuple[int, int]:
    """Restore everything saved by :func:`save_checkpoint`; returns ``(epochs_done, step)``."""
    tensors = load_file(path)
    meta = read_metadata(path)
    unwrapped(model).load_state_dict({k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")})
    if optimizer is not None:
        state = {}
        for key, value in tensors.items():
            if key.startswith("optim."):
                _, index, name = key.split(".", 2)
                state.setdefault(int(index), {})[name] = value
        optimizer.load_state_dict({"state": state, "param_groups": meta["optimizer"]["param_groups"]})
    if scaler is not None and meta.get("scaler"):
        scaler.load_state_dict(meta["scaler"])
    epochs_done = meta["epochs_done"] if "epochs_done" in meta else meta["epoch"] + 1  # 0.1.0's 0-based index
    return epochs_done, meta["step"]


def save_weights(path: str, model, metadata: dict) -> None:
    """Weights only (for evaluation and deployment), with the model's description."""
    save_atomically(path, model_state(model), metadata)


def load_weights(path: str) -> Tuple[dict, dict]:
    """``(state_dict, metadata)`` of a file written by :func:`save_weights`."""
    return load_file(path), read_metadata(path)
