"""snodevit.inference.Calibration in JSON: infinite thresholds are written as strict JSON and read back unchanged.

The reference is the calibration before the round trip: ``predict`` must take the same decisions and build the same
prediction sets with it as with what comes back.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

import snodevit
from snodevit.inference.fitted import Calibration
from snodevit.inference.predictor import predict

SMALL = dict(snodevit.MNIST_OVERRIDES, dim=24, depth=1, num_heads=2, rank=4, time_hidden_dim=16, noise_dim=4)

# Every kind of infinite threshold `snodevit calibrate` can fit, and a finite control.
CALIBRATIONS = {
    "confidence accepts none": Calibration(temperature=1.3, conformal_thresholds={"0.1": 0.8},
                                           decision_threshold=math.inf, target_risk=0.001),
    "epistemic accepts none": Calibration(decision_score="epistemic", decision_threshold=-math.inf, target_risk=0.0),
    "sets hold every class": Calibration(conformal_thresholds={"0.05": math.inf, "0.1": 0.5}, decision_threshold=0.2),
    "finite": Calibration(temperature=0.8, conformal_score="lac", conformal_thresholds={"0.1": 0.9},
                          decision_threshold=0.3, target_risk=0.02),
}


def _strict(text: str) -> object:
    def refuse(token: str) -> None:
        raise AssertionError(f"not strict JSON: holds {token}")

    return json.loads(text, parse_constant=refuse)


def _round_trip(cal: Calibration) -> Calibration:
    return Calibration.from_dict(_strict(json.dumps(cal.to_dict(), allow_nan=False)))


@pytest.fixture(scope="module")
def model() -> snodevit.SNodeViT:
    torch.manual_seed(0)
    m = snodevit.create_model("tiny", **SMALL).eval()
    torch.nn.init.normal_(m.head.weight)  # the head starts at zero: give the images different answers
    return m


@pytest.mark.parametrize("name", list(CALIBRATIONS))
def test_infinite_thresholds_round_trip_through_strict_json_with_the_same_decisions(model, name: str) -> None:
    cal = CALIBRATIONS[name]
    back = _round_trip(cal)
    assert back == cal
    images = torch.randn(6, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want, got = (predict(model, images, num_samples=4, seed=7, calibration=c) for c in (cal, back))
    assert torch.equal(got.accept, want.accept) and got.reasons == want.reasons
    assert (got.prediction_sets is None) == (want.prediction_sets is None)
    if want.prediction_sets is not None:
        assert torch.equal(got.prediction_sets, want.prediction_sets)
    if name.endswith("accepts none"):
        assert not want.accept.any()
    if name == "sets hold every class":
        assert want.alpha == 0.05 and want.prediction_sets.all()


def test_infinite_thresholds_are_written_as_strings() -> None:
    cal = Calibration(conformal_thresholds={"0.05": math.inf, "0.1": 0.25}, decision_score="epistemic",
                      decision_threshold=-math.inf)
    d = cal.to_dict()
    assert d["conformal_thresholds"] == {"0.05": "Infinity", "0.1": 0.25} and d["decision_threshold"] == "-Infinity"
    assert Calibration().to_dict()["decision_threshold"] is None  # None (accept all) stays distinct from +-inf
    with pytest.raises(ValueError, match="NaN"):
        Calibration(decision_threshold=math.nan).to_dict()


def test_files_written_before_keep_their_infinities() -> None:
    old = {"temperature": 1.1, "conformal_score": "aps", "conformal_thresholds": {"0.1": float("inf")},
           "decision_score": "confidence", "decision_threshold": float("inf"), "target_risk": 0.02}
    text = json.dumps(old)  # what meta.json held: the bare token Infinity
    assert "Infinity" in text and '"Infinity"' not in text
    for data in (old, json.loads(text)):
        cal = Calibration.from_dict(data)
        assert cal.decision_threshold == math.inf and cal.conformal_thresholds == {"0.1": math.inf}
        assert _strict(json.dumps(cal.to_dict(), allow_nan=False)) == {**old, "conformal_thresholds": {
            "0.1": "Infinity"}, "decision_threshold": "Infinity", "precision": "fp32"}  # files before it: fp32
    assert Calibration.from_dict({"decision_threshold": "-inf"}).decision_threshold == -math.inf


@pytest.mark.parametrize("bad, match", [
    ({"decision_threshold": float("nan")}, "NaN"),
    ({"decision_threshold": "NaN"}, "NaN"),
    ({"decision_threshold": "high"}, "decision_threshold must be a number"),
    ({"conformal_thresholds": {"0.1": [1]}}, "alpha 0.1 must be a number"),
])
def test_unreadable_thresholds_are_refused_by_name(bad: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        Calibration.from_dict(bad)
