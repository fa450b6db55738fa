"""The ``snodevit calibrate`` pipeline: fit post-hoc calibration, check it on held-out data, under shift and OOD.

Passes over the data, each image seeded with ``seed + its index in the pass`` (as ``snodevit evaluate`` does), so
every number is reproducible and an image's noise does not depend on its batch:

1. **calibration split**: raw Monte Carlo logits -> temperature ``T`` (:func:`calibration.fit_temperature`), one
   conformal threshold per alpha (:func:`calibration.fit_conformal_threshold` on the temperature-scaled
   probabilities) and the accept/review threshold (:func:`calibration.fit_selective_threshold` on the chosen
   score at the target risk);
2. **test split**: calibration errors before and after scaling, proper scores, conformal coverage and set size
   (of the served sets, which always hold the top class, and of the bare split-conformal sets, which may be empty
   and are what the coverage guarantee is about), selective coverage and risk, how well each uncertainty score
   flags errors;
3. **shift**: the test split rotated 0-180 degrees in 15 degree steps (Ovadia et al. 2019) and, for digit models,
   scikit-learn's digits as a shifted domain; **OOD**: uniform-noise images and crops of photographs, scored
   by 1 - max probability, predictive entropy and mutual information.

Every probability and uncertainty is what the service answers: :func:`snodevit.inference.summarize` of the raw
logits with the fitted ``T``, on images normalised with the model's own preprocessing. This module computes
results; :func:`calibration.write_report` renders them.

References:
    Guo et al. "On Calibration of Modern Neural Networks." ICML 2017 (temperature scaling).
    Angelopoulos & Bates. "A Gentle Introduction to Conformal Prediction." arXiv:2107.07511, 2021.
    Geifman & El-Yaniv. "Selective Classification for Deep Neural Networks." NeurIPS 2017.
    Ovadia et al. "Can You Trust Your Model's Uncertainty? Evaluating Predictive Uncertainty Under Dataset
    Shift." NeurIPS 2019.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, get_args

import torch
from torch import Tensor
from torch.utils.data import Subset
from tqdm.auto import tqdm

import calibration as cal
from calibration.conformal import conformal_quantile_index
from calibration.report import to_jsonable

from snodevit.data import DIGIT_CLASSES, DatasetBundle, load_dataset
from snodevit.data import normalize, resize_tensor
from snodevit.inference.decide import LOW_CONFIDENCE, OUT_OF_DISTRIBUTION, decide_outcomes
from snodevit.inference.fitted import GATE_SCORES, Calibration, OodGate
from snodevit.inference.passes import draw_noise, sample_in_passes
from snodevit.inference.summary import UncertaintySummary, summarize
from snodevit.inference.backends import LoadedModel
from snodevit.data.shift import (PIXEL_NOISE_STD, ROTATION_ANGLES, constant_images, inverted_images, letter_images,
    photo_crops, pixel_noise_images, rotate_images, uniform_noise_images)

logger = logging.getLogger(__name__)

DecisionScore = Literal["confidence", "epistemic"]
DECISION_SCORES: tuple[str, ...] = get_args(DecisionScore)
ConformalScore = Literal["aps", "lac"]
CONFORMAL_SCORES: tuple[str, ...] = get_args(ConformalScore)
#: Uncertainty scores compared for error and OOD detection; larger = less sure. "max_probability" is
#: 1 - confidence, "entropy" the predictive (total) entropy, "mutual_information" the epistemic part.
UNCERTAINTY_SCORES: tuple[str, ...] = ("max_probability", "entropy", "mutual_information", "aleatoric")
OOD_SCORES: tuple[str, ...] = ("max_probability", "entropy", "mutual_information")
OOD_SETS: tuple[str, ...] = ("uniform_noise", "photo_crops")
#: Far-OOD sets of the gate's "decisions under shift" section: nothing here is a digit the model should label.
#: Inverted digits (dark ink on white) count as far-OOD: the model was never shown that contrast.
FAR_OOD_SETS: tuple[str, ...] = ("uniform_noise", "photo_crops", "constant", "inverted_digits", "letters")
#: Gate candidates compared in the report (larger = more unusual). The first three can be served (GATE_SCORES);
#: "feature_density_last" is the Mahalanobis score of the last block's features only (one layer, as Lee et al.'s
#: plain variant), "max_probability" is 1 - confidence, and "feature_density|mutual_information" flags an image
#: when either of the two flags it, each fitted at half the review rate (so the union keeps the stated rate).
GATE_CANDIDATES: tuple[str, ...] = ("feature_density", "energy", "mutual_information", "feature_density_last",
                                    "max_probability", "feature_density|mutual_information")
#: The targets of the calibration issue, checked in the report's "goals" section.
GOAL_ECE = 0.01
GOAL_COVERAGE_SLACK = 0.02
#: The targets of the out-of-distribution gate issue: accuracy, in-distribution accepted share and error among
#: accepted, far-OOD share sent to review, and error among accepted on shifted digits.
GOAL_ACCURACY = 0.98
GOAL_ACCEPTED = 0.97
GOAL_ID_ERROR = 0.01
GOAL_FAR_OOD_REVIEW = 0.99
GOAL_FAR_OOD_SETS: tuple[str, ...] = ("uniform_noise", "photo_crops", "constant", "inverted_digits")
GOAL_SHIFT_ERROR = 0.05
_ROUNDING = 1e-9  # 1.0 - 0.98 is 0.020000000000000018 in floats: a value on the boundary meets the goal

__all__ = ["CONFORMAL_SCORES", "DECISION_SCORES", "CalibrateConfig", "CalibrationResult", "calibrate_model",
           "decision_figures", "quick_config"]


@dataclass(frozen=True)
class CalibrateConfig:
    """What ``snodevit calibrate`` fits and how much data it looks at."""

    num_samples: int = 32  # S Monte Carlo samples per image, in every pass
    alphas: tuple[float, ...] = (0.05, 0.1)  # miscoverage levels of the conformal sets, each in (0, 1)
    target_risk: float = 0.01  # error rate among automatically accepted images the decision threshold aims at
    decision_score: DecisionScore = "confidence"  # the score the accept/review rule thresholds
    # Non-conformity score of the prediction sets. LAC (1 - p_y; Sadinle et al. 2019) gives the smallest sets and
    # near-exact coverage; deterministic APS over-covers a confident model badly (the demo model: 100 % coverage
    # and 2.3 classes per set at alpha 0.05, because the true class's cumulative mass is ~1 for every image).
    conformal_score: ConformalScore = "lac"
    seed: int = 0  # image i of every pass is seeded with seed + i
    batch_size: int = 64  # images per forward pass
    n_bins: int = 15  # equal-width bins of ECE, MCE, class-wise ECE and the reliability diagram
    max_images: int | None = None  # cap on the images of every split and shifted set; None: all of them
    angles: tuple[float, ...] = ROTATION_ANGLES  # rotation angles of the shift sweep, degrees
    num_ood: int = 500  # images in each far-OOD set (uniform noise, photo crops, constant images, letters)
    gate_score: str = "feature_density"  # the out-of-distribution gate's score (GATE_SCORES); "none": no gate
    gate_review_rate: float = 0.01  # share of in-distribution images the gate may send to review
    max_train_images: int | None = 4000  # training images whose features fit the gate's density; None: all

    def __post_init__(self) -> None:
        for name in ("num_samples", "batch_size", "n_bins", "num_ood"):
            _check_int(getattr(self, name), name, 1)
        if self.max_train_images is not None:
            _check_int(self.max_train_images, "max_train_images", 2)
        if self.gate_score not in (*GATE_SCORES, "none"):
            raise ValueError(f"gate_score must be one of {[*GATE_SCORES, 'none']}, got {self.gate_score!r}")
        if not 0.0 < float(self.gate_review_rate) < 1.0:
            raise ValueError(f"gate_review_rate must be in (0, 1), got {self.gate_review_rate}")
        _check_int(self.seed, "seed", 0)
        if self.max_images is not None:
            _check_int(self.max_images, "max_images", 1)
        alphas = tuple(sorted({float(a) for a in self.alphas}))
        if not alphas or not all(0.0 < a < 1.0 for a in alphas):
            raise ValueError(f"alphas must be one or more numbers in (0, 1), got {list(self.alphas)}")
        object.__setattr__(self, "alphas", alphas)
        if not 0.0 <= float(self.target_risk) <= 1.0:
            raise ValueError(f"target_risk must be in [0, 1], got {self.target_risk}")
        if self.decision_score not in DECISION_SCORES:
            raise ValueError(f"decision_score must be one of {list(DECISION_SCORES)}, got {self.decision_score!r}")
        if self.conformal_score not in CONFORMAL_SCORES:
            raise ValueError(f"conformal_score must be one of {list(CONFORMAL_SCORES)}, got {self.conformal_score!r}")
        angles = tuple(sorted({float(a) for a in self.angles}))
        if not angles or not all(math.isfinite(a) for a in angles):
            raise ValueError(f"angles must be one or more finite numbers, got {list(self.angles)}")
        object.__setattr__(self, "angles", angles)


def quick_config(**overrides: Any) -> CalibrateConfig:
    """A small run for tests and smoke checks: S=4, at most 200 images per set, 3 angles, 64 OOD images per set."""
    base: dict[str, Any] = dict(num_samples=4, max_images=200, angles=(0.0, 90.0, 180.0), num_ood=64,
                                max_train_images=600)
    return CalibrateConfig(**{**base, **overrides})


def _check_int(value: Any, name: str, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


@dataclass
class CalibrationResult:
    """Everything a calibration run produced."""

    calibration: Calibration  # what is stored with the model and applied by every consumer
    metrics: dict[str, Any]  # report sections, in display order (see calibration.write_report)
    figures: dict[str, bytes]  # figure name -> PNG bytes
    headline: dict[str, Any]  # the figures `--json` prints and meta.json keeps as ``calibration_figures``


@dataclass
class _Pass:
    """One pass over an image set: raw logits, the density gate scores and, once T is known, the served summary."""

    logits: Tensor  # (S, N, C) raw Monte Carlo logits
    labels: Tensor  # (N,) int64 (zeros for OOD sets)
    density: dict[str, Tensor] = dataclasses.field(default_factory=dict)  # candidate -> (N,) mean over samples
    summary: UncertaintySummary | None = None
    temperature: float | None = None

    def scale(self, temperature: float) -> _Pass:
        self.summary = summarize(self.logits, temperature)
        self.temperature = temperature
        return self

    @property
    def s(self) -> UncertaintySummary:
        if self.summary is None:
            raise RuntimeError("call scale(T) first")
        return self.summary

    @property
    def correct(self) -> Tensor:
        return self.s.prediction == self.labels

    def gate_score(self, name: str) -> Tensor:
        """(N,) float64 score of a single gate candidate (not a union), as ``OodGate`` computes it when served."""
        if name in self.density:
            return self.density[name]
        if name == "energy":
            assert self.temperature is not None
            t = self.temperature
            return (-t * torch.logsumexp(self.logits.double() / t, dim=-1)).mean(dim=0)
        if name == "mutual_information":
            return self.s.epistemic.double()
        if name == "max_probability":
            return 1.0 - self.s.confidence.double()
        raise KeyError(name)


class _Runner:
    """Runs the model over uint8 image sets with one progress bar over every image of every pass.

    Image i of a pass is seeded with ``cfg.seed + i`` and batched by ``cfg.batch_size``, as `snodevit evaluate`
    and `snodevit score` seed and batch, through the same ``draw_noise`` and ``sample_in_passes`` as ``predict``:
    the logits and gate scores are the ones the service answers for these images.
    """

    def __init__(self, loaded: LoadedModel, cfg: CalibrateConfig, total: int, progress: bool) -> None:
        self.loaded = loaded
        self.cfg = cfg
        self.densities: dict[str, tuple[cal.FeatureDensity, slice]] = {}  # candidate -> density, feature groups
        self.bar = tqdm(total=total, desc="calibrate", unit="img", disable=not progress, dynamic_ncols=True)

    def _batches(self, name: str, images: Tensor, num_samples: int, features: bool):
        self.bar.set_description(f"calibrate [{name}]")
        bs = self.cfg.batch_size
        backend = self.loaded.backend
        for start in range(0, len(images), bs):
            prep = self.loaded.preprocessing
            x = normalize(resize_tensor(images[start:start + bs], prep), prep).to(self.loaded.device)
            seeds = list(range(self.cfg.seed + start, self.cfg.seed + start + len(x)))
            noise = draw_noise(backend, seeds, num_samples, device=x.device, dtype=x.dtype)
            with torch.no_grad():
                out = sample_in_passes(backend, x, noise, features=features, precision=self.loaded.precision)
            self.bar.update(len(x))
            yield out if isinstance(out, tuple) else (out,)

    def train_features(self, images: Tensor) -> Tensor:
        """(N, G, D) pooled features of one sample per training image, for fitting the density."""
        feats = [out[-1][0].double().cpu() for out in self._batches("training features", images, 1, True)]
        return torch.cat(feats)

    def run(self, name: str, images: Tensor, labels: Tensor) -> _Pass:
        """Raw logits of ``images`` (uint8 (N, C, H, W)) and the mean per-sample score of every fitted density."""
        logits, density = [], {k: [] for k in self.densities}
        for out in self._batches(name, images, self.cfg.num_samples, bool(self.densities)):
            logits.append(out[0].cpu())
            for key, (fd, groups) in self.densities.items():
                # as OodGate.image_scores: the density of the mean feature over the samples
                density[key].append(fd.score(out[-1][:, :, groups].cpu().double().mean(dim=0)))  # (B,)
        return _Pass(torch.cat(logits, dim=1), labels.to(torch.int64),
                     {k: torch.cat(v) for k, v in density.items()})  # (S, N, C)

    def close(self) -> None:
        self.bar.close()


def _cap(images: Tensor, labels: Tensor, cap: int | None) -> tuple[Tensor, Tensor]:
    """The first ``cap`` items (splits are in hash order, so a prefix is a class-mixed sample)."""
    return (images, labels) if cap is None else (images[:cap], labels[:cap])


def _check_inputs(loaded: LoadedModel, bundle: DatasetBundle, cfg: CalibrateConfig, n_cal: int) -> None:
    """Fail before the first forward pass, with a message a user can act on."""
    if bundle.preprocessing.channels != loaded.cfg.in_channels:
        raise ValueError(f"data set {bundle.spec} has {bundle.preprocessing.channels}-channel images, but the model "
                         f"expects {loaded.cfg.in_channels}; calibrate on the data the model was trained on")
    if bundle.num_classes != loaded.cfg.num_classes:
        raise ValueError(f"data set {bundle.spec} has {bundle.num_classes} classes, but the model predicts "
                         f"{loaded.cfg.num_classes}; calibrate on the data the model was trained on")
    for a in cfg.alphas:
        if conformal_quantile_index(n_cal, a) > n_cal:
            raise ValueError(f"alpha {a:g} is too small for {n_cal} calibration images: split conformal needs at "
                             f"least {math.ceil(1 / a - 1 - 1e-9)} (ceil((n + 1)(1 - alpha)) <= n); use a larger "
                             "alpha or more calibration data")
    if bundle.preprocessing.mean != loaded.preprocessing.mean or bundle.preprocessing.std != loaded.preprocessing.std:
        logger.warning("data set %s has mean/std %s/%s, the model %s/%s; images are normalised with the model's, "
                       "as the service does", bundle.spec, bundle.preprocessing.mean, bundle.preprocessing.std,
                       loaded.preprocessing.mean, loaded.preprocessing.std)


def _uncertainty(s: UncertaintySummary, name: str) -> Tensor:
    """(N,) uncertainty score, larger = less sure."""
    if name == "max_probability":
        return 1.0 - s.probs.double().max(dim=-1).values
    return {"entropy": s.total, "mutual_information": s.epistemic, "aleatoric": s.aleatoric}[name].double()


def _decision_scores(s: UncertaintySummary, score: str) -> tuple[Tensor, bool]:
    """The score the accept rule looks at, as ``snodevit.inference`` reads it, and whether higher is surer."""
    return (s.confidence, True) if score == "confidence" else (s.epistemic, False)


def _labelled_figures(p: _Pass, fitted: Calibration, rule: cal.SelectiveThreshold, cfg: CalibrateConfig,
                      unscaled: _Pass) -> dict[str, float]:
    """Accuracy, calibration, conformal and selective figures of one labelled set, as the service answers.

    Args:
        p: the set, scaled with the fitted temperature.
        fitted: the calibration (conformal thresholds).
        rule: the accept/review rule.
        cfg: bins, alphas and decision score.
        unscaled: the same set at T = 1, for the ECE before scaling.
    """
    s, labels = p.s, p.labels
    out: dict[str, float] = {
        "accuracy": cal.accuracy(s.probs, labels),
        "ece": cal.expected_calibration_error(s.probs, labels, n_bins=cfg.n_bins),
        "nll": cal.negative_log_likelihood(s.probs, labels),
        "brier": cal.brier_score(s.probs, labels),
    }
    out["ece_before_scaling"] = cal.expected_calibration_error(unscaled.s.probs, labels, n_bins=cfg.n_bins)
    out["mean_confidence"] = float(s.confidence.double().mean())
    out["mean_entropy"] = float(s.total.double().mean())
    out["mean_mutual_information"] = float(s.epistemic.double().mean())
    for a in cfg.alphas:
        row = _conformal_figures(s.probs, labels, fitted.threshold_for(a), fitted.conformal_score, a)
        out[f"coverage_alpha_{a:g}"] = row["coverage"]  # the served sets (top class added)
        out[f"set_size_alpha_{a:g}"] = row["mean_set_size"]
        out[f"bare_coverage_alpha_{a:g}"] = row["bare_coverage"]  # the sets the guarantee is about
        out[f"empty_fraction_alpha_{a:g}"] = row["empty_fraction"]
    scores, _ = _decision_scores(s, cfg.decision_score)
    sel = cal.selective_figures(scores, p.correct, rule)
    out["accepted_fraction"] = sel["coverage"]
    out["risk_among_accepted"] = sel["risk"]
    return out


def _conformal_figures(probs: Tensor, labels: Tensor, threshold: float, score: str, alpha: float) -> dict[str, Any]:
    """Coverage and size of the conformal sets of one (score, alpha) on a labelled set.

    Two kinds of set: the served sets (``coverage``, ``mean_set_size``, ``singleton_fraction``), which always
    hold the top class, as the service answers them, so their coverage is at least the top-1 accuracy; and the
    bare split-conformal sets ``{y : s(x, y) <= q}`` (``bare_*``, ``empty_fraction``), which may be empty and
    are the sets whose coverage conformal prediction controls (between 1 - alpha and 1 - alpha + 1/(n + 1)).
    """
    n = len(labels)
    sets = cal.prediction_sets(probs, threshold, score)
    bare = cal.prediction_sets(probs, threshold, score, allow_empty=True)
    coverage, size = cal.conformal_coverage(sets, labels)
    bare_coverage, bare_size = cal.conformal_coverage(bare, labels)
    return {"score": score, "threshold": threshold, "target_coverage": 1.0 - alpha, "coverage": coverage,
            "coverage_std_error": math.sqrt(coverage * (1.0 - coverage) / n),
            "top1_accuracy": cal.accuracy(probs, labels), "mean_set_size": size,
            "singleton_fraction": float((sets.sum(dim=1) == 1).double().mean()),
            "bare_coverage": bare_coverage,
            "bare_coverage_std_error": math.sqrt(bare_coverage * (1.0 - bare_coverage) / n),
            "bare_mean_set_size": bare_size, "empty_fraction": float((~bare.any(dim=1)).double().mean())}


def _png(fig: Any) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight", metadata={"Software": None})
    return buf.getvalue()


_AXIS = {"max_probability": "1 - max probability", "entropy": "predictive entropy (nats)",
         "mutual_information": "mutual information (epistemic, nats)",
         "aleatoric": "expected entropy (aleatoric, nats)"}
LOG_FLOOR = 1e-8  # figures show log10(max(score, LOG_FLOOR)): a confident model's scores pile up near 0


def _log10(u: Tensor) -> Tensor:
    return u.double().clamp_min(LOG_FLOOR).log10()


def _log_label(score: str) -> str:
    return f"log10 {_AXIS[score]} (floored at {LOG_FLOOR:g})"


def _ood_figure(scores: Mapping[str, Mapping[str, Tensor]], auroc: Mapping[str, Mapping[str, float]]) -> bytes:
    """Density histograms of each OOD score (log10): the test split against each OOD set (AUROCs read, not recomputed).

    Args:
        scores: set name ("test" first, then the OOD sets) -> score name -> (N,) scores.
        auroc: OOD set name -> score name -> AUROC against the test split.
    """
    from matplotlib.figure import Figure

    names = list(next(iter(scores.values())))
    fig = Figure(figsize=(4.4 * len(names), 3.6))
    axes = fig.subplots(1, len(names), squeeze=False)[0]
    colors = ("#4c72b0", "#d62728", "#2ca02c", "#9467bd")
    for ax, score in zip(axes, names):
        values = {k: _log10(v[score]).cpu().numpy() for k, v in scores.items()}
        lo = min(float(v.min()) for v in values.values())
        hi = max(float(v.max()) for v in values.values())
        edges = torch.linspace(lo, hi if hi > lo else lo + 1e-9, 31).numpy()
        for color, (set_name, v) in zip(colors, values.items()):
            label = set_name if set_name not in auroc else f"{set_name} (AUROC {auroc[set_name][score]:.3f})"
            ax.hist(v, bins=edges, density=True, histtype="stepfilled", alpha=0.4, color=color, label=label)
        ax.set_xlabel(_log_label(score), fontsize=8)
        ax.set_ylabel("density")
        ax.set_title(f"{score.replace('_', ' ')}: test vs OOD", fontsize=10)
        ax.legend(fontsize=7)
    return _png(fig)


def _selected_on_calibration_split(meta: Mapping[str, Any], spec: str) -> bool:
    """Whether `snodevit train` picked the saved epoch by accuracy on this data set's calibration split.

    It validates on the calibration split; with ``keep="best"`` (the only behaviour before ``keep`` was recorded)
    the saved weights are the ones that scored best there, which biases anything fitted on that split.
    """
    training = meta.get("training")
    if not isinstance(training, Mapping) or meta.get("data") != spec:
        return False
    return training.get("keep", "best") == "best"


def _is_digit_model(loaded: LoadedModel) -> bool:
    return loaded.cfg.in_channels == 1 and list(loaded.class_names) == list(DIGIT_CLASSES)


@dataclass
class _Passes:
    """The raw logits of every image set, in the order they were run."""

    calibration: _Pass
    test: _Pass
    rotated: dict[float, _Pass]  # angle (degrees, not a multiple of 360) -> the rotated test split
    digits: _Pass | None  # scikit-learn's digits, for digit models only
    pixel_noise: _Pass  # the test split under heavy pixel noise (labelled)
    ood: dict[str, _Pass]  # far-OOD set name -> its pass (labels are placeholders, but for inverted digits)


def _fit_densities(runner: _Runner, loaded: LoadedModel, train: Tensor, train_labels: Tensor) -> None:
    """Fit the gate's densities on training features: every layer's, and the last block's alone."""
    feats = runner.train_features(train)  # (N, G, D)
    groups = loaded.cfg.num_gate_features
    c = loaded.cfg.num_classes
    # rounded to float32 as meta.json keeps it, so every score measured here is the one served
    runner.densities["feature_density"] = (cal.fit_feature_density(feats, train_labels, c).rounded(),
                                           slice(0, groups))
    last = slice(groups - 1, groups)
    runner.densities["feature_density_last"] = (cal.fit_feature_density(feats[:, last], train_labels, c).rounded(),
                                                last)


