"""Selective prediction: the fitted threshold against a brute-force search, edge cases, and the accept rule."""

from __future__ import annotations

import dataclasses
import doctest
import math

import numpy as np
import pytest
import torch

import calibration.selective as SEL


def _brute_force(scores: np.ndarray, correct: np.ndarray, target: float, higher: bool) -> tuple[float, float, float]:
    """Try every calibration score as the threshold; keep the largest coverage with risk <= target."""
    best = (math.inf if higher else -math.inf, 0.0, math.nan)
    for t in np.unique(scores):
        acc = scores >= t if higher else scores <= t
        risk = float((~correct[acc]).mean())
        cov = float(acc.mean())
        if risk <= target + 1e-12 and cov > best[1]:
            best = (float(t), cov, risk)
    return best


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("target", [0.0, 0.02, 0.1, 0.3])
@pytest.mark.parametrize("higher", [True, False])
def test_fit_matches_brute_force(seed: int, target: float, higher: bool) -> None:
    g = torch.Generator().manual_seed(seed)
    n = 300
    conf = torch.rand(n, generator=g, dtype=torch.float64)
    correct = torch.rand(n, generator=g, dtype=torch.float64) < 0.6 + 0.4 * conf
    if seed % 2:
        conf = torch.round(conf * 20) / 20  # ties
    scores = conf if higher else 1.0 - conf
    rule = SEL.fit_selective_threshold(scores, correct, target, higher_is_confident=higher)
    t, cov, risk = _brute_force(scores.numpy(), correct.numpy(), target, higher)
    assert rule.threshold == t and rule.coverage == pytest.approx(cov)
    assert (math.isnan(rule.risk) and math.isnan(risk)) or rule.risk == pytest.approx(risk)
    # the rule reproduces its own calibration figures
    fig = SEL.selective_figures(scores, correct, rule)
    assert fig["coverage"] == pytest.approx(rule.coverage)
    assert (math.isnan(fig["risk"]) and math.isnan(rule.risk)) or fig["risk"] == pytest.approx(rule.risk)


def test_nothing_qualifies_accepts_nothing() -> None:
    scores = torch.tensor([0.9, 0.8, 0.7])
    correct = torch.tensor([False, True, True])  # the most confident answer is wrong
    rule = SEL.fit_selective_threshold(scores, correct, target_risk=0.2)
    assert rule.threshold == math.inf and rule.coverage == 0.0 and math.isnan(rule.risk)
    assert not SEL.decide(scores, rule).any()
    fig = SEL.selective_figures(scores, correct, rule)
    assert fig["coverage"] == 0.0 and fig["n_accepted"] == 0 and math.isnan(fig["risk"])
    rule_u = SEL.fit_selective_threshold(-scores, correct, target_risk=0.2, higher_is_confident=False)
    assert rule_u.threshold == -math.inf and not SEL.decide(-scores, rule_u).any()


def test_all_correct_and_full_risk_accept_everything() -> None:
    scores = torch.tensor([0.9, 0.2, 0.5])
    rule = SEL.fit_selective_threshold(scores, torch.ones(3, dtype=torch.bool), target_risk=0.0)
    assert rule.coverage == 1.0 and rule.risk == 0.0 and rule.threshold == pytest.approx(0.2)
    rule = SEL.fit_selective_threshold(scores, torch.zeros(3, dtype=torch.bool), target_risk=1.0)
    assert rule.coverage == 1.0 and rule.risk == 1.0


def test_ties_are_accepted_together() -> None:
    scores = torch.tensor([0.9, 0.5, 0.5, 0.5], dtype=torch.float64)
    correct = torch.tensor([True, True, True, False])
    # accepting any of the tied 0.5 means accepting all three, risk 1/4 > 0.2: only the 0.9 one qualifies
    rule = SEL.fit_selective_threshold(scores, correct, target_risk=0.2)
    assert rule.threshold == 0.9 and rule.coverage == 0.25


def test_decide_float_and_rule_forms() -> None:
    s = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
    assert SEL.decide(s, 0.5).tolist() == [False, True, True]
    assert SEL.decide(s, 0.5, higher_is_confident=False).tolist() == [True, True, False]
    rule = SEL.SelectiveThreshold(0.5, "epistemic", False, 0.02, 0.5, 0.01, 100)
    assert SEL.decide(s, rule).tolist() == [True, True, False]
    with pytest.raises(ValueError, match=r"`higher_is_confident`=True contradicts the fitted rule"):
        SEL.decide(s, rule, higher_is_confident=True)
    with pytest.raises(dataclasses.FrozenInstanceError):
        rule.threshold = 0.3  # type: ignore[misc]


@pytest.mark.parametrize("call,match", [
    (lambda: SEL.fit_selective_threshold(torch.rand(3), torch.ones(3, dtype=torch.bool), target_risk=1.5),
     r"`target_risk` must be a number in \[0, 1\], got 1.5"),
    (lambda: SEL.fit_selective_threshold(torch.rand(3), torch.ones(2, dtype=torch.bool)),
     r"`correct` must have N=3 entries"),
    (lambda: SEL.fit_selective_threshold(torch.tensor([0.1, float("nan")]), torch.ones(2, dtype=torch.bool)),
     r"`scores` must be finite"),
    (lambda: SEL.fit_selective_threshold(torch.empty(0), torch.empty(0, dtype=torch.bool)),
     r"`scores` must not be empty"),
    (lambda: SEL.fit_selective_threshold(torch.rand(2), torch.ones(2, dtype=torch.bool), score_name=""),
     r"`score_name` must be a non-empty string"),
    (lambda: SEL.decide(torch.rand(2), float("nan")), r"`threshold` must be a real number \(not NaN\)"),
    (lambda: SEL.decide(torch.rand(2, 1), 0.5), r"`scores` must have shape \(N,\)"),
    (lambda: SEL.decide(torch.rand(2), 0.5, higher_is_confident="yes"), r"`higher_is_confident` must be a bool"),
])
def test_rejects_invalid_input(call, match) -> None:
    with pytest.raises(ValueError, match=match):
        call()


def test_selective_doctests() -> None:
    result = doctest.testmod(SEL, verbose=False)
    assert result.attempted > 4 and result.failed == 0
