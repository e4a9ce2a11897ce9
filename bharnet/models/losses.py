"""Losses: label-smoothed cross-entropy and BHaRNet's Noisy-OR fusion."""
from __future__ import annotations

import torch


def smoothed_nll(log_probs: torch.Tensor, target: torch.Tensor, smoothing: float = 0.0) -> torch.Tensor:
    """``(1 − ε)·(−log p_y) + ε·mean_k(−log p_k)``, averaged over the batch (ε = ``smoothing``)."""
    if target.shape != log_probs.shape[:1]:  # gather would take the first len(target) rows
        raise ValueError(f"target must hold one class index per sample, shape ({log_probs.shape[0]},), "
                         f"got shape {tuple(target.shape)}")
    nll = -log_probs.gather(1, target[:, None]).squeeze(1)
    if smoothing:  # else 0 * (-inf) would make a -inf log-probability of another class NaN
        nll = (1 - smoothing) * nll - smoothing * log_probs.mean(dim=1)
    return nll.mean()


def _at_least_float32(x: torch.Tensor) -> torch.Tensor:
    """float16/bfloat16 (autocast) to float32; float32 and float64 as they are."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def cross_entropy(logits: torch.Tensor, target: torch.Tensor, smoothing: float = 0.0) -> torch.Tensor:
    """Label-smoothed cross-entropy of ``logits`` (N, K) against class indices ``target`` (N,),
    in float32 or, for float64 logits, float64."""
    return smoothed_nll(_at_least_float32(logits).log_softmax(dim=1), target, smoothing)


def noisy_or_log_probs(z_body: torch.Tensor, z_hand: torch.Tensor) -> torch.Tensor:
    """Noisy-OR fusion (*reconstruction*): ``p = 1 − (1 − softmax z_B)(1 − softmax z_H)``.

    A class is on if either expert turns it on. Returns ``log(p / Σ_k p_k)``, computed in log
    space from the log-softmaxes ``a``, ``b`` (float32; float64 for float64 logits) as ``log p = logaddexp(a, b + log(1 − e^a))``
    (``p = e^a + e^b (1 − e^a)``): a class that both experts rule out by a wide margin gets a
    finite log-probability, where the probabilities themselves underflow to 0 (logit gaps of
    about 104 in float32: log 0 made the loss infinite, and its gradient overflowed from gaps of
    about 95). ``1 − e^a`` is kept >= 1e-7, where ``e^b (1 − e^a)`` is negligible next to ``e^a``.
    """
    log_body, log_hand = _at_least_float32(z_body).log_softmax(dim=1), _at_least_float32(z_hand).log_softmax(dim=1)
    log_p = torch.logaddexp(log_body, log_hand + torch.log1p(-log_body.exp().clamp(max=1 - 1e-7)))
    return log_p - log_p.logsumexp(dim=1, keepdim=True)