def _run_passes(loaded: LoadedModel, bundle: DatasetBundle, cfg: CalibrateConfig,
                progress: bool) -> tuple[_Passes, cal.FeatureDensity]:
    """Check the inputs, fit the feature densities on the training split, then run the model over every image set.

    Returns:
        The passes and the density of every feature group (what a ``feature_density`` gate serves).
    """
    prep = loaded.preprocessing
    cal_images, cal_labels = _cap(*bundle.raw("calibration"), cfg.max_images)
    test_images, test_labels = _cap(*bundle.raw("test"), cfg.max_images)
    train_images, train_labels = _cap(*bundle.raw("train"), cfg.max_train_images)
    _check_inputs(loaded, bundle, cfg, len(cal_labels))
    digits = _cap(*load_dataset("digits").raw("all"), cfg.max_images) if _is_digit_model(loaded) else None
    angles = [a for a in cfg.angles if a % 360.0 != 0.0]  # 0 degrees is the test pass itself
    total = (len(train_labels) + len(cal_labels) + len(test_labels) * (3 + len(angles))
             + (0 if digits is None else len(digits[1])) + cfg.num_ood * (len(FAR_OOD_SETS) - 1))
    runner = _Runner(loaded, cfg, total, progress)
    try:
        _fit_densities(runner, loaded, train_images, train_labels)
        no_label = torch.zeros(cfg.num_ood, dtype=torch.int64)
        passes = _Passes(
            calibration=runner.run("calibration split", cal_images, cal_labels),
            test=runner.run("test split", test_images, test_labels),
            rotated={a: runner.run(f"rotated {a:g} deg", rotate_images(test_images, a), test_labels) for a in angles},
            digits=None if digits is None else runner.run("digits", *digits),
            pixel_noise=runner.run("pixel noise", pixel_noise_images(test_images, seed=cfg.seed), test_labels),
            ood={"uniform_noise": runner.run("uniform noise", uniform_noise_images(cfg.num_ood, prep, cfg.seed),
                                             no_label),
                 "photo_crops": runner.run("photo crops", photo_crops(cfg.num_ood, prep, cfg.seed), no_label),
                 "constant": runner.run("constant images", constant_images(cfg.num_ood, prep), no_label),
                 "inverted_digits": runner.run("inverted digits", inverted_images(test_images), test_labels),
                 "letters": runner.run("letters", letter_images(cfg.num_ood, prep, cfg.seed), no_label)})
    finally:
        runner.close()
    return passes, runner.densities["feature_density"][0]


