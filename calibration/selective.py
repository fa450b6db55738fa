"""Selective prediction: the accept/review threshold fitted for a target risk, and the ordering and tie rule that
:mod:`calibration.risk_coverage` (the curve and its summary figures) shares.

All accept the most confident samples first and treat tied scores as one group (a threshold cannot split them);
:func:`_tie_groups` is that ordering, written once. Where a coverage falls inside a tie group, the error count is
the expected one over the orders the tied samples could be accepted in (:func:`_expected_errors`); where a figure
is read at a threshold (the fitted rule, :func:`coverage_at_risk`), only whole tie groups are accepted.

The threshold is the one that accepts the most calibration samples while the empirical error rate among the
accepted stays at or below ``target_risk``. This is a plug-in rule on the calibration split, not a
high-probability guarantee (Geifman & El-Yaniv's SGR adds a binomial bound for that): on new data the risk among
accepted samples fluctuates around the target, by about ``sqrt(r (1 - r) / n_accepted)``.

References:
    Geifman & El-Yaniv. "Selective Classification for Deep Neural Networks." NeurIPS 2017 (risk-coverage, AURC).
    Geifman et al. "Bias-Reduced Uncertainty Estimation for Deep Neural Classifiers." ICLR 2019 (AURC).
    Traub et al. "Overcoming Common Flaws in the Evaluation of Selective Classification Systems." NeurIPS 2024
    (the generalized risk and AUGRC).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ._validation import (check_bool_arg, check_closed_unit_arg, check_probabilities_like, check_real_arg, check_scores,
                          check_scores_correct)

__all__ = ["SelectiveThreshold", "augrc", "aurc", "coverage_at_risk", "decide", "fit_selective_threshold",
           "risk_at_coverage", "risk_coverage_curve", "selective_figures", "selective_metrics"]


@dataclass(frozen=True)
class SelectiveThreshold:
    """An accept/review rule fitted on a calibration split."""

    threshold: float  # accept when score >= threshold (or <= when higher_is_confident is False); +-inf: none
    score_name: str  # what the score is, e.g. "confidence" or "epistemic"
    higher_is_confident: bool  # True: larger scores are more trustworthy (confidence); False: entropy-like
    target_risk: float  # the error rate among accepted samples the rule was fitted for
    coverage: float  # fraction of the calibration split accepted
    risk: float  # error rate among accepted calibration samples; NaN when none is accepted
    n_calibration: int  # size of the calibration split


def _accept(scores: Tensor, threshold: float, higher_is_confident: bool) -> Tensor:
    return scores >= threshold if higher_is_confident else scores <= threshold


def _tie_groups(score: Tensor, correct: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The samples in accepting order (most confident first) and the groups of tied scores along it.

    Args:
        score: (N,) scores, higher = more confident.
        correct: (N,) bool (or 0/1), True where the prediction was right.

    Returns:
        ``(order, counts, end, cum_err)``: the (N,) int64 permutation that sorts ``score`` in descending order
        (stable, so equal scores keep their input order), the (G,) sizes of the tie groups along it, the (G,)
        accepted count after each group, and the (N,) float64 running count of errors along ``order``.
    """
    s = score.double().cpu()
    order = torch.sort(s, descending=True, stable=True).indices
    cum_err = torch.cumsum((~correct.bool().cpu()[order]).double(), 0)
    _, counts = torch.unique_consecutive(s[order], return_counts=True)
    end = torch.cumsum(counts, 0)  # accepted count when the threshold sits at each tie group
    return order, counts, end, cum_err


def _expected_errors(score: Tensor, correct: Tensor) -> Tensor:
    """(N,) float64 errors among the k most confident, k = 1..N, ties resolved in expectation.

    Inside a tie group the count is interpolated linearly between the group's ends: the expected count if the
    tied samples were accepted in random order. At a group's end it is the exact count. ``score``: (N,), higher =
    more confident.
    """
    n = score.numel()
    _, counts, end, cum_err = _tie_groups(score, correct)
    start = end - counts
    err_end = cum_err[end - 1]
    err_start = torch.cat([torch.zeros(1, dtype=torch.float64), err_end[:-1]])
    rate = (err_end - err_start) / counts  # error rate inside each tie group
    k = torch.arange(1, n + 1, dtype=torch.float64)
    start_k = start.repeat_interleave(counts).double()
    return err_start.repeat_interleave(counts) + (k - start_k) * rate.repeat_interleave(counts)


