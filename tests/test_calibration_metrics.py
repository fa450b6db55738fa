"""The metrics of calibration (calibration_error, scoring_rules, selective's risk-coverage, detection, summary)
against independent references (torchmetrics, scikit-learn, plain numpy loops) and
hand-computed edge cases."""

from __future__ import annotations

import doctest
import itertools
import logging
import math

import numpy as np
import pytest
import torch
from sklearn.metrics import accuracy_score, average_precision_score, roc_auc_score

import calibration as M
from calibration import calibration_error, detection, scoring_rules, selective, summary

tm_cls = pytest.importorskip("torchmetrics.functional.classification")


def _random_case(seed: int, n: int, c: int, scale: float, dtype: torch.dtype = torch.float64):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, c, generator=g, dtype=torch.float64) * scale
    probs = torch.softmax(logits, dim=1).to(dtype)
    labels = torch.randint(0, c, (n,), generator=g)
    return probs, labels


GRID = list(itertools.product([0, 1], [1, 7, 300], [2, 10], [0.5, 4.0]))  # seed, N, C, logit scale


# --------------------------------------------------------------------------------------------------------------
# Equal-width ECE / MCE / RMS against torchmetrics
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed,n,c,scale", GRID)
@pytest.mark.parametrize("norm", ["l1", "l2", "max"])
def test_ece_matches_torchmetrics(seed: int, n: int, c: int, scale: float, norm: str) -> None:
    probs, labels = _random_case(seed, n, c, scale, torch.float32)
    for n_bins in (1, 5, 15, 40):
        ref = float(tm_cls.multiclass_calibration_error(probs, labels, num_classes=c, n_bins=n_bins, norm=norm))
        assert M.expected_calibration_error(probs, labels, n_bins=n_bins, norm=norm) == pytest.approx(ref, abs=2e-6)


def test_mce_is_max_norm() -> None:
    probs, labels = _random_case(3, 200, 5, 2.0)
    assert M.maximum_calibration_error(probs, labels, 10) == M.expected_calibration_error(probs, labels, 10, "max")


def test_ece_bin_edges_and_confidence_one_match_torchmetrics() -> None:
    # top-label confidences exactly on bin edges (0.6, 0.8) and exactly 1.0, which torchmetrics bins on its own
    probs = torch.tensor([[0.6, 0.4], [0.8, 0.2], [1.0, 0.0], [1.0, 0.0], [0.4, 0.6], [0.5, 0.5], [0.9, 0.1]])
    labels = torch.tensor([0, 1, 0, 1, 1, 0, 0])
    for n_bins in (1, 2, 5, 10):
        for norm in ("l1", "l2", "max"):
            ref = float(tm_cls.multiclass_calibration_error(probs, labels, num_classes=2, n_bins=n_bins, norm=norm))
            assert M.expected_calibration_error(probs, labels, n_bins, norm) == pytest.approx(ref, abs=1e-6)


def test_ece_hand_computed_edge_cases() -> None:
    one = torch.tensor([[1.0, 0.0]])
    # one sample: the gap is |1[right] - confidence|
    assert M.expected_calibration_error(torch.tensor([[0.7, 0.3]]), torch.tensor([0])) == pytest.approx(0.3)
    assert M.expected_calibration_error(torch.tensor([[0.7, 0.3]]), torch.tensor([1])) == pytest.approx(0.7)
    # confidence exactly 1: right -> 0, wrong -> 1, half/half -> 0.5
    assert M.expected_calibration_error(one, torch.tensor([0])) == 0.0
    assert M.expected_calibration_error(one, torch.tensor([1])) == 1.0
    assert M.expected_calibration_error(one.repeat(2, 1), torch.tensor([0, 1])) == pytest.approx(0.5)
    # all wrong at confidence 0.6 -> ECE = MCE = 0.6; all right at 0.6 -> 0.4
    p = torch.tensor([[0.6, 0.4]]).repeat(5, 1)
    assert M.expected_calibration_error(p, torch.ones(5, dtype=torch.long)) == pytest.approx(0.6)
    assert M.maximum_calibration_error(p, torch.ones(5, dtype=torch.long)) == pytest.approx(0.6)
    assert M.expected_calibration_error(p, torch.zeros(5, dtype=torch.long)) == pytest.approx(0.4)
    # empty bins contribute nothing: two occupied bins out of 100, gaps 0.1 (x3 samples) and 0.35 (x1)
    probs = torch.tensor([[0.9, 0.1], [0.9, 0.1], [0.9, 0.1], [0.35, 0.65]])
    labels = torch.tensor([0, 0, 0, 1])
    assert M.expected_calibration_error(probs, labels, n_bins=100) == pytest.approx(0.75 * 0.1 + 0.25 * 0.35)
    assert M.maximum_calibration_error(probs, labels, n_bins=100) == pytest.approx(0.35)
    assert M.expected_calibration_error(probs, labels, n_bins=100, norm="l2") == pytest.approx(
        math.sqrt(0.75 * 0.01 + 0.25 * 0.35**2))


