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

References:
    Depeweg et al. "Decomposition of Uncertainty in Bayesian Deep Learning." ICML 2018 (entropy split).
    Abnar & Zuidema. "Quantifying Attention Flow in Transformers." ACL 2020 (attention rollout).
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from typing import Any, Protocol, Sequence

import torch
from torch import Tensor

MAX_SEED = 2**63 - 1


class SamplingBackend(Protocol):
    """What ``predict`` needs from a model: the noise shape and folded Monte Carlo logits."""

    def noise_shape(self, batch_size: int, num_samples: int = 1) -> tuple[int, ...]: ...

    def sample_logits(self, images: Tensor, num_samples: int | None = None, noise: Tensor | None = None, *,
                      return_attention: bool = False) -> Tensor | tuple[Tensor, Tensor]: ...


@dataclass(frozen=True)
class Calibration:
    """Post-hoc calibration fitted by `snodevit calibrate`, stored with the model and applied by ``predict``."""

    temperature: float = 1.0  # T: every sample's logits are divided by T before averaging
    conformal_score: str = "aps"  # "lac" or "aps" non-conformity score of the prediction sets
    conformal_thresholds: dict[str, float] = field(default_factory=dict)  # str(alpha) -> fitted threshold
    decision_score: str = "confidence"  # "confidence" or "epistemic": what the accept/review rule looks at
    decision_threshold: float | None = None  # accept when confidence >= it (or epistemic <= it); None: accept all
    target_risk: float | None = None  # error rate among accepted images the threshold was fitted for

    @property
    def is_fitted(self) -> bool:
        return bool(self.conformal_thresholds) or self.decision_threshold is not None or self.temperature != 1.0

    def to_dict(self) -> dict[str, Any]:
        return {"temperature": self.temperature, "conformal_score": self.conformal_score,
                "conformal_thresholds": dict(self.conformal_thresholds), "decision_score": self.decision_score,
                "decision_threshold": self.decision_threshold, "target_risk": self.target_risk}

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> "Calibration":
        if not data:
            return cls()
        return cls(temperature=float(data.get("temperature", 1.0)),
                   conformal_score=str(data.get("conformal_score", "aps")),
                   conformal_thresholds={str(k): float(v) for k, v in (data.get("conformal_thresholds") or {}).items()},
                   decision_score=str(data.get("decision_score", "confidence")),
                   decision_threshold=None if data.get("decision_threshold") is None else float(data["decision_threshold"]),
                   target_risk=None if data.get("target_risk") is None else float(data["target_risk"]))

    def threshold_for(self, alpha: float) -> float:
        """Conformal threshold fitted for ``alpha`` (a key of ``conformal_thresholds``).

        Raises:
            ValueError: when no threshold was fitted for this alpha.
        """
        for key, value in self.conformal_thresholds.items():
            if abs(float(key) - alpha) < 1e-9:
                return value
        fitted = sorted(float(k) for k in self.conformal_thresholds)
        raise ValueError(f"alpha={alpha} has no fitted conformal threshold; fitted alphas: {fitted}")


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


@dataclass
class Prediction:
    """Everything the service and the CLI report for a batch of images."""

    summary: UncertaintySummary
    logits: Tensor  # (S, B, C) raw Monte Carlo logits
    seeds: list[int]  # the seed of each image's noise
    prediction_sets: Tensor | None  # (B, C) bool at ``alpha``, None when not calibrated
    alpha: float | None
    accept: Tensor  # (B,) bool
    reasons: list[str]
    attention: Tensor | None = None  # (B, depth, g, g) query -> patch attention per block
    rollout: Tensor | None = None  # (B, g, g)


def _entropy(p: Tensor) -> Tensor:
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
    total = _entropy(p)
    aleatoric = _entropy(p_s).mean(dim=0)
    epistemic = (total - aleatoric).clamp_min(0.0)
    std = p_s.std(dim=0, unbiased=False)
    return UncertaintySummary(p.float(), total.float(), aleatoric.float(), epistemic.float(), std.float())


