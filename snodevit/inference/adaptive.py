"""Adaptive sampling (``num_samples="auto"``): draw samples in rounds and stop each image as soon as its label, its
decision and its uncertainty figures are settled (see :func:`settled`)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from snodevit.inference.fitted import Calibration, OodGate
from snodevit.inference.passes import SamplingBackend, run_passes
from snodevit.inference.precision import Precision
from snodevit.inference.summary import (UncertaintySummary, entropy, standard_error, summarize,
                                        uncertainty_standard_errors)


@dataclass(frozen=True)
class AdaptiveSampling:
    """Stopping rule of ``num_samples="auto"``: sample in rounds until the answer is settled or ``max_samples``."""

    max_samples: int = 32  # S_max: no image gets more samples
    first_round: int = 8  # samples every image gets before the first check
    round_size: int = 8  # samples added to each unsettled image per later round
    z: float = 3.0  # a margin is settled when it exceeds z standard errors of its Monte Carlo estimate
    tolerance: float = 0.05  # nats: z standard errors of total / aleatoric / epistemic uncertainty must be below it

    def __post_init__(self) -> None:
        for name in ("max_samples", "first_round", "round_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"AdaptiveSampling.{name} must be an integer >= 1, got {value!r}")
        if self.first_round > self.max_samples:
            raise ValueError(f"AdaptiveSampling.first_round ({self.first_round}) must be <= max_samples "
                             f"({self.max_samples})")
        if not (self.z > 0 and math.isfinite(self.z)):
            raise ValueError(f"AdaptiveSampling.z must be a finite number > 0, got {self.z!r}")
        if not (self.tolerance > 0 and math.isfinite(self.tolerance)):
            raise ValueError(f"AdaptiveSampling.tolerance must be a finite number > 0, got {self.tolerance!r}")

    def rounds(self) -> list[int]:
        """Cumulative sample counts at which the rule checks: first_round, +round_size, ..., max_samples."""
        ends = list(range(self.first_round, self.max_samples, self.round_size))
        return ends + [self.max_samples]


def settled(logit_samples: Tensor, calibration: Calibration, rule: AdaptiveSampling,
            features: Tensor | None = None) -> Tensor:
    """Which images' answers the adaptive rule considers settled after the samples so far.

    With calibrated sample probabilities ``p_s`` (n, B, C) and their mean ``p``, an image is settled when

    * label: ``p[c1] - p[c2] > z * SE(p_s[c1] - p_s[c2])`` (top class over the runner-up);
    * decision: ``|score - threshold| > z * SE(score)`` for the calibrated accept/review rule (confidence
      ``p[c1]``, or epistemic uncertainty); always settled when no threshold is calibrated;
    * uncertainty: ``z * SE <= tolerance`` for total, aleatoric and epistemic uncertainty
      (``uncertainty_standard_errors``);
    * out-of-distribution gate: ``|score - threshold| > z * SE``, with SE the standard error of the mean of the
      per-sample gate scores (``OodGate.sample_scores``; from ``features`` (n, B, G, D) for the feature-density
      gate); for a gate on mutual information, its delta-method SE.

    SE is the sample standard deviation over sqrt(n); with fewer than 2 samples nothing is settled.

    Args:
        logit_samples: (n, B, C) raw logits.
        calibration: temperature and decision rule.
        rule: ``z`` and ``tolerance``.

    Returns:
        (B,) bool.
    """
    p_s = torch.softmax(logit_samples.double() / calibration.temperature, dim=-1)  # (n, B, C)
    p = p_s.mean(dim=0)  # (B, C)
    top = p.topk(min(2, p.shape[-1]), dim=-1).indices  # (B, 2)
    p_top = p_s.gather(-1, top[None].expand(p_s.shape[0], -1, -1))  # (n, B, 2)
    if p.shape[-1] > 1:
        diff = p_top[..., 0] - p_top[..., 1]
        label_ok = diff.mean(dim=0) > rule.z * standard_error(diff)
    else:
        label_ok = torch.ones(p.shape[0], dtype=torch.bool, device=p.device)
    se_total, se_alea, se_epi = uncertainty_standard_errors(p_s)
    unc_ok = rule.z * torch.stack((se_total, se_alea, se_epi)).amax(dim=0) <= rule.tolerance
    if calibration.decision_threshold is None:
        decision_ok = torch.ones_like(label_ok)
    else:
        thr = calibration.decision_threshold
        if calibration.decision_score == "confidence":
            margin, se = (p_top[..., 0].mean(dim=0) - thr).abs(), standard_error(p_top[..., 0])
        elif calibration.decision_score == "epistemic":
            epistemic = (entropy(p) - entropy(p_s).mean(dim=0)).clamp_min(0.0)
            margin, se = (epistemic - thr).abs(), se_epi
        else:
            raise ValueError(f"decision_score must be 'confidence' or 'epistemic', got {calibration.decision_score!r}")
        decision_ok = margin > rule.z * se
    gate = calibration.ood_gate
    if gate is not None and math.isfinite(gate.threshold):
        t = calibration.temperature
        if gate.score == "mutual_information":
            epistemic = (entropy(p) - entropy(p_s).mean(dim=0)).clamp_min(0.0)
            margin, se = (epistemic - gate.threshold).abs(), se_epi
        else:
            margin = (gate.image_scores(logit_samples, features, t) - gate.threshold).abs().to(p.device)
            se = standard_error(gate.sample_scores(logit_samples, features, t)).to(p.device)
        decision_ok = decision_ok & (margin > rule.z * se)
    return label_ok & decision_ok & unc_ok


def adaptive_logits(backend: SamplingBackend, images: Tensor, noise: Tensor, cal: Calibration,
                     rule: AdaptiveSampling, attention: bool,
                     precision: Precision) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor]:
    """Sample in rounds, dropping settled images. Returns logits (S_max, B, C) with NaN where unused, the
    attention (S_max, B, depth, N, N) or None, the gate features (S_max, B, G, D) or None, and the samples used
    per image (B,)."""
    b = images.shape[0]
    used = torch.zeros(b, dtype=torch.long)
    active = torch.arange(b)
    logits: Tensor | None = None
    attn: Tensor | None = None
    feats: Tensor | None = None
    start = 0
    for end in rule.rounds():
        sel = active.to(images.device)
        part, part_attn, part_feats = run_passes(backend, images[sel], noise[start:end][:, sel], cal, attention,
                                                  precision)
        if logits is None:
            logits = part.new_full((rule.max_samples, b, part.shape[-1]), math.nan)
        logits[start:end, sel] = part
        if part_attn is not None:
            if attn is None:
                attn = part_attn.new_zeros((rule.max_samples, b, *part_attn.shape[2:]))
            attn[start:end, sel] = part_attn
        if part_feats is not None:
            if feats is None:
                feats = part_feats.new_zeros((rule.max_samples, b, *part_feats.shape[2:]))
            feats[start:end, sel] = part_feats
        used[active] = end
        if end == rule.max_samples:
            break
        done = settled(logits[:end, sel], cal.for_samples(end), rule,
                       None if feats is None else feats[:end, sel]).cpu()
        active = active[~done]
        if active.numel() == 0:
            break
        start = end
    assert logits is not None
    return logits, attn, feats, used


def gate_by_count(gate: OodGate, logits: Tensor, feats: Tensor | None, used: Tensor, temperature: float) -> Tensor:
    """(B,) gate score of each image over its own first ``used[b]`` samples (equal counts scored together)."""
    out = torch.empty(logits.shape[1], dtype=torch.float64)
    for n in sorted(set(used.tolist())):
        idx = (used == n).nonzero().flatten()
        dev = idx.to(logits.device)
        out[idx] = gate.image_scores(logits[:n, dev], None if feats is None else feats[:n, dev], temperature)
    return out


def summarize_by_count(logits: Tensor, used: Tensor, temperature: float) -> UncertaintySummary:
    """``summarize`` of each image over its own first ``used[b]`` samples (images with equal counts together,
    so each image's figures come from the same computation as a fixed-S call)."""
    parts: dict[int, tuple[Tensor, UncertaintySummary]] = {}
    for n in sorted(set(used.tolist())):
        idx = (used == n).nonzero().flatten().to(logits.device)
        parts[n] = (idx, summarize(logits[:n, idx], temperature))
    b, c = logits.shape[1:]
    out = UncertaintySummary(logits.new_empty(b, c), logits.new_empty(b), logits.new_empty(b), logits.new_empty(b),
                             logits.new_empty(b, c))
    for idx, s in parts.values():
        for name in ("probs", "total", "aleatoric", "epistemic", "std"):
            getattr(out, name)[idx] = getattr(s, name).to(logits.dtype)
    return out
