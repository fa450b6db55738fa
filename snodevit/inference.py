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

import base64
import math
import secrets
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, Sequence, get_args

import torch
from torch import Tensor

from calibration.density import FeatureDensity

from .precision import Precision, autocast, resolve_precision

MAX_SEED = 2**63 - 1
AUTO = "auto"  # num_samples value that asks for adaptive sampling
NumSamples = int | Literal["auto"]


class SamplingBackend(Protocol):
    """What ``predict`` needs from a model: the noise shape and folded Monte Carlo logits."""

    def noise_shape(self, batch_size: int, num_samples: int = 1) -> tuple[int, ...]: ...

    def sample_logits(self, images: Tensor, num_samples: int | None = None, noise: Tensor | None = None, *,
                      return_attention: bool = False,
                      return_features: bool = False) -> Tensor | tuple[Tensor, ...]: ...


def threshold_to_json(value: float) -> float | str:
    """A threshold as a strict-JSON value: a finite number as it is, +-inf as the string "Infinity" / "-Infinity".

    Strict JSON has no infinity (``json.dumps`` would write the bare token ``Infinity``, which many parsers refuse);
    Python's ``float()`` and JavaScript's ``Number()`` both read the strings back.

    Raises:
        ValueError: on NaN, which no fit produces and no rule can apply.
    """
    value = float(value)
    if math.isnan(value):
        raise ValueError("a calibration threshold cannot be NaN")
    if math.isinf(value):
        return "Infinity" if value > 0 else "-Infinity"
    return value


def _threshold_from_json(value: Any, name: str) -> float:
    """The inverse of ``threshold_to_json``; also takes the float inf that older files hold (bare ``Infinity``).

    Raises:
        ValueError: neither a number nor a string ``float()`` reads, or NaN.
    """
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"calibration {name} must be a number or 'Infinity' / '-Infinity', got {value!r}") from None
    if math.isnan(out):
        raise ValueError(f"calibration {name} is NaN; re-run `snodevit calibrate`")
    return out


GateScore = Literal["feature_density", "energy", "mutual_information"]
GATE_SCORES: tuple[str, ...] = get_args(GateScore)
#: Reason codes of a decision: accepted, sent to review for low confidence, or for being out of distribution.
ReasonCode = Literal["accepted", "low_confidence", "out_of_distribution"]
REASON_CODES: tuple[str, ...] = get_args(ReasonCode)
ACCEPTED, LOW_CONFIDENCE, OUT_OF_DISTRIBUTION = REASON_CODES


def _density_to_json(density: FeatureDensity) -> str:
    """The density's tensors as base64 safetensors in float32 (``FeatureDensity.rounded`` reads back exactly)."""
    from safetensors.torch import save

    return base64.b64encode(save({k: v.float().contiguous() for k, v in density.to_tensors().items()})).decode()


def _density_from_json(text: str) -> FeatureDensity:
    from safetensors.torch import load

    try:
        return FeatureDensity.from_tensors(load(base64.b64decode(text.encode(), validate=True)))
    except Exception as e:  # binascii.Error, SafetensorError, ValueError: all mean a damaged calibration
        raise ValueError(f"calibration ood_gate density is unreadable ({e}); re-run `snodevit calibrate`") from None