def _risk_coverage_compute(score: Tensor, correct: Tensor) -> tuple[Tensor, Tensor]:
    """Risk-coverage with ties resolved in expectation. ``score``: (N,), higher = more confident."""
    n = score.numel()
    k = torch.arange(1, n + 1, dtype=torch.float64)
    return k / n, _expected_errors(score, correct) / k


def fit_selective_threshold(scores: Tensor, correct: Tensor, target_risk: float = 0.02,
                            higher_is_confident: bool = True, score_name: str = "confidence",
                            error_probabilities: Tensor | None = None) -> SelectiveThreshold:
    r"""The threshold with the largest calibration coverage whose selective risk is at most ``target_risk``.

    With the rule "accept if score >= t" (or <= t for uncertainty scores), over candidate thresholds t taken from
    the calibration scores themselves,

    .. math::
        t^\star = \arg\max_t \; \mathrm{cov}(t) \quad \text{s.t.} \quad
        \frac{\#\{\text{errors accepted at } t\}}{\#\{\text{accepted at } t\}} \le r_{\mathrm{target}},

    where tied scores are accepted or rejected together. Risk is not monotone in t, so every candidate is
    checked. If no threshold qualifies (even the single most confident group is too often wrong), the rule
    accepts nothing: ``threshold = +inf`` (``-inf`` for uncertainty scores), coverage 0, risk NaN.

    The empirical risk of a few hundred calibration images rests on a handful of errors: with 500 images and a
    1 % target, a split that happens to hold 5 errors accepts everything. With ``error_probabilities`` p_i (each
    image's probability of being wrong, e.g. 1 - its temperature-scaled confidence), a threshold must also keep
    their mean among the accepted, an estimate of the same risk that every accepted image informs, at most the
    target.

    Args:
        scores: (N,) calibration scores.
        correct: (N,) bool, True where the prediction was right.
        target_risk: the highest acceptable error rate among accepted samples, in [0, 1].
        higher_is_confident: True for confidence-like scores, False for entropy-like ones.
        score_name: a label stored with the rule, e.g. ``"confidence"``.
        error_probabilities: (N,) probabilities in [0, 1] that each prediction is wrong; None: the empirical risk
            alone decides.

    Returns:
        A :class:`SelectiveThreshold`.

    Raises:
        ValueError: on a bad ``target_risk``/``higher_is_confident``/``score_name`` or invalid tensors.

    Example:
        >>> conf = torch.tensor([0.9, 0.8, 0.7, 0.6], dtype=torch.float64)
        >>> rule = fit_selective_threshold(conf, torch.tensor([1, 1, 0, 1]), target_risk=0.25)
        >>> rule.threshold, rule.coverage, rule.risk
        (0.6, 1.0, 0.25)
        >>> fit_selective_threshold(conf, torch.tensor([1, 1, 0, 1]), target_risk=0.2).coverage
        0.5
        >>> p_wrong = torch.tensor([0.1, 0.2, 0.4, 0.5], dtype=torch.float64)  # their mean over all four: 0.3
        >>> fit_selective_threshold(conf, torch.tensor([1, 1, 0, 1]), 0.25, error_probabilities=p_wrong).coverage
        0.5
    """
    check_closed_unit_arg(target_risk, "target_risk")
    check_bool_arg(higher_is_confident, "higher_is_confident")
    if not isinstance(score_name, str) or not score_name:
        raise ValueError(f"`score_name` must be a non-empty string, got {score_name!r}")
    check_scores_correct(scores, correct)
    if error_probabilities is not None:
        check_probabilities_like(error_probabilities, scores, "error_probabilities")
    threshold, coverage, risk = _fit_compute(scores, correct, float(target_risk), higher_is_confident,
                                             error_probabilities)
    return SelectiveThreshold(threshold=threshold, score_name=score_name, higher_is_confident=higher_is_confident,
                              target_risk=float(target_risk), coverage=coverage, risk=risk,
                              n_calibration=scores.numel())


