r"""Inference that skips absent persons: the all-zero person slots of a clip cost nothing.

Skeleton datasets pad a clip to ``M`` persons with zeros (NTU RGB+D pads to two persons; only
11 of its 60 actions involve two). In the models of :mod:`bharnet.models` every person is computed on its own from
the input normalisation (``DataNorm``, which turns (N, C, T, V, M) into N·M rows) to the
classifier, which averages the rows' pooled features over the M persons. A person whose input
is all zero therefore reaches the classifier with features that depend only on the weights and
on its slot ``m`` (``data_bn`` is per slot): in eval mode every frame of that person is the
same constant (normalisation shift, 1x1 convolutions, graph aggregation, interpolation between
equal frames, max over equal frames, attention over repeated tokens all keep frames equal), so
its pooled features are also independent of T. They are computed once, on a one-frame zero
clip whose hands are undetected (``hand_valid`` False), and put back into the classifier's input
in place of the rows that were not computed.

:func:`skip_absent_persons` rewires an eval-mode model in place: a forward pre-hook finds the
persons present in the call (any non-zero value in any of its (N, C, T, V, M) inputs, or a
hand detected in ``hand_valid``, so a person whose body or hands are seen is computed in both
streams), each ``DataNorm`` (and the
``PersonRows`` of the hands' validity) passes on only their rows, and each ``Classifier`` fills
in the absent persons' precomputed features
(computed again after ``load_state_dict``; call :func:`refresh_absent_features` after changing
the weights in place otherwise).
The outputs equal the full computation's up to rounding. Persons are skipped in calls under
``torch.no_grad`` or ``torch.inference_mode``, as inference runs; with autograd on, every row
runs, so that gradients (for example an attribution with respect to the inputs) are those of
the full computation. Calls in which every person is present or every person is absent, and
calls under ``torch.compile`` (whose graphs would break on the data-dependent shapes), run
every row too, as do calls without ``hand_valid`` to a model that masks undetected hands (its
absent persons would then attend their zero hands, unlike the precomputed features).
"""
from __future__ import annotations

import threading
from typing import Optional

import torch
from torch import nn

from .graphs import BODY, HANDS
from .models.backbone import DataNorm, PersonRows
from .models.variants import Classifier, _Variant


class _PresentRows(threading.local):
    """The N·M rows of the persons present in the running call (bool), or None: every row.
    Per thread, so that threads may share a model; a copy (deepcopy, pickle) starts empty."""

    rows: Optional[torch.Tensor] = None

    def __reduce__(self):
        return type(self), ()


class PresentPersonsRows(nn.Module):
    """Stands in for a module whose output has one row per person, N·M rows (a ``DataNorm``, a
    ``PersonRows``): the output keeps the present persons' rows."""

    def __init__(self, rows: nn.Module, present: _PresentRows):
        super().__init__()
        self.rows = rows
        self.present = present

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = self.rows(x)
        keep = None if torch.compiler.is_compiling() else self.present.rows
        return rows if keep is None else rows[keep]