def _fit(p: _Pass, cfg: CalibrateConfig,
         density: cal.FeatureDensity) -> tuple[Calibration, cal.SelectiveThreshold]:
    """Temperature, then conformal and accept/review thresholds and the OOD gate on the scaled calibration split
    (scales ``p``)."""
    temperature = cal.fit_temperature(p.logits, p.labels)
    p.scale(temperature)
    thresholds = {str(a): cal.fit_conformal_threshold(p.s.probs, p.labels, a, cfg.conformal_score)
                  for a in cfg.alphas}
    scores, higher = _decision_scores(p.s, cfg.decision_score)
    rule = cal.fit_selective_threshold(scores, p.correct, cfg.target_risk, higher_is_confident=higher,
                                       score_name=cfg.decision_score)
    if rule.coverage == 0.0:
        logger.warning("no %s threshold keeps the calibration error rate at %.1f%%: every image will be sent to "
                       "review", cfg.decision_score, 100 * cfg.target_risk)
    gate = None
    if cfg.gate_score != "none":
        gate_threshold = cal.fit_novelty_threshold(p.gate_score(cfg.gate_score), cfg.gate_review_rate)
        if math.isinf(gate_threshold):
            logger.warning("the calibration split (%d images) is too small for a %.2f%% review rate: the "
                           "out-of-distribution gate will never fire", len(p.labels), 100 * cfg.gate_review_rate)
        gate = OodGate(score=cfg.gate_score, threshold=gate_threshold,  # type: ignore[arg-type]
                       review_rate=cfg.gate_review_rate,
                       density=density if cfg.gate_score == "feature_density" else None,
                       calibration_images=len(p.labels))
    fitted = Calibration(temperature=temperature, conformal_score=cfg.conformal_score,
                         conformal_thresholds=thresholds, decision_score=cfg.decision_score,
                         decision_threshold=rule.threshold, target_risk=cfg.target_risk, ood_gate=gate)
    return fitted, rule