def test_reliability_bins_reproduce_ece() -> None:
    probs, labels = _random_case(5, 500, 4, 3.0)
    probs = torch.cat([probs, torch.tensor([[1.0, 0.0, 0.0, 0.0]])])
    labels = torch.cat([labels, torch.tensor([0])])
    bins = M.reliability_bins(probs, labels, n_bins=12)
    assert bins.n_bins == 12 and bins.count.shape == (13,) and int(bins.count.sum()) == 501
    assert int(bins.count[-1]) == 1 and float(bins.accuracy[-1]) == 1.0
    full = bins.count > 0
    assert torch.isnan(bins.confidence[~full]).all()
    ece = float((bins.count[full].double() / 501 * (bins.accuracy[full] - bins.confidence[full]).abs()).sum())
    assert ece == pytest.approx(M.expected_calibration_error(probs, labels, 12), abs=1e-12)


# --------------------------------------------------------------------------------------------------------------
# Equal-mass ACE and class-wise ECE against numpy loops
# --------------------------------------------------------------------------------------------------------------


def _np_ace(probs: np.ndarray, labels: np.ndarray, n_bins: int) -> float:
    conf = probs.max(axis=1)
    hits = (probs.argmax(axis=1) == labels).astype(float)
    order = np.argsort(conf, kind="stable")
    total = 0.0
    for idx in np.array_split(order, n_bins):
        if len(idx):
            total += len(idx) / len(conf) * abs(hits[idx].mean() - conf[idx].mean())
    return total


def _np_classwise(probs: np.ndarray, labels: np.ndarray, n_bins: int) -> float:
    n, c = probs.shape
    edges = np.linspace(0, 1, n_bins + 1).astype(np.float32)
    per_class = []
    for k in range(c):
        pk, yk = probs[:, k], (labels == k).astype(float)
        ece = 0.0
        for b in range(n_bins + 1):  # bin n_bins holds p == 1 exactly
            if b < n_bins:
                lo, hi = edges[b], edges[b + 1]
                m = (pk.astype(np.float32) >= lo) & (pk.astype(np.float32) < hi)
            else:
                m = pk.astype(np.float32) >= 1.0
            if m.any():
                ece += m.sum() / n * abs(yk[m].mean() - pk[m].mean())
        per_class.append(ece)
    return float(np.mean(per_class))


@pytest.mark.parametrize("seed,n,c,scale", GRID)
def test_ace_matches_numpy_array_split(seed: int, n: int, c: int, scale: float) -> None:
    probs, labels = _random_case(seed, n, c, scale)
    for n_bins in (1, 4, 15):
        ref = _np_ace(probs.numpy(), labels.numpy(), n_bins)
        assert M.adaptive_calibration_error(probs, labels, n_bins) == pytest.approx(ref, abs=1e-12)


@pytest.mark.parametrize("seed,n,c,scale", GRID)
def test_classwise_matches_numpy_loop_and_torchmetrics_binary(seed: int, n: int, c: int, scale: float) -> None:
    probs, labels = _random_case(seed, n, c, scale)
    for n_bins in (1, 5, 15):
        ours = M.classwise_calibration_error(probs, labels, n_bins)
        assert ours == pytest.approx(_np_classwise(probs.numpy(), labels.numpy(), n_bins), abs=1e-12)
        tm = np.mean([float(tm_cls.binary_calibration_error(probs[:, k].float(), (labels == k).long(), n_bins=n_bins))
                      for k in range(c)])
        assert ours == pytest.approx(tm, abs=2e-6)


def test_classwise_edge_cases_zero_and_one() -> None:
    probs = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert M.classwise_calibration_error(probs, torch.tensor([0, 1])) == 0.0
    assert M.classwise_calibration_error(probs, torch.tensor([1, 0])) == 1.0


def test_ace_more_bins_than_samples() -> None:
    probs = torch.tensor([[0.7, 0.3], [0.2, 0.8]])
    # two singleton groups: |1 - 0.7| and |0 - 0.8|, each weighted 1/2
    assert M.adaptive_calibration_error(probs, torch.tensor([0, 0]), n_bins=15) == pytest.approx(0.55)


