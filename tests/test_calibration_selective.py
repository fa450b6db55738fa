"""Selective prediction: the fitted threshold against a brute-force search, edge cases, and the accept rule; the
summary figures (AURC, AUGRC, risk at a coverage, coverage at a risk) against plain loops over sorted thresholds."""

from __future__ import annotations

import dataclasses
import doctest
import itertools
import math
from fractions import Fraction

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

import calibration
import calibration.risk_coverage as RC
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


# --------------------------------------------------------------------------------------------------------------
# AURC, AUGRC, risk at a coverage, coverage at a risk
# --------------------------------------------------------------------------------------------------------------


def _threshold_points(scores: list[float], correct: list[bool], higher: bool) -> list[tuple[int, int]]:
    """(accepted, accepted and wrong) at every distinct score used as the threshold, widest last; (0, 0) first."""
    points = [(0, 0)]
    for t in sorted(set(scores), reverse=higher):
        accepted = [i for i, s in enumerate(scores) if (s >= t if higher else s <= t)]
        points.append((len(accepted), sum(not correct[i] for i in accepted)))
    return points


def _loop_errors(scores: list[float], correct: list[bool], higher: bool) -> list[float]:
    """Errors among the k most confident, k = 1..N: exact at each threshold, linear in k between two thresholds
    (the expected count when the samples tied at the next threshold are taken in random order)."""
    points = _threshold_points(scores, correct, higher)
    errors = []
    for (n0, e0), (n1, e1) in zip(points, points[1:]):
        for k in range(n0 + 1, n1 + 1):
            errors.append(e0 + (k - n0) * (e1 - e0) / (n1 - n0))
    return errors


def _loop_aurc(scores: list[float], correct: list[bool], higher: bool) -> float:
    errors = _loop_errors(scores, correct, higher)
    return sum(e / k for k, e in enumerate(errors, start=1)) / len(errors)


def _loop_augrc(scores: list[float], correct: list[bool], higher: bool) -> float:
    """Trapezoid rule over the generalized risk (accepted and wrong) / N at the thresholds, from (0, 0)."""
    n = len(scores)
    points = _threshold_points(scores, correct, higher)
    return sum((n1 - n0) / n * (e0 + e1) / (2 * n) for (n0, e0), (n1, e1) in zip(points, points[1:]))


def _loop_risk_at_coverage(scores: list[float], correct: list[bool], coverage: Fraction, higher: bool) -> float:
    """The error rate among the smallest k (>= 1) most confident whose share k / N is at least ``coverage``."""
    n = len(scores)
    k = next(k for k in range(1, n + 1) if Fraction(k, n) >= coverage)
    return _loop_errors(scores, correct, higher)[k - 1] / k


def _loop_coverage_at_risk(scores: list[float], correct: list[bool], risk: float, higher: bool) -> float:
    """The widest threshold whose error rate among the accepted is at most ``risk``; 0 when none is."""
    best = 0.0
    for n_acc, e in _threshold_points(scores, correct, higher)[1:]:
        if e / n_acc <= risk + 1e-12:
            best = max(best, n_acc / len(scores))
    return best


def _random_case(seed: int, n: int, ties: bool, higher: bool) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    conf = torch.rand(n, generator=g, dtype=torch.float64)
    correct = torch.rand(n, generator=g, dtype=torch.float64) < 0.5 + 0.5 * conf  # an informative score
    if ties:
        conf = torch.round(conf * 8) / 8
    return (conf if higher else 1.0 - conf), correct