def _named_sets(passes: _Passes) -> dict[str, _Pass]:
    """Every evaluated set by display name: test, rotations, digits, pixel noise, then the far-OOD sets."""
    out = {"test": passes.test}
    out |= {f"rotated {a:g}": p for a, p in sorted(passes.rotated.items())}
    if passes.digits is not None:
        out["sklearn digits"] = passes.digits
    out["pixel noise"] = passes.pixel_noise
    return out | dict(passes.ood)


def _labelled(name: str) -> bool:
    return name not in FAR_OOD_SETS or name == "inverted_digits"


def _candidate_flags(cal_pass: _Pass, p: _Pass, name: str, rate: float) -> Tensor:
    """(N,) bool: which images of ``p`` a gate candidate, fitted on the calibration split at ``rate``, flags."""
    if "|" in name:  # a union of two scores, each at half the rate, so the union keeps the rate (Bonferroni)
        flags = [_candidate_flags(cal_pass, p, part, rate / 2) for part in name.split("|")]
        return flags[0] | flags[1]
    return p.gate_score(name) > cal.fit_novelty_threshold(cal_pass.gate_score(name), rate)


def _gate_section(passes: _Passes, cfg: CalibrateConfig) -> dict[str, dict[str, float | None]]:
    """Every gate candidate side by side: the share of each set it sends to review at the stated in-distribution
    review rate, and its AUROC against the test split (larger scores = more unusual)."""
    sets = _named_sets(passes)
    out: dict[str, dict[str, float | None]] = {}
    for name in GATE_CANDIDATES:
        row: dict[str, float | None] = {}
        for set_name, p in sets.items():
            row[f"review {set_name}"] = float(_candidate_flags(passes.calibration, p, name,
                                                               cfg.gate_review_rate).double().mean())
        for set_name, p in sets.items():
            if set_name != "test":
                row[f"AUROC {set_name}"] = (None if "|" in name else cal.ood_detection(
                    passes.test.gate_score(name), p.gate_score(name))["auroc"])
        out[name] = row
    return out