class AbsentPersonsClassifier(nn.Module):
    """Stands in for a ``Classifier``: puts the absent persons' pooled features
    (``absent_features``, (M, C), by slot, filled by :func:`refresh_absent_features`) back among
    the present persons' rows."""

    def __init__(self, head: Classifier, present: _PresentRows):
        super().__init__()
        self.head = head
        self.present = present
        weight = head.fc.weight
        self.register_buffer("absent_features", torch.zeros(head.num_person, head.fc.in_features, dtype=weight.dtype,
                                                            device=weight.device), persistent=False)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        keep = None if torch.compiler.is_compiling() else self.present.rows
        if keep is not None:
            rows = self.absent_features.to(pooled.dtype).repeat(keep.numel() // self.head.num_person, 1)
            rows[keep] = pooled
            pooled = rows
        return self.head(pooled)


def _zero_inputs(model: _Variant, like: torch.Tensor):
    """A one-frame all-zero clip for ``model``'s inputs: (body, hand, hand_valid), None where
    unused; an absent person's hands are undetected."""
    config = model.config

    def zeros(nodes):
        return torch.zeros(1, config.in_channels, 1, nodes, config.num_person, dtype=like.dtype, device=like.device)

    if not model.uses_hand:
        return zeros(BODY.num_nodes), None, None
    hand_valid = torch.zeros(1, 1, 2, config.num_person, dtype=torch.bool, device=like.device)
    return zeros(BODY.num_nodes) if model.uses_body else None, zeros(HANDS.num_nodes), hand_valid


@torch.no_grad()
def refresh_absent_features(model: nn.Module) -> None:
    """(Re)compute the absent persons' features of a model rewired by :func:`skip_absent_persons`
    from its current weights: each classifier's input rows (M, C) for a clip of absent persons.
    Runs after ``model.load_state_dict`` by itself (a load_state_dict post-hook); call it after
    changing the weights in place otherwise. Computed on the ``reference`` backend, which runs
    anywhere (the model may be fused for a backend that runs only on the device it will be moved
    to)."""
    wrappers = [m for m in model.modules() if isinstance(m, AbsentPersonsClassifier)]
    hooks = [w.head.register_forward_hook(lambda module, args, out, w=w: w.absent_features.copy_(args[0]))
             for w in wrappers]
    backends = {m: m.impl for m in model.modules() if hasattr(m, "impl")}
    try:
        for m in backends:
            m.impl = "reference"
        model(*_zero_inputs(model, next(model.parameters())))  # every person absent: all rows run
    finally:
        for m, impl in backends.items():
            m.impl = impl
        for hook in hooks:
            hook.remove()


def _refresh_after_loading(model: nn.Module, incompatible_keys) -> None:
    refresh_absent_features(model)


def _hand_valid(args, kwargs) -> Optional[torch.Tensor]:
    return kwargs.get("hand_valid", args[2] if len(args) > 2 else None)


def _masks_without_validity(model: nn.Module, args, kwargs) -> bool:
    """Whether ``model`` masks undetected hands but the call gives no ``hand_valid``: its
    absent persons then attend their zero hands, unlike the precomputed features."""
    return model._masks_hands and _hand_valid(args, kwargs) is None


def _find_present_rows(model: nn.Module, args, kwargs) -> None:
    """Forward pre-hook: the rows of the persons with any non-zero input, when some are absent."""
    if torch.compiler.is_compiling():  # compiled calls run every row (wrappers ignore the state)
        return
    present = model._present_rows
    present.rows = None
    persons = [x for x in (*args, *kwargs.values()) if isinstance(x, torch.Tensor) and x.dim() == 5]
    if not persons or torch.is_grad_enabled() or len({(x.shape[0], x.shape[-1]) for x in persons}) > 1:
        return  # (inputs that disagree in N or M: the model's own check raises)
    if _masks_without_validity(model, args, kwargs):
        return
    seen = persons[0].ne(0).flatten(1, 3).any(1)  # (N, M); NaN counts as seen
    for x in persons[1:]:
        seen = seen | x.ne(0).flatten(1, 3).any(1)
    hand_valid = _hand_valid(args, kwargs)  # a detected hand counts as seen, even at zero input
    if isinstance(hand_valid, torch.Tensor) and hand_valid.dim() == 4 and hand_valid.shape[0] == seen.shape[0] \
            and hand_valid.shape[3] == seen.shape[1]:  # (N, T, 2, M); else the model's own check raises
        seen = seen | hand_valid.flatten(1, 2).any(1)
    if not bool(seen.all()) and bool(seen.any()):
        present.rows = seen.flatten()


def _forget_present_rows(model: nn.Module, args, out) -> None:
    if not torch.compiler.is_compiling():
        model._present_rows.rows = None


def skip_absent_persons(model: nn.Module) -> nn.Module:
    """Make an eval-mode model of :mod:`bharnet.models` skip the persons whose inputs are all
    zero (module docstring), in place; other models are returned unchanged. Returns ``model``."""
    norms = [(name, m) for name, m in model.named_modules() if isinstance(m, (DataNorm, PersonRows))]
    heads = [(name, m) for name, m in model.named_modules() if isinstance(m, Classifier)]
    if not isinstance(model, _Variant) or not norms or not heads or hasattr(model, "_present_rows"):
        return model
    present = model._present_rows = _PresentRows()  # hooks find it here (a copy gets its own)
    # whether its attention masks undetected hands (read by the pre-hook at every call)
    model._masks_hands = model.config.mask_missing_hands and any(isinstance(m, PersonRows) for _, m in norms)
    for name, norm in norms:
        model.set_submodule(name, PresentPersonsRows(norm, present))
    for name, head in heads:
        model.set_submodule(name, AbsentPersonsClassifier(head, present))
    model.register_forward_pre_hook(_find_present_rows, with_kwargs=True)
    model.register_forward_hook(_forget_present_rows, always_call=True)
    model.register_load_state_dict_post_hook(_refresh_after_loading)
    refresh_absent_features(model)
    return model
