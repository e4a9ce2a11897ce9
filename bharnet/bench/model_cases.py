"""Whole-model cases: a training step and single-clip inference.

* ``train``: ``optimizer.zero_grad(); loss = model.loss(model(body, hand, hand_valid), target);
  loss.backward(); optimizer.step()`` with ``bharnet train``'s optimizer (SGD with Nesterov
  momentum and weight decay, torch's fused implementation on CPU and CUDA:
  :func:`bharnet.engine.trainer.make_optimizer`), batch ``clips`` x ``persons``; under
  ``torch.compile`` the forward and loss are compiled. The step's ``saved_bytes()`` gives the
  bytes that autograd saves for the backward in its forward and loss; its ``model`` is the
  model it trains.
* ``infer``: ``model(body, hand, hand_valid)`` on one clip in eval mode under ``torch.no_grad``; with
  ``fold``, on the model fused for inference (:func:`bharnet.fast.fuse_for_inference`). Also
  with one person present (``present=1``, the others' inputs all zero, as datasets pad a clip
  of one person), which the fused model does not compute (:mod:`bharnet.absent_persons`).

``bf16`` runs under ``torch.autocast`` (parameters stay float32), except the fused inference
(``fold``), which is deployed as a bfloat16 model: the fused copy converted to bfloat16 and fed
bfloat16 inputs, without autocast (on CPU its C++ kernels then read bfloat16 features as they
are, and the 1x1 convolutions run oneDNN's bfloat16 kernels). Inputs are random skeletons
of the NTU layout (N, 3, T, V, M) with V = 25 body joints and V = 42 hand keypoints, each hand
detected in a random 90% of the frames (``hand_valid``; undetected hands zero).
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from ..data.features import hand_node_validity
from ..engine.config import TrainConfig
from ..engine.trainer import make_optimizer
from ..fast import fuse_for_inference
from ..graphs import BODY, HANDS
from ..models import create_model
from .memory import saved_tensor_bytes
from .providers import autocast, compiled

MODEL_NAMES = ("bharnet-e", "body", "unified")
INPUT_SETS = 2


@dataclass(frozen=True)
class ModelCase:
    """``model`` in ``mode`` (``train`` or ``infer``) at a batch of ``clips`` x ``persons``, of
    whom the first ``present`` are seen (None: all); the others' inputs are zero."""

    model: str
    mode: str
    preset: str
    clips: int
    persons: int
    frames: int
    classes: int = 120
    present: Optional[int] = None

    @property
    def x(self) -> str:
        return f"N{self.clips} M{self.persons} T{self.frames}" + ("" if self.present is None else f" P{self.present}")

    def config(self, dtype_name: str) -> str:
        return (f"dtype={dtype_name};preset={self.preset};N={self.clips};M={self.persons};"
                + ("" if self.present is None else f"present={self.present};")
                + f"T={self.frames};classes={self.classes}")


def model_cases(names, preset: str, clips: int, persons: int, frames: int):
    """A training step at ``clips`` clips and single-clip inference for each model name, the
    latter also with one person present when there are several."""
    cases = []
    for name in names:
        cases.append(ModelCase(name, "train", preset, clips, persons, frames))
        cases.append(ModelCase(name, "infer", preset, 1, persons, frames))
        if persons > 1:
            cases.append(ModelCase(name, "infer", preset, 1, persons, frames, present=1))
    return cases


def _batch(case: ModelCase, device: torch.device):
    body = torch.randn(case.clips, 3, case.frames, BODY.num_nodes, case.persons, device=device)
    hand = torch.randn(case.clips, 3, case.frames, HANDS.num_nodes, case.persons, device=device)
    # hands detected in 90% of the frames (a missing hand's keypoints are zero, as in the data)
    hand_valid = torch.rand(case.clips, case.frames, 2, case.persons, device=device) < 0.9
    if case.present is not None:
        body[..., case.present:] = 0
        hand_valid[..., case.present:] = False
    hand *= hand_node_validity(hand_valid)[:, None]
    target = torch.randint(0, case.classes, (case.clips,), device=device)
    return body, hand, hand_valid, target


def make_step(case: ModelCase, device: torch.device, dtype_name: str,
              compile_mode: Optional[str], fold: bool = False) -> Callable[[], None]:
    """A zero-argument callable running one step of ``case`` on fresh inputs (it cycles
    through a few input sets). The ops' backend is the global one (``bharnet.ops.use_backend``)
    in force when the step first runs (for compiled steps: when they are traced)."""
    model = create_model(case.model, case.classes, preset=case.preset, num_person=case.persons).to(device)
    batches = itertools.cycle([_batch(case, device) for _ in range(INPUT_SETS)])
    if case.mode == "infer":
        model.eval()
        autocast_dtype = dtype_name
        if fold:  # its layers keep the global backend (backend=None)
            model = fuse_for_inference(model, backend=None)
            if dtype_name == "bf16":  # a bfloat16 model, fed bfloat16 inputs, without autocast
                model, autocast_dtype = model.to(torch.bfloat16), "fp32"
        forward = compiled(model, compile_mode, fullgraph=False)
        input_dtype = next(model.parameters()).dtype

        def infer_step():
            body, hand, hand_valid, _ = next(batches)
            with torch.no_grad(), autocast(device, autocast_dtype):
                forward(body.to(input_dtype), hand.to(input_dtype), hand_valid)
        return infer_step

    model.train()
    # bharnet train's optimizer at a small learning rate: at its default of 0.1, random
    # inputs and labels drove a bf16 step's parameters to NaN within the warm-up
    optimizer = make_optimizer(model, TrainConfig(lr=0.01), device)

    def forward_loss(body, hand, hand_valid, target):
        return model.loss(model(body, hand, hand_valid), target)

    forward_loss = compiled(forward_loss, compile_mode, fullgraph=False)

    def train_step():
        body, hand, hand_valid, target = next(batches)
        optimizer.zero_grad(set_to_none=True)
        with autocast(device, dtype_name):
            loss = forward_loss(body, hand, hand_valid, target)
        loss.backward()
        optimizer.step()

    def saved_bytes() -> int:
        body, hand, hand_valid, target = next(batches)
        with autocast(device, dtype_name):
            return saved_tensor_bytes(lambda: forward_loss(body, hand, hand_valid, target))
    train_step.saved_bytes = saved_bytes
    train_step.model = model
    return train_step
