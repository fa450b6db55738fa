"""Calibration, proper scoring and uncertainty-ranking metrics on torch tensors.

Conventions (shapes use N samples and C classes):

* ``probs``: (N, C) floating tensor of mean predicted probabilities; rows sum to 1 within 1e-4.
* ``labels``: (N,) integer class indices in [0, C).
* ``correct``: (N,) bool (or 0/1 integer) tensor, True where the prediction was right.
* scores: (N,) finite floating tensors (confidence, entropy, mutual information, ...).

Every metric checks its arguments, then its tensors (raising ``ValueError`` naming the argument), then computes
in float64 and returns a python ``float`` (or a dict of them).

References:
    Guo et al. "On Calibration of Modern Neural Networks." ICML 2017 (ECE, MCE, reliability diagrams).
    Naeini et al. "Obtaining Well Calibrated Probabilities Using Bayesian Binning." AAAI 2015 (ECE/MCE).
    Nixon et al. "Measuring Calibration in Deep Learning." CVPR Workshops 2019 (adaptive, class-wise ECE).
    Kull et al. "Beyond temperature scaling: Obtaining well-calibrated multiclass probabilities with Dirichlet
    calibration." NeurIPS 2019 (class-wise ECE).
    Geifman & El-Yaniv. "Selective Classification for Deep Neural Networks." NeurIPS 2017 (risk-coverage, AURC).
    Hendrycks & Gimpel. "A Baseline for Detecting Misclassified and Out-of-Distribution Examples." ICLR 2017.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from ._validation import (
    check_bool_arg,
    check_choice,
    check_correct,
    check_int_arg,
    check_labels,
    check_open_unit_arg,
    check_probs,
    check_scores,
)

logger = logging.getLogger(__name__)

Norm = Literal["l1", "l2", "max"]
_NORMS = ("l1", "l2", "max")
TPR_LEVEL = 0.95  # the operating point of ``fpr_at_95_tpr``

__all__ = [
    "ReliabilityBins",
    "accuracy",
    "adaptive_calibration_error",
    "aurc",
    "brier_score",
    "calibration_summary",
    "classwise_calibration_error",
    "expected_calibration_error",
    "maximum_calibration_error",
    "misclassification_detection",
    "negative_log_likelihood",
    "ood_detection",
    "reliability_bins",
    "risk_coverage_curve",
]


# ---------------------------------------------------------------------------------------------------------------
# Binning
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReliabilityBins:
    """Per-bin statistics of equal-width top-label binning (the data of a reliability diagram).

    There are ``n_bins + 1`` bins: bin ``i < n_bins`` holds confidences in ``[edges[i], edges[i + 1])`` and the
    last bin holds confidences equal to 1.0 exactly (torchmetrics' convention, see
    :func:`expected_calibration_error`).
    """

    edges: Tensor  # (n_bins + 1,) float64 bin edges, torch.linspace(0, 1, n_bins + 1)
    count: Tensor  # (n_bins + 1,) int64 number of samples per bin; the last entry counts confidence == 1.0
    confidence: Tensor  # (n_bins + 1,) float64 mean confidence per bin, NaN where the bin is empty
    accuracy: Tensor  # (n_bins + 1,) float64 fraction correct per bin, NaN where the bin is empty

    @property
    def n_bins(self) -> int:
        """Number of equal-width bins (without the point bin at 1.0)."""
        return self.edges.numel() - 1


def _bin_index(conf: Tensor, n_bins: int) -> Tensor:
    """Equal-width bin index of each confidence, exactly as torchmetrics computes it.

    Membership is decided in float32 against ``torch.linspace(0, 1, n_bins + 1)`` with
    ``torch.bucketize(..., right=True) - 1``: bins are ``[b_i, b_{i+1})`` and 1.0 falls in an extra bin
    ``n_bins``. Doing it in float32, as torchmetrics does, keeps the two in agreement even on a bin edge.

    Args:
        conf: (M,) confidences in [0, 1].
        n_bins: number of equal-width bins.

    Returns:
        (M,) int64 indices in [0, n_bins].
    """
    boundaries = torch.linspace(0, 1, n_bins + 1, dtype=torch.float32, device=conf.device)
    return torch.bucketize(conf.float(), boundaries, right=True) - 1


def _binned_stats(conf: Tensor, hits: Tensor, index: Tensor, n_groups: int) -> tuple[Tensor, Tensor, Tensor]:
    """Count, summed confidence and summed hits per group, float64, each (n_groups,)."""
    zeros = torch.zeros(n_groups, dtype=torch.float64, device=conf.device)
    count = zeros.scatter_add(0, index, torch.ones_like(conf))
    conf_sum = zeros.scatter_add(0, index, conf)
    hit_sum = zeros.scatter_add(0, index, hits)
    return count, conf_sum, hit_sum


def _top_label(probs: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Top-label confidence and correctness as float64 (N,) tensors (ties: torch.max's choice)."""
    conf, pred = probs.max(dim=1)
    return conf.double(), pred.eq(labels).double()


