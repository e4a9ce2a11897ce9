"""Action recognition on a live skeleton stream: a sliding window over the newest frames.

A robot's pose tracker delivers one skeleton frame at a time. :class:`LiveRecognizer` keeps the
newest ``history`` frames and, once it has that many and then every ``stride`` frames, turns
them into the model's input the way the dataset turns a clip into one
(:func:`bharnet.data.clip_input` with the trained run's preprocessing, window and modality,
over all the frames it holds) and classifies them::

    recognizer = LiveRecognizer.from_file("runs/ntu-joint/model.safetensors")  # or an exported .pt2
    for body, hand, hand_valid in tracker:            # (3, 25, M), (3, 42, M), (2, M) per frame
        prediction = recognizer.push(body, hand, hand_valid)
        if prediction is not None:
            print(prediction.class_name, prediction.probabilities.max(), prediction.latency_ms)

A frame's layout is that of one time step of :meth:`bharnet.data.SkeletonDataset.raw`: Kinect
joints in metres, an absent person all zero, an undetected hand ``hand_valid`` False (its
keypoints are then ignored). Persons present in a window go first, as in the dataset (a tracker
may leave slot 0 empty). The probabilities are ``softmax(logits)``: the class probabilities of the single-expert
and additive models and BHaRNet-P's normalised Noisy-OR ``p / sum(p)``.
"""
from __future__ import annotations

import collections
import os
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn

from .data.dataset import _check_transform, clip_input
from .data.features import body_presence, hand_node_validity
from .engine.checkpoint import unwrapped
from .graphs import BODY, HANDS
from .models.variants import _Variant

DESCRIPTION_KEYS = ("modality", "window", "preprocessing")


@dataclass(frozen=True)
class Prediction:
    """One classification of the window that ends at frame ``frame`` (0-based, counted since the
    recognizer started or was reset): ``probabilities`` (K,), ``label`` their argmax,
    ``class_name`` that class's name (None for a model file written without class names), and
    the wall time that building the input and running the model took."""

    frame: int
    probabilities: torch.Tensor
    label: int
    class_name: Optional[str]
    latency_ms: float


