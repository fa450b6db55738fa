"""Selective prediction: the risk-coverage curve of a score, its summary figures (AURC, AUGRC, risk at a coverage,
coverage at a risk), and a threshold fitted for a target risk.

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
from numbers import Real
from typing import Any

import torch
from torch import Tensor

from ._validation import check_bool_arg, check_closed_unit_arg, check_real_arg, check_scores, check_scores_correct

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
                            higher_is_confident: bool = True, score_name: str = "confidence") -> SelectiveThreshold:
    r"""The threshold with the largest calibration coverage whose selective risk is at most ``target_risk``.

    With the rule "accept if score >= t" (or <= t for uncertainty scores), over candidate thresholds t taken from
    the calibration scores themselves,

    .. math::
        t^\star = \arg\max_t \; \mathrm{cov}(t) \quad \text{s.t.} \quad
        \frac{\#\{\text{errors accepted at } t\}}{\#\{\text{accepted at } t\}} \le r_{\mathrm{target}},

    where tied scores are accepted or rejected together. Risk is not monotone in t, so every candidate is
    checked. If no threshold qualifies (even the single most confident group is too often wrong), the rule
    accepts nothing: ``threshold = +inf`` (``-inf`` for uncertainty scores), coverage 0, risk NaN.

    Args:
        scores: (N,) calibration scores.
        correct: (N,) bool, True where the prediction was right.
        target_risk: the highest acceptable error rate among accepted samples, in [0, 1].
        higher_is_confident: True for confidence-like scores, False for entropy-like ones.
        score_name: a label stored with the rule, e.g. ``"confidence"``.

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
    """
    check_closed_unit_arg(target_risk, "target_risk")
    check_bool_arg(higher_is_confident, "higher_is_confident")
    if not isinstance(score_name, str) or not score_name:
        raise ValueError(f"`score_name` must be a non-empty string, got {score_name!r}")
    check_scores_correct(scores, correct)
    threshold, coverage, risk = _fit_compute(scores, correct, float(target_risk), higher_is_confident)
    return SelectiveThreshold(threshold=threshold, score_name=score_name, higher_is_confident=higher_is_confident,
                              target_risk=float(target_risk), coverage=coverage, risk=risk,
                              n_calibration=scores.numel())


def _fit_compute(scores: Tensor, correct: Tensor, target_risk: float,
                 higher_is_confident: bool) -> tuple[float, float, float]:
    """``(threshold, coverage, risk)`` of the widest tie-group cut whose risk is at most ``target_risk``.

    When no cut qualifies: ``(+inf, 0.0, nan)`` (``-inf`` for uncertainty scores), a rule that accepts nothing.
    """
    n = scores.numel()
    s = scores.double().cpu()
    order, _, end, cum_err = _tie_groups(s if higher_is_confident else -s, correct)
    risk = cum_err[end - 1] / end
    ok = risk <= target_risk + 1e-12
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


def risk_coverage_curve(confidence_or_score: Tensor, correct: Tensor,
                        higher_is_confident: bool = True) -> tuple[Tensor, Tensor]:
    r"""Selective risk at each coverage when the most confident samples are accepted first.

    Accepting the ``k`` most confident of N samples gives

    .. math::
        \mathrm{coverage}_k = \frac{k}{N}, \qquad \mathrm{risk}_k = \frac{\#\{\text{errors among the } k\}}{k},
        \quad k = 1, \dots, N.

    Tied scores cannot be split by a threshold, so inside a tie group the error count is interpolated linearly
    (the expected count if tied samples were accepted in random order); the curve therefore does not depend on
    the input order.

    Args:
        confidence_or_score: (N,) confidence (or any score).
        correct: (N,) bool, True where the prediction was right.
        higher_is_confident: True when a larger score means more confident (max-probability); False for
            uncertainty scores (entropy, mutual information).

    Returns:
        ``(coverage, risk)``: two (N,) float64 tensors, coverage increasing from 1/N to 1.

    Raises:
        ValueError: on a bad ``higher_is_confident`` or invalid tensors.

    Example:
        >>> conf, correct = torch.tensor([0.9, 0.8, 0.7, 0.6]), torch.tensor([True, False, True, False])
        >>> cov, risk = risk_coverage_curve(conf, correct)
        >>> cov.tolist(), risk.tolist()
        ([0.25, 0.5, 0.75, 1.0], [0.0, 0.5, 0.3333333333333333, 0.5])
    """
    check_bool_arg(higher_is_confident, "higher_is_confident")
    check_scores_correct(confidence_or_score, correct, "confidence_or_score")
    score = confidence_or_score if higher_is_confident else -confidence_or_score
    return _risk_coverage_compute(score, correct)


def aurc(confidence_or_score: Tensor, correct: Tensor, higher_is_confident: bool = True) -> float:
    r"""Area under the risk-coverage curve: the mean selective risk over the N coverage points.

    .. math::
        \mathrm{AURC} = \frac{1}{N} \sum_{k=1}^{N} \mathrm{risk}_k

    (the right Riemann sum over coverage steps of 1/N, Geifman et al. 2019's definition; lower is better, and a
    perfect ranking of a model with error rate r reaches ``r + (1 - r) log(1 - r)``).

    Args:
        confidence_or_score: (N,) confidence (or any score).
        correct: (N,) bool, True where the prediction was right.
        higher_is_confident: True when a larger score means more confident.

    Returns:
        The AURC in [0, 1] as a float.

    Raises:
        ValueError: on a bad ``higher_is_confident`` or invalid tensors.

    Example:
        >>> aurc(torch.tensor([0.9, 0.8, 0.7, 0.6]), torch.tensor([True, False, True, False]))
        0.3333333333333333
    """
    _, risk = risk_coverage_curve(confidence_or_score, correct, higher_is_confident)
    return float(risk.mean())


def augrc(confidence_or_score: Tensor, correct: Tensor, higher_is_confident: bool = True) -> float:
    r"""Area under the generalized risk-coverage curve (Traub et al. 2024): the risk of an undetected error.

    The generalized risk counts the accepted errors over all N samples, not over the accepted ones, so it is the
    joint probability "accepted and wrong" and is defined at every coverage, 0 included. With :math:`e_k` the
    errors among the k most confident samples (:math:`e_0 = 0`), the area of the curve through the points
    :math:`(k/N, e_k/N)`, joined by straight lines, is

    .. math::
        \mathrm{AUGRC} = \frac{1}{N} \sum_{k=1}^{N} \frac{e_{k-1} + e_k}{2N}
        = (1 - \mathrm{AUROC}) \, a (1 - a) + \tfrac{1}{2} (1 - a)^2,

    with a the accuracy and AUROC that of the score separating right from wrong answers (ties count 1/2), the
    identity Traub et al. give. Ties are handled as in :func:`aurc`: inside a tie group :math:`e_k` is the
    expected count over the orders the tied samples could be accepted in. The generalized risk is linear in k
    there, so the area does not depend on the input order and equals the area through the tie groups' ends
    alone (the thresholds), which is how Traub et al. compute it. Unlike :func:`aurc` (a right Riemann sum,
    since the selective risk is undefined at coverage 0), the curve starts at (0, 0) and is integrated with the
    trapezoid rule; a right Riemann sum would add :math:`(1 - a) / (2N)`. Lower is better: a perfect ranking
    reaches :math:`(1 - a)^2 / 2`, a random one :math:`(1 - a) / 2`.

    Args:
        confidence_or_score: (N,) confidence (or any score).
        correct: (N,) bool, True where the prediction was right.
        higher_is_confident: True when a larger score means more confident.

    Returns:
        The AUGRC in [0, 1/2] as a float.

    Raises:
        ValueError: on a bad ``higher_is_confident`` or invalid tensors.

    Example:
        >>> augrc(torch.tensor([0.9, 0.8, 0.7, 0.6]), torch.tensor([True, False, True, False]))
        0.1875
    """
    check_bool_arg(higher_is_confident, "higher_is_confident")
    check_scores_correct(confidence_or_score, correct, "confidence_or_score")
    score = confidence_or_score if higher_is_confident else -confidence_or_score
    return _augrc_compute(_expected_errors(score, correct))


def _augrc_compute(errors: Tensor) -> float:
    """Trapezoid area under ``(k/N, errors[k-1]/N)`` from (0, 0); ``errors``: (N,) from :func:`_expected_errors`."""
    n = errors.numel()
    return float((errors.sum() - 0.5 * errors[-1]) / (n * n))


def _check_coverage_arg(value: Any, name: str) -> None:
    """Raise unless ``value`` is a real number in (0, 1] (a share of images to accept: at least one)."""
    if isinstance(value, bool) or not isinstance(value, Real) or not 0.0 < float(value) <= 1.0:
        raise ValueError(f"`{name}` must be a number in (0, 1], got {value!r}")


def _accepted_count(coverage: float, n: int) -> int:
    """``max(1, ceil(coverage * n))``, a product within 1e-9 of an integer read as that integer (0.07 * 100 = 7)."""
    return max(1, math.ceil(coverage * n - 1e-9))


def risk_at_coverage(scores: Tensor, correct: Tensor, coverage: float = 0.8, higher_is_confident: bool = True) -> float:
    r"""Selective risk (the error rate among the accepted) when the most confident ``coverage`` share is accepted.

    .. math::
        \mathrm{risk@}c = \frac{e_k}{k}, \qquad k = \max(1, \lceil c N \rceil),

    the point of :func:`risk_coverage_curve` at coverage k/N: a fractional count is rounded up, so at least the
    share c is accepted (a product c N within 1e-9 of an integer counts as that integer, so 0.07 of 100 images
    is 7 although ``0.07 * 100`` is 7.000000000000001 in floating point). When the k-th sample is tied with
    samples left out, :math:`e_k` is the expected error count over the orders the tied samples could be accepted
    in (as in :func:`risk_coverage_curve`), not the count of a threshold, which could only accept the whole tie
    group.

    Args:
        scores: (N,) confidence (or any score).
        correct: (N,) bool, True where the prediction was right.
        coverage: the share of images accepted, in (0, 1].
        higher_is_confident: True when a larger score means more confident.

    Returns:
        The selective risk in [0, 1] as a float.

    Raises:
        ValueError: on a bad ``coverage``/``higher_is_confident`` or invalid tensors.

    Example:
        >>> conf, correct = torch.tensor([0.9, 0.8, 0.7, 0.6]), torch.tensor([True, False, True, False])
        >>> risk_at_coverage(conf, correct, 0.5), risk_at_coverage(conf, correct, 0.6)
        (0.5, 0.3333333333333333)
        >>> risk_at_coverage(torch.tensor([0.9, 0.5, 0.5]), torch.tensor([True, True, False]), 2 / 3)
        0.25
    """
    _check_coverage_arg(coverage, "coverage")
    check_bool_arg(higher_is_confident, "higher_is_confident")
    check_scores_correct(scores, correct)
    score = scores if higher_is_confident else -scores
    return _risk_at_coverage_compute(_expected_errors(score, correct), float(coverage))


def _risk_at_coverage_compute(errors: Tensor, coverage: float) -> float:
    k = _accepted_count(coverage, errors.numel())
    return float(errors[k - 1]) / k


def coverage_at_risk(scores: Tensor, correct: Tensor, risk: float = 0.01, higher_is_confident: bool = True) -> float:
    r"""The largest coverage of a threshold whose selective risk is at most ``risk``; 0.0 if there is none.

    .. math::
        \mathrm{cov@}r = \max \Big\{ \frac{k}{N} : k \text{ ends a tie group}, \; \frac{e_k}{k} \le r \Big\}
        \cup \{0\},

    over the thresholds of :func:`risk_coverage_curve` (a threshold accepts whole tie groups, so k runs over
    the ends of the groups, where :math:`e_k` is the exact count; a 1e-12 slack absorbs rounding). The risk is
    not monotone in k, so every threshold is checked. This is the calibration coverage of
    :func:`fit_selective_threshold` with ``target_risk=risk``.

    Args:
        scores: (N,) confidence (or any score).
        correct: (N,) bool, True where the prediction was right.
        risk: the highest acceptable error rate among the accepted, in [0, 1].
        higher_is_confident: True when a larger score means more confident.

    Returns:
        The coverage in [0, 1] as a float.

    Raises:
        ValueError: on a bad ``risk``/``higher_is_confident`` or invalid tensors.

    Example:
        >>> conf = torch.tensor([0.9, 0.8, 0.7, 0.6])
        >>> coverage_at_risk(conf, torch.tensor([True, True, False, True]), 0.25)
        1.0
        >>> coverage_at_risk(conf, torch.tensor([False, True, True, True]), 0.2)
        0.0
    """
    check_closed_unit_arg(risk, "risk")
    check_bool_arg(higher_is_confident, "higher_is_confident")
    check_scores_correct(scores, correct)
    return _fit_compute(scores, correct, float(risk), higher_is_confident)[1]


def selective_metrics(scores: Tensor, correct: Tensor, higher_is_confident: bool = True) -> dict[str, float]:
    r"""The selective-prediction figures the reports and the command line show, in one call.

    .. math::
        \{\mathrm{AURC}, \; \mathrm{AUGRC}, \; \mathrm{risk@}0.8, \; \mathrm{cov@}0.01, \; \mathrm{cov@}0.05\}

    as :func:`aurc`, :func:`augrc`, :func:`risk_at_coverage` (coverage 0.8) and :func:`coverage_at_risk` (risk
    0.01 and 0.05) define them, with the same tie handling.

    Args:
        scores: (N,) confidence (or any score).
        correct: (N,) bool, True where the prediction was right.
        higher_is_confident: True when a larger score means more confident.

    Returns:
        ``{"aurc", "augrc", "risk_at_80_coverage", "coverage_at_1_risk", "coverage_at_5_risk"}``, floats.

    Raises:
        ValueError: on a bad ``higher_is_confident`` or invalid tensors.

    Example:
        >>> selective_metrics(torch.tensor([0.9, 0.8, 0.7, 0.6]), torch.tensor([True, False, True, False]))
        ... # doctest: +NORMALIZE_WHITESPACE
        {'aurc': 0.3333333333333333, 'augrc': 0.1875, 'risk_at_80_coverage': 0.5, 'coverage_at_1_risk': 0.25,
         'coverage_at_5_risk': 0.25}
    """
    check_bool_arg(higher_is_confident, "higher_is_confident")
    check_scores_correct(scores, correct)
    score = scores if higher_is_confident else -scores
    errors = _expected_errors(score, correct)
    k = torch.arange(1, errors.numel() + 1, dtype=torch.float64)
    return {"aurc": float((errors / k).mean()), "augrc": _augrc_compute(errors),
            "risk_at_80_coverage": _risk_at_coverage_compute(errors, 0.8),
            "coverage_at_1_risk": _fit_compute(scores, correct, 0.01, higher_is_confident)[1],
            "coverage_at_5_risk": _fit_compute(scores, correct, 0.05, higher_is_confident)[1]}
