"""The fitted calibration that ``predict`` applies: temperature, conformal thresholds, the accept/review rule and the
out-of-distribution gate, stored as strict JSON with the model (meta.json, the ONNX metadata)."""

from __future__ import annotations

import base64
import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

import torch
from torch import Tensor

from calibration.density import FeatureDensity
from snodevit.inference.precision import Precision
from snodevit.inference.summary import summarize


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


@dataclass(frozen=True)
class CountRule:
    """The thresholds fitted for answers that use one number of Monte Carlo samples.

    A mean over fewer samples is noisier: one sample's features lie farther from the class means than the mean of
    32, and its confidence spreads more, so a threshold fitted at one count and applied at another reviews the
    wrong share of images. `snodevit calibrate` fits both thresholds again for each count in
    ``snodevit.evaluation.config.FITTED_COUNTS`` (from the first n samples of the same passes, since each image's
    noise is drawn sample by sample) at the same target risk and review rate.
    """

    decision_threshold: float | None  # accept/review threshold (None: no decision rule)
    gate_threshold: float | None  # out-of-distribution threshold (None: no gate)

    def to_dict(self) -> dict[str, Any]:
        return {k: None if v is None else threshold_to_json(v) for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any], n: str) -> "CountRule":
        def read(key: str) -> float | None:
            value = data.get(key)
            return None if value is None else _threshold_from_json(value, f"count_rules[{n}] {key}")
        return cls(decision_threshold=read("decision_threshold"), gate_threshold=read("gate_threshold"))


def _precision_from_json(value: Any) -> Precision:
    if value not in get_args(Precision):
        raise ValueError(f"calibration precision must be one of {list(get_args(Precision))}, got {value!r}")
    return value  # type: ignore[no-any-return]


def _count_rules_from_json(data: Any) -> dict[int, CountRule]:
    if not data:
        return {}
    try:
        return {int(n): CountRule.from_dict(r, n) for n, r in data.items()}
    except (TypeError, ValueError, AttributeError) as e:
        raise ValueError(f"calibration count_rules is malformed ({e}); re-run `snodevit calibrate`") from None


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
    count_rules: dict[int, CountRule] = field(default_factory=dict)  # samples -> thresholds fitted at that count

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
        if self.count_rules:
            out["count_rules"] = {str(n): r.to_dict() for n, r in sorted(self.count_rules.items())}
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
                   precision=_precision_from_json(data.get("precision", "fp32")),
                   count_rules=_count_rules_from_json(data.get("count_rules")))

    def rule_count(self, num_samples: int) -> int | None:
        """The fitted count whose thresholds apply to an answer of ``num_samples`` samples: the largest fitted
        count <= it (the smallest fitted one below that); None for a calibration without count rules."""
        if not self.count_rules:
            return None
        below = [n for n in self.count_rules if n <= num_samples]
        return max(below) if below else min(self.count_rules)

    def for_samples(self, num_samples: int) -> "Calibration":
        """This calibration with the decision and gate thresholds fitted for ``num_samples`` samples
        (:meth:`rule_count`); itself when it has no count rules (older files: one threshold for every count)."""
        n = self.rule_count(num_samples)
        if n is None:
            return self
        rule = self.count_rules[n]
        gate = self.ood_gate
        if gate is not None and rule.gate_threshold is not None:
            gate = dataclasses.replace(gate, threshold=rule.gate_threshold)
        decision = self.decision_threshold if self.decision_threshold is None else rule.decision_threshold
        return dataclasses.replace(self, decision_threshold=decision, ood_gate=gate)

    @property
    def alphas(self) -> list[float]:
        """The alphas with a fitted conformal threshold, smallest first: the values a request's ``alpha`` may take."""
        return sorted(float(k) for k in self.conformal_thresholds)

    def _alpha_key(self, alpha: float) -> str:
        """The key of ``conformal_thresholds`` that ``alpha`` names: the same float. A decimal string parses to
        the float the key was written from ("0.1", "0.10" and "1e-1" all name the key "0.1"); a neighbouring float
        (0.10000000000000002) names no fitted alpha, as the OpenAPI document's enum says.

        Raises:
            ValueError: when no threshold was fitted for this alpha.
        """
        for key in self.conformal_thresholds:
            if float(key) == alpha:
                return key
        raise ValueError(f"alpha={alpha} has no fitted conformal threshold; fitted alphas: {self.alphas}")

    def fitted_alpha(self, alpha: float) -> float:
        """The fitted alpha that ``alpha`` names (see ``threshold_for``). Raises ValueError when there is none."""
        return float(self._alpha_key(alpha))

    def threshold_for(self, alpha: float) -> float:
        """Conformal threshold fitted for ``alpha`` (a key of ``conformal_thresholds``, the same float).

        Raises:
            ValueError: when no threshold was fitted for this alpha.
        """
        return self.conformal_thresholds[self._alpha_key(alpha)]