def _ce_from_stats(count: Tensor, conf_sum: Tensor, hit_sum: Tensor, norm: str) -> float:
    """Calibration error of binned statistics; empty bins contribute nothing."""
    n = float(count.sum())
    nonempty = count > 0
    gap = (hit_sum[nonempty] - conf_sum[nonempty]) / count[nonempty]  # accuracy - confidence per bin
    weight = count[nonempty] / n
    if norm == "l1":
        return float((weight * gap.abs()).sum())
    if norm == "l2":
        return math.sqrt(float((weight * gap.square()).sum()))
    return float(gap.abs().max())


def _ece_compute(probs: Tensor, labels: Tensor, n_bins: int, norm: str) -> float:
    conf, hits = _top_label(probs, labels)
    count, conf_sum, hit_sum = _binned_stats(conf, hits, _bin_index(conf, n_bins), n_bins + 1)
    return _ce_from_stats(count, conf_sum, hit_sum, norm)


def _ace_compute(probs: Tensor, labels: Tensor, n_bins: int) -> float:
    conf, hits = _top_label(probs, labels)
    order = torch.sort(conf, stable=True).indices
    total = 0.0
    n = conf.numel()
    # torch.tensor_split with an int splits like numpy.array_split: the first N % n_bins groups get one extra.
    for group in torch.tensor_split(order, n_bins):
        if group.numel() == 0:
            continue
        total += group.numel() / n * abs(float(hits[group].mean()) - float(conf[group].mean()))
    return total


def _classwise_compute(probs: Tensor, labels: Tensor, n_bins: int) -> float:
    n, c = probs.shape
    p = probs.double()
    hits = torch.nn.functional.one_hot(labels.long(), c).double()  # (N, C)
    index = _bin_index(p.reshape(-1), n_bins).reshape(n, c)
    index = index + torch.arange(c, device=p.device) * (n_bins + 1)  # one block of bins per class
    count, conf_sum, hit_sum = _binned_stats(p.reshape(-1), hits.reshape(-1), index.reshape(-1), c * (n_bins + 1))
    count, conf_sum, hit_sum = (t.reshape(c, n_bins + 1) for t in (count, conf_sum, hit_sum))
    # every class sees all N samples, so the bin weight is count / N for each class
    gap = torch.where(count > 0, (hit_sum - conf_sum).abs() / count.clamp_min(1), torch.zeros_like(count))
    return float((count / n * gap).sum(dim=1).mean())


def _validate_probs_labels(probs: Tensor, labels: Tensor) -> None:
    check_probs(probs)
    check_labels(labels, probs.shape[0], probs.shape[1])


