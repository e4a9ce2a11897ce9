"""Model registry: ``create_model(name, num_classes, **cfg)``."""
from __future__ import annotations

import operator
import warnings
from functools import partial

from torch import nn

from ..ops._checks import is_int
from .config import PRESETS, VARIANT_OPTIONS, ModelConfig
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


def variant_options(name: str):
    """The options of ``VARIANT_OPTIONS`` that the variant ``name`` reads."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; expected one of {list(MODELS)}")
    variant = MODELS[name]
    return getattr(variant, "func", variant).variant_options  # SingleExpert comes as a partial


def create_model(name: str, num_classes: int, preset: str = "full", **cfg) -> nn.Module:
    """Build a variant by name (see ``MODELS``); ``preset`` is ``full`` or ``small``, and any
    :class:`ModelConfig` field can be overridden by keyword (e.g. ``attention_mode="sequence"``).
    An option the variant does not read (``heads`` for ``body``, say) is accepted, so that one
    set of options can serve several variants, and named in a warning."""
    read = variant_options(name)
    if not is_int(num_classes) or num_classes < 2:
        raise ValueError(f"num_classes must be an int >= 2, got {num_classes!r}")
    config = ModelConfig.build(preset, **cfg)
    ignored = [option for option in VARIANT_OPTIONS if option in cfg and option not in read]
    if ignored:
        warnings.warn(f"bharnet: {name} does not use the model option(s) {ignored}; they have no effect",
                      stacklevel=2)
    return MODELS[name](operator.index(num_classes), config)


__all__ = ["MODELS", "PRESETS", "ModelConfig", "ModelOutput", "create_model", "cross_entropy",
           "noisy_or_log_probs", "smoothed_nll", "variant_options"]
