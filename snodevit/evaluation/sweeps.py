"""The report sections away from the test split: the rotation sweep and the digits domain (``shift``,
``domain_shift``), far-OOD detection (``ood``), every gate candidate (``ood_gate``) and what the served decision
does on every set (``decisions_under_shift``).

References:
    Ovadia et al. "Can You Trust Your Model's Uncertainty? Evaluating Predictive Uncertainty Under Dataset
    Shift." NeurIPS 2019.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

import calibration as cal

from snodevit.evaluation.config import FAR_OOD_SETS, GATE_CANDIDATES, OOD_SCORES, CalibrateConfig
from snodevit.evaluation.passes import Pass, Passes
from snodevit.evaluation.sections import conformal_figures
from snodevit.inference.decide import LOW_CONFIDENCE, OUT_OF_DISTRIBUTION, decide_outcomes
from snodevit.inference.fitted import Calibration


def labelled_figures(p: Pass, fitted: Calibration, rule: cal.SelectiveThreshold, cfg: CalibrateConfig,
                     unscaled: Pass) -> dict[str, float]:
    """Accuracy, calibration, conformal and selective figures of one labelled set, as the service answers.

    Args:
        p: the set, scaled with the fitted temperature.
        fitted: the calibration (conformal thresholds).
        rule: the accept/review rule.
        cfg: bins, alphas and decision score.
        unscaled: the same set at T = 1, for the ECE before scaling.
    """
    s, labels = p.s, p.labels
    out: dict[str, float] = {
        "accuracy": cal.accuracy(s.probs, labels),
        "ece": cal.expected_calibration_error(s.probs, labels, n_bins=cfg.n_bins),
        "nll": cal.negative_log_likelihood(s.probs, labels),
        "brier": cal.brier_score(s.probs, labels),
    }
    out["ece_before_scaling"] = cal.expected_calibration_error(unscaled.s.probs, labels, n_bins=cfg.n_bins)
    out["mean_confidence"] = float(s.confidence.double().mean())
    out["mean_entropy"] = float(s.total.double().mean())
    out["mean_mutual_information"] = float(s.epistemic.double().mean())
    for a in cfg.alphas:
        row = conformal_figures(s.probs, labels, fitted.threshold_for(a), fitted.conformal_score, a)
        out[f"coverage_alpha_{a:g}"] = row["coverage"]  # the served sets (top class added)
        out[f"set_size_alpha_{a:g}"] = row["mean_set_size"]
        out[f"bare_coverage_alpha_{a:g}"] = row["bare_coverage"]  # the sets the guarantee is about
        out[f"empty_fraction_alpha_{a:g}"] = row["empty_fraction"]
    scores, _ = p.decision_scores(cfg.decision_score)
    sel = cal.selective_figures(scores, p.correct, rule)
    out["accepted_fraction"] = sel["coverage"]
    out["risk_among_accepted"] = sel["risk"]
    return out


def shift_sections(passes: Passes, test_one: Pass, fitted: Calibration, rule: cal.SelectiveThreshold,
                   cfg: CalibrateConfig, data_name: str) -> dict[str, Any]:
    """shift (one row per rotation angle, 0 = the test split) and domain_shift (test split vs digits).

    Scales the rotated and digits passes with the fitted temperature; ``passes.test`` must be scaled already.
    """
    t = fitted.temperature
    rows = []
    for a in cfg.angles:
        p = passes.rotated.get(a)
        scaled, one = (passes.test, test_one) if p is None else (p.scale(t), p.unscaled())
        rows.append(labelled_figures(scaled, fitted, rule, cfg, one))
    shift: dict[str, list[float]] = {"angle": list(cfg.angles)}
    shift |= {key: [row[key] for row in rows] for key in rows[0]}
    out: dict[str, Any] = {"shift": shift}
    if passes.digits is not None:
        d = passes.digits
        out["domain_shift"] = {
            f"{data_name} test": labelled_figures(passes.test, fitted, rule, cfg, test_one),
            "sklearn digits": labelled_figures(d.scale(t), fitted, rule, cfg, d.unscaled())}
    return out


def ood_section(passes: Passes, temperature: float) -> dict[str, dict[str, float]]:
    """Detection of each OOD set against the test split, by each score (scales the OOD passes)."""
    section = {}
    for set_name, p in passes.ood.items():
        p.scale(temperature)
        for score in OOD_SCORES:
            u_in, u_out = passes.test.uncertainty(score), p.uncertainty(score)
            section[f"{set_name}/{score}"] = {**cal.ood_detection(u_in, u_out), "mean_test": float(u_in.mean()),
                                              "mean_ood": float(u_out.mean())}
    return section


def _labelled(name: str) -> bool:
    """Whether the set's labels are real (every set but the far-OOD ones; inverted digits keep theirs)."""
    return name not in FAR_OOD_SETS or name == "inverted_digits"


def _candidate_flags(cal_pass: Pass, p: Pass, name: str, rate: float) -> Tensor:
    """(N,) bool: which images of ``p`` a gate candidate, fitted on the calibration split at ``rate``, flags."""
    if "|" in name:  # a union of two scores, each at half the rate, so the union keeps the rate (Bonferroni)
        flags = [_candidate_flags(cal_pass, p, part, rate / 2) for part in name.split("|")]
        return flags[0] | flags[1]
    return p.gate_score(name) > cal.fit_novelty_threshold(cal_pass.gate_score(name), rate)


