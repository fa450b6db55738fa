"""The risk-coverage curve of a confidence score and its summary figures: AURC, AUGRC, risk at a coverage and
coverage at a risk (:func:`selective_metrics`, what reports and the CLI show).

The ordering and the tie rule are those of :mod:`calibration.selective` (most confident first, tied scores one
group; inside a group the expected error count over its orders).

References:
    Geifman & El-Yaniv. "Selective Classification for Deep Neural Networks." NeurIPS 2017 (risk-coverage, AURC).
    Geifman et al. "Bias-Reduced Uncertainty Estimation for Deep Neural Classifiers." ICLR 2019 (AURC).
    Traub et al. "Overcoming Common Flaws in the Evaluation of Selective Classification Systems." NeurIPS 2024
    (the generalized risk and AUGRC).
"""

from __future__ import annotations

import math
from numbers import Real
from typing import Any

import torch
from torch import Tensor

from ._validation import check_bool_arg, check_closed_unit_arg, check_scores_correct
from .selective import _expected_errors, _fit_compute, _risk_coverage_compute

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