# --------------------------------------------------------------------------------------------------------------
# Proper scores and accuracy
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed,n,c,scale", GRID)
def test_nll_brier_accuracy_match_references(seed: int, n: int, c: int, scale: float) -> None:
    probs, labels = _random_case(seed, n, c, scale)
    ref_nll = float(torch.nn.functional.nll_loss(torch.log(probs), labels))
    assert M.negative_log_likelihood(probs, labels) == pytest.approx(ref_nll, rel=1e-12)
    p, y = probs.numpy(), labels.numpy()
    ref_brier = np.mean([sum((p[i, k] - (y[i] == k)) ** 2 for k in range(c)) for i in range(n)])
    assert M.brier_score(probs, labels) == pytest.approx(ref_brier, rel=1e-12)
    assert M.accuracy(probs, labels) == pytest.approx(accuracy_score(y, p.argmax(axis=1)))


def test_nll_eps_floor_and_perfect() -> None:
    probs = torch.tensor([[1.0, 0.0]])
    assert M.negative_log_likelihood(probs, torch.tensor([1]), eps=1e-6) == pytest.approx(-math.log(1e-6))
    assert M.negative_log_likelihood(probs, torch.tensor([0])) == 0.0
    assert M.brier_score(probs, torch.tensor([1])) == 2.0


# --------------------------------------------------------------------------------------------------------------
# Risk-coverage and AURC
# --------------------------------------------------------------------------------------------------------------


