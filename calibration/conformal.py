"""Split conformal prediction sets with the LAC and APS scores.

A threshold fitted on a calibration split of n exchangeable samples turns any classifier's probabilities into
sets that contain the true class with probability at least 1 - alpha (marginally, over calibration and test
draws), whatever the model:

1. score each calibration sample, ``s_i = s(x_i, y_i)`` (large = the label looks unlikely);
2. take ``q = `` the ``k``-th smallest score, ``k = ceil((n + 1)(1 - alpha))`` (``q = inf`` if ``k > n``);
3. predict ``{y : s(x, y) <= q}``.

Scores:

* ``"lac"`` (least ambiguous set-valued classifier, Sadinle et al. 2019): ``s(x, y) = 1 - p_y``.
* ``"aps"`` (adaptive prediction sets, Romano et al. 2020): the probability mass of the classes ranked (by
  probability, descending, stable order) up to and including y, ``s(x, y) = sum_{j <= rank(y)} p_(j)``; with
  ``randomized=True`` the last term is scaled by ``u ~ U(0, 1)``, ``s = sum_{j < rank(y)} p_(j) + u p_y``,
  which removes the discreteness and gives smaller sets with near-exact coverage.

The coverage guarantee, ``1 - alpha <= P(y in set) <= 1 - alpha + 1/(n + 1)`` (the upper bound needs scores without
ties), holds for the bare sets of step 3, and a bare set can be empty. :func:`prediction_sets` returns them with
``allow_empty=True``, as MAPIE and TorchCP do. An empty set spends part of the allowed miscoverage alpha: no class
is needed on that image to reach the promised coverage, because even its most likely class scores worse than ``q``,
so by the score the image is among the least typical. With LAC that is an image whose top probability is below
``1 - q`` (a hard one); with deterministic APS it is one whose top class alone holds more than ``q`` of the mass
(an unusually confident one).

By default (``allow_empty=False``) the top class is added to every set, so a caller always gets a class to act on.
This is a deviation from the bare recipe. Adding a class can only raise coverage, so the lower bound still holds,
but coverage can no longer fall below the top-1 accuracy: a model that is 98 % accurate covers at least 98 %
whatever alpha asks for, and the upper bound is lost. To check the calibration of the sets themselves, measure the
bare sets.

References:
    Angelopoulos & Bates. "A Gentle Introduction to Conformal Prediction and Distribution-Free Uncertainty
    Quantification." arXiv:2107.07511, 2021.
    Sadinle, Lei & Wasserman. "Least Ambiguous Set-Valued Classifiers with Bounded Error Levels." JASA 2019.
    Romano, Sesia & Candès. "Classification with Valid and Adaptive Coverage." NeurIPS 2020.
"""

from __future__ import annotations

import logging
import math
from typing import Literal

import torch
from torch import Tensor

from ._validation import (check_bool_arg, check_choice, check_labels, check_open_unit_arg, check_probs, check_probs_labels,
                          check_real_arg)

logger = logging.getLogger(__name__)

Score = Literal["lac", "aps"]
_SCORES = ("lac", "aps")

__all__ = ["conformal_coverage", "conformal_quantile_index", "fit_conformal_threshold", "prediction_sets"]


def _check_set_options(score: str, randomized: bool, generator: torch.Generator | None) -> None:
    """The options shared by fitting a threshold and building sets: the score, and APS-only randomisation."""
    check_choice(score, "score", _SCORES)
    check_bool_arg(randomized, "randomized")
    if randomized and score != "aps":
        raise ValueError(f"`randomized=True` is only defined for score='aps', got score={score!r}")
    _check_generator(generator)


def _check_generator(generator: object) -> None:
    if generator is not None and not isinstance(generator, torch.Generator):
        raise ValueError(f"`generator` must be a torch.Generator or None, got {type(generator).__name__}")


def _class_scores(probs: Tensor, score: str, u: Tensor | None) -> tuple[Tensor, Tensor]:
    """Non-conformity score of every class of every sample.

    Args:
        probs: (N, C) probabilities.
        score: "lac" or "aps".
        u: (N,) uniforms for randomized APS, or None.

    Returns:
        ``(scores, top)``: (N, C) float64 scores and (N,) int64 index of the top class (rank 1).
    """
    p = probs.double()
    order = torch.sort(p, dim=1, descending=True, stable=True).indices  # (N, C) classes by rank
    top = order[:, 0]
    if score == "lac":
        return 1.0 - p, top
    p_sorted = p.gather(1, order)
    cum = torch.cumsum(p_sorted, dim=1)  # mass up to and including each rank
    if u is not None:
        cum = cum - p_sorted + u.double().unsqueeze(1) * p_sorted
    return torch.empty_like(p).scatter_(1, order, cum), top


