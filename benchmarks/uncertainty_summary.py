"""What ``benchmarks/uncertainty.py`` reports across seeds: the mean and spread of every figure, and the goals of
issue #7 checked against them."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from uncertainty_plan import GOAL_ACCURACY, GOAL_COST_VS_ENSEMBLE, GOAL_ECE_VS_ENSEMBLE, GOAL_OOD_MI_AUROC


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """Every number of a nested result under a ``section.metric`` key (booleans left out)."""
    out: dict[str, float] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[key] = float(v)
    return out


def _mean_std(values: Sequence[float]) -> dict[str, float]:
    """Mean, sample standard deviation (0 for one value) and count."""
    arr = np.asarray(values, dtype=np.float64)
    return {"mean": float(arr.mean()), "std": float(arr.std(ddof=1)) if len(arr) > 1 else 0.0, "n": int(len(arr))}


def aggregate(per_run: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, dict[str, float]]]:
    """Mean and sample standard deviation over seeds of every scalar figure (``section.metric`` keys)."""
    summary = {}
    for name, runs in per_run.items():
        flat = [_flatten({k: v for k, v in r.items() if k not in ("method", "seed")}) for r in runs]
        keys = [k for k in flat[0] if all(k in f for f in flat)]
        summary[name] = {k: _mean_std([f[k] for f in flat]) for k in keys}
        curves = np.asarray([r["rejection_accuracy"] for r in runs], dtype=np.float64)
        summary[name]["rejection_accuracy"] = {"mean": curves.mean(0).tolist(),  # type: ignore[dict-item]
                                               "std": (curves.std(0, ddof=1) if len(runs) > 1
                                                       else np.zeros(curves.shape[1])).tolist()}
    return summary


def goal_check(summary: dict[str, Any], cost: dict[str, Any], names: Sequence[str], ensemble: str) -> dict[str, Any]:
    """The issue's goal for each SDE method: rotated ECE, cost against the ensemble, far-OOD MI AUROC, accuracy."""
    def m(method: str, key: str) -> float:
        return summary[method][key]["mean"]

    out = {}
    for name in names:
        if name not in summary:
            continue
        ece = m(name, "rotation_mean.ece")
        ens_ece = m(ensemble, "rotation_mean.ece")
        cost_ratio = cost[name]["flops_per_image"] / cost[ensemble]["flops_per_image"]
        checks = {
            "rotated_ece_below_det": {"value": ece, "reference": m("det", "rotation_mean.ece"),
                                      "met": ece < m("det", "rotation_mean.ece")},
            "rotated_ece_below_mc_dropout": {"value": ece, "reference": m("mc-dropout", "rotation_mean.ece"),
                                             "met": ece < m("mc-dropout", "rotation_mean.ece")},
            "rotated_ece_within_10pct_of_ensemble": {"value": ece, "reference": ens_ece,
                                                     "met": ece <= (1 + GOAL_ECE_VS_ENSEMBLE) * ens_ece},
            "cost_at_most_a_third_of_ensemble": {"value": cost_ratio, "reference": GOAL_COST_VS_ENSEMBLE,
                                                 "met": cost_ratio <= GOAL_COST_VS_ENSEMBLE},
            "far_ood_auroc_mi_at_least_0.99": {"value": m(name, "ood_min.auroc_mutual_information"),
                                               "reference": GOAL_OOD_MI_AUROC,
                                               "met": m(name, "ood_min.auroc_mutual_information") >= GOAL_OOD_MI_AUROC},
            "test_accuracy_at_least_98pct": {"value": m(name, "test.accuracy"), "reference": GOAL_ACCURACY,
                                             "met": m(name, "test.accuracy") >= GOAL_ACCURACY},
        }
        out[name] = {"checks": checks, "all_met": all(c["met"] for c in checks.values())}
    return out