@dataclass(frozen=True)
class OodGate:
    """The out-of-distribution gate: review an image whose score exceeds ``threshold``.

    The threshold is the conformal novelty threshold (:func:`calibration.fit_novelty_threshold`) of the score on
    the calibration split, so an in-distribution image is sent to review with probability at most
    ``review_rate`` (Bates et al. 2023). Scores (larger = more unusual; :meth:`image_scores`):

    * ``feature_density``: :class:`calibration.FeatureDensity` of every layer's quadrant-pooled patch tokens,
      averaged over the image's samples;
    * ``energy``: ``-T logsumexp(z / T)`` of the logits (Liu et al. 2020), averaged over the samples;
    * ``mutual_information``: the epistemic uncertainty of the samples.

    References:
        Liu, Wang, Owens, Li. "Energy-based Out-of-distribution Detection." NeurIPS 2020.
    """

    score: GateScore  # what the gate thresholds
    threshold: float  # review when score > threshold; +inf: the gate never fires
    review_rate: float  # in-distribution share of images sent to review it was fitted for
    density: FeatureDensity | None = None  # the fitted density of score "feature_density"
    calibration_images: int = 0  # size of the split the threshold was fitted on

    def __post_init__(self) -> None:
        if self.score not in GATE_SCORES:
            raise ValueError(f"ood_gate score must be one of {list(GATE_SCORES)}, got {self.score!r}")
        if (self.score == "feature_density") != (self.density is not None):
            raise ValueError("an ood_gate of score 'feature_density' needs a density, and only that score has one")
        if not 0.0 < self.review_rate < 1.0:
            raise ValueError(f"ood_gate review_rate must be in (0, 1), got {self.review_rate}")

    def summary(self) -> dict[str, Any]:
        """What people read (``/metadata``, reports): everything but the density's tensors."""
        out: dict[str, Any] = {"score": self.score, "threshold": threshold_to_json(self.threshold),
                               "review_rate": self.review_rate, "calibration_images": self.calibration_images}
        if self.density is not None:
            out["feature_groups"] = self.density.num_groups
            out["feature_dim"] = self.density.dim
        return out

    def to_dict(self) -> dict[str, Any]:
        out = self.summary()
        if self.density is not None:
            out["density"] = _density_to_json(self.density)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "OodGate":
        try:
            density = _density_from_json(data["density"]) if data.get("density") is not None else None
            return cls(score=data["score"], threshold=_threshold_from_json(data["threshold"], "ood_gate threshold"),
                       review_rate=float(data["review_rate"]), density=density,
                       calibration_images=int(data.get("calibration_images", 0)))
        except KeyError as e:
            raise ValueError(f"calibration ood_gate lacks {e}; re-run `snodevit calibrate`") from None

    def image_scores(self, logits: Tensor, features: Tensor | None, temperature: float) -> Tensor:
        """(B,) float64 score of each image from its samples' logits (n, B, C) and features (n, B, G, D).

        ``feature_density`` scores the mean feature over the samples (one whitening per image, not per sample:
        with noise in the last block only, the samples share every earlier layer's features anyway); ``energy``
        is the mean of the samples' energies; ``mutual_information`` the epistemic part of the samples' entropy.
        """
        if self.score == "feature_density":
            if features is None:
                raise ValueError("the feature_density gate needs the features of the passes")
            assert self.density is not None
            return self.density.score(features.double().mean(dim=0)).cpu()
        if self.score == "energy":
            return self.sample_scores(logits, features, temperature).mean(dim=0)
        return summarize(logits, temperature).epistemic.double().cpu()

    def sample_scores(self, logits: Tensor, features: Tensor | None, temperature: float) -> Tensor:
        """(n, B) float64 score of every sample on its own, the spread adaptive sampling judges the margin by;
        not defined for ``mutual_information``, a property of all samples together.

        Raises:
            ValueError: for the ``mutual_information`` gate, or ``feature_density`` without features.
        """
        if self.score == "feature_density":
            if features is None:
                raise ValueError("the feature_density gate needs the features of the passes")
            assert self.density is not None
            return self.density.score(features).cpu()
        if self.score == "energy":
            return (-temperature * torch.logsumexp(logits.double() / temperature, dim=-1)).cpu()
        raise ValueError("the mutual_information gate has no per-sample score")

    def reason(self, score: float, flagged: bool) -> str:
        op = ">" if flagged else "<="
        return (f"out-of-distribution score ({self.score}) {score:.4g} {op} threshold {self.threshold:.4g} (fitted "
                f"to send {self.review_rate:.1%} of in-distribution images to review)")


def _precision_from_json(value: Any) -> Precision:
    if value not in get_args(Precision):
        raise ValueError(f"calibration precision must be one of {list(get_args(Precision))}, got {value!r}")
    return value  # type: ignore[no-any-return]