def reliability_bins(probs: Tensor, labels: Tensor, n_bins: int = 15) -> ReliabilityBins:
    """Per-bin confidence, accuracy and count of equal-width top-label binning (a reliability diagram's data).

    Uses the same bins as :func:`expected_calibration_error`, so
    ``sum_b count_b / N * |accuracy_b - confidence_b|`` over non-empty bins is the ECE.

    Args:
        probs: (N, C) mean predicted probabilities.
        labels: (N,) int64 true classes.
        n_bins: number of equal-width bins over [0, 1], >= 1.

    Returns:
        A :class:`ReliabilityBins` with (n_bins + 1,) tensors (the last bin holds confidence == 1.0).

    Raises:
        ValueError: on a bad ``n_bins`` or invalid tensors.

    Example:
        >>> probs = torch.tensor([[0.9, 0.1], [0.6, 0.4], [0.3, 0.7]])
        >>> bins = reliability_bins(probs, torch.tensor([0, 1, 1]), n_bins=2)
        >>> bins.count.tolist(), bins.accuracy.tolist()[1]
        ([0, 3, 0], 0.6666666666666666)
    """
    check_int_arg(n_bins, "n_bins", 1)
    _validate_probs_labels(probs, labels)
    conf, hits = _top_label(probs, labels)
    count, conf_sum, hit_sum = _binned_stats(conf, hits, _bin_index(conf, n_bins), n_bins + 1)
    empty = count == 0
    nan = torch.full_like(count, float("nan"))
    return ReliabilityBins(
        edges=torch.linspace(0, 1, n_bins + 1, dtype=torch.float64),
        count=count.round().long().cpu(),
        confidence=torch.where(empty, nan, conf_sum / count.clamp_min(1)).cpu(),
        accuracy=torch.where(empty, nan, hit_sum / count.clamp_min(1)).cpu(),
    )


# ---------------------------------------------------------------------------------------------------------------
# Calibration errors
# ---------------------------------------------------------------------------------------------------------------


def expected_calibration_error(probs: Tensor, labels: Tensor, n_bins: int = 15, norm: Norm = "l1") -> float:
    r"""Top-label expected calibration error with equal-width bins.

    .. math::
        \mathrm{ECE}_{l1} = \sum_b \frac{n_b}{N} |\mathrm{acc}_b - \mathrm{conf}_b|, \quad
        \mathrm{ECE}_{l2} = \sqrt{\sum_b \frac{n_b}{N} (\mathrm{acc}_b - \mathrm{conf}_b)^2}, \quad
        \mathrm{MCE} = \max_{b: n_b > 0} |\mathrm{acc}_b - \mathrm{conf}_b|

    where ``conf`` is the top-class probability and ``acc`` whether the top class is the label. The bins follow
    ``torchmetrics.functional.classification.multiclass_calibration_error`` exactly: edges
    ``torch.linspace(0, 1, n_bins + 1)``, bin ``i`` is ``[edge_i, edge_{i+1})`` (``torch.bucketize(right=True)``,
    decided in float32), and a confidence of exactly 1.0 gets a bin of its own. Empty bins contribute nothing.

    Args:
        probs: (N, C) mean predicted probabilities.
        labels: (N,) int64 true classes.
        n_bins: number of equal-width bins over [0, 1], >= 1.
        norm: ``"l1"`` (ECE), ``"l2"`` (RMS calibration error) or ``"max"`` (MCE).

    Returns:
        The calibration error in [0, 1] as a float.

    Raises:
        ValueError: on a bad ``n_bins``/``norm`` or invalid tensors.

    Example:
        >>> probs = torch.tensor([[0.25, 0.20, 0.55], [0.55, 0.05, 0.40], [0.10, 0.30, 0.60], [0.90, 0.05, 0.05]])
        >>> labels = torch.tensor([0, 1, 2, 0])
        >>> round(expected_calibration_error(probs, labels, n_bins=3), 4)
        0.2
        >>> round(expected_calibration_error(probs, labels, n_bins=3, norm="l2"), 4)
        0.2082
    """
    check_int_arg(n_bins, "n_bins", 1)
    check_choice(norm, "norm", _NORMS)
    _validate_probs_labels(probs, labels)
    return _ece_compute(probs, labels, n_bins, norm)


