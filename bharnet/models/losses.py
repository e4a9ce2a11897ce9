"""Losses: label-smoothed cross-entropy and BHaRNet's Noisy-OR fusion."""
from __future__ import annotations

import torch


def smoothed_nll(log_probs: torch.Tensor, target: torch.Tensor, smoothing: float = 0.0) -> torch.Tensor:
    """``(1 − ε)·(−log p_y) + ε·mean_k(−log p_k)``, averaged over the batch (ε = ``smoothing``)."""
    nll = -log_probs.gather(1, target[:, None]).squeeze(1)
    return ((1 - smoothing) * nll - smoothing * log_probs.mean(dim=1)).mean()


def cross_entropy(logits: torch.Tensor, target: torch.Tensor, smoothing: float = 0.0) -> torch.Tensor:
    """Label-smoothed cross-entropy of ``logits`` (N, K) against class indices ``target`` (N,)."""
    return smoothed_nll(logits.float().log_softmax(dim=1), target, smoothing)


def noisy_or_log_probs(z_body: torch.Tensor, z_hand: torch.Tensor) -> torch.Tensor:
    """Noisy-OR fusion (*reconstruction*): ``p = 1 − (1 − softmax z_B)(1 − softmax z_H)``.

    A class is on if either expert turns it on. Returns ``log(p / Σ_k p_k)``; ``p_k`` lies in
    [0, 1] and is at least ``max(softmax z_B, softmax z_H)_k > 0``, so the log is finite.
    """
    p_body, p_hand = z_body.float().softmax(dim=1), z_hand.float().softmax(dim=1)
    p = p_body + p_hand - p_body * p_hand
    return p.log() - p.sum(dim=1, keepdim=True).log()