COVERAGES = ("0.05", "0.1", "0.5", "0.7", "0.8", "0.95", "1")
RISKS = (0.0, 0.01, 0.05, 0.2, 0.5, 1.0)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("n", [1, 2, 7, 10, 240])
@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("higher", [True, False])
def test_selective_figures_match_plain_loops(seed: int, n: int, ties: bool, higher: bool) -> None:
    scores, correct = _random_case(seed, n, ties, higher)
    s, c = scores.tolist(), correct.tolist()
    assert RC.aurc(scores, correct, higher) == pytest.approx(_loop_aurc(s, c, higher), abs=1e-12)
    assert RC.augrc(scores, correct, higher) == pytest.approx(_loop_augrc(s, c, higher), abs=1e-12)
    for cov in COVERAGES:
        assert RC.risk_at_coverage(scores, correct, float(cov), higher) == pytest.approx(
            _loop_risk_at_coverage(s, c, Fraction(cov), higher), abs=1e-12), cov
    for r in RISKS:
        assert RC.coverage_at_risk(scores, correct, r, higher) == _loop_coverage_at_risk(s, c, r, higher), r
    m = RC.selective_metrics(scores, correct, higher)
    assert list(m) == ["aurc", "augrc", "risk_at_80_coverage", "coverage_at_1_risk", "coverage_at_5_risk"]
    assert m == pytest.approx({"aurc": _loop_aurc(s, c, higher), "augrc": _loop_augrc(s, c, higher),
                               "risk_at_80_coverage": _loop_risk_at_coverage(s, c, Fraction(4, 5), higher),
                               "coverage_at_1_risk": _loop_coverage_at_risk(s, c, 0.01, higher),
                               "coverage_at_5_risk": _loop_coverage_at_risk(s, c, 0.05, higher)}, abs=1e-12)
    # the figures rank the images; the order they come in does not matter, tied or not
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + 100))
    assert RC.selective_metrics(scores[perm], correct[perm], higher) == pytest.approx(m, abs=1e-12)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("ties", [False, True])
def test_augrc_is_traub_et_al_closed_form(seed: int, ties: bool) -> None:
    """AUGRC = (1 - AUROC) a (1 - a) + (1 - a)^2 / 2, AUROC of the confidence separating right from wrong."""
    conf, correct = _random_case(seed, 300, ties, True)
    a = float(correct.double().mean())
    auroc = roc_auc_score(correct.numpy(), conf.numpy())  # ties count 1/2
    assert RC.augrc(conf, correct) == pytest.approx((1 - auroc) * a * (1 - a) + 0.5 * (1 - a) ** 2, abs=1e-12)


def test_coverage_at_risk_is_the_fitted_rules_coverage() -> None:
    scores, correct = _random_case(5, 300, True, True)
    for r in RISKS:
        assert RC.coverage_at_risk(scores, correct, r) == SEL.fit_selective_threshold(scores, correct, r).coverage


def test_risk_at_coverage_inside_a_tie_is_expected_over_orders() -> None:
    scores = torch.tensor([0.9, 0.5, 0.5, 0.5, 0.2], dtype=torch.float64)
    correct = torch.tensor([True, True, False, False, True])
    for k in range(1, 6):
        expected = 0.0
        perms = list(itertools.permutations([1, 2, 3]))
        for perm in perms:
            order = [0, *perm, 4]
            expected += sum(not bool(correct[i]) for i in order[:k]) / k / len(perms)
        assert RC.risk_at_coverage(scores, correct, k / 5) == pytest.approx(expected, abs=1e-12), k