def _fit_compute(scores: Tensor, correct: Tensor, target_risk: float, higher_is_confident: bool,
                 error_probabilities: Tensor | None = None) -> tuple[float, float, float]:
    """``(threshold, coverage, risk)`` of the widest tie-group cut whose risk (and mean error probability, when
    given) is at most ``target_risk``.

    When no cut qualifies: ``(+inf, 0.0, nan)`` (``-inf`` for uncertainty scores), a rule that accepts nothing.
    """
    n = scores.numel()
    s = scores.double().cpu()
    order, _, end, cum_err = _tie_groups(s if higher_is_confident else -s, correct)
    risk = cum_err[end - 1] / end
    ok = risk <= target_risk + 1e-12
    if error_probabilities is not None:
        estimate = torch.cumsum(error_probabilities.double().cpu()[order], 0)[end - 1] / end
        ok &= estimate <= target_risk + 1e-12
    if not bool(ok.any()):
        return (math.inf if higher_is_confident else -math.inf), 0.0, math.nan
    best = int(torch.nonzero(ok).max())  # groups are in accepting order, so the last qualifying covers most
    return float(s[order[int(end[best]) - 1]]), float(end[best]) / n, float(risk[best])


def _resolve_rule(threshold: float | SelectiveThreshold, higher_is_confident: bool | None) -> tuple[float, bool]:
    if isinstance(threshold, SelectiveThreshold):
        if higher_is_confident is not None and higher_is_confident != threshold.higher_is_confident:
            raise ValueError(f"`higher_is_confident`={higher_is_confident} contradicts the fitted rule "
                             f"({threshold.higher_is_confident}); leave it None")
        return threshold.threshold, threshold.higher_is_confident
    check_real_arg(threshold, "threshold")
    if higher_is_confident is None:
        higher_is_confident = True
    check_bool_arg(higher_is_confident, "higher_is_confident")
    return float(threshold), higher_is_confident


def decide(scores: Tensor, threshold: float | SelectiveThreshold, higher_is_confident: bool | None = None) -> Tensor:
    r"""Accept mask of a selective rule: ``score >= threshold`` (confidence) or ``score <= threshold`` (uncertainty).

    .. math::
        \mathrm{accept}_i = 1[s_i \ge t] \;\; \text{(or } 1[s_i \le t] \text{)}

    Args:
        scores: (N,) scores of the samples to decide on.
        threshold: a :class:`SelectiveThreshold`, or a bare float threshold.
        higher_is_confident: the direction for a bare float (default True); must be None or agree with a
            :class:`SelectiveThreshold`.

    Returns:
        (N,) bool tensor, True = accept, False = send to review.

    Raises:
        ValueError: on a bad threshold/direction or invalid tensors.

    Example:
        >>> decide(torch.tensor([0.95, 0.5]), 0.9).tolist()
        [True, False]
        >>> decide(torch.tensor([0.01, 0.3]), 0.1, higher_is_confident=False).tolist()
        [True, False]
    """
    t, higher = _resolve_rule(threshold, higher_is_confident)
    check_scores(scores)
    return _accept(scores.double(), t, higher)


def selective_figures(scores: Tensor, correct: Tensor, threshold: float | SelectiveThreshold,
                      higher_is_confident: bool | None = None) -> dict[str, float | int]:
    r"""Coverage and risk of a selective rule on (test) data.

    .. math::
        \mathrm{coverage} = \frac{|A|}{N}, \qquad \mathrm{risk} = \frac{\#\{\text{errors in } A\}}{|A|},
        \qquad A = \{i : \mathrm{accept}_i\}

    Args:
        scores: (N,) scores.
        correct: (N,) bool, True where the prediction was right.
        threshold: a :class:`SelectiveThreshold`, or a bare float threshold.
        higher_is_confident: the direction for a bare float (default True).

    Returns:
        ``{"coverage", "risk", "n_accepted"}``; risk is NaN when nothing is accepted.

    Raises:
        ValueError: on a bad threshold/direction or invalid tensors.

    Example:
        >>> selective_figures(torch.tensor([0.9, 0.8, 0.7, 0.6]), torch.tensor([1, 0, 1, 1]), 0.75)
        {'coverage': 0.5, 'risk': 0.5, 'n_accepted': 2}
    """
    t, higher = _resolve_rule(threshold, higher_is_confident)
    check_scores_correct(scores, correct)
    accept = _accept(scores.double(), t, higher)
    n_acc = int(accept.sum())
    errors = int((accept & ~correct.bool()).sum())
    return {"coverage": n_acc / scores.numel(), "risk": errors / n_acc if n_acc else math.nan, "n_accepted": n_acc}