def maximum_calibration_error(probs: Tensor, labels: Tensor, n_bins: int = 15) -> float:
    r"""Maximum calibration error: the largest bin gap, ``expected_calibration_error(..., norm="max")``.

    .. math::
        \mathrm{MCE} = \max_{b: n_b > 0} |\mathrm{acc}_b - \mathrm{conf}_b|

    Args:
        probs: (N, C) mean predicted probabilities.
        labels: (N,) int64 true classes.
        n_bins: number of equal-width bins over [0, 1], >= 1.

    Returns:
        The MCE in [0, 1] as a float.

    Raises:
        ValueError: on a bad ``n_bins`` or invalid tensors.

    Example:
        >>> probs = torch.tensor([[0.25, 0.20, 0.55], [0.55, 0.05, 0.40], [0.10, 0.30, 0.60], [0.90, 0.05, 0.05]])
        >>> round(maximum_calibration_error(probs, torch.tensor([0, 1, 2, 0]), n_bins=3), 4)
        0.2333
    """
    return expected_calibration_error(probs, labels, n_bins=n_bins, norm="max")


def adaptive_calibration_error(probs: Tensor, labels: Tensor, n_bins: int = 15) -> float:
    r"""Top-label calibration error with equal-mass (adaptive) bins.

    .. math::
        \mathrm{ACE} = \sum_b \frac{n_b}{N} |\mathrm{acc}_b - \mathrm{conf}_b|

    Samples are sorted by top-label confidence (a stable sort, so ties keep their input order) and the sorted
    list is cut into ``n_bins`` consecutive groups the way ``numpy.array_split`` cuts it: the first
    ``N mod n_bins`` groups hold ``N // n_bins + 1`` samples, the rest ``N // n_bins``. When ``N < n_bins`` the
    trailing groups are empty and contribute nothing. (This is the top-label variant; Nixon et al. also define a
    class-wise one.)

    Args:
        probs: (N, C) mean predicted probabilities.
        labels: (N,) int64 true classes.
        n_bins: number of equal-mass bins, >= 1.

    Returns:
        The ACE in [0, 1] as a float.

    Raises:
        ValueError: on a bad ``n_bins`` or invalid tensors.

    Example:
        >>> probs = torch.tensor([[0.9, 0.1], [0.6, 0.4], [0.3, 0.7], [0.2, 0.8]])
        >>> round(adaptive_calibration_error(probs, torch.tensor([0, 1, 1, 1]), n_bins=2), 4)
        0.15
    """
    check_int_arg(n_bins, "n_bins", 1)
    _validate_probs_labels(probs, labels)
    return _ace_compute(probs, labels, n_bins)


def classwise_calibration_error(probs: Tensor, labels: Tensor, n_bins: int = 15) -> float:
    r"""Class-wise ECE: the mean over classes of the equal-width ECE of ``p_k`` against ``1[y = k]``.

    .. math::
        \mathrm{cwECE} = \frac{1}{C} \sum_{k=1}^{C} \sum_b \frac{n_{k,b}}{N}
        \left| \frac{1}{n_{k,b}} \sum_{i \in b} 1[y_i = k] - \frac{1}{n_{k,b}} \sum_{i \in b} p_{ik} \right|

    Each class uses all N samples and the same bins as :func:`expected_calibration_error` (so it equals the mean
    over k of torchmetrics' ``binary_calibration_error(p[:, k], y == k)``).

    Args:
        probs: (N, C) mean predicted probabilities.
        labels: (N,) int64 true classes.
        n_bins: number of equal-width bins over [0, 1], >= 1.

    Returns:
        The class-wise ECE in [0, 1] as a float.

    Raises:
        ValueError: on a bad ``n_bins`` or invalid tensors.

    Example:
        >>> probs = torch.tensor([[0.9, 0.1], [0.6, 0.4], [0.3, 0.7]])
        >>> round(classwise_calibration_error(probs, torch.tensor([0, 1, 1]), n_bins=2), 4)
        0.2667
    """
    check_int_arg(n_bins, "n_bins", 1)
    _validate_probs_labels(probs, labels)
    return _classwise_compute(probs, labels, n_bins)


# ---------------------------------------------------------------------------------------------------------------
# Proper scores and accuracy
# ---------------------------------------------------------------------------------------------------------------