def conformal_quantile_index(n: int, alpha: float) -> int:
    r"""The rank ``k = ceil((n + 1)(1 - alpha))`` of the calibration score used as the conformal threshold.

    ``q`` is the k-th smallest of n scores, i.e. the empirical quantile at level ``k / n`` taken as an order
    statistic (``numpy.quantile(..., k / n, method="inverted_cdf")``). This is the quantile of the coverage
    theorem; ``method="higher"`` of the Gentle Introduction's code picks the (k+1)-th score for k < n, one
    rank more conservative. ``k > n`` means the calibration split is too small for this alpha.

    A 1e-9 slack absorbs float error in ``(n + 1)(1 - alpha)`` (e.g. ``100 * (1 - 0.1)``).

    Args:
        n: number of calibration samples, >= 1.
        alpha: miscoverage in (0, 1).

    Returns:
        k, an int in [1, n + 1].

    Example:
        >>> conformal_quantile_index(99, 0.1), conformal_quantile_index(8, 0.1)
        (90, 9)
    """
    return max(1, math.ceil((n + 1) * (1.0 - alpha) - 1e-9))


def fit_conformal_threshold(probs: Tensor, labels: Tensor, alpha: float, score: Score = "lac",
                            randomized: bool = False, *, generator: torch.Generator | None = None) -> float:
    r"""Split-conformal threshold of the LAC or APS score on a calibration split.

    .. math::
        \hat q = s_{(k)}, \qquad k = \lceil (n + 1)(1 - \alpha) \rceil,

    the k-th smallest calibration score (see :func:`conformal_quantile_index`). Sets built with
    :func:`prediction_sets` and the same ``score``/``randomized`` then cover the true class with probability
    >= 1 - alpha on exchangeable test data; the bare sets (``allow_empty=True``) also cover <= 1 - alpha + 1/(n + 1)
    when the scores have no ties. When ``k > n`` the split is too small: the threshold is ``inf`` (every set holds
    every class) and a warning is logged.

    Args:
        probs: (N, C) calibration probabilities.
        labels: (N,) int64 calibration labels.
        alpha: target miscoverage in (0, 1).
        score: ``"lac"`` or ``"aps"``.
        randomized: APS only; draw ``u ~ U(0, 1)`` per sample (use the same setting in :func:`prediction_sets`).
        generator: random source of the uniforms when ``randomized``.

    Returns:
        The threshold as a float (``inf`` if the calibration split is too small).

    Raises:
        ValueError: on a bad ``alpha``/``score``/``randomized`` (randomized LAC included) or invalid tensors.

    Example:
        >>> probs = torch.tensor([[0.9, 0.1], [0.6, 0.4], [0.3, 0.7], [0.2, 0.8]])
        >>> q = fit_conformal_threshold(probs, torch.tensor([0, 1, 1, 1]), alpha=0.4, score="lac")  # k = 3 of 4
        >>> round(q, 6)  # scores 1 - p_y: 0.1, 0.6, 0.3, 0.2; the 3rd smallest
        0.3
    """
    check_open_unit_arg(alpha, "alpha")
    _check_set_options(score, randomized, generator)
    check_probs_labels(probs, labels)

    n = probs.shape[0]
    u = torch.rand(n, generator=generator, dtype=torch.float64).to(probs.device) if randomized else None
    all_scores, _ = _class_scores(probs, score, u)
    cal_scores = all_scores.gather(1, labels.long().unsqueeze(1)).squeeze(1)
    k = conformal_quantile_index(n, float(alpha))
    if k > n:
        logger.warning("fit_conformal_threshold: n=%d calibration samples are too few for alpha=%g "
                       "(needs n >= %d); threshold is inf, every set holds every class", n, alpha,
                       math.ceil(1.0 / alpha - 1.0 - 1e-9))
        return math.inf
    return float(torch.sort(cal_scores).values[k - 1])


