"""What ``snodevit calibrate`` fits and measures: :class:`CalibrateConfig` and the names of the scores and sets.

The names here are shared by the passes, the report sections and the figures, so that a score or a set is spelt
once (the report's keys are built from them).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal, get_args

from snodevit.data import ROTATION_ANGLES
from snodevit.inference.fitted import GATE_SCORES

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


#: Sample counts whose decision and gate thresholds `snodevit calibrate` fits (up to its own S, which is always
#: fitted): one sample, small fixed counts, and the counts at which adaptive sampling stops (its rounds of 8).
FITTED_COUNTS: tuple[int, ...] = (1, 2, 4, 8, 16, 24, 32)


def fitted_counts(num_samples: int) -> tuple[int, ...]:
    """The counts fitted by a calibration at ``num_samples`` samples: FITTED_COUNTS up to it, and it."""
    return tuple(sorted({n for n in FITTED_COUNTS if n <= num_samples} | {num_samples}))


@dataclass(frozen=True)
class CalibrateConfig:
    """What ``snodevit calibrate`` fits and how much data it looks at.

    Raises:
        ValueError: a field out of its range, naming the field and the value given.
    """

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
    # The decision threshold must also keep the mean of 1 - confidence (temperature-scaled) among the accepted at
    # the target risk, not only the error count: on 500 calibration images a split with 5 errors would otherwise
    # accept everything (measured: the stochastic-tail model then accepted 98 % of the test split at 1.6 % error)
    calibrated_risk: bool = True

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
        # sorted and deduplicated so the report's rows come in one order whatever order the caller gave
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
    """A small run for tests and smoke checks: S=4, at most 200 images per set, 3 angles, 64 OOD images per set.

    Args:
        **overrides: fields of :class:`CalibrateConfig` that replace the quick defaults.

    Returns:
        The configuration.
    """
    base: dict[str, Any] = dict(num_samples=4, max_images=200, angles=(0.0, 90.0, 180.0), num_ood=64,
                                max_train_images=600)
    return CalibrateConfig(**{**base, **overrides})


def _check_int(value: Any, name: str, minimum: int) -> None:
    """Refuse anything but an int (bools too) below ``minimum``, naming the field."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
