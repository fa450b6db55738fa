"""Monte Carlo summaries: calibrated mean probabilities, the entropy split into aleatoric and epistemic parts, their
standard errors, and attention maps.

References:
    Depeweg et al. "Decomposition of Uncertainty in Bayesian Deep Learning." ICML 2018 (entropy split).
    Abnar & Zuidema. "Quantifying Attention Flow in Transformers." ACL 2020 (attention rollout).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class UncertaintySummary:
    """Monte Carlo summary of a batch. Shapes use B images and C classes."""

    probs: Tensor  # (B, C) calibrated mean probabilities
    total: Tensor  # (B,) predictive entropy, nats
    aleatoric: Tensor  # (B,) expected entropy, nats
    epistemic: Tensor  # (B,) mutual information, nats
    std: Tensor  # (B, C) std over samples of the calibrated sample probabilities

    @property
    def confidence(self) -> Tensor:
        return self.probs.max(dim=-1).values

    @property
    def prediction(self) -> Tensor:
        return self.probs.argmax(dim=-1)


def entropy(p: Tensor) -> Tensor:
    return -(p * torch.log(p.clamp_min(1e-12))).sum(dim=-1)


def summarize(logit_samples: Tensor, temperature: float = 1.0) -> UncertaintySummary:
    """Summarise Monte Carlo logits (S, B, C) with one temperature applied to every sample.

    Example:
        >>> s = summarize(torch.tensor([[[0.0, 0.0]], [[0.0, 0.0]]]))
        >>> round(float(s.total[0]), 4), round(float(s.epistemic[0]), 4)
        (0.6931, 0.0)
    """
    if logit_samples.dim() != 3:
        raise ValueError(f"logit_samples must be (S, B, C), got shape {tuple(logit_samples.shape)}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    z = logit_samples.double() / temperature
    p_s = torch.softmax(z, dim=-1)  # (S, B, C)
    p = p_s.mean(dim=0)
    total = entropy(p)
    aleatoric = entropy(p_s).mean(dim=0)
    epistemic = (total - aleatoric).clamp_min(0.0)
    std = p_s.std(dim=0, unbiased=False)
    return UncertaintySummary(p.float(), total.float(), aleatoric.float(), epistemic.float(), std.float())


def attention_maps(attention: Tensor, pool: str = "cls") -> tuple[Tensor, Tensor]:
    """Per-block query -> patch maps and rollout from applied attention.

    Args:
        attention: (S, B, depth, N, N) row-stochastic attention, token 0 is the class token.
        pool: "cls" reads the class token's row; "mean" averages the patch rows (what a mean-pooled head reads).

    Returns:
        maps (B, depth, g, g) and rollout (B, g, g), each map normalised to sum to 1 over patches.
    """
    a = attention.double().mean(dim=0)  # (B, depth, N, N)
    b, depth, n, _ = a.shape
    g = int(round((n - 1) ** 0.5))
    if pool == "cls":
        rows = a[:, :, 0, 1:]
    else:
        rows = a[:, :, 1:, 1:].mean(dim=2)
    maps = rows / rows.sum(dim=-1, keepdim=True).clamp_min(1e-12)
    eye = torch.eye(n, dtype=a.dtype)
    roll = eye.expand(b, n, n).clone()
    for layer in range(depth):
        a_res = 0.5 * a[:, layer] + 0.5 * eye
        a_res = a_res / a_res.sum(dim=-1, keepdim=True)
        roll = a_res @ roll
    r_rows = roll[:, 0, 1:] if pool == "cls" else roll[:, 1:, 1:].mean(dim=1)
    r_rows = r_rows / r_rows.sum(dim=-1, keepdim=True).clamp_min(1e-12)
    return maps.reshape(b, depth, g, g).float(), r_rows.reshape(b, g, g).float()


def standard_error(values: Tensor) -> Tensor:
    """Standard error of the mean over dim 0 of (n, ...) values; inf when n < 2 (nothing to estimate from)."""
    n = values.shape[0]
    if n < 2:
        return torch.full(values.shape[1:], math.inf, dtype=values.dtype, device=values.device)
    return values.std(dim=0, unbiased=True) / math.sqrt(n)


def uncertainty_standard_errors(sample_probs: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Monte Carlo standard errors of total, aleatoric and epistemic uncertainty from n sample probabilities.

    Delta method: ``H[p]`` moves by ``-sum_c log p_c (p_s,c - p_c)`` per sample (its influence), aleatoric
    ``mean_s H[p_s]`` is a plain mean, and epistemic is their difference, so each SE is the sample standard
    deviation of the per-sample terms over sqrt(n).

    Args:
        sample_probs: (n, B, C) calibrated probabilities of each sample.

    Returns:
        (B,) standard errors of total, aleatoric and epistemic uncertainty, nats (inf when n < 2).
    """
    p = sample_probs.mean(dim=0)
    h_s = entropy(sample_probs)  # (n, B)
    influence = -((sample_probs - p) * torch.log(p.clamp_min(1e-12))).sum(dim=-1)  # (n, B)
    return standard_error(influence), standard_error(h_s), standard_error(influence - h_s)