def test_selective_metrics_by_hand_with_ties() -> None:
    scores = torch.tensor([0.9, 0.5, 0.5, 0.5, 0.2], dtype=torch.float64)
    correct = torch.tensor([True, True, False, False, True])
    # errors among the k most confident: 0, 2/3, 4/3, 2, 2 (the tied three hold 2 errors)
    m = RC.selective_metrics(scores, correct)
    assert m["aurc"] == pytest.approx((0 + 1 / 3 + 4 / 9 + 2 / 4 + 2 / 5) / 5, abs=1e-15)
    assert m["augrc"] == pytest.approx((0 + 2 / 3 + 4 / 3 + 2 + 2 - 2 / 2) / 25, abs=1e-15)  # = 0.2
    assert m["risk_at_80_coverage"] == pytest.approx(0.5, abs=1e-15)  # 4 of 5 images: 2 / 4
    assert RC.risk_at_coverage(scores, correct, 0.6) == pytest.approx(4 / 9, abs=1e-15)
    assert m["coverage_at_1_risk"] == m["coverage_at_5_risk"] == 0.2  # only the 0.9 image; the ties hold 2/3 wrong
    assert RC.coverage_at_risk(scores, correct, 0.4) == 1.0  # all five: 2 / 5
    assert RC.coverage_at_risk(scores, correct, 0.39) == 0.2
    # every score tied: the overall error rate at every coverage, and a random ranking's AUGRC (1 - a) / 2
    flat = torch.full((4,), 0.5, dtype=torch.float64)
    m = RC.selective_metrics(flat, torch.tensor([1, 0, 1, 1]))
    assert m == pytest.approx({"aurc": 0.25, "augrc": 0.125, "risk_at_80_coverage": 0.25,
                               "coverage_at_1_risk": 0.0, "coverage_at_5_risk": 0.0}, abs=1e-15)


