"""Calibration errors of top-label and class-wise predictions, and the binning behind reliability diagrams.

Conventions (shapes use N samples and C classes): ``probs`` is an (N, C) floating tensor of mean predicted
probabilities whose rows sum to 1 within 1e-4, ``labels`` an (N,) integer tensor of class indices in [0, C).
Every metric checks its arguments, then its tensors (raising ``ValueError`` naming the argument), then computes
in float64 and returns a python ``float``.

References:
    Guo et al. "On Calibration of Modern Neural Networks." ICML 2017 (ECE, MCE, reliability diagrams).
    Naeini et al. "Obtaining Well Calibrated Probabilities Using Bayesian Binning." AAAI 2015 (ECE/MCE).
    Nixon et al. "Measuring Calibration in Deep Learning." CVPR Workshops 2019 (adaptive, class-wise ECE).
    Kull et al. "Beyond temperature scaling: Obtaining well-calibrated multiclass probabilities with Dirichlet
    calibration." NeurIPS 2019 (class-wise ECE).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from ._validation import check_choice, check_int_arg, check_probs_labels

Norm = Literal["l1", "l2", "max"]
_NORMS = ("l1", "l2", "max")

__all__ = [
    "ReliabilityBins",
    "adaptive_calibration_error",
    "classwise_calibration_error",
    "expected_calibration_error",
    "maximum_calibration_error",
    "reliability_bins",
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
    check_probs_labels(probs, labels)
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
    check_probs_labels(probs, labels)
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
    check_probs_labels(probs, labels)
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
    check_probs_labels(probs, labels)
    return _classwise_compute(probs, labels, n_bins)
