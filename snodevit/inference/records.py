"""Per-image answer records: the one place where a ``Prediction`` becomes JSON-ready numbers.

The HTTP service and the batch-scoring CLI both call ``prediction_records``, so the same image, seed and
number of samples give the same numbers in both.
"""

from __future__ import annotations

from typing import Any

from snodevit.inference.fitted import threshold_to_json
from snodevit.inference.predictor import Prediction


def prediction_records(pred: Prediction, class_names: list[str], top_k: int = 3) -> list[dict[str, Any]]:
    """One dict per image of the batch.

    Keys: label, class_index, confidence (calibrated mean probability of the label), top_k (list of
    {label, class_index, probability}), uncertainty {total, aleatoric, epistemic, std}, prediction_set (labels, or
    None without conformal calibration), alpha, decision ("accept" | "review"), reason_code ("accepted" |
    "low_confidence" | "out_of_distribution": why), reason (the same in words, with the numbers), ood ({score,
    threshold, out_of_distribution, score_name} of the out-of-distribution gate, or None when the model has none), seed, num_samples (the Monte Carlo samples
    this image's answer used: the requested S, or with ``num_samples="auto"`` as many as the adaptive rule drew).
    ``std`` is the standard deviation over samples of the predicted class's probability.
    """
    s = pred.summary
    gate = pred.ood_gate
    k = max(1, min(int(top_k), s.probs.shape[1]))
    top_p, top_i = s.probs.topk(k, dim=-1)
    records = []
    for b in range(s.probs.shape[0]):
        idx = int(top_i[b, 0])  # from topk, so label and top_k[0] agree even when probabilities tie
        rec: dict[str, Any] = {
            "label": class_names[idx],
            "class_index": idx,
            "confidence": float(s.probs[b, idx]),
            "top_k": [{"label": class_names[int(i)], "class_index": int(i), "probability": float(p)}
                      for p, i in zip(top_p[b], top_i[b])],
            "uncertainty": {"total": float(s.total[b]), "aleatoric": float(s.aleatoric[b]),
                            "epistemic": float(s.epistemic[b]), "std": float(s.std[b, idx])},
            "prediction_set": None if pred.prediction_sets is None else
            [class_names[int(i)] for i in pred.prediction_sets[b].nonzero().flatten()],
            "alpha": pred.alpha,
            "decision": "accept" if bool(pred.accept[b]) else "review",
            "reason_code": pred.reason_codes[b],
            "reason": pred.reasons[b],
            "ood": None if (gate is None or pred.ood_score is None or pred.out_of_distribution is None) else
            {"score": float(pred.ood_score[b]),
             "threshold": threshold_to_json(gate.threshold if pred.gate_thresholds is None
                                            else float(pred.gate_thresholds[b])),
             "out_of_distribution": bool(pred.out_of_distribution[b]), "score_name": gate.score},
            "seed": pred.seeds[b],
            "num_samples": int(pred.num_samples[b]),  # samples this image used (adaptive: fewer)
        }
        records.append(rec)
    return records
