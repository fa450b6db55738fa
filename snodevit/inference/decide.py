"""The decision of each image: the out-of-distribution gate first, then the confidence (or epistemic) rule."""

from __future__ import annotations

from typing import Literal, get_args

import torch
from torch import Tensor

from calibration.selective import decide
from snodevit.inference.fitted import Calibration
from snodevit.inference.summary import UncertaintySummary

#: Reason codes of a decision: accepted, sent to review for low confidence, or for being out of distribution.
ReasonCode = Literal["accepted", "low_confidence", "out_of_distribution"]
REASON_CODES: tuple[str, ...] = get_args(ReasonCode)
ACCEPTED, LOW_CONFIDENCE, OUT_OF_DISTRIBUTION = REASON_CODES


def decide_outcomes(summary: UncertaintySummary, cal: Calibration,
            ood_score: Tensor | None) -> tuple[Tensor, list[str], list[str], Tensor | None]:
    """The decision of each image: the OOD gate first, then the confidence (or epistemic) rule.

    Returns:
        accept (B,) bool, reasons (text), reason codes (``REASON_CODES``), and the gate's flags (None without one).
    """
    b = summary.probs.shape[0]
    flagged = None
    if cal.ood_gate is not None:
        assert ood_score is not None
        flagged = ood_score.cpu() > cal.ood_gate.threshold
    if cal.decision_threshold is None:
        accept = torch.ones(b, dtype=torch.bool)
        rule = ["no decision threshold calibrated: accepted by default"] * b
    else:
        if cal.decision_score == "confidence":
            scores, higher = summary.confidence, True
        elif cal.decision_score == "epistemic":
            scores, higher = summary.epistemic, False
        else:
            raise ValueError(f"decision_score must be 'confidence' or 'epistemic', got {cal.decision_score!r}")
        accept = decide(scores, cal.decision_threshold, higher_is_confident=higher).cpu()
        risk = f" (fitted for {cal.target_risk:.1%} error among accepted)" if cal.target_risk is not None else ""
        op_ok, op_bad = (">=", "<") if higher else ("<=", ">")
        rule = [f"{cal.decision_score} {float(v):.4f} {op_ok if ok else op_bad} threshold "
                f"{cal.decision_threshold:.4f}{risk}" for v, ok in zip(scores, accept.tolist())]
    codes = [ACCEPTED if ok else LOW_CONFIDENCE for ok in accept.tolist()]
    reasons = rule
    if flagged is not None:
        assert cal.ood_gate is not None and ood_score is not None
        gate = [cal.ood_gate.reason(float(v), bool(f)) for v, f in zip(ood_score, flagged.tolist())]
        codes = [OUT_OF_DISTRIBUTION if f else c for f, c in zip(flagged.tolist(), codes)]
        reasons = [g if f else f"{r}; {g}" for g, f, r in zip(gate, flagged.tolist(), rule)]
        accept = accept & ~flagged
    return accept, reasons, codes, flagged