def resolve_seeds(seed: int | Sequence[int] | None, batch_size: int) -> list[int]:
    """One seed per image: a given int is used for every image (same image + seed -> same answer); None draws."""
    if seed is None:
        return [secrets.randbelow(MAX_SEED) for _ in range(batch_size)]
    if isinstance(seed, int):
        seeds = [seed] * batch_size
    else:
        seeds = [int(s) for s in seed]
        if len(seeds) != batch_size:
            raise ValueError(f"got {len(seeds)} seeds for {batch_size} images")
    for s in seeds:
        if not 0 <= s <= MAX_SEED:
            raise ValueError(f"seed must be in [0, {MAX_SEED}], got {s}")
    return seeds


def draw_noise(backend: SamplingBackend, seeds: Sequence[int], num_samples: int,
               device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> Tensor:
    """Noise (S, B, ...) where column b is drawn from a CPU generator seeded with ``seeds[b]``.

    Drawing on the CPU makes the noise, and so the answer, identical on every device and backend; it costs a
    few thousand normals per sample, far below the forward pass.
    """
    per_image = backend.noise_shape(1, num_samples)  # (S, 1, ...)
    cols = [torch.randn(per_image, generator=torch.Generator().manual_seed(s), dtype=dtype) for s in seeds]
    return torch.cat(cols, dim=1).to(device)


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


def _decide(summary: UncertaintySummary, cal: Calibration) -> tuple[Tensor, list[str]]:
    from calibration.selective import decide

    b = summary.probs.shape[0]
    if cal.decision_threshold is None:
        return torch.ones(b, dtype=torch.bool), ["no decision threshold calibrated: accepted by default"] * b
    if cal.decision_score == "confidence":
        scores, higher = summary.confidence, True
    elif cal.decision_score == "epistemic":
        scores, higher = summary.epistemic, False
    else:
        raise ValueError(f"decision_score must be 'confidence' or 'epistemic', got {cal.decision_score!r}")
    accept = decide(scores, cal.decision_threshold, higher_is_confident=higher)
    risk = f" (fitted for {cal.target_risk:.1%} error among accepted)" if cal.target_risk is not None else ""
    op_ok, op_bad = (">=", "<") if higher else ("<=", ">")
    reasons = [f"{cal.decision_score} {float(v):.4f} {op_ok if ok else op_bad} threshold {cal.decision_threshold:.4f}{risk}"
               for v, ok in zip(scores, accept.tolist())]
    return accept, reasons


@torch.no_grad()
def predict(backend: SamplingBackend, images: Tensor, *, num_samples: int, seed: int | Sequence[int] | None = None,
            calibration: Calibration | None = None, alpha: float | None = None, attention: bool = False,
            pool: str = "cls") -> Prediction:
    """Monte Carlo prediction with calibrated, decomposed uncertainty for a batch of preprocessed images.

    Args:
        backend: the PyTorch model or an ONNX Runtime predictor (see ``SamplingBackend``).
        images: (B, C, H, W) preprocessed images.
        num_samples: S Monte Carlo samples per image, folded into one forward pass.
        seed: one int for all images, one per image, or None to draw (the seeds are returned).
        calibration: temperature, conformal thresholds and decision rule; identity when None.
        alpha: miscoverage of the conformal set; None uses the smallest fitted alpha, no set if none fitted.
        attention: also compute attention maps and rollout (uses the explicit attention path).
        pool: the model's pooling, which decides whose attention row the maps show.

    Returns:
        A ``Prediction`` for the batch.
    """
    from calibration.conformal import prediction_sets

    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    cal = calibration or Calibration()
    seeds = resolve_seeds(seed, images.shape[0])
    noise = draw_noise(backend, seeds, num_samples, device=images.device, dtype=images.dtype)
    out = backend.sample_logits(images, num_samples, noise, return_attention=attention)
    logits, attn = (out if attention else (out, None))
    summary = summarize(logits, cal.temperature)
    sets, used_alpha = None, None
    if cal.conformal_thresholds:
        used_alpha = alpha if alpha is not None else min(float(k) for k in cal.conformal_thresholds)
        sets = prediction_sets(summary.probs, cal.threshold_for(used_alpha), cal.conformal_score)
    elif alpha is not None:
        raise ValueError("this model has no conformal calibration; run `snodevit calibrate` first")
    accept, reasons = _decide(summary, cal)
    maps = rollout = None
    if attn is not None:
        maps, rollout = attention_maps(attn, pool)
    return Prediction(summary, logits, seeds, sets, used_alpha, accept, reasons, maps, rollout)
