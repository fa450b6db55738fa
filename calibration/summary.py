"""The headline figures of a set of predictions in one call, validated once: what the report and the CLI show.

Each figure is computed by the private ``_*_compute`` function behind the public metric of the same name, so the
summary and the single metrics can never disagree, and the tensors are checked once instead of eleven times.
"""

from __future__ import annotations

from torch import Tensor

from ._validation import check_int_arg, check_probs_labels
from .calibration_error import _ace_compute, _classwise_compute, _ece_compute, _top_label
from .scoring_rules import _accuracy_compute, _brier_compute, _nll_compute
from .selective import _risk_coverage_compute

__all__ = ["calibration_summary"]


def calibration_summary(probs: Tensor, labels: Tensor, n_bins: int = 15) -> dict[str, float | int]:
    r"""All headline figures of a set of predictions, validated once; used by the report and the CLI.

    Keys: ``n_samples``, ``n_classes``, ``n_bins``, ``accuracy``, ``nll`` (nats), ``brier``, ``ece`` (l1),
    ``rms_ce`` (l2), ``mce`` (max), ``ace`` (equal-mass), ``classwise_ece`` and ``aurc`` (max-probability
    confidence), each as defined by the function of the same name in this package.

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
    check_probs_labels(probs, labels)
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