def _nll_compute(probs: Tensor, labels: Tensor, eps: float) -> float:
    p_true = probs.double().gather(1, labels.long().unsqueeze(1)).squeeze(1)
    return float(-torch.log(p_true.clamp_min(eps)).mean())


def _brier_compute(probs: Tensor, labels: Tensor) -> float:
    onehot = torch.nn.functional.one_hot(labels.long(), probs.shape[1]).double()
    return float((probs.double() - onehot).square().sum(dim=1).mean())


def _accuracy_compute(probs: Tensor, labels: Tensor) -> float:
    return float(probs.argmax(dim=1).eq(labels).double().mean())


def negative_log_likelihood(probs: Tensor, labels: Tensor, eps: float = 1e-12) -> float:
    r"""Mean negative log-likelihood of the true class, in nats.

    .. math::
        \mathrm{NLL} = -\frac{1}{N} \sum_i \log \max(p_{i, y_i}, \varepsilon)

    Args:
        probs: (N, C) mean predicted probabilities.
        labels: (N,) int64 true classes.
        eps: floor on the true-class probability so a confident mistake costs ``-log(eps)``, in (0, 1).

    Returns:
        The NLL (>= 0) as a float.

    Raises:
        ValueError: on a bad ``eps`` or invalid tensors.

    Example:
        >>> probs = torch.tensor([[0.5, 0.5], [0.25, 0.75]])
        >>> round(negative_log_likelihood(probs, torch.tensor([0, 1])), 6)
        0.490415
    """
    check_open_unit_arg(eps, "eps")
    _validate_probs_labels(probs, labels)
    return _nll_compute(probs, labels, float(eps))


def brier_score(probs: Tensor, labels: Tensor) -> float:
    r"""Multiclass Brier score: squared error to the one-hot label, summed over classes, averaged over samples.

    .. math::
        \mathrm{BS} = \frac{1}{N} \sum_i \sum_k (p_{ik} - 1[y_i = k])^2 \in [0, 2]

    Args:
        probs: (N, C) mean predicted probabilities.
        labels: (N,) int64 true classes.

    Returns:
        The Brier score as a float.

    Raises:
        ValueError: on invalid tensors.

    Example:
        >>> probs = torch.tensor([[0.5, 0.5], [0.25, 0.75]])
        >>> brier_score(probs, torch.tensor([0, 1]))
        0.3125
    """
    _validate_probs_labels(probs, labels)
    return _brier_compute(probs, labels)


def accuracy(probs: Tensor, labels: Tensor) -> float:
    r"""Top-1 accuracy of the argmax class.

    .. math::
        \mathrm{acc} = \frac{1}{N} \sum_i 1[\arg\max_k p_{ik} = y_i]

    Args:
        probs: (N, C) mean predicted probabilities.
        labels: (N,) int64 true classes.

    Returns:
        The accuracy in [0, 1] as a float.

    Raises:
        ValueError: on invalid tensors.

    Example:
        >>> probs = torch.tensor([[0.9, 0.1], [0.6, 0.4], [0.3, 0.7], [0.2, 0.8]])
        >>> accuracy(probs, torch.tensor([0, 1, 1, 1]))
        0.75
    """
    _validate_probs_labels(probs, labels)
    return _accuracy_compute(probs, labels)


# ---------------------------------------------------------------------------------------------------------------
# Selective prediction: risk-coverage
# ---------------------------------------------------------------------------------------------------------------


def _risk_coverage_compute(score: Tensor, correct: Tensor) -> tuple[Tensor, Tensor]:
    """Risk-coverage with ties resolved in expectation. ``score``: (N,), higher = more confident."""
    s = score.double().cpu()
    err = (~correct.bool()).double().cpu()
    n = s.numel()
    order = torch.sort(s, descending=True, stable=True).indices
    s, err = s[order], err[order]
    cum_err = torch.cumsum(err, 0)
    _, counts = torch.unique_consecutive(s, return_counts=True)
    end = torch.cumsum(counts, 0)  # accepted count after each tie group
    start = end - counts
    err_end = cum_err[end - 1]
    err_start = torch.cat([torch.zeros(1, dtype=torch.float64), err_end[:-1]])
    rate = (err_end - err_start) / counts  # error rate inside each tie group
    k = torch.arange(1, n + 1, dtype=torch.float64)
    start_k = start.repeat_interleave(counts).double()
    errors_k = err_start.repeat_interleave(counts) + (k - start_k) * rate.repeat_interleave(counts)
    return k / n, errors_k / k


