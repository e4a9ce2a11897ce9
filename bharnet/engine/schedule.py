"""Learning-rate schedule: linear warm-up, then cosine decay, evaluated per iteration."""
from __future__ import annotations

import math


def warmup_cosine(step: int, total_steps: int, warmup_steps: int, base_lr: float, min_lr: float = 0.0) -> float:
    """``base_lr·(step+1)/warmup_steps`` during warm-up, then
    ``min_lr + (base_lr − min_lr)·(1 + cos(π·progress))/2`` with progress from 0 to 1."""
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
