"""The rows of a scoring run: one per image, the service's answer record flattened, or the image's error.

Every output format (CSV, JSON Lines, Parquet) has these columns in this order; the partial file holds the same
rows as JSON lines.
"""

from __future__ import annotations

from typing import Any

#: Columns of every output, in order. ``uncertainty_*`` are the ``uncertainty`` dict of ``prediction_records``.
ROW_FIELDS: tuple[str, ...] = (
    "path", "label", "class_index", "confidence", "top_k", "uncertainty_total", "uncertainty_aleatoric",
    "uncertainty_epistemic", "uncertainty_std", "prediction_set", "alpha", "decision", "reason_code", "reason",
    "ood_score", "out_of_distribution", "seed", "num_samples", "true_label", "error", "error_detail",
)
#: Internal field of labelled rows in the partial file (their probability vector), dropped from the output.
PROBS_KEY = "_probs"


def record_row(path: str, record: dict[str, Any], true_label: str | None) -> dict[str, Any]:
    """One output row from one ``prediction_records`` dict: the same numbers, ``uncertainty`` flattened."""
    u = record["uncertainty"]
    ood = record["ood"]
    return {"path": path, "label": record["label"], "class_index": record["class_index"],
            "confidence": record["confidence"], "top_k": record["top_k"], "uncertainty_total": u["total"],
            "uncertainty_aleatoric": u["aleatoric"], "uncertainty_epistemic": u["epistemic"],
            "uncertainty_std": u["std"], "prediction_set": record["prediction_set"], "alpha": record["alpha"],
            "decision": record["decision"], "reason_code": record["reason_code"], "reason": record["reason"],
            "ood_score": None if ood is None else ood["score"],
            "out_of_distribution": None if ood is None else ood["out_of_distribution"], "seed": record["seed"],
            "num_samples": record["num_samples"], "true_label": true_label, "error": None, "error_detail": None}


def error_row(path: str, error: str, detail: str, true_label: str | None) -> dict[str, Any]:
    """The row of an image that could not be scored: every answer field empty, ``error`` set."""
    row: dict[str, Any] = dict.fromkeys(ROW_FIELDS)
    row.update(path=path, true_label=true_label, error=error, error_detail=detail)
    return row