def _validate_scores_correct(scores: Tensor, correct: Tensor, scores_name: str) -> None:
    check_scores(scores, scores_name)
    check_correct(correct, scores.shape[0])


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
    _validate_scores_correct(confidence_or_score, correct, "confidence_or_score")
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


# ---------------------------------------------------------------------------------------------------------------
# Detection: misclassification and out-of-distribution
# ---------------------------------------------------------------------------------------------------------------


def _detection_compute(y_positive: np.ndarray, score: np.ndarray) -> dict[str, float]:
    """AUROC, AUPR and FPR at 95% TPR of ``score`` for a binary target (both classes present)."""
    # imported here: scikit-learn takes about a second to import, and the service never needs it
    from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

    fpr, tpr, _ = roc_curve(y_positive, score, drop_intermediate=False)
    # tpr is non-decreasing and ends at 1, so the first point reaching the level is the lowest FPR that does
    idx = int(np.searchsorted(tpr, TPR_LEVEL, side="left"))
    return {
        "auroc": float(roc_auc_score(y_positive, score)),
        "aupr": float(average_precision_score(y_positive, score)),
        "fpr_at_95_tpr": float(fpr[idx]),
    }


def misclassification_detection(scores: Tensor, correct: Tensor, higher_is_uncertain: bool = True) -> dict[str, float]:
    r"""How well an uncertainty score separates wrong predictions (positive class) from right ones.

    With errors as positives and the score oriented so that larger means "more likely wrong":

    * ``auroc``: ``sklearn.metrics.roc_auc_score``, P(score of a random error > score of a random hit) (+ ties/2);
    * ``aupr``: ``sklearn.metrics.average_precision_score``, :math:`\sum_n (R_n - R_{n-1}) P_n`;
    * ``fpr_at_95_tpr``: the false-positive rate at the first ``sklearn.metrics.roc_curve`` point whose TPR is
      at least 0.95 (the fraction of right predictions flagged when 95% of errors are caught).

    Degenerate case: when every prediction is right (or every one wrong) the ranking is undefined; the three
    figures are then NaN and a warning is logged, so an evaluation of a perfect model still completes.

    Args:
        scores: (N,) uncertainty (or confidence, with ``higher_is_uncertain=False``).
        correct: (N,) bool, True where the prediction was right.
        higher_is_uncertain: True for entropy-like scores, False for confidence-like ones.

    Returns:
        ``{"auroc", "aupr", "fpr_at_95_tpr"}`` floats (NaN in the degenerate case).

    Raises:
        ValueError: on a bad ``higher_is_uncertain`` or invalid tensors.

    Example:
        >>> out = misclassification_detection(torch.tensor([0.1, 0.4, 0.35, 0.8]), torch.tensor([1, 1, 0, 0]))
        >>> out["auroc"], round(out["aupr"], 4), out["fpr_at_95_tpr"]
        (0.75, 0.8333, 0.5)
    """
    check_bool_arg(higher_is_uncertain, "higher_is_uncertain")
    _validate_scores_correct(scores, correct, "scores")
    y = (~correct.bool()).cpu().numpy().astype(np.int64)
    if y.min() == y.max():
        what = "right" if y.max() == 0 else "wrong"
        logger.warning("misclassification_detection: all %d predictions are %s, so errors cannot be ranked; "
                       "returning NaN", y.size, what)
        return {"auroc": math.nan, "aupr": math.nan, "fpr_at_95_tpr": math.nan}
    s = scores.double().cpu().numpy()
    return _detection_compute(y, s if higher_is_uncertain else -s)


