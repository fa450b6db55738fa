"""Split conformal prediction: coverage on calibrated synthetic data, thresholds against an independent numpy
reference, set properties and input checks."""

from __future__ import annotations

import doctest
import logging
import math

import numpy as np
import pytest
import torch

import calibration.conformal as CP

COVERAGE_TOL = 0.02  # |coverage - (1 - alpha)| on n_cal = n_test = 5000 (about 3 standard deviations)
BARE_COVERAGE_TOL = 0.02  # |bare coverage - 0.9| on n_cal = 2000, n_test = 20000 (about 3 standard deviations)


def _calibrated(n: int, c: int, seed: int, concentration: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """Dirichlet probabilities and labels drawn from them, so the probabilities are calibrated by construction."""
    g = torch.Generator().manual_seed(seed)
    gam = torch.distributions.Gamma(torch.full((c,), concentration, dtype=torch.float64), torch.ones(c))
    torch.manual_seed(seed)  # Gamma sampling takes no generator
    w = gam.sample((n,))
    probs = w / w.sum(dim=1, keepdim=True)
    labels = torch.multinomial(probs, 1, generator=g).squeeze(1)
    return probs, labels


def _np_scores(probs: np.ndarray, labels: np.ndarray, score: str) -> np.ndarray:
    """Independent per-sample loop for the calibration scores."""
    out = np.empty(len(labels))
    for i, (p, y) in enumerate(zip(probs, labels)):
        if score == "lac":
            out[i] = 1.0 - p[y]
        else:
            order = np.argsort(-p, kind="stable")
            rank = int(np.nonzero(order == y)[0][0])
            out[i] = p[order[: rank + 1]].sum()
    return out


def _accurate(n: int, c: int, seed: int, margin: float = 10.0) -> tuple[torch.Tensor, torch.Tensor]:
    """A very accurate, calibrated classifier: one class per sample gets a logit boost of about ``margin`` (sd 2),
    and labels are drawn from the softmax probabilities. ``margin=10`` with c=10 gives ~99.4 % top-1 accuracy,
    with no probability rounding to exactly 1 (so no tied scores at 0)."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, c, generator=g, dtype=torch.float64)
    boosted = torch.randint(0, c, (n,), generator=g)
    logits[torch.arange(n), boosted] += margin + 2.0 * torch.randn(n, generator=g, dtype=torch.float64)
    probs = logits.softmax(dim=1)
    return probs, torch.multinomial(probs, 1, generator=g).squeeze(1)


def _np_bare_sets(probs: np.ndarray, q: float, score: str, u: np.ndarray | None) -> np.ndarray:
    """Independent per-sample, per-class loop for the bare sets {y : s(x, y) <= q}."""
    n, c = probs.shape
    out = np.zeros((n, c), dtype=bool)
    for i, p in enumerate(probs):
        order = np.argsort(-p, kind="stable")
        for y in range(c):
            if score == "lac":
                s = 1.0 - p[y]
            else:
                rank = int(np.nonzero(order == y)[0][0])
                before = float(np.sum(p[order[:rank]]))
                s = before + (p[y] if u is None else u[i] * p[y])
            out[i, y] = s <= q
    return out


@pytest.mark.parametrize("score,randomized", [("lac", False), ("aps", False), ("aps", True)])
@pytest.mark.parametrize("alpha", [0.05, 0.1, 0.2])
def test_coverage_on_calibrated_data(score: str, randomized: bool, alpha: float) -> None:
    probs, labels = _calibrated(10000, 10, seed=int(alpha * 100) + len(score) + randomized)
    cal_p, cal_y, test_p, test_y = probs[:5000], labels[:5000], probs[5000:], labels[5000:]
    g = torch.Generator().manual_seed(0)
    q = CP.fit_conformal_threshold(cal_p, cal_y, alpha, score, randomized, generator=g)
    sets = CP.prediction_sets(test_p, q, score, randomized, generator=g)
    coverage, size = CP.conformal_coverage(sets, test_y)
    assert abs(coverage - (1 - alpha)) < COVERAGE_TOL
    assert 1.0 <= size < 10.0
    assert bool(sets.any(dim=1).all())  # never empty


@pytest.mark.parametrize("score,randomized", [("lac", False), ("aps", False), ("aps", True)])
def test_bare_sets_match_a_numpy_loop(score: str, randomized: bool) -> None:
    probs, _ = _calibrated(200, 6, seed=3, concentration=0.3)
    boundary = 1.0 - float(probs[7, 2])  # a LAC score itself: membership is "<=", so class 2 of row 7 is in
    for q in (0.0, 0.15, 0.5, boundary, 0.83, 0.97, 1.0, math.inf):
        sets = CP.prediction_sets(probs, q, score, randomized, generator=torch.Generator().manual_seed(11),
                                  allow_empty=True)
        # the uniforms prediction_sets draws: one float64 per sample from the generator
        u = torch.rand(200, generator=torch.Generator().manual_seed(11), dtype=torch.float64).numpy()
        ref = _np_bare_sets(probs.numpy(), q, score, u if randomized else None)
        assert sets.dtype == torch.bool and sets.numpy().tolist() == ref.tolist(), q
        if score == "lac" and q == boundary:
            assert bool(sets[7, 2])
        if q == 0.0:  # no probability here is exactly 1, so every score is > 0: every bare set is empty
            assert not bool(sets.any())
        if q == math.inf:
            assert bool(sets.all())


@pytest.mark.parametrize("score,randomized", [("lac", False), ("aps", False), ("aps", True)])
def test_served_sets_are_the_bare_sets_plus_the_top_class(score: str, randomized: bool) -> None:
    probs, _ = _calibrated(300, 8, seed=4, concentration=0.2)
    probs[0] = torch.tensor([0.3, 0.3, 0.1, 0.1, 0.1, 0.05, 0.05, 0.0], dtype=torch.float64)  # tie: lowest index
    top = torch.nn.functional.one_hot(probs.argmax(dim=1), 8).bool()  # argmax picks the first of tied maxima
    assert int(probs[0].argmax()) == 0
    empty = 0
    for q in (0.0, 0.2, 0.6, 0.9):
        bare = CP.prediction_sets(probs, q, score, randomized, generator=torch.Generator().manual_seed(2),
                                  allow_empty=True)
        served = CP.prediction_sets(probs, q, score, randomized, generator=torch.Generator().manual_seed(2))
        assert torch.equal(served, bare | top)
        empty += int((~bare.any(dim=1)).sum())
    assert empty > 0, "the check above needs some empty bare sets"


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("score,randomized", [("lac", False), ("aps", False), ("aps", True)])
def test_bare_sets_reach_the_target_coverage_of_an_accurate_model(score: str, randomized: bool, seed: int) -> None:
    """The served sets cannot cover less than the accuracy (~0.99); the bare ones land on 1 - alpha = 0.9."""
    alpha, n_cal = 0.1, 2000
    probs, labels = _accurate(n_cal + 20000, 10, seed)
    cal_p, cal_y, test_p, test_y = probs[:n_cal], labels[:n_cal], probs[n_cal:], labels[n_cal:]
    accuracy = float((test_p.argmax(dim=1) == test_y).double().mean())
    assert accuracy > 0.985
    g = torch.Generator().manual_seed(seed)
    q = CP.fit_conformal_threshold(cal_p, cal_y, alpha, score, randomized, generator=g)
    state = g.get_state()
    bare = CP.prediction_sets(test_p, q, score, randomized, generator=g, allow_empty=True)
    g.set_state(state)  # the same uniforms for both kinds of set
    served = CP.prediction_sets(test_p, q, score, randomized, generator=g)
    bare_coverage, _ = CP.conformal_coverage(bare, test_y)
    served_coverage, _ = CP.conformal_coverage(served, test_y)
    # coverage given the calibration split has sd ~ sqrt(alpha (1 - alpha) / n_cal) = 0.0067, test sampling 0.002
    assert abs(bare_coverage - (1 - alpha)) <= BARE_COVERAGE_TOL
    assert served_coverage >= accuracy > 1 - alpha + BARE_COVERAGE_TOL  # the served sets miss the goal
    empty = float((~bare.any(dim=1)).double().mean())
    assert 0.05 < empty < 0.15  # the allowed miscoverage is mostly spent on empty sets


def test_randomized_aps_gives_smaller_sets() -> None:
    probs, labels = _calibrated(10000, 10, seed=5)
    g = torch.Generator().manual_seed(1)
    sizes = {}
    for randomized in (False, True):
        q = CP.fit_conformal_threshold(probs[:5000], labels[:5000], 0.1, "aps", randomized, generator=g)
        sizes[randomized] = CP.conformal_coverage(CP.prediction_sets(probs[5000:], q, "aps", randomized, generator=g),
                                                  labels[5000:])[1]
    assert sizes[True] < sizes[False]


@pytest.mark.parametrize("score", ["lac", "aps"])
@pytest.mark.parametrize("n", [9, 10, 57, 400])
def test_threshold_matches_numpy_order_statistic(score: str, n: int) -> None:
    probs, labels = _calibrated(n, 6, seed=n)
    for alpha in (0.1, 0.25, 0.5):
        q = CP.fit_conformal_threshold(probs, labels, alpha, score)
        k = math.ceil((n + 1) * (1 - alpha) - 1e-9)
        ref = np.quantile(_np_scores(probs.numpy(), labels.numpy(), score), k / n, method="inverted_cdf")
        assert q == pytest.approx(float(ref), abs=1e-12)


def test_quantile_index_is_robust_to_float_error() -> None:
    assert (9 + 1) * (1 - 0.7) > 3  # 3.0000000000000004 in floats: a naive ceil would give 4
    assert CP.conformal_quantile_index(9, 0.7) == 3
    assert CP.conformal_quantile_index(99, 0.1) == 90
    assert CP.conformal_quantile_index(9, 0.1) == 9
    assert CP.conformal_quantile_index(8, 0.1) == 9  # > n: too few samples
    assert CP.conformal_quantile_index(4, 0.4) == 3


def test_too_few_samples_gives_full_sets(caplog: pytest.LogCaptureFixture) -> None:
    probs, labels = _calibrated(8, 4, seed=0)
    with caplog.at_level(logging.WARNING, logger="calibration.conformal"):
        q = CP.fit_conformal_threshold(probs, labels, 0.1, "aps")
    assert q == math.inf and "too few" in caplog.text
    assert bool(CP.prediction_sets(probs, q, "aps").all())


def test_sets_hold_the_top_class_and_aps_sets_are_prefixes() -> None:
    probs, _ = _calibrated(300, 8, seed=2, concentration=0.2)
    top = probs.argmax(dim=1)
    for score in ("lac", "aps"):
        for q in (0.0, 0.3, 0.9):
            sets = CP.prediction_sets(probs, q, score)
            assert bool(sets[torch.arange(300), top].all())
    sets = CP.prediction_sets(probs, 0.8, "aps")
    order = probs.argsort(dim=1, descending=True)
    ranked = sets.gather(1, order).int()
    # once a class is left out, every less likely class is left out too
    assert bool((ranked[:, 1:] <= ranked[:, :-1]).all())
    # thresholds are monotone: a larger threshold never shrinks a set
    assert bool((CP.prediction_sets(probs, 0.5, "lac") <= CP.prediction_sets(probs, 0.7, "lac")).all())


def test_lac_threshold_zero_keeps_only_certain_classes() -> None:
    probs = torch.tensor([[1.0, 0.0, 0.0], [0.2, 0.5, 0.3]])
    sets = CP.prediction_sets(probs, 0.0, "lac")
    assert sets.tolist() == [[True, False, False], [False, True, False]]  # second row: only the added top class
    bare = CP.prediction_sets(probs, 0.0, "lac", allow_empty=True)
    assert bare.tolist() == [[True, False, False], [False, False, False]]


def test_randomized_is_reproducible_with_a_generator() -> None:
    probs, labels = _calibrated(200, 5, seed=9)
    q1 = CP.fit_conformal_threshold(probs, labels, 0.1, "aps", True, generator=torch.Generator().manual_seed(4))
    q2 = CP.fit_conformal_threshold(probs, labels, 0.1, "aps", True, generator=torch.Generator().manual_seed(4))
    assert q1 == q2


def test_coverage_hand_computed() -> None:
    sets = torch.tensor([[True, False], [True, True], [False, True]])
    assert CP.conformal_coverage(sets, torch.tensor([0, 0, 0])) == (2 / 3, 4 / 3)


def test_positional_call_used_by_inference() -> None:
    probs = torch.tensor([[0.7, 0.2, 0.1]], dtype=torch.float32)
    assert CP.prediction_sets(probs, 0.75, "aps").tolist() == [[True, False, False]]


P = torch.tensor([[0.7, 0.3], [0.4, 0.6]])
Y = torch.tensor([0, 1])


@pytest.mark.parametrize("call,match", [
    (lambda: CP.fit_conformal_threshold(P, Y, 0.0), r"`alpha` must be a number in the open interval \(0, 1\), got 0.0"),
    (lambda: CP.fit_conformal_threshold(P, Y, 1.0), r"`alpha` must be a number in the open interval \(0, 1\), got 1.0"),
    (lambda: CP.fit_conformal_threshold(P, Y, 1.5), r"`alpha` must be a number in the open interval \(0, 1\)"),
    (lambda: CP.fit_conformal_threshold(P, Y, float("nan")), r"`alpha` must be a number in the open interval"),
    (lambda: CP.fit_conformal_threshold(P, Y, 0.1, "raps"), r"`score` must be one of \('lac', 'aps'\), got 'raps'"),
    (lambda: CP.fit_conformal_threshold(P, Y, 0.1, "lac", True), r"`randomized=True` is only defined for score='aps'"),
    (lambda: CP.fit_conformal_threshold(torch.tensor([[float("nan"), 1.0], [0.4, 0.6]]), Y, 0.1),
     r"`probs` must be finite"),
    (lambda: CP.fit_conformal_threshold(P[0], Y, 0.1), r"`probs` must have shape \(N, C\)"),
    (lambda: CP.fit_conformal_threshold(torch.tensor([[0.5, 0.3], [0.4, 0.6]]), Y, 0.1),
     r"rows of `probs` must sum to 1 \(within 0.0001\); row 0 sums to 0.8"),
    (lambda: CP.fit_conformal_threshold(P, torch.tensor([0]), 0.1), r"`labels` must have N=2 entries"),
    (lambda: CP.prediction_sets(P, float("nan"), "lac"), r"`threshold` must be a real number \(not NaN\)"),
    (lambda: CP.prediction_sets(P, 0.5, "lac", generator=3), r"`generator` must be a torch.Generator or None"),
    (lambda: CP.prediction_sets(P, 0.5, "lac", allow_empty="yes"), r"`allow_empty` must be a bool, got 'yes'"),
    (lambda: CP.prediction_sets(P, 0.5, "lac", allow_empty=1), r"`allow_empty` must be a bool, got 1"),
    (lambda: CP.conformal_coverage(torch.ones(2, 2), Y), r"`sets` must be a bool tensor"),
    (lambda: CP.conformal_coverage(torch.ones(2, dtype=torch.bool), Y), r"`sets` must have shape \(N, C\)"),
])
def test_rejects_invalid_input(call, match) -> None:
    with pytest.raises(ValueError, match=match):
        call()


def test_conformal_doctests() -> None:
    result = doctest.testmod(CP, verbose=False)
    assert result.attempted > 5 and result.failed == 0