@pytest.mark.parametrize("n", [1, 9])
def test_selective_metrics_all_correct_and_all_wrong(n: int) -> None:
    scores = torch.rand(n, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
    right = RC.selective_metrics(scores, torch.ones(n, dtype=torch.bool))
    assert right == {"aurc": 0.0, "augrc": 0.0, "risk_at_80_coverage": 0.0, "coverage_at_1_risk": 1.0,
                     "coverage_at_5_risk": 1.0}
    wrong = RC.selective_metrics(scores, torch.zeros(n, dtype=torch.bool), higher_is_confident=False)
    assert wrong == {"aurc": 1.0, "augrc": 0.5, "risk_at_80_coverage": 1.0, "coverage_at_1_risk": 0.0,
                     "coverage_at_5_risk": 0.0}
    assert RC.coverage_at_risk(scores, torch.zeros(n, dtype=torch.bool), 1.0) == 1.0


def test_risk_at_coverage_rounds_a_fractional_count_up() -> None:
    scores = torch.linspace(1.0, 0.01, 100, dtype=torch.float64)
    correct = torch.tensor([True] * 7 + [False] * 93)
    assert 0.07 * 100 > 7
    assert RC.risk_at_coverage(scores, correct, 0.07) == 0.0  # 0.07 * 100 = 7.000000000000001 is 7 images
    assert RC.risk_at_coverage(scores, correct, 0.0701) == pytest.approx(1 / 8)  # 7.01 images: 8
    assert RC.risk_at_coverage(scores, correct, 1e-6) == 0.0  # at least one image


def test_selective_metrics_are_exported() -> None:
    for name in ("augrc", "risk_at_coverage", "coverage_at_risk", "selective_metrics"):
        assert getattr(calibration, name) is getattr(RC, name) and name in calibration.__all__


_S, _C = torch.rand(3, dtype=torch.float64), torch.tensor([True, False, True])


@pytest.mark.parametrize("call,match", [
    (lambda: RC.risk_at_coverage(_S, _C, coverage=0.0), r"`coverage` must be a number in \(0, 1\], got 0.0"),
    (lambda: RC.risk_at_coverage(_S, _C, coverage=1.5), r"`coverage` must be a number in \(0, 1\], got 1.5"),
    (lambda: RC.risk_at_coverage(_S, _C, coverage=True), r"`coverage` must be a number in \(0, 1\]"),
    (lambda: RC.risk_at_coverage(_S, _C, coverage="0.8"), r"`coverage` must be a number in \(0, 1\]"),
    (lambda: RC.risk_at_coverage(_S, _C, coverage=float("nan")), r"`coverage` must be a number in \(0, 1\]"),
    (lambda: RC.risk_at_coverage(_S, _C, higher_is_confident=1), r"`higher_is_confident` must be a bool"),
    (lambda: RC.risk_at_coverage(_S.float().unsqueeze(1), _C), r"`scores` must have shape \(N,\)"),
    (lambda: RC.coverage_at_risk(_S, _C, risk=-0.1), r"`risk` must be a number in \[0, 1\], got -0.1"),
    (lambda: RC.coverage_at_risk(_S, _C, risk=None), r"`risk` must be a number in \[0, 1\]"),
    (lambda: RC.coverage_at_risk(_S, _C, higher_is_confident="no"), r"`higher_is_confident` must be a bool"),
    (lambda: RC.coverage_at_risk(_S, _C[:2]), r"`correct` must have N=3 entries"),
    (lambda: RC.augrc(torch.tensor([0.1, float("inf")]), _C[:2]), r"`confidence_or_score` must be finite"),
    (lambda: RC.augrc(torch.tensor([1, 2]), _C[:2]), r"`confidence_or_score` must be a floating-point tensor"),
    (lambda: RC.augrc(_S, _C, higher_is_confident=0), r"`higher_is_confident` must be a bool"),
    (lambda: RC.selective_metrics(torch.empty(0), torch.empty(0, dtype=torch.bool)), r"`scores` must not be empty"),
    (lambda: RC.selective_metrics(_S, torch.tensor([0.0, 1.0, 1.0])), r"`correct` must be a bool tensor"),
    (lambda: RC.selective_metrics(_S, torch.tensor([0, 2, 1])), r"`correct` must hold only 0/1"),
    (lambda: RC.selective_metrics(_S, _C, higher_is_confident=None), r"`higher_is_confident` must be a bool"),
])
def test_selective_metrics_reject_invalid_input(call, match) -> None:
    with pytest.raises(ValueError, match=match):
        call()


def test_selective_doctests() -> None:
    result = doctest.testmod(SEL, verbose=False)
    assert result.attempted > 4 and result.failed == 0


def _loop_fit_with_estimate(s: list[float], c: list[bool], p: list[float], target: float) -> float:
    """Plain loop: the widest cut at a distinct score whose error rate and mean error probability are both <= target."""
    best = 0.0
    for t in sorted(set(s)):
        acc = [i for i, v in enumerate(s) if v >= t]
        risk = sum(not c[i] for i in acc) / len(acc)
        est = sum(p[i] for i in acc) / len(acc)
        if risk <= target + 1e-12 and est <= target + 1e-12:
            best = max(best, len(acc) / len(s))
    return best


@pytest.mark.parametrize("seed", range(6))
def test_error_probabilities_also_bound_the_fitted_rule(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    n = 60
    scores = torch.rand(n, generator=g, dtype=torch.float64).round(decimals=1 if seed % 2 else 6)
    correct = torch.rand(n, generator=g, dtype=torch.float64) < 0.3 + 0.7 * scores
    p_wrong = (1 - scores) * torch.rand(n, generator=g, dtype=torch.float64)
    for target in (0.05, 0.1, 0.2, 0.4):
        rule = SEL.fit_selective_threshold(scores, correct, target, error_probabilities=p_wrong)
        want = _loop_fit_with_estimate(scores.tolist(), correct.tolist(), p_wrong.tolist(), target)
        assert rule.coverage == pytest.approx(want, abs=1e-12), target
        assert rule.coverage <= SEL.fit_selective_threshold(scores, correct, target).coverage
    # probabilities of zero leave the empirical rule as it was
    zero = SEL.fit_selective_threshold(scores, correct, 0.2, error_probabilities=torch.zeros(n, dtype=torch.float64))
    assert zero == SEL.fit_selective_threshold(scores, correct, 0.2)


def test_error_probabilities_are_checked() -> None:
    with pytest.raises(ValueError, match="shape of `scores`"):
        SEL.fit_selective_threshold(_S, _C, 0.1, error_probabilities=torch.zeros(2, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        SEL.fit_selective_threshold(_S, _C, 0.1, error_probabilities=torch.full((3,), 1.5, dtype=torch.float64))