@dataclass(frozen=True)
class Calibration:
    """Post-hoc calibration fitted by `snodevit calibrate`, stored with the model and applied by ``predict``.

    Thresholds may be infinite: a conformal threshold of +inf puts every class in the set (the calibration split
    was too small for that alpha); a decision threshold of +inf (confidence) or -inf (epistemic) accepts no image
    (no threshold kept the error rate at ``target_risk``). ``to_dict`` writes them as the strings ``"Infinity"``
    and ``"-Infinity"``, so meta.json, the ONNX metadata and the service's answers stay strict JSON; ``from_dict``
    reads those strings, plain numbers, and the float inf of older files written with the bare ``Infinity`` token.
    """

    temperature: float = 1.0  # T: every sample's logits are divided by T before averaging
    conformal_score: str = "aps"  # "lac" or "aps" non-conformity score of the prediction sets
    conformal_thresholds: dict[str, float] = field(default_factory=dict)  # str(alpha) -> threshold; inf: every class
    decision_score: str = "confidence"  # "confidence" or "epistemic": what the accept/review rule looks at
    decision_threshold: float | None = None  # accept when confidence >= it (epistemic <= it); None: all; +-inf: none
    target_risk: float | None = None  # error rate among accepted images the threshold was fitted for
    ood_gate: OodGate | None = None  # out-of-distribution gate, checked before the confidence rule; None: no gate
    precision: Precision = "fp32"  # the precision of the forward passes these figures were fitted on

    @property
    def is_fitted(self) -> bool:
        return (bool(self.conformal_thresholds) or self.decision_threshold is not None or self.temperature != 1.0
                or self.ood_gate is not None)

    @property
    def needs_features(self) -> bool:
        """Whether ``predict`` must ask the backend for the pooled features (the feature-density gate)."""
        return self.ood_gate is not None and self.ood_gate.score == "feature_density"

    def to_dict(self) -> dict[str, Any]:
        """Strict JSON (``json.dumps(..., allow_nan=False)`` takes it): infinite thresholds become strings.

        Raises:
            ValueError: a NaN threshold.
        """
        decision = None if self.decision_threshold is None else threshold_to_json(self.decision_threshold)
        out = {"temperature": self.temperature, "conformal_score": self.conformal_score,
               "conformal_thresholds": {k: threshold_to_json(v) for k, v in self.conformal_thresholds.items()},
               "decision_score": self.decision_score, "decision_threshold": decision, "target_risk": self.target_risk}
        if self.ood_gate is not None:  # files of models without a gate stay as they were
            out["ood_gate"] = self.ood_gate.to_dict()
        if self.is_fitted:
            out["precision"] = self.precision
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> "Calibration":
        """Read ``to_dict``'s output, or an older one holding float inf; empty or None: no calibration.

        Raises:
            ValueError: a threshold that is neither a number nor "Infinity" / "-Infinity", or is NaN.
        """
        if not data:
            return cls()
        decision = data.get("decision_threshold")
        return cls(temperature=float(data.get("temperature", 1.0)),
                   conformal_score=str(data.get("conformal_score", "aps")),
                   conformal_thresholds={str(k): _threshold_from_json(v, f"conformal threshold of alpha {k}")
                                         for k, v in (data.get("conformal_thresholds") or {}).items()},
                   decision_score=str(data.get("decision_score", "confidence")),
                   decision_threshold=None if decision is None else _threshold_from_json(decision, "decision_threshold"),
                   target_risk=None if data.get("target_risk") is None else float(data["target_risk"]),
                   ood_gate=None if not data.get("ood_gate") else OodGate.from_dict(data["ood_gate"]),
                   precision=_precision_from_json(data.get("precision", "fp32")))

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
    """Noise (S, B, ...) where column b is drawn from a CPU generator seeded with ``seeds[b]``, sample by sample.

    Drawing on the CPU makes the noise, and so the answer, identical on every device and backend; it costs a
    few thousand normals per sample, far below the forward pass. One draw per sample (not one for all S) makes
    the first n samples of any longer draw exactly the draw of n, which adaptive sampling relies on.
    """
    tail = backend.noise_shape(1, 1)[2:]  # (L, K, N, m)
    noise = torch.empty((num_samples, len(seeds), *tail), dtype=dtype)
    for b, s in enumerate(seeds):
        gen = torch.Generator().manual_seed(s)
        for i in range(num_samples):
            torch.randn(tail, generator=gen, dtype=dtype, out=noise[i, b])
    return noise.to(device)


