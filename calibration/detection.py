"""How well an uncertainty score ranks wrong predictions, or out-of-distribution inputs, above the rest.

The figures (AUROC, AUPR, FPR at 95% TPR) come from scikit-learn, imported on first use: it takes about a second
to import and the service never needs it.

References:
    Hendrycks & Gimpel. "A Baseline for Detecting Misclassified and Out-of-Distribution Examples." ICLR 2017.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import torch
from torch import Tensor

from ._validation import check_bool_arg, check_scores, check_scores_correct

logger = logging.getLogger(__name__)

TPR_LEVEL = 0.95  # the operating point of ``fpr_at_95_tpr``

__all__ = ["misclassification_detection", "ood_detection"]


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
    check_scores_correct(scores, correct, "scores")
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