def gate_section(passes: Passes, cfg: CalibrateConfig) -> dict[str, dict[str, float | None]]:
    """Every gate candidate side by side: the share of each set it sends to review at the stated in-distribution
    review rate, and its AUROC against the test split (larger scores = more unusual)."""
    sets = passes.named()
    out: dict[str, dict[str, float | None]] = {}
    for name in GATE_CANDIDATES:
        row: dict[str, float | None] = {}
        for set_name, p in sets.items():
            row[f"review {set_name}"] = float(_candidate_flags(passes.calibration, p, name,
                                                               cfg.gate_review_rate).double().mean())
        for set_name, p in sets.items():
            if set_name != "test":
                row[f"AUROC {set_name}"] = (None if "|" in name else cal.ood_detection(
                    passes.test.gate_score(name), p.gate_score(name))["auroc"])
        out[name] = row
    return out


def decision_rows(passes: Passes, fitted: Calibration) -> dict[str, dict[str, float | None]]:
    """What the served decision does on every set: accepted share, error among accepted, review shares by reason,
    and the served gate's AUROC against the test split."""
    gate = fitted.ood_gate
    out: dict[str, dict[str, float | None]] = {}
    for name, p in passes.named().items():
        score = None if gate is None else p.gate_score(gate.score)
        decided = decide_outcomes(p.s, fitted, score, [p.logits.shape[0]] * len(p.labels))  # its own count's rule
        accept, codes = decided.accept, decided.codes
        n = len(codes)
        accepted = int(accept.sum())
        row: dict[str, float | None] = {"images": float(n), "accuracy": None, "accepted": accepted / n,
                                        "error_among_accepted": None,
                                        "review_out_of_distribution": codes.count(OUT_OF_DISTRIBUTION) / n,
                                        "review_low_confidence": codes.count(LOW_CONFIDENCE) / n,
                                        "gate_auroc": None}
        if _labelled(name):
            row["accuracy"] = float(p.correct.double().mean())
            if accepted:
                row["error_among_accepted"] = float((~p.correct[accept]).double().mean())
        if gate is not None and name != "test":
            row["gate_auroc"] = cal.ood_detection(passes.test.gate_score(gate.score), score)["auroc"]
        out[name] = row
    return out


#: Shifted sets of digits whose wrongly accepted answers the samples comparison counts: rotations of 30 degrees or
#: more (180 is left out: a 6 turned over is a 9) and the other handwriting set.
SAMPLE_COMPARISON_SETS = ("rotated 30", "rotated 45", "rotated 90", "rotated 135", "sklearn digits")


def _accepted_at(p: Pass, gate_ok: Tensor, share: float) -> float:
    """The confidence threshold at which ``share`` of ``p``'s images pass the gate and the threshold (the most
    confident gate-passing images first; +inf when none may be accepted)."""
    conf = p.s.confidence.double()[gate_ok].sort(descending=True).values
    k = min(len(conf), round(share * len(p.labels)))
    return float(conf[k - 1]) if k >= 1 else float("inf")


def samples_comparison(passes: Passes, fitted: Calibration) -> dict[str, dict[str, float | None]]:
    """Do the samples decide better than one? Wrong answers accepted on shifted digits by the served S and by one
    sample, each with its own gate threshold (``Calibration.for_samples``) and a confidence threshold that accepts
    the same share of the calibration split as the served rule does there (equal in-domain acceptance)."""
    s = passes.calibration.logits.shape[0]
    served = decide_outcomes(passes.calibration.s, fitted, _gate(passes.calibration, fitted),
                             [s] * len(passes.calibration.labels))
    share = float(served.accept.double().mean())
    out: dict[str, dict[str, float | None]] = {}
    for n, ps in ((s, passes), (1, passes.at_count(1))):
        rule = fitted.for_samples(n)
        gate_thr = math.inf if rule.ood_gate is None else rule.ood_gate.threshold

        def ok(p: Pass) -> Tensor:
            score = _gate(p, fitted)
            return torch.ones(len(p.labels), dtype=torch.bool) if score is None else score <= gate_thr
        t = _accepted_at(ps.calibration, ok(ps.calibration), share)
        row: dict[str, float | None] = {"num_samples": float(n), "confidence_threshold": t}
        named = ps.named()
        shifted = 0.0
        for name in ("test", *SAMPLE_COMPARISON_SETS):
            if name not in named:
                continue
            p = named[name]
            accept = ok(p) & (p.s.confidence.double() >= t)
            wrong = float((accept & ~p.correct).sum())
            row[f"{name}: accepted"], row[f"{name}: wrong accepted"] = float(accept.double().mean()), wrong
            shifted += 0.0 if name == "test" else wrong
        row["shifted: wrong accepted"] = shifted
        out[f"S={n}"] = row
    one, many = out["S=1"]["shifted: wrong accepted"], out[f"S={s}"]["shifted: wrong accepted"]
    out["reduction"] = {"calibration_acceptance": share,
                        "wrong_accepted_fewer_than_one_sample": None if not one else 1.0 - float(many) / float(one)}
    return out


def _gate(p: Pass, fitted: Calibration) -> Tensor | None:
    return None if fitted.ood_gate is None else p.gate_score(fitted.ood_gate.score)
