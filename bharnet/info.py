"""Model size and cost table (``bharnet info``)."""
from __future__ import annotations

from typing import Dict, List

import torch
from torch.utils.flop_counter import FlopCounterMode

from .graphs import BODY, HANDS
from .models import MODELS, create_model
from .ops import use_backend


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def forward_flops(model: torch.nn.Module, frames: int = 64, persons: int = 2, channels: int = 3) -> int:
    """FLOPs of one forward pass on one clip, counted by ``torch.utils.flop_counter``:
    matrix multiplies and convolutions, a multiply-add counted as 2 FLOPs; elementwise ops,
    normalisation and softmax are not counted."""
    body = torch.randn(1, channels, frames, BODY.num_nodes, persons)
    hand = torch.randn(1, channels, frames, HANDS.num_nodes, persons)
    model.eval()
    with torch.no_grad(), use_backend("reference"), FlopCounterMode(display=False) as counter:
        model(body, hand)
    return counter.get_total_flops()


def model_table(num_classes: int = 120, frames: int = 64, persons: int = 2,
                preset: str = "full") -> List[Dict]:
    rows = []
    for name in MODELS:
        model = create_model(name, num_classes, preset=preset, num_person=persons)
        rows.append({"model": name, "params": count_parameters(model),
                     "gflops": forward_flops(model, frames, persons) / 1e9})
    return rows


def format_table(rows: List[Dict]) -> str:
    lines = [f"{'model':<16} {'params (M)':>10} {'GFLOPs/clip':>12}", "-" * 40]
    lines += [f"{r['model']:<16} {r['params'] / 1e6:>10.2f} {r['gflops']:>12.2f}" for r in rows]
    return "\n".join(lines)
