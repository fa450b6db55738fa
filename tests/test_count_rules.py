"""Thresholds fitted for each number of Monte Carlo samples: stored, read back, applied by ``predict`` to the count
each answer used (adaptive answers too), and fitted by `snodevit calibrate` from the first n samples exactly as an
independent one-sample pass gives them."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

import calibration as cal
from snodevit.checkpoint import save_model
from snodevit.config import MNIST_OVERRIDES
from snodevit.data import ImageTensorDataset, normalize, resize_tensor
from snodevit.data.sets import load_dataset
from snodevit.evaluation import calibrate_model, collect, quick_config
from snodevit.inference import AdaptiveSampling, Calibration, open_model, predict
from snodevit.inference.fitted import CountRule
from snodevit.inference.summary import summarize
from snodevit.model import create_model

TINY = dict(dim=24, depth=2, num_heads=2, rank=4, time_hidden_dim=16, time_embed_dim=8, noise_dim=4, num_steps=1)


def test_count_rules_round_trip_and_pick_the_largest_count_at_or_below() -> None:
    c = Calibration(temperature=1.5, decision_threshold=0.7, target_risk=0.01,
                    count_rules={1: CountRule(0.9, None), 8: CountRule(math.inf, None), 32: CountRule(0.7, None)})
    back = Calibration.from_dict(c.to_dict())
    assert back == c and back.to_dict()["count_rules"]["8"]["decision_threshold"] == "Infinity"
    assert [c.rule_count(n) for n in (1, 2, 7, 8, 31, 32, 64)] == [1, 1, 1, 8, 8, 32, 32]
    assert c.for_samples(5).decision_threshold == 0.9 and c.for_samples(40).decision_threshold == 0.7
    old = {k: v for k, v in c.to_dict().items() if k != "count_rules"}  # a file from before count rules
    assert Calibration.from_dict(old).count_rules == {} and Calibration.from_dict(old).for_samples(1).decision_threshold == 0.7
    with pytest.raises(ValueError, match="count_rules"):
        Calibration.from_dict({**old, "count_rules": {"one": {"decision_threshold": 0.5}}})


def test_predict_applies_the_rule_of_each_answers_own_count() -> None:
    torch.manual_seed(0)
    model = create_model("tiny", **MNIST_OVERRIDES, **TINY).eval()
    torch.nn.init.normal_(model.head.weight)
    # one sample: nothing is sure enough; two or more: everything is
    c = Calibration(decision_threshold=0.5, count_rules={1: CountRule(math.inf, None), 2: CountRule(0.0, None)})
    images = torch.randn(6, 1, 28, 28)
    one, three = (predict(model, images, num_samples=n, seed=0, calibration=c) for n in (1, 3))
    assert not one.accept.any() and set(one.reason_codes) == {"low_confidence"}
    assert three.accept.all() and "threshold 0.0000" in three.reasons[0]
    auto = predict(model, images, num_samples="auto", seed=list(range(6)), calibration=c,
                   adaptive=AdaptiveSampling(max_samples=4, first_round=2, round_size=2, z=1e-6, tolerance=10.0))
    assert auto.accept.all() and set(auto.num_samples) <= {2, 4}


@pytest.fixture(scope="module")
def fitted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Calibration]:
    torch.manual_seed(0)
    m = create_model("tiny", **MNIST_OVERRIDES, **TINY)
    torch.nn.init.normal_(m.head.weight)
    d = save_model(m, tmp_path_factory.mktemp("model"), {"class_names": [str(i) for i in range(10)],
                                                         "preprocessing": load_dataset("mnist5k").preprocessing.to_dict()})
    loaded = open_model(d)
    result = calibrate_model(loaded, load_dataset("mnist5k"), quick_config(num_samples=4, target_risk=0.2),
                             progress=False, figures=False)
    return d, result.calibration


def test_calibrate_fits_each_count_as_a_one_sample_pass_would(fitted: tuple[Path, Calibration]) -> None:
    d, c = fitted
    assert sorted(c.count_rules) == [1, 2, 4]
    assert c.count_rules[4] == CountRule(c.decision_threshold, c.ood_gate.threshold)  # S itself: the main rule
    # independently: one sample per calibration image through collect, scaled at the stored temperature
    loaded = open_model(d)
    images, labels = load_dataset("mnist5k").raw("calibration")
    r = collect(loaded, ImageTensorDataset(images[:200], labels[:200], loaded.preprocessing), 1, seed=0,
                batch_size=64, progress=False)
    s = summarize(r["logits"], c.temperature)
    want = cal.fit_selective_threshold(s.confidence, s.prediction == r["labels"], 0.2,
                                       error_probabilities=1 - s.confidence.double()).threshold
    assert c.count_rules[1].decision_threshold == pytest.approx(want, abs=1e-6)
    # the gate: the density score of the first sample's features alone
    x = normalize(resize_tensor(images[:200], loaded.preprocessing), loaded.preprocessing)
    p = loaded.predict(x, num_samples=1, seed=list(range(200)), calibration=c)
    gate_want = cal.fit_novelty_threshold(p.ood_score, c.ood_gate.review_rate)
    assert c.count_rules[1].gate_threshold == pytest.approx(gate_want, rel=1e-9)
    assert c.count_rules[1].gate_threshold != c.count_rules[4].gate_threshold


def _pass(g: torch.Generator, n: int, s: int, shift: float) -> "Pass":
    from snodevit.evaluation.passes import Pass
    logits = torch.randn(s, n, 10, generator=g, dtype=torch.float64) * 2 + shift * torch.randn(1, n, 10, generator=g,
                                                                                              dtype=torch.float64)
    labels = torch.randint(0, 10, (n,), generator=g)
    logits[..., :] += 3.0 * torch.nn.functional.one_hot(labels, 10) * (1.0 - shift / 4)  # shifted sets: less right
    return Pass(logits, labels).scale(1.3)


def test_samples_comparison_counts_wrong_acceptances_at_equal_calibration_acceptance() -> None:
    from snodevit.evaluation.passes import Passes
    from snodevit.evaluation.sweeps import SAMPLE_COMPARISON_SETS, samples_comparison
    from snodevit.inference.fitted import OodGate
    g = torch.Generator().manual_seed(0)
    s = 6
    calib, test = _pass(g, 300, s, 0.0), _pass(g, 300, s, 0.0)
    rotated = {a: _pass(g, 200, s, 2.0) for a in (30.0, 45.0, 90.0, 135.0, 180.0)}
    passes = Passes(calib, test, rotated, _pass(g, 200, s, 3.0), _pass(g, 50, s, 3.0), {})
    energy = lambda p: (-1.3 * torch.logsumexp(p.logits / 1.3, dim=-1)).mean(dim=0)  # noqa: E731
    gate = OodGate(score="energy", threshold=float(energy(calib).quantile(0.97)), review_rate=0.03)
    one = passes.at_count(1)
    fitted = Calibration(temperature=1.3, decision_threshold=0.6, target_risk=0.05, ood_gate=gate,
                         count_rules={1: CountRule(0.7, float(energy(one.calibration).quantile(0.97))),
                                      s: CountRule(0.6, gate.threshold)})
    out = samples_comparison(passes, fitted)
    # the reference, a plain loop: the served rule's calibration share, then each count's threshold for that share
    served = (calib.s.confidence >= 0.6) & (energy(calib) <= gate.threshold)
    share = served.double().mean().item()
    assert out["reduction"]["calibration_acceptance"] == share
    for n, ps in ((s, passes), (1, one)):
        thr = fitted.count_rules[n].gate_threshold
        ok_cal = energy(ps.calibration) <= thr
        k = round(share * 300)
        t = sorted(ps.calibration.s.confidence[ok_cal].tolist(), reverse=True)[k - 1]
        row = out[f"S={n}"]
        assert row["confidence_threshold"] == t
        total = 0
        for name, p in zip(SAMPLE_COMPARISON_SETS, [ps.rotated[a] for a in (30.0, 45.0, 90.0, 135.0)] + [ps.digits]):
            wrong = sum(1 for i in range(len(p.labels)) if energy(p)[i] <= thr and p.s.confidence[i] >= t
                        and p.s.prediction[i] != p.labels[i])
            assert row[f"{name}: wrong accepted"] == wrong
            total += wrong
        assert row["shifted: wrong accepted"] == total
    one_w, many_w = out["S=1"]["shifted: wrong accepted"], out[f"S={s}"]["shifted: wrong accepted"]
    assert out["reduction"]["wrong_accepted_fewer_than_one_sample"] == pytest.approx(1 - many_w / one_w)
