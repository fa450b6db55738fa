"""The precision setting: one rule for "auto", bf16 answers against fp32 ones, and where the precision is recorded."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

import snodevit.inference.precision
import snodevit.training.train
from snodevit.data.sets import load_dataset
from snodevit.data import normalize
from snodevit.inference.fitted import Calibration
from snodevit.inference.predictor import predict
from snodevit.inference.backends import open_model
from snodevit.inference.precision import ENV_VAR, resolve_precision
from snodevit.training.train import use_bf16

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "models" / "snodevit-mnist"


def _simulate_cpu(monkeypatch: pytest.MonkeyPatch, native: bool) -> None:
    """This CPU as one with (or without) native bf16, for every module that asks (emulated bf16 runs here too)."""
    monkeypatch.setattr(snodevit.inference.precision, "cpu_has_bf16", lambda: native)
    monkeypatch.setattr(snodevit.training.train, "cpu_has_bf16", lambda: native)


@pytest.mark.parametrize("native, want", [(False, "fp32"), (True, "bf16")])
def test_auto_is_bf16_only_where_the_cpu_multiplies_bf16_natively(monkeypatch: pytest.MonkeyPatch,
                                                                  native: bool, want: str) -> None:
    monkeypatch.delenv(ENV_VAR, raising=False)  # the test run pins it (conftest.py)
    monkeypatch.setattr(snodevit.inference.precision, "cpu_has_bf16", lambda: native)
    assert resolve_precision("auto", "cpu") == want
    assert resolve_precision("fp32", "cpu") == "fp32" and resolve_precision("bf16", "cpu") == "bf16"
    assert resolve_precision("auto", "cpu", "onnx") == "fp32"  # ONNX Runtime runs the fp32 graph


@pytest.mark.parametrize("native", [False, True])
def test_snodevit_precision_pins_auto_wherever_it_is_resolved(monkeypatch: pytest.MonkeyPatch, native: bool) -> None:
    """$SNODEVIT_PRECISION is what "auto" means on this machine, read by the one rule, not by each caller."""
    _simulate_cpu(monkeypatch, native)
    for pinned in ("fp32", "bf16"):
        monkeypatch.setenv(ENV_VAR, pinned)
        assert resolve_precision("auto", "cpu") == pinned
        assert resolve_precision("fp32", "cpu") == "fp32" and resolve_precision("bf16", "cpu") == "bf16"
    monkeypatch.setenv(ENV_VAR, "auto")
    assert resolve_precision("auto", "cpu") == ("bf16" if native else "fp32")
    monkeypatch.setenv(ENV_VAR, "bf16")
    with pytest.raises(ValueError, match=f"{ENV_VAR}=bf16.*torch backend"):
        resolve_precision("auto", "cpu", "onnx")
    monkeypatch.setenv(ENV_VAR, "fp16")
    with pytest.raises(ValueError, match=f"{ENV_VAR} must be one of"):
        resolve_precision("auto", "cpu")
    assert resolve_precision("fp32", "cpu") == "fp32"  # an explicit precision needs no pin


@pytest.mark.parametrize("native", [False, True])
def test_training_gives_auto_the_same_meaning(monkeypatch: pytest.MonkeyPatch, native: bool) -> None:
    """`snodevit train`'s "auto" is inference's: bf16 on a native-bf16 CPU, fp32 elsewhere, pinned by the same
    variable; training alone refuses emulated bf16."""
    _simulate_cpu(monkeypatch, native)
    cpu = torch.device("cpu")
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert use_bf16("auto", cpu) == (resolve_precision("auto", cpu) == "bf16") == native
    assert not use_bf16("fp32", cpu)
    monkeypatch.setenv(ENV_VAR, "fp32")
    assert not use_bf16("auto", cpu)
    monkeypatch.setenv(ENV_VAR, "bf16")
    for precision in ("auto", "bf16"):
        if native:
            assert use_bf16(precision, cpu)
        else:
            with pytest.raises(ValueError, match="native bf16"):
                use_bf16(precision, cpu)


def test_bad_precisions_are_refused_by_name() -> None:
    with pytest.raises(ValueError, match="precision must be one of"):
        resolve_precision("fp16", "cpu")
    with pytest.raises(ValueError, match="torch backend"):
        resolve_precision("bf16", "cpu", "onnx")
    with pytest.raises(ValueError, match="calibration precision"):
        Calibration.from_dict({"temperature": 1.2, "precision": "int8"})


def test_the_calibration_records_its_precision() -> None:
    cal = Calibration(temperature=1.2, decision_threshold=0.7, precision="bf16")
    assert cal.to_dict()["precision"] == "bf16"
    assert Calibration.from_dict(json.loads(json.dumps(cal.to_dict()))) == cal
    assert Calibration.from_dict({"temperature": 1.2}).precision == "fp32"  # files written before the setting
    assert "precision" not in Calibration().to_dict()  # nothing fitted, nothing to record


@pytest.fixture(scope="module")
def shipped_test_images() -> tuple[torch.Tensor, torch.Tensor]:
    loaded = open_model(SHIPPED, "torch", "cpu")
    test = load_dataset("mnist5k").split("test")
    images = torch.stack([test[i][0] for i in range(48)])
    return normalize(images, loaded.preprocessing) if images.dtype == torch.uint8 else images, \
        torch.tensor([test[i][1] for i in range(48)])


@pytest.mark.slow
@pytest.mark.skipif(not (SHIPPED / "meta.json").is_file(), reason="no shipped model")
def test_bf16_answers_match_fp32_on_the_shipped_model(shipped_test_images) -> None:
    """The shipped model on real test digits: bf16 autocast changes no decision that is not within its own
    rounding of a threshold, and no probability by more than 2.5e-2 (measured 1.8e-2 on the stochastic-tail model,
    1.4e-2 of it on its deterministic path alone; the former every-block model stayed within 1e-2)."""
    x, _ = shipped_test_images
    loaded = open_model(SHIPPED, "torch", "cpu")
    cal = loaded.calibration.for_samples(4)  # the thresholds these 4-sample answers are decided by
    assert cal.ood_gate is not None and cal.decision_threshold is not None
    seeds = list(range(len(x)))
    a = predict(loaded.backend, x, num_samples=4, seed=seeds, calibration=cal, precision="fp32")
    b = predict(loaded.backend, x, num_samples=4, seed=seeds, calibration=cal, precision="bf16")
    assert (a.precision, b.precision) == ("fp32", "bf16")
    assert b.summary.probs.dtype == torch.float32 and b.logits.dtype == torch.float32  # summed in fp32
    prob_diff = float((a.summary.probs - b.summary.probs).abs().max())
    assert 0 < prob_diff <= 2.5e-2  # bf16 really ran, and stayed close
    assert a.ood_score is not None and b.ood_score is not None
    gate_diff = (a.ood_score - b.ood_score).abs()
    # an image decides alike unless one of its scores lies within the bf16 error of its threshold
    clear = ((a.summary.confidence - cal.decision_threshold).abs() > 2 * prob_diff) \
        & ((a.ood_score - cal.ood_gate.threshold).abs() > 2 * float(gate_diff.max()))
    assert int(clear.sum()) >= 0.9 * len(x)
    assert torch.equal(a.accept[clear], b.accept[clear])
    assert [c for c, k in zip(a.reason_codes, clear) if k] == [c for c, k in zip(b.reason_codes, clear) if k]
    assert torch.equal(a.summary.prediction, b.summary.prediction)
    assert float((a.accept == b.accept).float().mean()) >= 0.95


@pytest.mark.skipif(not (SHIPPED / "meta.json").is_file(), reason="no shipped model")
def test_bf16_is_refused_for_the_onnx_backend(tmp_path: Path) -> None:
    from export import export_onnx
    from snodevit.checkpoint import load_model

    model, meta = load_model(SHIPPED)
    path = export_onnx(model, tmp_path / "model.onnx", meta=meta)
    with pytest.raises(ValueError, match="torch backend"):
        open_model(path, "onnx", "cpu", precision="bf16")
    loaded = open_model(path, "onnx", "cpu", precision="auto")
    assert loaded.precision == "fp32"
    with pytest.raises(ValueError, match="torch backend"):
        predict(loaded.backend, torch.randn(2, 1, 28, 28), num_samples=2, seed=0, precision="bf16")
    assert loaded.predict(torch.randn(2, 1, 28, 28), num_samples=2, seed=0).precision == "fp32"


def test_a_model_calibrated_in_another_precision_is_served_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    from service.engine import Engine
    from service.settings import ServiceSettings

    loaded = open_model(SHIPPED, "torch", "cpu", precision="bf16")
    assert loaded.calibration.precision == "fp32"
    with caplog.at_level("WARNING", logger="service.engine"):
        engine = Engine(loaded, ServiceSettings(precision="bf16"), name="snodevit-mnist", tag="snodevit-mnist:x")
    assert engine.info.precision == "bf16" and engine.info.calibration_precision == "fp32"
    assert "calibrated in fp32" in caplog.text
    same = dataclasses.replace(loaded, precision="fp32")
    caplog.clear()
    with caplog.at_level("WARNING", logger="service.engine"):
        engine = Engine(same, ServiceSettings(precision="fp32"), name="snodevit-mnist", tag="snodevit-mnist:x")
    assert engine.info.precision == "fp32" and "calibrated in" not in caplog.text


def test_service_settings_refuse_an_unknown_precision() -> None:
    from service.settings import ServiceSettings

    with pytest.raises(ValueError, match="SNODEVIT_PRECISION"):
        ServiceSettings.from_env({"SNODEVIT_PRECISION": "fp16"})
    assert ServiceSettings.from_env({"SNODEVIT_PRECISION": "bf16"}).precision == "bf16"
