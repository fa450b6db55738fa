"""The decision of each image: the out-of-distribution gate first, then the confidence (or epistemic) rule."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, NamedTuple, get_args

import torch
from torch import Tensor

from calibration.selective import decide
from snodevit.inference.fitted import Calibration
from snodevit.inference.summary import UncertaintySummary

#: Reason codes of a decision: accepted, sent to review for low confidence, or for being out of distribution.
ReasonCode = Literal["accepted", "low_confidence", "out_of_distribution"]
REASON_CODES: tuple[str, ...] = get_args(ReasonCode)
ACCEPTED, LOW_CONFIDENCE, OUT_OF_DISTRIBUTION = REASON_CODES


class Outcomes(NamedTuple):
    """The decisions of a batch."""

    accept: Tensor  # (B,) bool
    reasons: list[str]  # the decision in words, with the numbers compared
    codes: list[str]  # one of REASON_CODES per image
    flagged: Tensor | None  # (B,) bool: the gate fired; None without a gate
    gate_thresholds: Tensor | None  # (B,) float64: the gate threshold each image was compared with


def decide_outcomes(summary: UncertaintySummary, cal: Calibration, ood_score: Tensor | None,
                    counts: Sequence[int] | None = None) -> Outcomes:
    """The decision of each image under the thresholds fitted for its number of samples (``counts``; with the
    calibration's own thresholds when None or when it has no count rules: ``Calibration.for_samples``).

    Returns:
        The :class:`Outcomes`, in the order of the images.
    """
    b = summary.probs.shape[0]
    if counts is None or not cal.count_rules:
        return _decide(summary, cal, ood_score)
    accept = torch.zeros(b, dtype=torch.bool)
    reasons, codes = [""] * b, [""] * b
    flagged = None if cal.ood_gate is None else torch.zeros(b, dtype=torch.bool)
    thresholds = None if cal.ood_gate is None else torch.zeros(b, dtype=torch.float64)
    for n in sorted(set(counts)):
        idx = torch.tensor([i for i, c in enumerate(counts) if c == n])
        dev = idx.to(summary.probs.device)
        part = UncertaintySummary(*(getattr(summary, f)[dev] for f in ("probs", "total", "aleatoric", "epistemic",
                                                                       "std")))
        out = _decide(part, cal.for_samples(n), None if ood_score is None else ood_score[idx.to(ood_score.device)])
        accept[idx] = out.accept
        for j, i in enumerate(idx.tolist()):
            reasons[i], codes[i] = out.reasons[j], out.codes[j]
        if flagged is not None and thresholds is not None and out.flagged is not None:
            flagged[idx], thresholds[idx] = out.flagged, out.gate_thresholds
    return Outcomes(accept, reasons, codes, flagged, thresholds)


def _decide(summary: UncertaintySummary, cal: Calibration, ood_score: Tensor | None) -> Outcomes:
    """The decision of each image under ``cal``'s thresholds: the OOD gate first, then the confidence (or
    epistemic) rule."""
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
    thresholds = None if cal.ood_gate is None else torch.full((b,), cal.ood_gate.threshold, dtype=torch.float64)
    return Outcomes(accept, reasons, codes, flagged, thresholds)