def _np_risk_coverage(conf: np.ndarray, correct: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    order = np.argsort(-conf, kind="stable")
    n = len(conf)
    cov, risk, errors = [], [], 0
    for k in range(1, n + 1):
        errors += int(not correct[order[k - 1]])
        cov.append(k / n)
        risk.append(errors / k)
    return np.array(cov), np.array(risk)


@pytest.mark.parametrize("seed", range(4))
def test_risk_coverage_matches_loop_without_ties(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    conf = torch.rand(257, generator=g, dtype=torch.float64)
    correct = torch.rand(257, generator=g, dtype=torch.float64) < conf  # informative score
    cov, risk = M.risk_coverage_curve(conf, correct)
    ref_cov, ref_risk = _np_risk_coverage(conf.numpy(), correct.numpy())
    np.testing.assert_allclose(cov.numpy(), ref_cov, rtol=0, atol=1e-15)
    np.testing.assert_allclose(risk.numpy(), ref_risk, rtol=0, atol=1e-12)
    assert M.aurc(conf, correct) == pytest.approx(ref_risk.mean(), abs=1e-12)
    # an uncertainty score ranks the other way round
    _, risk_u = M.risk_coverage_curve(-conf, correct, higher_is_confident=False)
    torch.testing.assert_close(risk_u, risk)


def test_risk_coverage_ties_are_expected_over_orderings() -> None:
    scores = torch.tensor([0.9, 0.5, 0.5, 0.5, 0.2], dtype=torch.float64)
    correct = torch.tensor([True, True, False, False, True])
    _, risk = M.risk_coverage_curve(scores, correct)
    tied = [1, 2, 3]
    expected = np.zeros(5)
    perms = list(itertools.permutations(tied))
    for perm in perms:
        order = [0, *perm, 4]
        errs = np.cumsum([not bool(correct[i]) for i in order])
        expected += errs / np.arange(1, 6) / len(perms)
    np.testing.assert_allclose(risk.numpy(), expected, atol=1e-12)
    # and the answer does not depend on the input order
    perm = torch.tensor([3, 0, 4, 2, 1])
    torch.testing.assert_close(M.risk_coverage_curve(scores[perm], correct[perm])[1], risk)


def test_risk_coverage_edge_cases() -> None:
    cov, risk = M.risk_coverage_curve(torch.tensor([0.3]), torch.tensor([False]))
    assert cov.tolist() == [1.0] and risk.tolist() == [1.0]
    assert M.aurc(torch.rand(10, dtype=torch.float64), torch.ones(10, dtype=torch.bool)) == 0.0
    assert M.aurc(torch.rand(10, dtype=torch.float64), torch.zeros(10, dtype=torch.bool)) == 1.0
    # all scores equal: the risk is the overall error rate at every coverage
    _, risk = M.risk_coverage_curve(torch.full((4,), 0.5), torch.tensor([1, 0, 1, 1]))
    np.testing.assert_allclose(risk.numpy(), 0.25)


# --------------------------------------------------------------------------------------------------------------
# Misclassification and OOD detection against scikit-learn
# --------------------------------------------------------------------------------------------------------------


def _np_fpr_at_tpr(y: np.ndarray, s: np.ndarray, level: float = 0.95) -> float:
    best = 1.0
    for t in np.unique(s):
        flagged = s >= t
        tpr = flagged[y == 1].mean()
        if tpr >= level:
            best = min(best, flagged[y == 0].mean())
    return best


def test_detection_hand_checked_example() -> None:
    # scikit-learn's documented example: AUROC 0.75, AP 0.8333; TPR reaches 1 at score 0.35 where FPR = 0.5
    out = M.misclassification_detection(torch.tensor([0.1, 0.4, 0.35, 0.8]), torch.tensor([True, True, False, False]))
    assert out == pytest.approx({"auroc": 0.75, "aupr": 0.8333333333333333, "fpr_at_95_tpr": 0.5})
    out = M.ood_detection(torch.tensor([0.1, 0.4]), torch.tensor([0.35, 0.8]))
    assert out == pytest.approx({"auroc": 0.75, "aupr": 0.8333333333333333, "fpr_at_95_tpr": 0.5})
    # perfect separation
    out = M.ood_detection(torch.tensor([0.1, 0.2]), torch.tensor([0.8, 0.9]))
    assert out == {"auroc": 1.0, "aupr": 1.0, "fpr_at_95_tpr": 0.0}


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("higher", [True, False])
def test_detection_matches_sklearn(seed: int, higher: bool) -> None:
    g = torch.Generator().manual_seed(seed)
    n = 400
    correct = torch.rand(n, generator=g) < 0.8
    unc = torch.randn(n, generator=g, dtype=torch.float64) + 1.5 * (~correct).double()
    unc = torch.round(unc * 4) / 4  # ties on purpose
    scores = unc if higher else -unc
    out = M.misclassification_detection(scores, correct, higher_is_uncertain=higher)
    y = (~correct).numpy().astype(int)
    assert out["auroc"] == pytest.approx(roc_auc_score(y, unc.numpy()), abs=1e-12)
    assert out["aupr"] == pytest.approx(average_precision_score(y, unc.numpy()), abs=1e-12)
    assert out["fpr_at_95_tpr"] == pytest.approx(_np_fpr_at_tpr(y, unc.numpy()), abs=1e-12)

    s_in, s_out = unc[:250], unc[250:] + 1.0
    out = M.ood_detection(s_in if higher else -s_in, s_out if higher else -s_out, higher_is_uncertain=higher)
    yy = np.r_[np.zeros(250), np.ones(150)]
    ss = np.r_[s_in.numpy(), s_out.numpy()]
    assert out["auroc"] == pytest.approx(roc_auc_score(yy, ss), abs=1e-12)
    assert out["aupr"] == pytest.approx(average_precision_score(yy, ss), abs=1e-12)
    assert out["fpr_at_95_tpr"] == pytest.approx(_np_fpr_at_tpr(yy, ss), abs=1e-12)


def test_misclassification_degenerate_is_nan_with_warning(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="calibration.detection"):
        out = M.misclassification_detection(torch.rand(5), torch.ones(5, dtype=torch.bool))
    assert all(math.isnan(v) for v in out.values())
    assert "all 5 predictions are right" in caplog.text


# --------------------------------------------------------------------------------------------------------------
# Summary, validation, doctests
# --------------------------------------------------------------------------------------------------------------


def test_calibration_summary_agrees_with_each_metric() -> None:
    probs, labels = _random_case(11, 600, 7, 2.5)
    s = M.calibration_summary(probs, labels, n_bins=10)
    assert s["n_samples"] == 600 and s["n_classes"] == 7 and s["n_bins"] == 10
    assert s["accuracy"] == M.accuracy(probs, labels)
    assert s["nll"] == M.negative_log_likelihood(probs, labels)
    assert s["brier"] == M.brier_score(probs, labels)
    assert s["ece"] == M.expected_calibration_error(probs, labels, 10)
    assert s["rms_ce"] == M.expected_calibration_error(probs, labels, 10, "l2")
    assert s["mce"] == M.maximum_calibration_error(probs, labels, 10)
    assert s["ace"] == M.adaptive_calibration_error(probs, labels, 10)
    assert s["classwise_ece"] == M.classwise_calibration_error(probs, labels, 10)
    conf, pred = probs.max(dim=1)
    assert s["aurc"] == pytest.approx(M.aurc(conf, pred == labels), abs=1e-15)
    assert all(isinstance(v, (int, float)) for v in s.values())


GOOD_P = torch.tensor([[0.7, 0.3], [0.4, 0.6]])
GOOD_Y = torch.tensor([0, 1])


@pytest.mark.parametrize("probs,labels,kwargs,match", [
    (torch.tensor([[float("nan"), 1.0], [0.4, 0.6]]), GOOD_Y, {}, r"`probs` must be finite, found 1 NaN/inf"),
    (torch.tensor([[float("inf"), 0.0], [0.4, 0.6]]), GOOD_Y, {}, r"`probs` must be finite"),
    (torch.tensor([0.7, 0.3]), GOOD_Y, {}, r"`probs` must have shape \(N, C\) \(2 dims\), got shape \(2,\)"),
    (torch.tensor([[0.7, 0.2], [0.4, 0.6]]), GOOD_Y, {}, r"rows of `probs` must sum to 1 .* row 0 sums to 0.9"),
    (torch.tensor([[1.5, -0.5], [0.4, 0.6]]), GOOD_Y, {}, r"`probs` must hold probabilities in \[0, 1\]"),
    (torch.empty(0, 2), torch.empty(0, dtype=torch.long), {}, r"`probs` must not be empty"),
    (torch.tensor([[1.0], [1.0]]), GOOD_Y, {}, r"at least 2 classes"),
    (torch.tensor([[7, 3], [4, 6]]), GOOD_Y, {}, r"`probs` must be a floating-point tensor"),
    (GOOD_P.numpy(), GOOD_Y, {}, r"`probs` must be a torch.Tensor, got ndarray"),
    (GOOD_P, torch.tensor([0, 2]), {}, r"`labels` must lie in \[0, 1\] \(C=2 classes\), got values in \[0, 2\]"),
    (GOOD_P, torch.tensor([0, -1]), {}, r"`labels` must lie in \[0, 1\]"),
    (GOOD_P, torch.tensor([0, 1, 1]), {}, r"`labels` must have N=2 entries to match the predictions, got 3"),
    (GOOD_P, torch.tensor([0.0, 1.0]), {}, r"`labels` must be an integer tensor"),
    (GOOD_P, GOOD_Y, {"n_bins": 0}, r"`n_bins` must be an integer >= 1, got 0"),
    (GOOD_P, GOOD_Y, {"n_bins": 2.5}, r"`n_bins` must be an integer >= 1, got 2.5"),
    (GOOD_P, GOOD_Y, {"norm": "l3"}, r"`norm` must be one of \('l1', 'l2', 'max'\), got 'l3'"),
])
def test_ece_rejects_invalid_input(probs, labels, kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        M.expected_calibration_error(probs, labels, **kwargs)


def test_other_metrics_reject_invalid_input() -> None:
    bad = torch.tensor([[0.7, 0.2], [0.4, 0.6]])
    for fn in (M.adaptive_calibration_error, M.classwise_calibration_error, M.negative_log_likelihood,
               M.brier_score, M.accuracy, M.calibration_summary, M.reliability_bins):
        with pytest.raises(ValueError, match="rows of `probs` must sum to 1"):
            fn(bad, GOOD_Y)
    with pytest.raises(ValueError, match=r"`eps` must be a number in the open interval \(0, 1\), got 0"):
        M.negative_log_likelihood(GOOD_P, GOOD_Y, eps=0)
    with pytest.raises(ValueError, match=r"`correct` must have N=3 entries to match the scores, got 2"):
        M.aurc(torch.rand(3), torch.tensor([True, False]))
    with pytest.raises(ValueError, match=r"`confidence_or_score` must be finite"):
        M.risk_coverage_curve(torch.tensor([0.5, float("nan")]), torch.tensor([True, False]))
    with pytest.raises(ValueError, match=r"`correct` must hold only 0/1"):
        M.aurc(torch.rand(2), torch.tensor([0, 2]))
    with pytest.raises(ValueError, match=r"`higher_is_confident` must be a bool, got 1"):
        M.aurc(torch.rand(2), torch.tensor([0, 1]), higher_is_confident=1)
    with pytest.raises(ValueError, match=r"`scores_out` must not be empty"):
        M.ood_detection(torch.rand(3), torch.empty(0))
    with pytest.raises(ValueError, match=r"`scores` must have shape \(N,\)"):
        M.misclassification_detection(torch.rand(3, 1), torch.ones(3, dtype=torch.bool))


def test_metrics_doctests() -> None:
    attempted = 0
    for module in (calibration_error, scoring_rules, selective, detection, summary):
        result = doctest.testmod(module, verbose=False, extraglobs={"torch": torch})
        assert result.failed == 0, module.__name__
        attempted += result.attempted
    assert attempted > 10
