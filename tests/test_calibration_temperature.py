"""Temperature scaling: recovers a known temperature, agrees with an independent scalar minimiser, never does
worse than T = 1 on the calibration data, and rejects bad input."""

from __future__ import annotations

import doctest
import logging
import math

import numpy as np
import pytest
import torch
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax, logsumexp

import calibration.temperature as T


def _synthetic(t_true: float, s: int, seed: int, n: int = 5000, c: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    """Logit samples and labels drawn from mean_s softmax(z_s / t_true): a well-specified model at T = t_true."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, c, generator=g, dtype=torch.float64) * 3.0
    zs = z.unsqueeze(0) + (0.7 * torch.randn(s, n, c, generator=g, dtype=torch.float64) if s > 1 else 0.0)
    probs = torch.softmax(zs / t_true, dim=-1).mean(dim=0)
    labels = torch.multinomial(probs, 1, generator=g).squeeze(1)
    return zs.float(), labels


def _np_nll(logits: np.ndarray, labels: np.ndarray, t: float) -> float:
    """Independent numpy/scipy NLL of mean_s softmax(z_s / t)."""
    logp = log_softmax(logits / t, axis=-1)  # (S, N, C)
    logp_y = logp[:, np.arange(labels.size), labels]  # (S, N)
    return float(-(logsumexp(logp_y, axis=0) - math.log(logits.shape[0])).mean())


@pytest.mark.parametrize("t_true", [0.5, 2.0])
@pytest.mark.parametrize("s", [1, 4])
def test_recovers_known_temperature(t_true: float, s: int) -> None:
    logits, labels = _synthetic(t_true, s, seed=int(10 * t_true) + s)
    t = T.fit_temperature(logits, labels)
    assert abs(t - t_true) / t_true < 0.10
    assert T.calibrated_nll(logits, labels, t) < T.calibrated_nll(logits, labels, 1.0)


@pytest.mark.parametrize("s", [1, 3])
def test_matches_independent_scalar_minimiser(s: int) -> None:
    logits, labels = _synthetic(1.6, s, seed=7, n=800, c=5)
    t = T.fit_temperature(logits, labels)
    z, y = logits.double().numpy(), labels.numpy()
    ref = minimize_scalar(lambda lt: _np_nll(z, y, math.exp(lt)), bounds=(-4, 4), method="bounded",
                          options={"xatol": 1e-10})
    assert t == pytest.approx(math.exp(ref.x), rel=1e-4)
    assert T.calibrated_nll(logits, labels, t) == pytest.approx(_np_nll(z, y, t), rel=1e-10)


@pytest.mark.parametrize("seed", range(6))
def test_never_worse_than_identity(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    s, n, c = 1 + seed % 3, 60, 4
    logits = torch.randn(s, n, c, generator=g) * (0.1 + 3 * seed)
    labels = torch.randint(0, c, (n,), generator=g)  # labels unrelated to the logits: T grows large
    t = T.fit_temperature(logits, labels)
    assert T.T_MIN <= t <= T.T_MAX
    assert T.calibrated_nll(logits, labels, t) <= T.calibrated_nll(logits, labels, 1.0) + 1e-12


def test_works_under_inference_mode() -> None:
    logits, labels = _synthetic(2.0, 2, seed=1, n=500)
    expected = T.fit_temperature(logits, labels)
    with torch.inference_mode():
        z, y = logits.double().clone(), labels.clone()  # inference tensors, as an evaluation loop would give
        assert T.fit_temperature(z, y) == pytest.approx(expected, rel=1e-6)


def test_separable_data_is_clipped_not_divergent() -> None:
    logits = torch.tensor([[[5.0, 0.0], [0.0, 5.0], [4.0, 1.0]]])
    labels = torch.tensor([0, 1, 0])  # every argmax right: the NLL keeps falling as T -> 0
    t = T.fit_temperature(logits, labels)
    assert T.T_MIN <= t < 1.0 and math.isfinite(t)
    assert T.calibrated_nll(logits, labels, t) < T.calibrated_nll(logits, labels, 1.0)


def test_guard_falls_back_to_identity(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    logits, labels = _synthetic(1.0, 1, seed=3, n=500)
    monkeypatch.setattr(torch.optim.LBFGS, "step", lambda self, closure: None)  # an optimiser that does nothing
    with caplog.at_level(logging.WARNING, logger="calibration.temperature"):
        assert T.fit_temperature(logits, labels, init=50.0) == 1.0
    assert "keeping T=1" in caplog.text


def test_apply_temperature_matches_definition() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 30, 6, generator=g)
    probs = T.apply_temperature(logits, 1.7)
    ref = torch.stack([torch.softmax(logits[i] / 1.7, dim=1) for i in range(5)]).mean(dim=0)
    torch.testing.assert_close(probs, ref)
    assert probs.dtype == torch.float32 and probs.shape == (30, 6)
    torch.testing.assert_close(probs.sum(dim=1), torch.ones(30))
    # a single sample keeps its argmax whatever T is (accuracy is unchanged by temperature scaling)
    one = logits[:1]
    assert torch.equal(T.apply_temperature(one, 0.3).argmax(1), T.apply_temperature(one, 4.0).argmax(1))


@pytest.mark.parametrize("call,match", [
    (lambda: T.fit_temperature(torch.randn(10, 3), torch.zeros(10, dtype=torch.long)),
     r"`logit_samples` must have shape \(S, N, C\) \(3 dims\), got shape \(10, 3\)"),
    (lambda: T.fit_temperature(torch.full((1, 2, 3), float("nan")), torch.zeros(2, dtype=torch.long)),
     r"`logit_samples` must be finite, found 6 NaN/inf"),
    (lambda: T.fit_temperature(torch.randn(1, 2, 3), torch.zeros(3, dtype=torch.long)),
     r"`labels` must have N=2 entries"),
    (lambda: T.fit_temperature(torch.randn(1, 2, 3), torch.tensor([0, 3])), r"`labels` must lie in \[0, 2\]"),
    (lambda: T.fit_temperature(torch.randn(1, 2, 1), torch.zeros(2, dtype=torch.long)), r"at least 2 classes"),
    (lambda: T.fit_temperature(torch.randn(1, 2, 3), torch.zeros(2, dtype=torch.long), init=0.0),
     r"`init` must be a finite number > 0, got 0.0"),
    (lambda: T.fit_temperature(torch.randn(1, 2, 3), torch.zeros(2, dtype=torch.long), max_iter=0),
     r"`max_iter` must be an integer >= 1, got 0"),
    (lambda: T.apply_temperature(torch.randn(1, 2, 3), -1.0), r"`temperature` must be a finite number > 0"),
    (lambda: T.apply_temperature(torch.randn(1, 2, 3), float("inf")), r"`temperature` must be a finite number > 0"),
    (lambda: T.apply_temperature(torch.empty(0, 2, 3), 1.0), r"`logit_samples` must not be empty"),
])
def test_rejects_invalid_input(call, match) -> None:
    with pytest.raises(ValueError, match=match):
        call()


def test_temperature_doctests() -> None:
    result = doctest.testmod(T, verbose=False)
    assert result.attempted > 3 and result.failed == 0