def _decision_rows(passes: _Passes, fitted: Calibration) -> dict[str, dict[str, float | None]]:
    """What the served decision does on every set: accepted share, error among accepted, review shares by reason,
    and the served gate's AUROC against the test split."""
    gate = fitted.ood_gate
    out: dict[str, dict[str, float | None]] = {}
    for name, p in _named_sets(passes).items():
        score = None if gate is None else p.gate_score(gate.score)
        accept, _, codes, _ = decide_outcomes(p.s, fitted, score)
        n = len(codes)
        accepted = int(accept.sum())
        row: dict[str, float | None] = {"images": float(n), "accuracy": None, "accepted": accepted / n,
                                        "error_among_accepted": None,
                                        "review_out_of_distribution": codes.count(OUT_OF_DISTRIBUTION) / n,
                                        "review_low_confidence": codes.count(LOW_CONFIDENCE) / n,
                                        "gate_auroc": None}
        if _labelled(name):
            row["accuracy"] = float(p.correct.double().mean())
            if accepted:
                row["error_among_accepted"] = float((~p.correct[accept]).double().mean())
        if gate is not None and name != "test":
            row["gate_auroc"] = cal.ood_detection(passes.test.gate_score(gate.score), score)["auroc"]
        out[name] = row
    return out


def _test_sections(cal_pass: _Pass, test: _Pass, test_one: _Pass, fitted: Calibration,
                   rule: cal.SelectiveThreshold, cfg: CalibrateConfig) -> dict[str, Any]:
    """temperature, calibration, conformal, selective and misclassification sections of the test split."""
    labels, t = test.labels, fitted.temperature
    before = cal.calibration_summary(test_one.s.probs, labels, n_bins=cfg.n_bins)
    after = cal.calibration_summary(test.s.probs, labels, n_bins=cfg.n_bins)
    before["mean_confidence"] = float(test_one.s.confidence.double().mean())
    after["mean_confidence"] = float(test.s.confidence.double().mean())
    temperature = {"temperature": t, "calibration_accuracy": cal.accuracy(cal_pass.s.probs, cal_pass.labels),
                   "test_accuracy": after["accuracy"],
                   "calibration_nll_before": cal.calibrated_nll(cal_pass.logits, cal_pass.labels, 1.0),
                   "calibration_nll_after": cal.calibrated_nll(cal_pass.logits, cal_pass.labels, t),
                   "test_nll_before": before["nll"], "test_nll_after": after["nll"]}

    conformal = {f"alpha={a:g}": _conformal_figures(test.s.probs, labels, fitted.threshold_for(a),
                                                    fitted.conformal_score, a) for a in cfg.alphas}
    other = next(c for c in CONFORMAL_SCORES if c != fitted.conformal_score)
    for a in cfg.alphas:  # the other score on the same probabilities, for comparison; not stored with the model
        thr = cal.fit_conformal_threshold(cal_pass.s.probs, cal_pass.labels, a, other)
        conformal[f"alpha={a:g} {other} (not stored)"] = _conformal_figures(test.s.probs, labels, thr, other, a)

    scores, _ = _decision_scores(test.s, cfg.decision_score)
    on_test = cal.selective_figures(scores, test.correct, rule)
    rule_row = {"score": rule.score_name, "threshold": rule.threshold, "target_risk": rule.target_risk}
    selective = {
        "calibration": {**rule_row, "coverage": rule.coverage, "risk": rule.risk, "images": rule.n_calibration},
        "test": {**rule_row, "coverage": on_test["coverage"], "risk": on_test["risk"], "images": len(labels)}}

    miscls = {}
    for name in UNCERTAINTY_SCORES:
        u = _uncertainty(test.s, name)
        miscls[name] = {**cal.misclassification_detection(u, test.correct),
                        "aurc": cal.aurc(u, test.correct, higher_is_confident=False)}
    return {"temperature": temperature, "calibration": {"before": before, "after": after}, "conformal": conformal,
            "selective": selective, "misclassification": miscls}


