"""The BHaRNet variants and their single-expert baselines (DESIGN.md section 4)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch
from torch import nn

from ..graphs import BODY, HANDS, UNIFIED
from ..nn import CrossAttention, PoolingAttention, global_pool
from .backbone import Expert, PersonRows, check_input, pooled_validity
from .config import ModelConfig
from .losses import cross_entropy, noisy_or_log_probs, smoothed_nll


@dataclass
class ModelOutput:
    """``logits`` (N, K): the fused class scores (argmax = prediction); ``parts``: each part's
    logits by name (e.g. ``z_B``, ``z_H``, ``z_BE``...)."""

    logits: torch.Tensor
    parts: Dict[str, torch.Tensor]


# a pytree node, so that torch.export and torch.compile's graph outputs may carry it
torch.export.register_dataclass(ModelOutput, serialized_type_name="bharnet.ModelOutput")


class Classifier(nn.Module):
    """Pooled per-person features (N·M, C) → mean over persons → dropout → Linear → (N, K)."""

    def __init__(self, channels: int, num_classes: int, num_person: int, dropout: float):
        super().__init__()
        self.num_person = num_person
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        per_clip = pooled.view(-1, self.num_person, pooled.shape[-1]).mean(dim=1)
        return self.fc(self.dropout(per_clip))


class _Variant(nn.Module):
    # The options of VARIANT_OPTIONS (models.config) this variant reads; the rest it ignores.
    variant_options: Tuple[str, ...] = ()

    def __init__(self, num_classes: int, config: ModelConfig):
        super().__init__()
        self.num_classes = num_classes
        self.config = config

    def _checked(self, body, hand, hand_valid=None):
        if self.uses_body:
            check_input(body, "body", self.config, BODY.num_nodes)
        if self.uses_hand:
            check_input(hand, "hand", self.config, HANDS.num_nodes)
        if hand_valid is not None:
            _check_hand_valid(hand_valid, hand if self.uses_hand else body)
        if self.uses_body and self.uses_hand and (body.shape[0], body.shape[2]) != (hand.shape[0], hand.shape[2]):
            raise ValueError(f"body and hand must agree in N and T, got {tuple(body.shape)} and {tuple(hand.shape)}")
        parameter = next(self.parameters(), None)  # none in an nn.DataParallel replica
        for name, x in (("body", body), ("hand", hand)):
            if parameter is None or not getattr(self, f"uses_{name}"):
                continue
            if x.device != parameter.device:
                raise ValueError(f"{name} is on {x.device}, the model on {parameter.device}")
            if x.dtype != parameter.dtype and not torch.is_autocast_enabled(x.device.type):
                raise TypeError(f"{name} is {x.dtype}, the model {parameter.dtype} (convert one of them, "
                                "or run under torch.autocast)")

    def _ce(self, logits, target):
        return cross_entropy(logits, target, self.config.label_smoothing)


def _check_hand_valid(hand_valid, like: torch.Tensor) -> None:
    """Raise a clear error unless ``hand_valid`` is bool (N, T, 2, M) for the (checked) model
    input ``like`` (N, C, T, V, M), on its device."""
    N, _, T, _, M = like.shape
    expected = f"(N, T, 2, M) = {(N, T, 2, M)}"
    if not isinstance(hand_valid, torch.Tensor) or hand_valid.dtype != torch.bool:
        raise TypeError(f"hand_valid must be a bool tensor of shape {expected} (True where the hand is "
                        f"detected), got {getattr(hand_valid, 'dtype', type(hand_valid).__name__)}")
    if tuple(hand_valid.shape) != (N, T, 2, M):
        raise ValueError(f"hand_valid must have shape {expected}, got {tuple(hand_valid.shape)}")
    if hand_valid.device != like.device:
        raise ValueError(f"hand_valid is on {hand_valid.device}, the inputs on {like.device}")


class SingleExpert(_Variant):
    """``body``, ``hand`` (one expert alone) or ``unified`` (one expert on the 67-node graph,
    body and hand joints concatenated)."""

    def __init__(self, modality: str, num_classes: int, config: ModelConfig):
        super().__init__(num_classes, config)
        self.modality = modality
        self.uses_body = modality in ("body", "unified")
        self.uses_hand = modality in ("hand", "unified")
        graph = {"body": BODY, "hand": HANDS, "unified": UNIFIED}[modality]
        self.expert = Expert(graph, config)
        self.head = Classifier(self.expert.out_channels, num_classes, config.num_person, config.dropout)

    def forward(self, body: Optional[torch.Tensor] = None, hand: Optional[torch.Tensor] = None,
                hand_valid: Optional[torch.Tensor] = None) -> ModelOutput:
        """``hand_valid`` is accepted (and checked) as by the two-expert variants; an expert alone
        has no attention for it to mask."""
        self._checked(body, hand, hand_valid)
        x = {"body": body, "hand": hand}.get(self.modality)
        if x is None:
            x = torch.cat([body, hand], dim=3)
        z = self.head(global_pool(self.expert(x)))
        return ModelOutput(z, {f"z_{self.modality}": z})

    def loss(self, out: ModelOutput, target: torch.Tensor) -> torch.Tensor:
        return self._ce(out.logits, target)


class _TwoExperts(_Variant):
    """Both experts. ``forward(body, hand, hand_valid=None)``: ``hand_valid`` (N, T, 2, M) bool,
    True where a hand is detected (axis 2: left, right; a clip's as :func:`bharnet.data.clip_input`
    gives it). The variants with attention to the hands (BHaRNet-E, -P, -PAM) mask the hands'
    tokens where it is False (with ``mask_missing_hands``, the default): a body token attends
    only detected hands, and one whose hands are all missing gets no attention output (its
    residual passes it on). Without ``hand_valid`` every hand token is attended."""

    uses_body = uses_hand = True

    def ensemble_loss(self, z_body, z_hand, target):
        """``L_cpl + L_B + L_H = CE(z_B + z_H) + CE(z_B) + CE(z_H)``."""
        return self._ce(z_body + z_hand, target) + self._ce(z_body, target) + self._ce(z_hand, target)

    def hand_mask(self, hand_valid: Optional[torch.Tensor], features: torch.Tensor) -> Optional[torch.Tensor]:
        """The hand nodes' validity (N·M, T′, 42) bool at the time steps of hand ``features``
        (N·M, C, T′, 42) (:func:`~bharnet.models.backbone.pooled_validity`), or None: nothing to
        mask. Reads ``self.hand_rows``, which the masking variants have."""
        if hand_valid is None or not self.config.mask_missing_hands:
            return None
        per_hand = pooled_validity(self.hand_rows(hand_valid), features.shape[2])
        return per_hand.repeat_interleave(HANDS.num_nodes // 2, dim=2)


class BHaRNetVanilla(_TwoExperts):
    """Body and hand experts, logits summed; loss ``CE(z_B + z_H) + CE(z_B) + CE(z_H)``."""

    def __init__(self, num_classes: int, config: ModelConfig):
        super().__init__(num_classes, config)
        self.body_expert, self.hand_expert = Expert(BODY, config), Expert(HANDS, config)
        width = self.body_expert.out_channels
        self.body_head = Classifier(width, num_classes, config.num_person, config.dropout)
        self.hand_head = Classifier(width, num_classes, config.num_person, config.dropout)

    def forward(self, body: torch.Tensor, hand: torch.Tensor, hand_valid: Optional[torch.Tensor] = None) -> ModelOutput:
        self._checked(body, hand, hand_valid)  # no attention: hand_valid has nothing to mask
        z_b = self.body_head(global_pool(self.body_expert(body)))
        z_h = self.hand_head(global_pool(self.hand_expert(hand)))
        return ModelOutput(z_b + z_h, {"z_B": z_b, "z_H": z_h})

    def loss(self, out: ModelOutput, target: torch.Tensor) -> torch.Tensor:
        return self.ensemble_loss(out.parts["z_B"], out.parts["z_H"], target)


class BHaRNetPAM(BHaRNetVanilla):
    """Vanilla BHaRNet whose global pooling is replaced by the Pooling-Attention Module
    (*reconstruction*): each modality pools with attention to the other."""

    variant_options = ("heads", "mask_missing_hands")

    def __init__(self, num_classes: int, config: ModelConfig):
        super().__init__(num_classes, config)
        width = self.body_expert.out_channels
        self.body_pam = PoolingAttention(width, config.heads, impl=config.impl)
        self.hand_pam = PoolingAttention(width, config.heads, impl=config.impl)
        self.hand_rows = PersonRows()

    def forward(self, body: torch.Tensor, hand: torch.Tensor, hand_valid: Optional[torch.Tensor] = None) -> ModelOutput:
        self._checked(body, hand, hand_valid)
        f_b, f_h = self.body_expert(body), self.hand_expert(hand)
        z_b = self.body_head(self.body_pam(f_b, f_h, self.hand_mask(hand_valid, f_h)))
        z_h = self.hand_head(self.hand_pam(f_h, f_b))
        return ModelOutput(z_b + z_h, {"z_B": z_b, "z_H": z_h})


class BHaRNetE(_TwoExperts):
    """BHaRNet-E: per modality a stem (blocks 1..stem_depth), then an expertized branch and an
    interactive branch (the remaining blocks each). The interactive branches exchange
    information by bidirectional cross-attention (*reconstruction*: pre-LN MHA with residual at
    the end of the branches). Parts ``z_BE, z_BI, z_HI, z_HE``; fused logits are their sum;
    loss ``CE(Σ z) + CE(z_BE + z_BI) + CE(z_HE + z_HI)``."""

    variant_options = ("heads", "attention_mode", "stem_depth", "mask_missing_hands")

    def __init__(self, num_classes: int, config: ModelConfig):
        super().__init__(num_classes, config)
        split, depth = config.stem_depth, len(config.channels)
        if not 0 < split < depth:  # checked here: the other variants have no stem
            raise ValueError(f"stem_depth must be in [1, {depth - 1}], got {split}")
        heads = {}
        for name, graph in (("body", BODY), ("hand", HANDS)):
            setattr(self, f"{name}_stem", Expert(graph, config, (0, split)))
            for branch in ("expert", "inter"):
                setattr(self, f"{name}_{branch}", Expert(graph, config, (split, depth)))
                heads[f"{name}_{branch}"] = Classifier(config.channels[-1], num_classes,
                                                       config.num_person, config.dropout)
        self.heads = nn.ModuleDict(heads)
        self.body_attention = CrossAttention(config.channels[-1], config.heads, config.attention_mode,
                                             impl=config.impl)
        self.hand_attention = CrossAttention(config.channels[-1], config.heads, config.attention_mode,
                                             impl=config.impl)
        self.hand_rows = PersonRows()

    def part_logits(self, body: torch.Tensor, hand: torch.Tensor,
                    hand_valid: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
        self._checked(body, hand, hand_valid)
        s_b, s_h = self.body_stem(body), self.hand_stem(hand)
        i_b, i_h = self.body_inter(s_b), self.hand_inter(s_h)
        features = {
            "body_expert": self.body_expert(s_b),
            "body_inter": self.body_attention(i_b, i_h, self.hand_mask(hand_valid, i_h)),
            "hand_inter": self.hand_attention(i_h, i_b),
            "hand_expert": self.hand_expert(s_h),
        }
        names = {"body_expert": "z_BE", "body_inter": "z_BI", "hand_inter": "z_HI", "hand_expert": "z_HE"}
        return {names[k]: self.heads[k](global_pool(f)) for k, f in features.items()}

    def forward(self, body: torch.Tensor, hand: torch.Tensor, hand_valid: Optional[torch.Tensor] = None) -> ModelOutput:
        parts = self.part_logits(body, hand, hand_valid)
        return ModelOutput(sum(parts.values()), parts)

    def loss(self, out: ModelOutput, target: torch.Tensor) -> torch.Tensor:
        p = out.parts
        return self.ensemble_loss(p["z_BE"] + p["z_BI"], p["z_HE"] + p["z_HI"], target)


class BHaRNetP(BHaRNetE):
    """BHaRNet-P: BHaRNet-E's interactive branches with Noisy-OR fusion (*reconstruction*) of
    ``z_B = z_BE + z_BI`` and ``z_H = z_HE + z_HI``: ``p = 1 − (1 − softmax z_B)(1 − softmax z_H)``.
    ``logits`` are ``log(p / Σp)`` (argmax p is the prediction); loss
    ``NLL(p / Σp) + CE(z_B) + CE(z_H)``."""

    def forward(self, body: torch.Tensor, hand: torch.Tensor, hand_valid: Optional[torch.Tensor] = None) -> ModelOutput:
        parts = self.part_logits(body, hand, hand_valid)
        parts["z_B"] = parts["z_BE"] + parts["z_BI"]
        parts["z_H"] = parts["z_HE"] + parts["z_HI"]
        return ModelOutput(noisy_or_log_probs(parts["z_B"], parts["z_H"]), parts)

    def loss(self, out: ModelOutput, target: torch.Tensor) -> torch.Tensor:
        fused = smoothed_nll(out.logits, target, self.config.label_smoothing)
        return fused + self._ce(out.parts["z_B"], target) + self._ce(out.parts["z_H"], target)
