"""Proper scoring rules (negative log-likelihood, Brier score) and top-1 accuracy of mean predicted probabilities.

Conventions: ``probs`` (N, C) rows summing to 1 within 1e-4, ``labels`` (N,) class indices in [0, C). Each metric
checks its arguments, then its tensors (raising ``ValueError`` naming the argument), then computes in float64
and returns a python ``float``.

References:
    Gneiting & Raftery. "Strictly Proper Scoring Rules, Prediction, and Estimation." JASA 2007.
    Brier. "Verification of Forecasts Expressed in Terms of Probability." Monthly Weather Review 1950.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._validation import check_open_unit_arg, check_probs_labels

__all__ = ["accuracy", "brier_score", "negative_log_likelihood"]


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
    check_probs_labels(probs, labels)
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
    check_probs_labels(probs, labels)
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
    check_probs_labels(probs, labels)
    return _accuracy_compute(probs, labels)