def _shift_sections(passes: _Passes, test_one: _Pass, fitted: Calibration, rule: cal.SelectiveThreshold,
                    cfg: CalibrateConfig, data_name: str) -> dict[str, Any]:
    """shift (one row per rotation angle, 0 = the test split) and domain_shift (test split vs digits)."""
    t = fitted.temperature
    rows = []
    for a in cfg.angles:
        p = passes.rotated.get(a)
        scaled, one = (passes.test, test_one) if p is None else (p.scale(t), _Pass(p.logits, p.labels).scale(1.0))
        rows.append(_labelled_figures(scaled, fitted, rule, cfg, one))
    shift: dict[str, list[float]] = {"angle": list(cfg.angles)}
    shift |= {key: [row[key] for row in rows] for key in rows[0]}
    out: dict[str, Any] = {"shift": shift}
    if passes.digits is not None:
        d = passes.digits
        out["domain_shift"] = {
            f"{data_name} test": _labelled_figures(passes.test, fitted, rule, cfg, test_one),
            "sklearn digits": _labelled_figures(d.scale(t), fitted, rule, cfg, _Pass(d.logits, d.labels).scale(1.0))}
    return out


def _ood_section(passes: _Passes, temperature: float) -> dict[str, dict[str, float]]:
    """Detection of each OOD set against the test split, by each score (scales the OOD passes)."""
    section = {}
    for set_name, p in passes.ood.items():
        p.scale(temperature)
        for score in OOD_SCORES:
            u_in, u_out = _uncertainty(passes.test.s, score), _uncertainty(p.s, score)
            section[f"{set_name}/{score}"] = {**cal.ood_detection(u_in, u_out), "mean_test": float(u_in.mean()),
                                              "mean_ood": float(u_out.mean())}
    return section


def _goals(m: Mapping[str, Any], cfg: CalibrateConfig) -> dict[str, dict[str, Any]]:
    """The targets of the calibration issue, the measured values, and whether they were met."""
    after = m["calibration"]["after"]
    goals: dict[str, dict[str, Any]] = {
        "test ECE after scaling": {"goal": f"<= {GOAL_ECE:g}", "measured": after["ece"],
                                   "met": after["ece"] <= GOAL_ECE, "note": ""}}
    for a in cfg.alphas:
        # judged on the bare sets, the ones whose coverage split conformal controls; the served sets add the top
        # class, so their coverage cannot fall below the top-1 accuracy whatever alpha is
        row = m["conformal"][f"alpha={a:g}"]
        c = row["bare_coverage"]
        note = (f"bare split-conformal sets {{y : score <= q}} (± {row['bare_coverage_std_error']:.3f} standard "
                f"error), {100 * row['empty_fraction']:.1f}% of them empty; the served sets add the top class, so "
                f"none is empty, and cover {row['coverage']:.3f} (>= top-1 accuracy {row['top1_accuracy']:.3f})")
        goals[f"coverage alpha={a:g}"] = {"goal": f"{1 - a:g} ± {GOAL_COVERAGE_SLACK:g}", "measured": c,
                                          "met": abs(c - (1 - a)) <= GOAL_COVERAGE_SLACK + _ROUNDING, "note": note}
    goals["test accuracy"] = {"goal": f">= {GOAL_ACCURACY:g}", "measured": after["accuracy"],
                              "met": after["accuracy"] >= GOAL_ACCURACY - _ROUNDING, "note": ""}
    rows = m.get("decisions_under_shift")
    if not rows:  # no decision rows (a caller that measured only the calibration): no decision goals
        return goals
    test = rows["test"]
    goals["test: accepted"] = {"goal": f">= {GOAL_ACCEPTED:g}", "measured": test["accepted"],
                               "met": test["accepted"] >= GOAL_ACCEPTED - _ROUNDING, "note": ""}
    err = test["error_among_accepted"]
    goals["test: error among accepted"] = {"goal": f"<= {GOAL_ID_ERROR:g}", "measured": err,
                                           "met": err is not None and err <= GOAL_ID_ERROR + _ROUNDING, "note": ""}
    for name in GOAL_FAR_OOD_SETS:
        review = 1.0 - rows[name]["accepted"]
        goals[f"{name}: sent to review"] = {"goal": f">= {GOAL_FAR_OOD_REVIEW:g}", "measured": review,
                                            "met": review >= GOAL_FAR_OOD_REVIEW - _ROUNDING,
                                            "note": f"{rows[name]['review_out_of_distribution']:.3f} by the gate"}
    for name, row in rows.items():
        if name.startswith("rotated") or name in ("sklearn digits", "pixel noise"):
            err = row["error_among_accepted"]
            goals[f"{name}: error among accepted"] = {
                "goal": f"<= {GOAL_SHIFT_ERROR:g}", "measured": err,
                "met": err is None or err <= GOAL_SHIFT_ERROR + _ROUNDING,
                "note": f"{row['accepted']:.3f} accepted (none accepted counts as met)"}
    return goals


