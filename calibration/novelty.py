"""Conformal novelty detection: a threshold on an out-of-distribution score with a stated in-distribution
review rate.

Given scores ``s_1..s_n`` of ``n`` calibration images drawn from the training distribution (larger = more
unusual), the conformal p-value of a new score ``s`` is

.. math::
    p(s) = \\frac{1 + \\#\\{i : s_i \\ge s\\}}{n + 1},

and flagging ``p(s) <= rate`` is the same as flagging ``s > t`` with ``t`` the ``ceil((n + 1)(1 - rate))``-th
smallest calibration score. If the new image is exchangeable with the calibration images, the chance that it is
flagged is at most ``rate`` (marginally over the calibration draw, Bates et al. 2023); it is at least
``rate - 1 / (n + 1)`` when the scores have no ties. When ``ceil((n + 1)(1 - rate)) > n`` the split is too small
for that rate and the threshold is +inf: nothing is flagged.

References:
    Bates, Candès, Lei, Romano, Sesia. "Testing for Outliers with Conformal p-values." Annals of Statistics, 2023.
    Vovk, Gammerman, Shafer. "Algorithmic Learning in a Random World." Springer, 2005.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ._validation import check_open_unit_arg, check_scores

__all__ = ["conformal_p_values", "fit_novelty_threshold", "novelty_flags"]


def fit_novelty_threshold(calibration_scores: Tensor, rate: float) -> float:
    """The score above which an image is flagged, for an in-distribution flag rate of at most ``rate``.

    Args:
        calibration_scores: (n,) scores of in-distribution images the model was not fitted on.
        rate: target share of in-distribution images flagged, in (0, 1).

    Returns:
        The ``ceil((n + 1)(1 - rate))``-th smallest score, or +inf when that index exceeds ``n``.

    Raises:
        ValueError: non-1-D, empty or non-finite scores, or a rate outside (0, 1).

    Example:
        >>> fit_novelty_threshold(torch.arange(1.0, 100.0), 0.1)  # ceil(100 * 0.9) = 90th smallest
        90.0
    """
    check_scores(calibration_scores, "calibration_scores")
    check_open_unit_arg(rate, "rate")
    n = calibration_scores.numel()
    k = math.ceil((n + 1) * (1.0 - rate) - 1e-9)  # 1e-9: (n + 1)(1 - rate) that is an integer in exact arithmetic
    if k > n:
        return math.inf
    return float(calibration_scores.double().sort().values[k - 1])


def conformal_p_values(calibration_scores: Tensor, scores: Tensor) -> Tensor:
    """Conformal p-values ``(1 + #{s_i >= s}) / (n + 1)`` of ``scores`` against the calibration scores.

    Args:
        calibration_scores: (n,) in-distribution calibration scores.
        scores: (m,) scores of the images to test.

    Returns:
        (m,) float64 p-values in [1 / (n + 1), 1].

    Example:
        >>> conformal_p_values(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0.0, 2.5, 9.0])).tolist()
        [1.0, 0.5, 0.25]
    """
    check_scores(calibration_scores, "calibration_scores")
    check_scores(scores, "scores")
    cal = calibration_scores.double().sort().values
    # number of calibration scores >= s = n - (number < s) = n - searchsorted(left)
    below = torch.searchsorted(cal, scores.double().contiguous(), right=False)
    n = cal.numel()
    return (1.0 + (n - below).double()) / (n + 1.0)


def novelty_flags(scores: Tensor, threshold: float) -> Tensor:
    """(N,) bool: which scores are above the fitted threshold (out of distribution)."""
    return scores > threshold
