"""Training configuration: defaults, a JSON/TOML config file, and command-line overrides."""
from __future__ import annotations

import json
import os
import tomllib
import warnings
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Optional, Tuple

from ..models.config import ModelConfig
from ..ops._checks import is_int

AMP_MODES = ("none", "bf16", "fp16")
# torch.compile's modes; reduce-overhead replays each step as CUDA graphs (GPU), which removes
# the per-kernel host cost that bounds a training step on a slow host
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


class RunFolderMismatch(ValueError):
    """A run folder holds a run trained with other options than the ones given, or a finished
    run without a checkpoint to resume from."""


@dataclass(frozen=True)
class TrainConfig:
    """One training run. ``data=None`` means the built-in synthetic dataset."""

    model: str = "bharnet-e"
    data: Optional[str] = None
    out: Optional[str] = None
    preset: str = "full"
    model_options: dict = field(default_factory=dict)
    modality: str = "joint"
    preprocessing: str = "canonical"
    window: int = 64
    epochs: int = 65
    batch_size: int = 64
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 4e-4
    warmup_epochs: int = 5
    min_lr: float = 0.0
    label_smoothing: float = 0.1
    amp: str = "none"
    compile: bool = False
    compile_mode: str = "default"
    backend: Optional[str] = None
    device: str = "auto"
    workers: int = 0
    seed: int = 0
    keep_checkpoints: int = 2

    def check(self) -> "TrainConfig":
        for name in ("window", "epochs", "batch_size", "warmup_epochs", "workers", "seed", "keep_checkpoints"):
            if not is_int(getattr(self, name)):
                raise ValueError(f"{name} must be an int, got {getattr(self, name)!r}")
        for name in ("lr", "momentum", "weight_decay", "min_lr", "label_smoothing"):
            if not isinstance(getattr(self, name), (int, float)) or isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a number, got {getattr(self, name)!r}")
        try:  # the model options as create_model takes them (unknown ones, wrong types, bad values)
            ModelConfig.build(self.preset, **self.model_options)
        except TypeError as error:
            raise ValueError(f"model options: {error}") from error
        if self.amp not in AMP_MODES:
            raise ValueError(f"amp must be one of {AMP_MODES}, got {self.amp!r}")
        if self.compile_mode not in COMPILE_MODES:
            raise ValueError(f"compile_mode must be one of {COMPILE_MODES}, got {self.compile_mode!r}")
        for name in ("epochs", "batch_size", "window", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0 or self.warmup_epochs < 0 or self.workers < 0:
            raise ValueError("lr must be > 0, warmup_epochs and workers >= 0")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")
        if 0 < self.epochs <= self.warmup_epochs:
            warnings.warn(f"warmup_epochs ({self.warmup_epochs}) >= epochs ({self.epochs}): the learning rate only "
                          f"ramps up, to {self.lr * self.epochs / self.warmup_epochs:g}, and never decays; "
                          "pass a --warmup-epochs below --epochs", stacklevel=2)
        return self

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown training option(s) {unknown}; known: {sorted(known)}")
        return replace(cls(), **values).check()


def read_config_file(path: str) -> dict:
    """Options from a ``.json`` or ``.toml`` file (keys are :class:`TrainConfig` fields)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file {path!r} does not exist")
    if path.endswith(".toml"):
        with open(path, "rb") as handle:
            return tomllib.load(handle)
    if path.endswith(".json"):
        with open(path, "r", encoding="utf-8") as handle:
            return json.load(handle)
    raise ValueError(f"config file must end in .json or .toml, got {path!r}")


def parse_model_options(items: Tuple[str, ...]) -> dict:
    """``["heads=4", "attention_mode=sequence", "channels=[16,32]"]`` → dict (values as JSON
    where they parse, else strings)."""
    options = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"model option must look like key=value, got {item!r}")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    return options