# Images x samples per forward pass on a CPU. A pass's activations should stay in cache: per sample, tiny and small
# (MNIST preset, 50 tokens) ran 10-30 % slower in passes of 256-512 rows than of 32-128 on this project's 2-core
# machine (single-thread CPU time, so background load did not decide it). GPUs take the whole fold in one pass.
CPU_ROWS_PER_PASS = 64


def sample_in_passes(backend: SamplingBackend, images: Tensor, noise: Tensor, *, attention: bool = False,
                     features: bool = False, max_rows: int | None = None,
                     precision: Precision = "fp32") -> Tensor | tuple[Tensor, ...]:
    """``backend.sample_logits(images, noise=noise)`` in passes of at most ``max_rows`` images x samples.

    Each pass folds its samples into the batch with the prefix computed once per image; images are split first,
    and a lone image's samples only when S alone exceeds ``max_rows``.

    Args:
        backend: the model or an ONNX Runtime predictor.
        images: (B, C, H, W).
        noise: (S, B, ...) standard normals.
        attention: also return the applied attention (S, B, depth, N, N).
        features: also return the pooled features of the OOD gate (S, B, G, D).
        max_rows: the most rows per pass; None: ``CPU_ROWS_PER_PASS`` on a CPU, everything at once elsewhere.
        precision: "fp32", or "bf16" to run the passes under bf16 autocast (``snodevit.precision``; already
            resolved, so never "auto").

    Returns:
        Logits (S, B, classes) [, attention] [, features], as one ``sample_logits`` call would give them (up to
        float32 rounding when the passes differ in shape); in fp32 after bf16 passes.
    """
    with autocast(precision, images.device):
        out = _sample_in_passes(backend, images, noise, attention, features, max_rows)
    if precision == "fp32":  # the backend's own dtype (float64 models stay float64)
        return out
    return tuple(o.float() for o in out) if isinstance(out, tuple) else out.float()