def ood_detection(scores_in: Tensor, scores_out: Tensor, higher_is_uncertain: bool = True) -> dict[str, float]:
    r"""How well an uncertainty score separates out-of-distribution inputs (positive class) from in-distribution.

    Same figures as :func:`misclassification_detection` with OOD samples as positives: ``auroc``
    (``roc_auc_score``), ``aupr`` (``average_precision_score``, "AUPR-out") and ``fpr_at_95_tpr`` (fraction of
    in-distribution inputs flagged when 95% of OOD inputs are).

    Args:
        scores_in: (N_in,) scores of in-distribution samples.
        scores_out: (N_out,) scores of out-of-distribution samples.
        higher_is_uncertain: True for entropy-like scores, False for confidence-like ones.

    Returns:
        ``{"auroc", "aupr", "fpr_at_95_tpr"}`` floats.

    Raises:
        ValueError: on a bad ``higher_is_uncertain`` or invalid (e.g. empty) tensors.

    Example:
        >>> out = ood_detection(torch.tensor([0.1, 0.4]), torch.tensor([0.35, 0.8]))
        >>> out["auroc"], round(out["aupr"], 4), out["fpr_at_95_tpr"]
        (0.75, 0.8333, 0.5)
    """
    check_bool_arg(higher_is_uncertain, "higher_is_uncertain")
    check_scores(scores_in, "scores_in")
    check_scores(scores_out, "scores_out")
    s = torch.cat([scores_in.double().cpu(), scores_out.double().cpu()]).numpy()
    y = np.concatenate([np.zeros(scores_in.numel(), np.int64), np.ones(scores_out.numel(), np.int64)])
    return _detection_compute(y, s if higher_is_uncertain else -s)


# ---------------------------------------------------------------------------------------------------------------
# Summary
# ---------------------------------------------------------------------------------------------------------------


def calibration_summary(probs: Tensor, labels: Tensor, n_bins: int = 15) -> dict[str, float | int]:
    r"""All headline figures of a set of predictions, validated once; used by the report and the CLI.

    Keys: ``n_samples``, ``n_classes``, ``n_bins``, ``accuracy``, ``nll`` (nats), ``brier``, ``ece`` (l1),
    ``rms_ce`` (l2), ``mce`` (max), ``ace`` (equal-mass), ``classwise_ece`` and ``aurc`` (max-probability
    confidence), each as defined by the function of the same name in this module.

    Args:
        probs: (N, C) mean predicted probabilities.
        labels: (N,) int64 true classes.
        n_bins: number of bins of the binned calibration errors, >= 1.

    Returns:
        A dict of python floats (ints for the counts).

    Raises:
        ValueError: on a bad ``n_bins`` or invalid tensors.

    Example:
        >>> probs = torch.tensor([[0.9, 0.1], [0.6, 0.4], [0.3, 0.7], [0.2, 0.8]])
        >>> s = calibration_summary(probs, torch.tensor([0, 1, 1, 1]), n_bins=4)
        >>> s["accuracy"], round(s["ece"], 4), s["n_samples"]
        (0.75, 0.15, 4)
    """
    check_int_arg(n_bins, "n_bins", 1)
    _validate_probs_labels(probs, labels)
    conf, hits = _top_label(probs, labels)
    return {
        "n_samples": int(probs.shape[0]),
        "n_classes": int(probs.shape[1]),
        "n_bins": int(n_bins),
        "accuracy": _accuracy_compute(probs, labels),
        "nll": _nll_compute(probs, labels, 1e-12),
        "brier": _brier_compute(probs, labels),
        "ece": _ece_compute(probs, labels, n_bins, "l1"),
        "rms_ce": _ece_compute(probs, labels, n_bins, "l2"),
        "mce": _ece_compute(probs, labels, n_bins, "max"),
        "ace": _ace_compute(probs, labels, n_bins),
        "classwise_ece": _classwise_compute(probs, labels, n_bins),
        "aurc": float(_risk_coverage_compute(conf, hits.bool())[1].mean()),
    }
