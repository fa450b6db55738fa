"""The report sections of the held-out test split: temperature, calibration, conformal sets, selective
classification and misclassification detection, each figure computed by the ``calibration`` package on what
the service answers (the test pass scaled with the fitted temperature).

References:
    Guo et al. "On Calibration of Modern Neural Networks." ICML 2017 (temperature scaling).
    Angelopoulos & Bates. "A Gentle Introduction to Conformal Prediction." arXiv:2107.07511, 2021.
    Geifman & El-Yaniv. "Selective Classification for Deep Neural Networks." NeurIPS 2017.
    Traub et al. "Overcoming Common Flaws in the Evaluation of Selective Classification Systems." NeurIPS 2024
    (AUGRC).
"""

from __future__ import annotations

import math
from typing import Any

from torch import Tensor

import calibration as cal

from snodevit.evaluation.config import CONFORMAL_SCORES, UNCERTAINTY_SCORES, CalibrateConfig
from snodevit.evaluation.passes import Pass
from snodevit.inference.fitted import Calibration


def conformal_figures(probs: Tensor, labels: Tensor, threshold: float, score: str, alpha: float) -> dict[str, Any]:
    """Coverage and size of the conformal sets of one (score, alpha) on a labelled set.

    Two kinds of set: the served sets (``coverage``, ``mean_set_size``, ``singleton_fraction``), which always
    hold the top class, as the service answers them, so their coverage is at least the top-1 accuracy; and the
    bare split-conformal sets ``{y : s(x, y) <= q}`` (``bare_*``, ``empty_fraction``), which may be empty and
    are the sets whose coverage conformal prediction controls (between 1 - alpha and 1 - alpha + 1/(n + 1)).

    Args:
        probs: (N, C) served probabilities.
        labels: (N,) int64 true classes.
        threshold: the fitted conformal threshold q.
        score: the non-conformity score ("lac" or "aps").
        alpha: the miscoverage the threshold was fitted for.

    Returns:
        The row of the report's ``conformal`` section.
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


def held_out_sections(cal_pass: Pass, test: Pass, test_one: Pass, fitted: Calibration, rule: cal.SelectiveThreshold,
                  cfg: CalibrateConfig) -> dict[str, Any]:
    """temperature, calibration, conformal, selective and misclassification sections of the test split.

    Args:
        cal_pass: the calibration split, scaled with the fitted temperature.
        test: the test split, scaled with the fitted temperature.
        test_one: the test split at T = 1.
        fitted: the calibration.
        rule: the accept/review rule, with its figures on the calibration split.
        cfg: bins, alphas and decision score.
    """
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
    return {"temperature": temperature, "calibration": {"before": before, "after": after},
            "conformal": _conformal_section(cal_pass, test, fitted, cfg),
            "selective": _selective_section(test, rule, cfg), "misclassification": _misclassification_section(test)}


def _conformal_section(cal_pass: Pass, test: Pass, fitted: Calibration, cfg: CalibrateConfig) -> dict[str, Any]:
    """One row per alpha of the stored score, then one per alpha of the other score (fitted here, not stored)."""
    labels = test.labels
    conformal = {f"alpha={a:g}": conformal_figures(test.s.probs, labels, fitted.threshold_for(a),
                                                   fitted.conformal_score, a) for a in cfg.alphas}
    other = next(c for c in CONFORMAL_SCORES if c != fitted.conformal_score)
    for a in cfg.alphas:  # the other score on the same probabilities, for comparison; not stored with the model
        thr = cal.fit_conformal_threshold(cal_pass.s.probs, cal_pass.labels, a, other)
        conformal[f"alpha={a:g} {other} (not stored)"] = conformal_figures(test.s.probs, labels, thr, other, a)
    return conformal


def _selective_section(test: Pass, rule: cal.SelectiveThreshold, cfg: CalibrateConfig) -> dict[str, Any]:
    """The accept rule's coverage and risk on the calibration split (where it was fitted) and the test split, and
    how well the served confidence ranks the test split at the served S and at S = 1.

    The S = 1 figures read the first Monte Carlo sample of the same pass (``Pass.at_count``): the noise is drawn
    per image sample by sample (``draw_noise``), so that sample is what the service answers at S = 1.
    """
    scores, _ = test.decision_scores(cfg.decision_score)
    on_test = cal.selective_figures(scores, test.correct, rule)
    rule_row = {"score": rule.score_name, "threshold": rule.threshold, "target_risk": rule.target_risk}
    first = test.at_count(1)  # (1, N, C), at the temperature test was scaled with
    return {"calibration": {**rule_row, "coverage": rule.coverage, "risk": rule.risk, "images": rule.n_calibration},
            "test": {**rule_row, "coverage": on_test["coverage"], "risk": on_test["risk"],
                     "images": len(test.labels)},
            "test_ranking": _ranking_row(test), "test_ranking_one_sample": _ranking_row(first)}


def _ranking_row(p: Pass) -> dict[str, Any]:
    """:func:`calibration.selective_metrics` of the served confidence on one scaled pass."""
    return {"score": "confidence", "num_samples": p.logits.shape[0], "images": len(p.labels),
            **cal.selective_metrics(p.s.confidence, p.correct)}


def _misclassification_section(test: Pass) -> dict[str, Any]:
    """How well each uncertainty score flags the test split's errors (AUROC and friends, AURC)."""
    miscls = {}
    for name in UNCERTAINTY_SCORES:
        u = test.uncertainty(name)
        miscls[name] = {**cal.misclassification_detection(u, test.correct),
                        "aurc": cal.aurc(u, test.correct, higher_is_confident=False)}
    return miscls
