"""The one inference function shared by the HTTP service, the batch-scoring CLI, evaluation and benchmarks.

``predict`` takes any backend that can turn images and explicit noise into Monte Carlo logits (the PyTorch
model, or the ONNX Runtime predictor in ``export.runtime``), draws the noise per image from that image's seed
(so an answer does not depend on which other images share the batch, up to float32 rounding of about 1e-6:
CPU matrix kernels sum in a batch-shape-dependent order; equal batch shapes give bit-identical answers), and
summarises the samples:

* calibrated mean probabilities ``p = mean_s softmax(z_s / T)``,
* total uncertainty ``H[p]`` (predictive entropy), aleatoric ``mean_s H[p_s]`` (expected entropy) and
  epistemic ``H[p] - mean_s H[p_s]`` (mutual information between label and noise), all in nats,
* the per-class standard deviation of the sample probabilities,
* the conformal prediction set and the accept/review decision from the stored calibration,
* optionally attention maps (per block, query -> patches, mean over heads and samples) and rollout.

With ``num_samples="auto"`` (``AdaptiveSampling``) the samples are drawn in rounds and an image stops as soon as
its label, its accept/review decision and its uncertainty figures are settled: each margin (top class over the
runner-up; decision score over its threshold) exceeds ``z`` standard errors of the Monte Carlo mean, and ``z``
standard errors of the total, aleatoric and epistemic uncertainty (delta method) are below ``tolerance`` nats.
Image b's noise is drawn sample by sample from its seed, so the first n samples of a longer draw are exactly
the samples of a draw of n: an adaptive answer that used n samples is the fixed ``num_samples=n`` answer with the
same seed (bit-identical when the passes have equal shapes, e.g. a lone image answered in one round; otherwise
within the float32 rounding that batch composition causes).

References:
    Depeweg et al. "Decomposition of Uncertainty in Bayesian Deep Learning." ICML 2018 (entropy split).
    Abnar & Zuidema. "Quantifying Attention Flow in Transformers." ACL 2020 (attention rollout).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple, Sequence

import torch
from torch import Tensor

from calibration.conformal import prediction_sets
from snodevit.inference.adaptive import AdaptiveSampling, adaptive_logits, gate_by_count, summarize_by_count
from snodevit.inference.decide import decide_outcomes
from snodevit.inference.fitted import Calibration, OodGate
from snodevit.inference.params import AUTO, NumSamples, check_num_samples, default_alpha, resolve_seeds
from snodevit.inference.passes import SamplingBackend, draw_noise, run_passes
from snodevit.inference.precision import Precision, resolve_precision
from snodevit.inference.summary import UncertaintySummary, attention_maps, summarize


@dataclass
class Prediction:
    """Everything the service and the CLI report for a batch of images."""

    summary: UncertaintySummary
    logits: Tensor  # (S, B, C) raw Monte Carlo logits; adaptive: S = the most any image used, unused rows NaN
    seeds: list[int]  # the seed of each image's noise
    prediction_sets: Tensor | None  # (B, C) bool at ``alpha``, None when not calibrated
    alpha: float | None
    accept: Tensor  # (B,) bool
    reasons: list[str]
    num_samples: list[int]  # samples each image's answer used (all equal unless adaptive)
    attention: Tensor | None = None  # (B, depth, g, g) query -> patch attention per block
    rollout: Tensor | None = None  # (B, g, g)
    reason_codes: list[str] = field(default_factory=list)  # per image, one of REASON_CODES
    ood_score: Tensor | None = None  # (B,) float64 gate score, None without a gate
    out_of_distribution: Tensor | None = None  # (B,) bool: the gate fired, None without a gate
    ood_gate: OodGate | None = None  # the gate that made ``ood_score`` and ``out_of_distribution``
    precision: Precision = "fp32"  # what the forward passes ran in (the figures are fp32 whatever it is)
    gate_thresholds: Tensor | None = None  # (B,) float64: the gate threshold fitted for each image's sample count


@torch.no_grad()
def predict(backend: SamplingBackend, images: Tensor, *, num_samples: NumSamples,
            seed: int | Sequence[int] | None = None, calibration: Calibration | None = None,
            alpha: float | None = None, attention: bool = False, pool: str = "cls",
            adaptive: AdaptiveSampling | None = None, precision: str = "fp32") -> Prediction:
    """Monte Carlo prediction with calibrated, decomposed uncertainty for a batch of preprocessed images.

    Args:
        backend: the PyTorch model or an ONNX Runtime predictor (see ``SamplingBackend``).
        images: (B, C, H, W) preprocessed images.
        num_samples: S Monte Carlo samples per image, folded into the batch (``sample_in_passes``); or "auto":
            sample in rounds and stop each image when its answer is settled (``adaptive``, see ``settled``).
        seed: one int for all images, one per image, or None to draw (the seeds are returned).
        calibration: temperature, conformal thresholds and decision rule; identity when None.
        alpha: miscoverage of the conformal set; None uses the smallest fitted alpha, no set if none fitted.
        attention: also compute attention maps and rollout (uses the explicit attention path).
        pool: the model's pooling, which decides whose attention row the maps show.
        adaptive: the stopping rule of ``num_samples="auto"``; None uses ``AdaptiveSampling()``.
        precision: "fp32", "bf16" (autocast; the torch backend only) or "auto" (``snodevit.inference.precision``:
            bf16 where the device multiplies bf16 natively). The samples are cast back to fp32 before they are summarised.

    Returns:
        A ``Prediction`` for the batch; ``num_samples`` says how many samples each image used.

    Raises:
        ValueError: a bad ``num_samples``, seed, alpha or precision (bf16 of a backend other than the torch
            model), or ``adaptive`` given with an integer ``num_samples``.
    """
    check_num_samples(num_samples)
    if adaptive is not None and num_samples != AUTO:
        raise ValueError(f"adaptive is the rule of num_samples='auto'; got num_samples={num_samples!r}")
    cal = calibration or Calibration()
    used_precision = resolve_precision(precision, images.device,
                                       "torch" if isinstance(backend, torch.nn.Module) else "onnx")
    seeds = resolve_seeds(seed, images.shape[0])
    if num_samples == AUTO:
        drawn = _adaptive_samples(backend, images, seeds, cal, adaptive or AdaptiveSampling(), attention,
                                  used_precision)
    else:
        assert isinstance(num_samples, int)
        drawn = _fixed_samples(backend, images, seeds, num_samples, cal, attention, used_precision)
    sets, used_alpha = _conformal_sets(drawn.summary, cal, alpha)
    out = decide_outcomes(drawn.summary, cal, drawn.ood_score, drawn.counts)
    maps, rollout = _attention(drawn, pool, adaptive=num_samples == AUTO)
    gate = cal.for_samples(drawn.counts[0]).ood_gate if drawn.counts else cal.ood_gate
    return Prediction(drawn.summary, drawn.logits, seeds, sets, used_alpha, out.accept, out.reasons, drawn.counts,
                      maps, rollout, reason_codes=out.codes, ood_score=drawn.ood_score,
                      out_of_distribution=out.flagged, ood_gate=gate, precision=used_precision,
                      gate_thresholds=out.gate_thresholds)


class _Drawn(NamedTuple):
    """The samples of a batch and what is computed from them alone."""

    logits: Tensor  # (S, B, C); adaptive: S = the most any image used, NaN where an image stopped earlier
    attention: Tensor | None  # (S, B, depth, N, N) or None
    summary: UncertaintySummary
    counts: list[int]  # samples each image used
    ood_score: Tensor | None  # (B,) gate score, None without a gate


def _fixed_samples(backend: SamplingBackend, images: Tensor, seeds: list[int], num_samples: int, cal: Calibration,
                   attention: bool, precision: Precision) -> _Drawn:
    noise = draw_noise(backend, seeds, num_samples, device=images.device, dtype=images.dtype)
    logits, attn, feats = run_passes(backend, images, noise, cal, attention, precision)
    gate = None if cal.ood_gate is None else cal.ood_gate.image_scores(logits, feats, cal.temperature)
    return _Drawn(logits, attn, summarize(logits, cal.temperature), [num_samples] * images.shape[0], gate)


def _adaptive_samples(backend: SamplingBackend, images: Tensor, seeds: list[int], cal: Calibration,
                      rule: AdaptiveSampling, attention: bool, precision: Precision) -> _Drawn:
    noise = draw_noise(backend, seeds, rule.max_samples, device=images.device, dtype=images.dtype)
    logits, attn, feats, used = adaptive_logits(backend, images, noise, cal, rule, attention, precision)
    most = int(used.max())
    logits = logits[:most]
    attn = None if attn is None else attn[:most]
    gate = None if cal.ood_gate is None else gate_by_count(cal.ood_gate, logits, feats, used, cal.temperature)
    return _Drawn(logits, attn, summarize_by_count(logits, used, cal.temperature), used.tolist(), gate)


def _conformal_sets(summary: UncertaintySummary, cal: Calibration,
                    alpha: float | None) -> tuple[Tensor | None, float | None]:
    """(B, C) prediction sets at ``alpha`` (``default_alpha`` when None) and the alpha used; (None, None) for a
    model without conformal calibration, which refuses an explicit alpha."""
    if cal.conformal_thresholds:
        used = alpha if alpha is not None else default_alpha(cal)
        assert used is not None
        return prediction_sets(summary.probs, cal.threshold_for(used), cal.conformal_score), used
    if alpha is not None:
        raise ValueError("this model has no conformal calibration; run `snodevit calibrate` first")
    return None, None


def _attention(drawn: _Drawn, pool: str, adaptive: bool) -> tuple[Tensor | None, Tensor | None]:
    """Maps and rollout of the batch (each image over its own samples when adaptive), or (None, None)."""
    if drawn.attention is None:
        return None, None
    if not adaptive:
        return attention_maps(drawn.attention, pool)
    per_image = [attention_maps(drawn.attention[:n, i:i + 1], pool) for i, n in enumerate(drawn.counts)]
    return torch.cat([m for m, _ in per_image]), torch.cat([r for _, r in per_image])