def _sample_in_passes(backend: SamplingBackend, images: Tensor, noise: Tensor, attention: bool, features: bool,
                      max_rows: int | None) -> Tensor | tuple[Tensor, ...]:
    s, b = noise.shape[:2]
    if max_rows is None:
        max_rows = CPU_ROWS_PER_PASS if images.device.type == "cpu" else s * b
    if max_rows < 1:
        raise ValueError(f"max_rows must be >= 1, got {max_rows}")
    flags = {"return_attention": attention, "return_features": features} if features else \
        {"return_attention": attention}  # a baseline without features never sees the keyword
    if s * b <= max_rows:
        return backend.sample_logits(images, s, noise, **flags)
    per_pass_images = max(1, max_rows // s)
    per_pass_samples = s if per_pass_images > 1 else min(s, max_rows)
    rows = []  # one list of passes per image group, each pass a tuple of outputs
    for i in range(0, b, per_pass_images):
        cols = []
        for j in range(0, s, per_pass_samples):
            part = noise[j:j + per_pass_samples, i:i + per_pass_images]
            out = backend.sample_logits(images[i:i + per_pass_images], part.shape[0], part, **flags)
            cols.append(out if isinstance(out, tuple) else (out,))
        rows.append(cols)
    joined = tuple(torch.cat([torch.cat([c[k] for c in cols], dim=0) for cols in rows], dim=1)
                   for k in range(len(rows[0][0])))
    return joined if len(joined) > 1 else joined[0]


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


def decide_outcomes(summary: UncertaintySummary, cal: Calibration,
            ood_score: Tensor | None) -> tuple[Tensor, list[str], list[str], Tensor | None]:
    """The decision of each image: the OOD gate first, then the confidence (or epistemic) rule.

    Returns:
        accept (B,) bool, reasons (text), reason codes (``REASON_CODES``), and the gate's flags (None without one).
    """
    from calibration.selective import decide

    b = summary.probs.shape[0]
    flagged = None
    if cal.ood_gate is not None:
        assert ood_score is not None
        flagged = ood_score.cpu() > cal.ood_gate.threshold
    if cal.decision_threshold is None:
        accept = torch.ones(b, dtype=torch.bool)
        rule = ["no decision threshold calibrated: accepted by default"] * b
    else:
        if cal.decision_score == "confidence":
            scores, higher = summary.confidence, True
        elif cal.decision_score == "epistemic":
            scores, higher = summary.epistemic, False
        else:
            raise ValueError(f"decision_score must be 'confidence' or 'epistemic', got {cal.decision_score!r}")
        accept = decide(scores, cal.decision_threshold, higher_is_confident=higher).cpu()
        risk = f" (fitted for {cal.target_risk:.1%} error among accepted)" if cal.target_risk is not None else ""
        op_ok, op_bad = (">=", "<") if higher else ("<=", ">")
        rule = [f"{cal.decision_score} {float(v):.4f} {op_ok if ok else op_bad} threshold "
                f"{cal.decision_threshold:.4f}{risk}" for v, ok in zip(scores, accept.tolist())]
    codes = [ACCEPTED if ok else LOW_CONFIDENCE for ok in accept.tolist()]
    reasons = rule
    if flagged is not None:
        assert cal.ood_gate is not None and ood_score is not None
        gate = [cal.ood_gate.reason(float(v), bool(f)) for v, f in zip(ood_score, flagged.tolist())]
        codes = [OUT_OF_DISTRIBUTION if f else c for f, c in zip(flagged.tolist(), codes)]
        reasons = [g if f else f"{r}; {g}" for g, f, r in zip(gate, flagged.tolist(), rule)]
        accept = accept & ~flagged
    return accept, reasons, codes, flagged


def _standard_error(values: Tensor) -> Tensor:
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
    h_s = _entropy(sample_probs)  # (n, B)
    influence = -((sample_probs - p) * torch.log(p.clamp_min(1e-12))).sum(dim=-1)  # (n, B)
    return _standard_error(influence), _standard_error(h_s), _standard_error(influence - h_s)


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
        label_ok = diff.mean(dim=0) > rule.z * _standard_error(diff)
    else:
        label_ok = torch.ones(p.shape[0], dtype=torch.bool, device=p.device)
    se_total, se_alea, se_epi = uncertainty_standard_errors(p_s)
    unc_ok = rule.z * torch.stack((se_total, se_alea, se_epi)).amax(dim=0) <= rule.tolerance
    if calibration.decision_threshold is None:
        decision_ok = torch.ones_like(label_ok)
    else:
        thr = calibration.decision_threshold
        if calibration.decision_score == "confidence":
            margin, se = (p_top[..., 0].mean(dim=0) - thr).abs(), _standard_error(p_top[..., 0])
        elif calibration.decision_score == "epistemic":
            epistemic = (_entropy(p) - _entropy(p_s).mean(dim=0)).clamp_min(0.0)
            margin, se = (epistemic - thr).abs(), se_epi
        else:
            raise ValueError(f"decision_score must be 'confidence' or 'epistemic', got {calibration.decision_score!r}")
        decision_ok = margin > rule.z * se
    gate = calibration.ood_gate
    if gate is not None and math.isfinite(gate.threshold):
        t = calibration.temperature
        if gate.score == "mutual_information":
            epistemic = (_entropy(p) - _entropy(p_s).mean(dim=0)).clamp_min(0.0)
            margin, se = (epistemic - gate.threshold).abs(), se_epi
        else:
            margin = (gate.image_scores(logit_samples, features, t) - gate.threshold).abs().to(p.device)
            se = _standard_error(gate.sample_scores(logit_samples, features, t)).to(p.device)
        decision_ok = decision_ok & (margin > rule.z * se)
    return label_ok & decision_ok & unc_ok


def _run_passes(backend: SamplingBackend, images: Tensor, noise: Tensor, cal: Calibration,
                attention: bool, precision: Precision) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Logits (S, B, C), attention or None, and the gate features (S, B, G, D) or None, of one set of passes;
    all fp32 whatever the passes ran in, so every figure computed from them is summed in fp32 or wider."""
    out = sample_in_passes(backend, images, noise, attention=attention, features=cal.needs_features,
                           precision=precision)
    outs = out if isinstance(out, tuple) else (out,)
    return outs[0], (outs[1] if attention else None), (outs[-1] if cal.needs_features else None)


def _adaptive_logits(backend: SamplingBackend, images: Tensor, noise: Tensor, cal: Calibration,
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
        part, part_attn, part_feats = _run_passes(backend, images[sel], noise[start:end][:, sel], cal, attention,
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
        done = settled(logits[:end, sel], cal, rule, None if feats is None else feats[:end, sel]).cpu()
        active = active[~done]
        if active.numel() == 0:
            break
        start = end
    assert logits is not None
    return logits, attn, feats, used


def _gate_by_count(gate: OodGate, logits: Tensor, feats: Tensor | None, used: Tensor, temperature: float) -> Tensor:
    """(B,) gate score of each image over its own first ``used[b]`` samples (equal counts scored together)."""
    out = torch.empty(logits.shape[1], dtype=torch.float64)
    for n in sorted(set(used.tolist())):
        idx = (used == n).nonzero().flatten()
        dev = idx.to(logits.device)
        out[idx] = gate.image_scores(logits[:n, dev], None if feats is None else feats[:n, dev], temperature)
    return out


def _summarize_by_count(logits: Tensor, used: Tensor, temperature: float) -> UncertaintySummary:
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


def _check_num_samples(num_samples: object) -> None:
    if num_samples == AUTO:
        return
    if not isinstance(num_samples, int) or isinstance(num_samples, bool) or num_samples < 1:
        raise ValueError(f"num_samples must be an integer >= 1 or 'auto', got {num_samples!r}")


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
        precision: "fp32", "bf16" (autocast; the torch backend only) or "auto" (``snodevit.precision``: bf16 where
            the device multiplies bf16 natively). The samples are cast back to fp32 before they are summarised.

    Returns:
        A ``Prediction`` for the batch; ``num_samples`` says how many samples each image used.

    Raises:
        ValueError: a bad ``num_samples``, seed, alpha or precision (bf16 of a backend other than the torch
            model), or ``adaptive`` given with an integer ``num_samples``.
    """
    from calibration.conformal import prediction_sets

    _check_num_samples(num_samples)
    if adaptive is not None and num_samples != AUTO:
        raise ValueError(f"adaptive is the rule of num_samples='auto'; got num_samples={num_samples!r}")
    cal = calibration or Calibration()
    used_precision = resolve_precision(precision, images.device,
                                       "torch" if isinstance(backend, torch.nn.Module) else "onnx")
    seeds = resolve_seeds(seed, images.shape[0])
    if num_samples == AUTO:
        rule = adaptive or AdaptiveSampling()
        noise = draw_noise(backend, seeds, rule.max_samples, device=images.device, dtype=images.dtype)
        logits, attn, feats, used = _adaptive_logits(backend, images, noise, cal, rule, attention, used_precision)
        logits = logits[:int(used.max())]
        if attn is not None:
            attn = attn[:int(used.max())]
        summary = _summarize_by_count(logits, used, cal.temperature)
        counts = used.tolist()
        ood_score = None if cal.ood_gate is None else _gate_by_count(cal.ood_gate, logits, feats, used,
                                                                      cal.temperature)
    else:
        assert isinstance(num_samples, int)
        noise = draw_noise(backend, seeds, num_samples, device=images.device, dtype=images.dtype)
        logits, attn, feats = _run_passes(backend, images, noise, cal, attention, used_precision)
        summary = summarize(logits, cal.temperature)
        counts = [num_samples] * images.shape[0]
        ood_score = None if cal.ood_gate is None else cal.ood_gate.image_scores(logits, feats, cal.temperature)
    sets, used_alpha = None, None
    if cal.conformal_thresholds:
        used_alpha = alpha if alpha is not None else min(float(k) for k in cal.conformal_thresholds)
        sets = prediction_sets(summary.probs, cal.threshold_for(used_alpha), cal.conformal_score)
    elif alpha is not None:
        raise ValueError("this model has no conformal calibration; run `snodevit calibrate` first")
    accept, reasons, codes, flagged = decide_outcomes(summary, cal, ood_score)
    maps = rollout = None
    if attn is not None:
        if num_samples == AUTO:
            per_image = [attention_maps(attn[:n, i:i + 1], pool) for i, n in enumerate(counts)]
            maps = torch.cat([m for m, _ in per_image])
            rollout = torch.cat([r for _, r in per_image])
        else:
            maps, rollout = attention_maps(attn, pool)
    return Prediction(summary, logits, seeds, sets, used_alpha, accept, reasons, counts, maps, rollout,
                      reason_codes=codes, ood_score=ood_score, out_of_distribution=flagged, ood_gate=cal.ood_gate,
                      precision=used_precision)
