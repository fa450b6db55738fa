"""Calibration of uncertainty-aware classifiers: metrics, temperature scaling, conformal sets, selective
prediction, figures and reports.

Pure numerics on torch tensors; nothing here imports the model. Conventions: ``probs`` (N, C) mean predicted
probabilities, ``labels`` (N,) int64, ``logit_samples`` (S, N, C) Monte Carlo logits, scores (N,) floats.
Invalid input raises ``ValueError`` naming the argument; scalar metrics are python floats.

The figure and report functions are imported on first use, so that the service, which only needs the
conformal sets and the accept/review rule, does not pay for importing matplotlib.
"""

import importlib
from typing import Any

from .calibration_error import (
    ReliabilityBins,
    adaptive_calibration_error,
    classwise_calibration_error,
    expected_calibration_error,
    maximum_calibration_error,
    reliability_bins,
)
from .conformal import conformal_coverage, conformal_quantile_index, fit_conformal_threshold, prediction_sets
from .density import FeatureDensity, fit_feature_density
from .detection import misclassification_detection, ood_detection
from .novelty import conformal_p_values, fit_novelty_threshold, novelty_flags
from .scoring_rules import accuracy, brier_score, negative_log_likelihood
from .risk_coverage import augrc, aurc, coverage_at_risk, risk_at_coverage, risk_coverage_curve, selective_metrics
from .selective import SelectiveThreshold, decide, fit_selective_threshold, selective_figures
from .summary import calibration_summary
from .temperature import apply_temperature, calibrated_nll, fit_temperature

__all__ = [
    "FeatureDensity",
    "ReliabilityBins",
    "SelectiveThreshold",
    "accuracy",
    "adaptive_calibration_error",
    "apply_temperature",
    "augrc",
    "aurc",
    "brier_score",
    "calibrated_nll",
    "calibration_summary",
    "classwise_calibration_error",
    "confidence_histogram",
    "conformal_coverage",
    "conformal_p_values",
    "conformal_quantile_index",
    "coverage_at_risk",
    "decide",
    "expected_calibration_error",
    "fit_conformal_threshold",
    "fit_feature_density",
    "fit_novelty_threshold",
    "fit_selective_threshold",
    "fit_temperature",
    "maximum_calibration_error",
    "misclassification_detection",
    "negative_log_likelihood",
    "novelty_flags",
    "ood_detection",
    "prediction_sets",
    "reliability_bins",
    "reliability_diagram",
    "risk_at_coverage",
    "risk_coverage_curve",
    "risk_coverage_plot",
    "selective_figures",
    "selective_metrics",
    "shift_plot",
    "uncertainty_histogram",
    "write_report",
]

_LAZY = {
    "confidence_histogram": "plots",
    "reliability_diagram": "plots",
    "risk_coverage_plot": "plots",
    "shift_plot": "plots",
    "uncertainty_histogram": "plots",
    "write_report": "report",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
