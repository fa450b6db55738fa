"""Conformal novelty threshold and p-values (calibration.novelty) against plain-loop references and by simulation."""

from __future__ import annotations

import math

import pytest
import torch

from calibration import conformal_p_values, fit_novelty_threshold, novelty_flags


def _loop_threshold(scores: list[float], rate: float) -> float:
    """The smallest calibration score t with #{s_i <= t} >= ceil((n + 1)(1 - rate)); +inf when none has."""
    need = math.ceil((len(scores) + 1) * (1 - rate) - 1e-9)
    for t in sorted(scores):
        if sum(s <= t for s in scores) >= need:
            return t
    return math.inf


def _loop_p_value(scores: list[float], s: float) -> float:
    return (1 + sum(c >= s for c in scores)) / (len(scores) + 1)


@pytest.mark.parametrize("n", [9, 50, 199, 500])
@pytest.mark.parametrize("rate", [0.01, 0.05, 0.1, 0.3])
def test_threshold_matches_the_loop_reference(n: int, rate: float) -> None:
    scores = torch.randn(n, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
    assert fit_novelty_threshold(scores, rate) == _loop_threshold(scores.tolist(), rate)


def test_p_values_match_the_loop_and_the_threshold_rule() -> None:
    gen = torch.Generator().manual_seed(0)
    cal, new = torch.randn(200, generator=gen, dtype=torch.float64), 1.5 * torch.randn(300, generator=gen,
                                                                                       dtype=torch.float64)
    p = conformal_p_values(cal, new)
    assert p.tolist() == pytest.approx([_loop_p_value(cal.tolist(), s) for s in new.tolist()], abs=0)
    for rate in (0.02, 0.1, 0.25):  # flag p <= rate  <=>  score > threshold (no ties in continuous scores)
        assert torch.equal(p <= rate + 1e-12, novelty_flags(new, fit_novelty_threshold(cal, rate)))


def test_stated_review_rate_holds_on_exchangeable_data() -> None:
    """Bates et al.: P(flag) = 1 - k / (n + 1) for continuous scores, k = ceil((n + 1)(1 - rate)); simulated."""
    n, rate, trials = 99, 0.1, 4000
    gen = torch.Generator().manual_seed(1)
    cal = torch.randn(trials, n, generator=gen, dtype=torch.float64)
    new = torch.randn(trials, generator=gen, dtype=torch.float64)
    flagged = torch.tensor([bool(new[t] > fit_novelty_threshold(cal[t], rate)) for t in range(trials)])
    exact = 1 - math.ceil((n + 1) * (1 - rate)) / (n + 1)  # 0.10 here
    se = math.sqrt(exact * (1 - exact) / trials)
    assert abs(float(flagged.double().mean()) - exact) < 4 * se
    # and an outlier distribution is flagged far more often
    far = 3.0 + torch.randn(trials, generator=gen, dtype=torch.float64)
    assert float(torch.tensor([bool(far[t] > fit_novelty_threshold(cal[t], rate)) for t in range(200)])
                 .double().mean()) > 0.8


def test_too_few_calibration_scores_never_flag() -> None:
    assert fit_novelty_threshold(torch.arange(5.0), 0.1) == math.inf  # ceil(6 * 0.9) = 6 > 5
    assert not novelty_flags(torch.tensor([1e9]), math.inf).any()


@pytest.mark.parametrize("rate", [0.0, 1.0, -0.1, float("nan"), True])
def test_bad_rate_is_refused(rate: float) -> None:
    with pytest.raises(ValueError, match="rate"):
        fit_novelty_threshold(torch.arange(10.0), rate)


def test_bad_scores_are_refused() -> None:
    with pytest.raises(ValueError, match="calibration_scores"):
        fit_novelty_threshold(torch.tensor([1.0, float("nan")]), 0.1)
    with pytest.raises(ValueError, match="calibration_scores"):
        fit_novelty_threshold(torch.ones(3, 2), 0.1)
