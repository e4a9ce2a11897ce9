"""Model registry: ``create_model(name, num_classes, **cfg)``."""
from __future__ import annotations

from functools import partial

from torch import nn

from .config import PRESETS, ModelConfig
from .losses import cross_entropy, noisy_or_log_probs, smoothed_nll
from .variants import (BHaRNetE, BHaRNetP, BHaRNetPAM, BHaRNetVanilla, ModelOutput,
                       SingleExpert)

MODELS = {
    "body": partial(SingleExpert, "body"),
    "hand": partial(SingleExpert, "hand"),
    "unified": partial(SingleExpert, "unified"),
    "bharnet-vanilla": BHaRNetVanilla,
    "bharnet-e": BHaRNetE,
    "bharnet-pam": BHaRNetPAM,
    "bharnet-p": BHaRNetP,
}


def create_model(name: str, num_classes: int, preset: str = "full", **cfg) -> nn.Module:
    """Build a variant by name (see ``MODELS``); ``preset`` is ``full`` or ``small``, and any
    :class:`ModelConfig` field can be overridden by keyword (e.g. ``attention_mode="sequence"``)."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; expected one of {list(MODELS)}")
    if not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes must be an int >= 2, got {num_classes!r}")
    return MODELS[name](num_classes, ModelConfig.build(preset, **cfg))


__all__ = ["MODELS", "PRESETS", "ModelConfig", "ModelOutput", "create_model", "cross_entropy",
           "noisy_or_log_probs", "smoothed_nll"]