class LiveRecognizer:
    """Classify the newest ``history`` frames every ``stride`` frames (module docstring).

    ``model`` is called as ``model(body, hand, hand_valid)`` on (1, C, window, V, M) inputs and
    the (1, window, 2, M) hands' detections, and returns a :class:`bharnet.ModelOutput` (an
    eval-mode model, an exported program's ``module()``, an AOTInductor package); as
    ``model(body, hand)`` where ``description`` lists its ``inputs`` without ``hand_valid`` (a
    file exported without it) or, without ``inputs``, for a model that is not one of
    :mod:`bharnet.models` (also inside ``torch.compile`` or ``nn.DataParallel``). The inputs go
    to the device and dtype of its first parameter (CPU float32 for a model without any). ``description`` holds the ``modality``, ``window`` and
    ``preprocessing`` it was trained with (a run's description, or an exported file's metadata)
    and, optionally, ``class_names`` (label order; a run's description has them).
    ``history`` (default: the window) is the number of raw frames per classification; they are
    resampled to the window, so at a frame rate other than the training data's, pick the history
    that spans the same time."""

    def __init__(self, model: Callable, description: dict, history: Optional[int] = None, stride: int = 8):
        missing = [key for key in DESCRIPTION_KEYS if key not in description]
        if missing:
            raise ValueError(f"the description lacks {missing}: pass a run's description (bharnet.engine."
                             "evaluate.load_model) or the metadata that bharnet export stores")
        if isinstance(model, nn.Module):
            training = [name or type(model).__name__ for name, m in model.named_modules()
                        if m.training and isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.Dropout))]
            if training:  # its BatchNorm would normalise by the live clip and update its statistics
                raise ValueError(f"LiveRecognizer needs an eval-mode model (call model.eval() first); in training "
                                 f"mode: {', '.join(training[:3])}{' ...' if len(training) > 3 else ''}")
        _check_transform(description["modality"], description["preprocessing"])
        self.model = model
        inputs = description.get("inputs")
        self.passes_hand_valid = ("hand_valid" in inputs if inputs is not None
                                  else isinstance(unwrapped(model), _Variant))
        parameter = next(model.parameters(), None) if isinstance(model, nn.Module) else None
        self.device = parameter.device if parameter is not None else torch.device("cpu")
        self.dtype = parameter.dtype if parameter is not None else torch.float32
        config = getattr(model, "config", None)  # a bharnet model's; an exported file's metadata has num_person
        self.num_person: Optional[int] = getattr(config, "num_person", None) or description.get("num_person")
        self.modality, self.window = description["modality"], int(description["window"])
        self.preprocessing = description["preprocessing"]
        self.class_names = description.get("class_names")
        self.history = self.window if history is None else history
        if not isinstance(self.history, int) or self.history < 2:
            raise ValueError(f"history must be an int >= 2 frames, got {self.history!r}")
        if not isinstance(stride, int) or stride < 1:
            raise ValueError(f"stride must be a positive int, got {stride!r}")
        self.stride = stride
        self.reset()

    @classmethod
    def from_file(cls, path: str, history: Optional[int] = None, stride: int = 8,
                  device="cpu", dtype: Optional[torch.dtype] = None) -> "LiveRecognizer":
        """A recognizer for a run's ``model.safetensors`` (rebuilt and fused for inference) or
        for a file that ``bharnet export`` wrote (a program or an AOTInductor package, with the
        run's description as metadata), which runs on the CPU, as ``bharnet export`` traced it.
        ``device``: where the rebuilt model runs; ``dtype``: the rebuilt model's dtype (default
        float32; ``torch.bfloat16`` is the faster one on CPUs with AMX, see
        :func:`bharnet.fast.fuse_for_inference`). An exported file runs in its own dtype."""
        path = os.fspath(path)
        if path.endswith(".safetensors"):
            from .engine.evaluate import load_model
            from .fast import fuse_for_inference
            model, description = load_model(path, device=device)
            model = fuse_for_inference(model)
            if dtype is not None:
                if not dtype.is_floating_point:
                    raise ValueError(f"dtype must be a floating-point dtype, got {dtype}")
                model = model.to(dtype)
        else:
            if torch.device(device).type != "cpu":
                raise ValueError(f"an exported file runs on the CPU (bharnet export traces it there), not on "
                                 f"{device}: pass the run's model.safetensors to run on {device}")
            if dtype is not None:
                raise ValueError(f"an exported file runs in the dtype it was exported in; dtype={dtype} applies "
                                 "to a run's model.safetensors")
            from .deploy import load_runnable
            model, description = load_runnable(path)
        return cls(model, description, history=history, stride=stride)

    def reset(self) -> None:
        """Forget every frame (a new scene); the frame count starts again at 0."""
        self._frames = collections.deque(maxlen=self.history)
        self._count = 0
        self._persons: Optional[int] = None

    def push(self, body: torch.Tensor, hand: Optional[torch.Tensor] = None,
             hand_valid: Optional[torch.Tensor] = None) -> Optional[Prediction]:
        """Add one frame: ``body`` (3, 25, M), ``hand`` (3, 42, M) or None (no hands seen) and
        ``hand_valid`` (2, M) bool or None (a hand counts as seen where any of its keypoints is
        non-zero). Returns the prediction when this frame completes a window, else None."""
        body, hand, hand_valid = self._checked(body, hand, hand_valid)
        self._frames.append((body, hand, hand_valid))
        self._count += 1
        if len(self._frames) < self.history or (self._count - self.history) % self.stride:
            return None
        return self._classify()

    def _checked(self, body, hand, hand_valid):
        if not isinstance(body, torch.Tensor) or body.dim() != 3 or body.shape[:2] != (3, BODY.num_nodes):
            raise ValueError(f"body must be a tensor of shape (3, {BODY.num_nodes}, M), got {_shape(body)}")
        persons = body.shape[2]
        if self.num_person is not None and persons != self.num_person:
            raise ValueError(f"body has {persons} persons, the model takes {self.num_person} "
                             "(zeros for an absent person)")
        if self._persons is not None and persons != self._persons:
            raise ValueError(f"body has {persons} persons, the frames before had {self._persons} "
                             "(keep M fixed, with zeros for an absent person; reset() for a new scene)")
        if hand is None:
            hand = torch.zeros(3, HANDS.num_nodes, persons)
            hand_valid = torch.zeros(2, persons, dtype=torch.bool)
        elif not isinstance(hand, torch.Tensor) or tuple(hand.shape) != (3, HANDS.num_nodes, persons):
            raise ValueError(f"hand must be a tensor of shape (3, {HANDS.num_nodes}, {persons}), got {_shape(hand)}")
        hand = hand.detach().to("cpu", torch.float32, copy=True)  # the caller may reuse its buffers
        if hand_valid is None:
            hand_valid = hand.reshape(3, 2, HANDS.num_nodes // 2, persons).ne(0).any(dim=2).any(dim=0)
        elif not isinstance(hand_valid, torch.Tensor) or tuple(hand_valid.shape) != (2, persons):
            raise ValueError(f"hand_valid must be a bool tensor of shape (2, {persons}), got {_shape(hand_valid)}")
        self._persons = persons
        hand_valid = hand_valid.detach().to("cpu", torch.bool, copy=True)
        # an undetected hand's keypoints may hold anything (NaN too): they count as zero
        hand = torch.where(hand_node_validity(hand_valid[None]), hand, 0.0)
        body = body.detach().to("cpu", torch.float32, copy=True)
        for name, x in (("body", body), ("hand", hand)):
            if not torch.isfinite(x).all():
                raise ValueError(f"{name} holds non-finite values (NaN or inf): mark a joint the tracker lost "
                                 "as zero (an absent person all zero, an undetected hand with hand_valid False)")
        return body, hand, hand_valid

    @torch.no_grad()
    def _classify(self) -> Prediction:
        start = time.perf_counter()
        bodies, hands, valid = zip(*self._frames)  # (3, L, V, M) as the dataset stores clips
        body, hand, hand_valid = torch.stack(bodies, dim=1), torch.stack(hands, dim=1), torch.stack(valid)
        body, hand, hand_valid = _present_persons_first(body, hand, hand_valid)
        body, hand, hand_valid = clip_input(body, hand, hand_valid, modality=self.modality, window=self.window,
                                            preprocessing=self.preprocessing, crop=(0, len(self._frames)))
        inputs = [body[None].to(self.device, self.dtype), hand[None].to(self.device, self.dtype)]
        if self.passes_hand_valid:
            inputs.append(hand_valid[None].to(self.device))
        out = self.model(*inputs)
        probabilities = torch.softmax(out.logits[0].float(), dim=0).cpu()
        label = int(probabilities.argmax())
        if self.class_names is not None and len(self.class_names) != probabilities.numel():
            raise ValueError(f"the description names {len(self.class_names)} classes, the model scores "
                             f"{probabilities.numel()}")
        name = None if self.class_names is None else self.class_names[label]
        return Prediction(self._count - 1, probabilities, label, name, (time.perf_counter() - start) * 1e3)


def _present_persons_first(body, hand, hand_valid):
    """The persons of a window with the ones present in it first, as in the dataset (whose
    person 0 is the main actor; the canonical preprocessing centres on person 0): a tracker
    that keeps a slot per person may leave slot 0 empty while another slot is filled."""
    present = body_presence(body).flatten(0, 1).any(dim=0)  # (M,)
    if bool(present[0]) or not bool(present.any()):
        return body, hand, hand_valid
    order = torch.argsort((~present).to(torch.int8), stable=True)
    return body[..., order], hand[..., order], hand_valid[..., order]


def _shape(x) -> str:
    return str(tuple(x.shape)) if isinstance(x, torch.Tensor) else type(x).__name__