def calibrate_model(loaded: LoadedModel, bundle: DatasetBundle, cfg: CalibrateConfig | None = None, *,
                    progress: bool = True, figures: bool = True) -> CalibrationResult:
    """Fit the calibration of ``loaded`` on ``bundle``'s calibration split and measure it everywhere else.

    Args:
        loaded: the model (its stored calibration is ignored: fitting starts from the raw logits).
        bundle: the data set; its calibration split fits, its test split evaluates.
        cfg: what to fit and how much data to use; default :class:`CalibrateConfig`.
        progress: show a progress bar over all passes (on stderr).
        figures: draw the PNG figures (the metrics do not depend on them).

    Returns:
        The fitted :class:`~snodevit.inference.Calibration`, the report sections, figures and headline figures.

    Raises:
        ValueError: images with another channel count or class count than the model, or an alpha too small for
            the calibration split (raised before the first forward pass).
    """
    cfg = cfg or CalibrateConfig()
    started = time.perf_counter()
    passes, density = _run_passes(loaded, bundle, cfg, progress)
    inference_seconds = time.perf_counter() - started

    fitted, rule = _fit(passes.calibration, cfg, density)
    fitted = dataclasses.replace(fitted, precision=loaded.precision)  # the passes the figures were fitted on
    test_one = _Pass(passes.test.logits, passes.test.labels).scale(1.0)
    passes.test.scale(fitted.temperature)
    passes.pixel_noise.scale(fitted.temperature)
    sections = _test_sections(passes.calibration, passes.test, test_one, fitted, rule, cfg)
    sections |= _shift_sections(passes, test_one, fitted, rule, cfg, bundle.name)
    sections["ood"] = _ood_section(passes, fitted.temperature)
    sections["ood_gate"] = _gate_section(passes, cfg)
    sections["decisions_under_shift"] = _decision_rows(passes, fitted)
    setup = {
        "model": loaded.source, "weights_sha256": loaded.weights_sha256, "data": bundle.spec,
        "calibration_images": len(passes.calibration.labels), "test_images": len(passes.test.labels),
        "model_selected_on_calibration_split": _selected_on_calibration_split(loaded.meta, bundle.spec),
        "digits_images": 0 if passes.digits is None else len(passes.digits.labels),
        "ood_images_per_set": cfg.num_ood, "num_samples": cfg.num_samples, "seed": cfg.seed, "n_bins": cfg.n_bins,
        "alphas": list(cfg.alphas), "conformal_score": cfg.conformal_score, "decision_score": cfg.decision_score,
        "target_risk": cfg.target_risk, "rotation_angles": list(cfg.angles), "max_images": cfg.max_images,
        "gate_score": cfg.gate_score, "gate_review_rate": cfg.gate_review_rate,
        "gate_training_images": min(len(bundle.train), cfg.max_train_images or len(bundle.train)),
        "pixel_noise_std": PIXEL_NOISE_STD,
        "inference_seconds": inference_seconds, "seconds": time.perf_counter() - started}
    metrics = {"goals": _goals(sections, cfg), **sections, "setup": setup}
    pngs = _figures(passes, test_one, metrics, cfg) if figures else {}
    return CalibrationResult(calibration=fitted, metrics=metrics, figures=pngs,
                             headline=_headline(fitted, metrics, bundle, cfg))


def _headline(fitted: Calibration, m: Mapping[str, Any], bundle: DatasetBundle, cfg: CalibrateConfig) -> dict[str, Any]:
    """The figures a user reads first (also stored as ``calibration_figures`` in meta.json). JSON-safe."""
    conformal = m["conformal"]
    test_sel = m["selective"]["test"]
    head = {
        "data": bundle.spec, "num_samples": cfg.num_samples,
        "calibration_images": m["setup"]["calibration_images"], "test_images": m["setup"]["test_images"],
        "accuracy": m["calibration"]["after"]["accuracy"], "temperature": fitted.temperature,
        "ece_before": m["calibration"]["before"]["ece"], "ece_after": m["calibration"]["after"]["ece"],
        "nll_before": m["calibration"]["before"]["nll"], "nll_after": m["calibration"]["after"]["nll"],
        "conformal_score": fitted.conformal_score,
        "coverage": {str(a): conformal[f"alpha={a:g}"]["coverage"] for a in cfg.alphas},
        "mean_set_size": {str(a): conformal[f"alpha={a:g}"]["mean_set_size"] for a in cfg.alphas},
        "bare_coverage": {str(a): conformal[f"alpha={a:g}"]["bare_coverage"] for a in cfg.alphas},
        "bare_mean_set_size": {str(a): conformal[f"alpha={a:g}"]["bare_mean_set_size"] for a in cfg.alphas},
        "empty_fraction": {str(a): conformal[f"alpha={a:g}"]["empty_fraction"] for a in cfg.alphas},
        "decision_score": fitted.decision_score, "decision_threshold": fitted.decision_threshold,
        "target_risk": fitted.target_risk, "selective_coverage": test_sel["coverage"],
        "selective_risk": test_sel["risk"],
    }
    for score in OOD_SCORES:
        head[f"ood_auroc_{score}"] = {s: m["ood"][f"{s}/{score}"]["auroc"] for s in OOD_SETS}
    head["rotation_accuracy"] = {f"{a:g}": acc for a, acc in zip(m["shift"]["angle"], m["shift"]["accuracy"])}
    head["ood_gate"] = None if fitted.ood_gate is None else fitted.ood_gate.summary()
    head["decisions"] = {name: {k: row[k] for k in ("accepted", "error_among_accepted", "review_out_of_distribution")}
                         for name, row in m["decisions_under_shift"].items()}
    head["seconds"] = m["setup"]["seconds"]
    return to_jsonable(head)