def prediction_sets(probs: Tensor, threshold: float, score: Score = "lac", randomized: bool = False, *,
                    generator: torch.Generator | None = None, allow_empty: bool = False) -> Tensor:
    r"""Conformal prediction sets ``{y : s(x, y) <= threshold}``, with the top class added unless ``allow_empty``.

    .. math::
        \Gamma_{\text{bare}}(x) = \{ y : s(x, y) \le \hat q \}, \qquad
        \Gamma(x) = \Gamma_{\text{bare}}(x) \cup \{ \arg\max_k p_k \}

    By default the top class (first in the stable descending order, i.e. the lowest index among ties) is
    always included, so an image never gets an empty set, which a caller could not act on. Adding a class can
    only raise coverage, but it stops coverage from going below the top-1 accuracy (see the module docstring).
    With ``allow_empty=True`` the bare sets are returned: these are the sets whose coverage split conformal
    controls. An empty bare set means that no class is needed on that image to reach the promised coverage,
    because even the most likely class scores above the threshold.

    Args:
        probs: (N, C) test probabilities.
        threshold: the value from :func:`fit_conformal_threshold` (``inf`` allowed: all classes).
        score: the score the threshold was fitted with, ``"lac"`` or ``"aps"``.
        randomized: APS only; as at fitting time.
        generator: random source of the uniforms when ``randomized``.
        allow_empty: return the bare sets ``{y : s(x, y) <= threshold}``, which may be empty, instead of
            adding the top class.

    Returns:
        (N, C) bool tensor, True where the class is in the set.

    Raises:
        ValueError: on a bad ``threshold``/``score``/``randomized``/``allow_empty`` or invalid tensors.

    Example:
        >>> probs = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.1, 0.8]])
        >>> prediction_sets(probs, 0.75, "lac").int().tolist()
        [[1, 1, 0], [0, 0, 1]]
        >>> prediction_sets(probs, 0.75, "aps").int().tolist()
        [[1, 0, 0], [0, 0, 1]]
        >>> prediction_sets(probs, 0.4, "lac", allow_empty=True).int().tolist()  # row 0: every 1 - p_y > 0.4
        [[0, 0, 0], [0, 0, 1]]
        >>> prediction_sets(probs, 0.4, "lac").int().tolist()  # the top class added
        [[1, 0, 0], [0, 0, 1]]
    """
    check_real_arg(threshold, "threshold")
    _check_set_options(score, randomized, generator)
    check_bool_arg(allow_empty, "allow_empty")
    check_probs(probs)

    n = probs.shape[0]
    u = torch.rand(n, generator=generator, dtype=torch.float64).to(probs.device) if randomized else None
    all_scores, top = _class_scores(probs, score, u)
    sets = all_scores <= float(threshold)
    if not allow_empty:
        sets[torch.arange(n, device=sets.device), top] = True
    return sets


def conformal_coverage(sets: Tensor, labels: Tensor) -> tuple[float, float]:
    r"""Empirical coverage and mean size of prediction sets.

    .. math::
        \mathrm{coverage} = \frac{1}{N} \sum_i 1[y_i \in \Gamma_i], \qquad
        \mathrm{size} = \frac{1}{N} \sum_i |\Gamma_i|

    Args:
        sets: (N, C) bool prediction sets.
        labels: (N,) int64 true classes.

    Returns:
        ``(coverage, mean_size)`` as floats.

    Raises:
        ValueError: on invalid tensors.

    Example:
        >>> sets = torch.tensor([[True, True, False], [False, False, True]])
        >>> conformal_coverage(sets, torch.tensor([1, 0]))
        (0.5, 1.5)
    """
    if not isinstance(sets, Tensor):
        raise ValueError(f"`sets` must be a torch.Tensor, got {type(sets).__name__}")
    if sets.dtype != torch.bool:
        raise ValueError(f"`sets` must be a bool tensor, got dtype {sets.dtype}")
    if sets.dim() != 2 or sets.numel() == 0:
        raise ValueError(f"`sets` must have shape (N, C) with N, C >= 1, got shape {tuple(sets.shape)}")
    check_labels(labels, sets.shape[0], sets.shape[1])
    covered = sets.gather(1, labels.long().unsqueeze(1)).squeeze(1)
    return float(covered.double().mean()), float(sets.sum(dim=1).double().mean())
