"""The targets of the calibration and out-of-distribution gate issues, checked in the report's "goals" section.

:func:`goals` reads the measured report sections; it computes no metric of its own.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from snodevit.evaluation.config import CalibrateConfig

#: The targets of the calibration issue: test ECE after scaling, and bare coverage within 1 - alpha +- slack.
GOAL_ECE = 0.01
GOAL_COVERAGE_SLACK = 0.02
#: The targets of the out-of-distribution gate issue: accuracy, in-distribution accepted share and error among
#: accepted, far-OOD share sent to review, and error among accepted on shifted digits.
GOAL_ACCURACY = 0.98
GOAL_ACCEPTED = 0.97
GOAL_ID_ERROR = 0.01
GOAL_FAR_OOD_REVIEW = 0.99
GOAL_FAR_OOD_SETS: tuple[str, ...] = ("uniform_noise", "photo_crops", "constant", "inverted_digits")
GOAL_SHIFT_ERROR = 0.05
_ROUNDING = 1e-9  # 1.0 - 0.98 is 0.020000000000000018 in floats: a value on the boundary meets the goal


def _goal(goal: str, measured: Any, met: bool, note: str = "") -> dict[str, Any]:
    """One row of the goals section."""
    return {"goal": goal, "measured": measured, "met": met, "note": note}


def goals(m: Mapping[str, Any], cfg: CalibrateConfig) -> dict[str, dict[str, Any]]:
    """The targets of the calibration issue, the measured values, and whether they were met.

    Args:
        m: the report sections; ``calibration`` and ``conformal`` are required, ``decisions_under_shift`` adds
            the gate's goals when present and not empty.
        cfg: the alphas whose coverage is judged.

    Returns:
        Goal name -> ``goal`` (text), ``measured``, ``met`` and ``note``.
    """
    after = m["calibration"]["after"]
    out = {"test ECE after scaling": _goal(f"<= {GOAL_ECE:g}", after["ece"], after["ece"] <= GOAL_ECE)}
    for a in cfg.alphas:
        # judged on the bare sets, the ones whose coverage split conformal controls; the served sets add the top
        # class, so their coverage cannot fall below the top-1 accuracy whatever alpha is
        row = m["conformal"][f"alpha={a:g}"]
        c = row["bare_coverage"]
        note = (f"bare split-conformal sets {{y : score <= q}} (± {row['bare_coverage_std_error']:.3f} standard "
                f"error), {100 * row['empty_fraction']:.1f}% of them empty; the served sets add the top class, so "
                f"none is empty, and cover {row['coverage']:.3f} (>= top-1 accuracy {row['top1_accuracy']:.3f})")
        out[f"coverage alpha={a:g}"] = _goal(f"{1 - a:g} ± {GOAL_COVERAGE_SLACK:g}", c,
                                             abs(c - (1 - a)) <= GOAL_COVERAGE_SLACK + _ROUNDING, note)
    out["test accuracy"] = _goal(f">= {GOAL_ACCURACY:g}", after["accuracy"],
                                 after["accuracy"] >= GOAL_ACCURACY - _ROUNDING)
    rows = m.get("decisions_under_shift")
    if rows:  # no decision rows (a caller that measured only the calibration): no decision goals
        out |= _decision_goals(rows)
    return out


def _decision_goals(rows: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """The gate issue's goals, read from the ``decisions_under_shift`` rows."""
    test = rows["test"]
    err = test["error_among_accepted"]
    out = {"test: accepted": _goal(f">= {GOAL_ACCEPTED:g}", test["accepted"],
                                   test["accepted"] >= GOAL_ACCEPTED - _ROUNDING),
           "test: error among accepted": _goal(f"<= {GOAL_ID_ERROR:g}", err,
                                               err is not None and err <= GOAL_ID_ERROR + _ROUNDING)}
    for name in GOAL_FAR_OOD_SETS:
        review = 1.0 - rows[name]["accepted"]
        out[f"{name}: sent to review"] = _goal(f">= {GOAL_FAR_OOD_REVIEW:g}", review,
                                               review >= GOAL_FAR_OOD_REVIEW - _ROUNDING,
                                               f"{rows[name]['review_out_of_distribution']:.3f} by the gate")
    for name, row in rows.items():
        if name.startswith("rotated") or name in ("sklearn digits", "pixel noise"):
            err = row["error_among_accepted"]
            out[f"{name}: error among accepted"] = _goal(
                f"<= {GOAL_SHIFT_ERROR:g}", err, err is None or err <= GOAL_SHIFT_ERROR + _ROUNDING,
                f"{row['accepted']:.3f} accepted (none accepted counts as met)")
    return out