def _figures(passes: _Passes, test_one: _Pass, m: Mapping[str, Any], cfg: CalibrateConfig) -> dict[str, bytes]:
    """The report's PNGs; every number they print is read from the metrics ``m``."""
    test = passes.test
    before, after, shift = m["calibration"]["before"], m["calibration"]["after"], m["shift"]
    panel_before, panel_after = "before scaling (T = 1)", f"after scaling (T = {m['temperature']['temperature']:.3f})"
    uncertainty = {name: _uncertainty(test.s, name) for name in UNCERTAINTY_SCORES}
    out = {
        "calibration_reliability": cal.reliability_diagram(
            {panel_before: cal.reliability_bins(test_one.s.probs, test.labels, cfg.n_bins),
             panel_after: cal.reliability_bins(test.s.probs, test.labels, cfg.n_bins)},
            ece={panel_before: before["ece"], panel_after: after["ece"]}),
        "calibration_confidence_histogram": cal.confidence_histogram(
            {"before scaling": test_one.s.confidence, "after scaling": test.s.confidence},
            accuracy=after["accuracy"]),
        "selective_risk_coverage": cal.risk_coverage_plot(
            {name: cal.risk_coverage_curve(u, test.correct, higher_is_confident=False)
             for name, u in uncertainty.items()},
            aurc={name: row["aurc"] for name, row in m["misclassification"].items()}),
    }
    for name, u in uncertainty.items():  # log10: the ranking (and so AUROC) is that of the score itself
        out[f"misclassification_{name}"] = cal.uncertainty_histogram(_log10(u), test.correct,
                                                                     score_name=_log_label(name))
    out["shift_rotation"] = cal.shift_plot(shift["angle"], {
        "accuracy": shift["accuracy"], "ECE (after scaling)": shift["ece"],
        "ECE (before scaling)": shift["ece_before_scaling"], "mean confidence": shift["mean_confidence"],
        "accepted fraction": shift["accepted_fraction"]})
    scores = {"test": {s: uncertainty[s] for s in OOD_SCORES}}
    scores |= {name: {s: _uncertainty(p.s, s) for s in OOD_SCORES} for name, p in passes.ood.items()}
    auroc = {name: {s: m["ood"][f"{name}/{s}"]["auroc"] for s in OOD_SCORES} for name in passes.ood}
    out["ood_scores"] = _ood_figure(scores, auroc)
    out |= decision_figures(m["decisions_under_shift"])
    return out


def decision_figures(rows: Mapping[str, Mapping[str, Any]]) -> dict[str, bytes]:
    """Accepted share and error among accepted against rotation angle; one bar per far-OOD and shifted set
    (values read from the ``decisions_under_shift`` rows)."""
    from matplotlib.figure import Figure

    angles = [0.0] + [float(k.split()[1]) for k in rows if k.startswith("rotated ")]
    keys = ["test"] + [k for k in rows if k.startswith("rotated ")]
    fig = Figure(figsize=(6.4, 3.8))
    ax = fig.subplots()
    nan = float("nan")
    ax.plot(angles, [rows[k]["accepted"] for k in keys], "o-", color="#4c72b0", label="accepted")
    ax.plot(angles, [nan if rows[k]["error_among_accepted"] is None else rows[k]["error_among_accepted"]
                     for k in keys], "s-", color="#d62728", label="error among accepted")
    ax.plot(angles, [rows[k]["review_out_of_distribution"] for k in keys], "^--", color="#2ca02c",
            label="sent to review: out of distribution")
    ax.plot(angles, [rows[k]["accuracy"] for k in keys], ":", color="#7f7f7f", label="accuracy")
    ax.axhline(GOAL_SHIFT_ERROR, color="#d62728", lw=0.8, ls=":")
    ax.set_xlabel("rotation of the test digits (degrees)")
    ax.set_ylabel("share of images")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title("decisions under rotation", fontsize=10)
    ax.legend(fontsize=7)
    out = {"decisions_under_shift_rotation": _png(fig)}

    names = [k for k in rows if not k.startswith("rotated ") and k != "test"]
    fig = Figure(figsize=(max(6.4, 1.0 * len(names)), 3.8))
    ax = fig.subplots()
    x = list(range(len(names)))
    ood = [rows[k]["review_out_of_distribution"] for k in names]
    low = [rows[k]["review_low_confidence"] for k in names]
    ax.bar(x, ood, color="#2ca02c", label="review: out of distribution")
    ax.bar(x, low, bottom=ood, color="#ff7f0e", label="review: low confidence")
    for i, k in enumerate(names):
        err = rows[k]["error_among_accepted"]
        if err is not None and rows[k]["accepted"] > 0:
            ax.text(i, min(1.0, ood[i] + low[i]) + 0.02, f"err {err:.0%}", ha="center", fontsize=7)
    ax.axhline(GOAL_FAR_OOD_REVIEW, color="#444", lw=0.8, ls=":")
    ax.set_xticks(x, [k.replace("_", " ") for k in names], rotation=20, fontsize=8)
    ax.set_ylabel("share sent to review")
    ax.set_ylim(0, 1.3)
    ax.set_title("decisions on shifted and out-of-distribution sets (err: error among accepted)", fontsize=10)
    ax.legend(fontsize=7, loc="upper left", ncol=2)
    out["decisions_under_shift_sets"] = _png(fig)
    return out


REPORT_INTRO = (
    "This report checks whether the confidence of {model} can be acted on: accepted automatically when it is high, "
    "sent to a person when it is not. Everything was fitted on the {n_cal}-image calibration split of {data} and "
    "measured on its {n_test}-image test split, which the fit never saw; the model was not trained on either. Each "
    "image got S = {s} Monte Carlo samples (noise seeded per image, so rerunning gives the same numbers), and all "
    "probabilities are exactly what the service answers with the stored calibration. Read 'goals' first: the "
    "targets of the calibration work and whether this run met them. Then 'temperature' and 'calibration' (is a "
    "stated confidence honest?), 'conformal' (do the prediction sets contain the answer as often as promised? The "
    "promise is about the bare sets, which may be empty; the served sets always hold the top class, so they cover "
    "at least as often as the model is right), 'selective' (what share of images can be accepted at the target "
    "error rate?), and 'misclassification' (which uncertainty score best flags wrong answers?). 'shift' rotates "
    "the test digits to see how confidence degrades as inputs move away from the training data; 'domain_shift', "
    "when present, compares the test split with scikit-learn's digits, upsampled 8x8 scans from another source: "
    "the same classes drawn differently, so accuracy drops and the guarantees of the conformal sets and the accept "
    "rule no longer hold, which its bare coverage and risk rows show. 'ood' asks whether images that are not "
    "digits at all (uniform noise, crops of photographs) get higher uncertainty than real test images. 'setup' "
    "lists what was run. With a few hundred test images, differences below about one percentage point are within "
    "sampling noise (coverage carries its standard error).")


SELECTION_NOTE = (
    " One caveat applies to this model: `snodevit train` chose its best epoch by accuracy on this same calibration "
    "split, so the model looks a little better there than on unseen images (compare calibration_accuracy and "
    "test_accuracy under 'temperature'), and what is fitted there can be slightly too optimistic on the test split.")


def report_intro(result: CalibrationResult, model_name: str) -> str:
    """The report's opening paragraph for ``result`` (plain language; reads the figures, computes none)."""
    setup = result.metrics["setup"]
    text = REPORT_INTRO.format(model=model_name, n_cal=setup["calibration_images"], data=setup["data"],
                               n_test=setup["test_images"], s=setup["num_samples"])
    return text + (SELECTION_NOTE if setup["model_selected_on_calibration_split"] else "")

