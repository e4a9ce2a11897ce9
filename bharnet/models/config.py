"""Model configuration: presets and the keyword arguments every variant accepts."""
from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Optional, Tuple

from ..ops._backend import BACKENDS
from ..ops._checks import is_int

PRESETS = {
    # DESIGN.md: 10 blocks, stride 2 at blocks 5 and 8 (T = 64 → 16), stem = blocks 1-4.
    "full": dict(channels=(64, 64, 64, 64, 128, 128, 128, 256, 256, 256),
                 strides=(1, 1, 1, 1, 2, 1, 1, 2, 1, 1), stem_depth=4),
    # A small model that learns the synthetic demo in minutes on two CPU cores.
    "small": dict(channels=(16, 32, 32, 64), strides=(1, 2, 1, 2), stem_depth=2, heads=4),
}


# Options that only some variants read (each lists its own in ``variant_options``); the other
# fields shape every variant.
VARIANT_OPTIONS = ("heads", "attention_mode", "stem_depth", "mask_missing_hands")


@dataclass(frozen=True)
class ModelConfig:
    """Everything configurable about a variant. Unknown keys raise ``TypeError``."""

    in_channels: int = 3
    num_person: int = 2
    channels: Tuple[int, ...] = PRESETS["full"]["channels"]
    strides: Tuple[int, ...] = PRESETS["full"]["strides"]
    stem_depth: int = 4
    groups: int = 4
    heads: int = 8
    attention_mode: str = "frame"
    # the attention of the body to the hands skips undetected hands (given ``hand_valid``)
    mask_missing_hands: bool = True
    dropout: float = 0.0
    label_smoothing: float = 0.1
    impl: Optional[str] = None
    preset: str = field(default="full")

    @classmethod
    def build(cls, preset: str = "full", **overrides) -> "ModelConfig":
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; expected one of {sorted(PRESETS)}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise TypeError(f"unknown model option(s) {unknown}; known: {sorted(known)}")
        config = replace(cls(), preset=preset, **PRESETS[preset])
        config = replace(config, **overrides)
        config.check()
        return config

    def check(self) -> None:
        for name in ("channels", "strides"):
            values = getattr(self, name)
            if len(values) == 0 or not all(is_int(v) and v >= 1 for v in values):
                raise ValueError(f"{name} must be a non-empty sequence of positive ints (one per block), got {values!r}")
        if len(self.channels) != len(self.strides):
            raise ValueError(f"channels ({len(self.channels)}) and strides ({len(self.strides)}) differ in length")
        for name in ("in_channels", "num_person", "groups", "heads", "stem_depth"):
            if not is_int(getattr(self, name)):
                raise TypeError(f"{name} must be an int, got {getattr(self, name)!r}")
        for name in ("in_channels", "num_person", "groups", "heads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not isinstance(self.mask_missing_hands, bool):
            raise TypeError(f"mask_missing_hands must be a bool, got {self.mask_missing_hands!r}")
        if not 0 <= self.label_smoothing < 1:
            raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.impl is not None and self.impl not in BACKENDS:
            raise ValueError(f"impl must be one of {BACKENDS} or None, got {self.impl!r}")
        if self.attention_mode not in ("frame", "sequence"):
            raise ValueError(f"attention_mode must be 'frame' or 'sequence', got {self.attention_mode!r}")
