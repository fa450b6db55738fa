"""Figures and the HTML report: PNG bytes, embedded data URIs, metrics.json round trip, atomic writes."""

from __future__ import annotations

import html
import json
import math
import os
from pathlib import Path

import pytest
import torch

import calibration
import calibration as M
from calibration import plots as P
from calibration import report as R
from calibration.selective import fit_selective_threshold

PNG = R.PNG_SIGNATURE


@pytest.fixture(scope="module")
def case() -> dict:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(400, 5, generator=g, dtype=torch.float64) * 3
    probs = torch.softmax(logits, dim=1)
    labels = torch.randint(0, 5, (400,), generator=g)
    labels[:250] = probs[:250].argmax(dim=1)  # a model that is right 60-70% of the time
    probs = torch.cat([probs, torch.tensor([[1.0, 0.0, 0.0, 0.0, 0.0]], dtype=torch.float64)])
    labels = torch.cat([labels, torch.tensor([0])])
    conf, pred = probs.max(dim=1)
    return {"probs": probs, "labels": labels, "conf": conf, "correct": pred == labels}


@pytest.fixture(scope="module")
def figures(case: dict) -> dict[str, bytes]:
    probs, labels, conf, correct = case["probs"], case["labels"], case["conf"], case["correct"]
    soft = torch.softmax(torch.log(probs.clamp_min(1e-12)) / 2.0, dim=1)
    before, after = M.reliability_bins(probs, labels, 10), M.reliability_bins(soft, labels, 10)
    entropy = -(probs * probs.clamp_min(1e-12).log()).sum(dim=1)
    return {
        "calibration_reliability": P.reliability_diagram(
            {"before": before, "after (T=2)": after},
            ece={"before": M.expected_calibration_error(probs, labels, 10)}),
        "calibration_confidence": P.confidence_histogram({"before": conf, "after": soft.max(dim=1).values},
                                                         accuracy=M.accuracy(probs, labels)),
        "selective_risk_coverage": P.risk_coverage_plot(
            {"confidence": M.risk_coverage_curve(conf, correct),
             "entropy": M.risk_coverage_curve(entropy, correct, higher_is_confident=False)},
            aurc={"confidence": M.aurc(conf, correct)}),
        "uncertainty_entropy": P.uncertainty_histogram(entropy, correct, "entropy (nats)"),
        "shift": P.shift_plot([0, 15, 30, 45], {"accuracy": [0.99, 0.95, 0.8, 0.5], "ECE": [0.01, 0.02, 0.08, 0.2]}),
    }


def test_every_plot_returns_png(figures: dict[str, bytes]) -> None:
    for name, png in figures.items():
        assert png.startswith(PNG) and len(png) > 5000, name


def test_plot_writes_path(tmp_path: Path, case: dict) -> None:
    out = tmp_path / "hist.png"
    data = P.uncertainty_histogram(case["conf"], case["correct"], path=out)
    assert out.read_bytes() == data
    assert [p.name for p in tmp_path.iterdir()] == ["hist.png"]


def test_plots_reject_invalid_input(case: dict) -> None:
    with pytest.raises(ValueError, match=r"`panels` must be a non-empty mapping"):
        P.reliability_diagram({})
    with pytest.raises(ValueError, match=r"`panels\['x'\]` must be a ReliabilityBins"):
        P.reliability_diagram({"x": case["probs"]})
    with pytest.raises(ValueError, match=r"`correct` must have N=401 entries"):
        P.uncertainty_histogram(case["conf"], case["correct"][:5])
    with pytest.raises(ValueError, match=r"`metrics\['ECE'\]` must have 3 values \(one per angle\), got 2"):
        P.shift_plot([0, 10, 20], {"ECE": [0.1, 0.2]})
    with pytest.raises(ValueError, match=r"coverage and risk must have the same shape"):
        P.risk_coverage_plot({"a": (torch.rand(3, dtype=torch.float64), torch.rand(4, dtype=torch.float64))})


def _metrics(case: dict) -> dict:
    probs, labels = case["probs"], case["labels"]
    rule = fit_selective_threshold(case["conf"], case["correct"], target_risk=0.05)
    return {
        "calibration": {"before": M.calibration_summary(probs, labels), "after": M.calibration_summary(probs, labels)},
        "temperature": {"temperature": 1.25, "nll_before": 0.9, "nll_after": 0.8},
        "conformal": {"alpha": 0.1, "score": "aps", "threshold": math.inf, "coverage": 0.91, "mean_size": 1.7},
        "selective": rule,
        "misclassification": {"auroc": torch.tensor(0.81), "aupr": math.nan, "fpr_at_95_tpr": 0.4},
        "shift": {"angle": [0, 15, 30, 45], "accuracy": [0.99, 0.95, 0.8, 0.5], "ece": [0.01, 0.02, 0.08, 0.2]},
        "<script>alert(1)</script>": "a & b",
    }


def test_write_report(tmp_path: Path, case: dict, figures: dict[str, bytes]) -> None:
    out = tmp_path / "report"
    path = R.write_report(out, _metrics(case), figures, title="Model <b>v1</b> & co")
    assert path == out / "report.html"
    page = path.read_text(encoding="utf-8")
    assert page.count("data:image/png;base64,") == len(figures)
    for key in ("calibration", "temperature", "conformal", "selective", "misclassification", "shift"):
        assert html.escape(R.SECTION_NOTES[key]) in page, key  # a plain-language note for each known section
    # everything user-provided is escaped
    assert "<script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "Model &lt;b&gt;v1&lt;/b&gt; &amp; co" in page and "a &amp; b" in page
    # non-finite values are shown for what they are in the page (and as null in metrics.json)
    assert "<th>threshold</th><td>&infin;</td>" in page and "NaN (undefined)" in page
    # no external resources: it opens offline
    assert "http://" not in page and "https://" not in page and "<link" not in page
    # metrics.json is strict JSON and round-trips the numbers; NaN/inf become null
    data = json.loads((out / "metrics.json").read_text(), parse_constant=lambda c: pytest.fail(f"non-JSON {c}"))
    assert data["calibration"]["before"]["ece"] == M.expected_calibration_error(case["probs"], case["labels"])
    assert data["conformal"]["threshold"] is None and data["misclassification"]["aupr"] is None
    assert data["misclassification"]["auroc"] == pytest.approx(0.81)
    assert data["selective"]["score_name"] == "confidence" and data["selective"]["target_risk"] == 0.05
    for name, png in figures.items():
        assert (out / f"{name}.png").read_bytes() == png
    # nothing else, in particular no temporary file, is left behind
    assert sorted(p.name for p in out.iterdir()) == sorted(["report.html", "metrics.json",
                                                            *(f"{n}.png" for n in figures)])
    assert oct(os.stat(path).st_mode & 0o777) == oct(0o644)


def test_failed_write_leaves_no_temp_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(src: str, dst: str) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        R.write_report(tmp_path, {"temperature": {"temperature": 1.0}}, {})
    assert list(tmp_path.iterdir()) == []


def test_report_overwrites_previous_run(tmp_path: Path) -> None:
    R.write_report(tmp_path, {"temperature": {"temperature": 1.0}}, {})
    R.write_report(tmp_path, {"temperature": {"temperature": 2.0}}, {})
    assert json.loads((tmp_path / "metrics.json").read_text()) == {"temperature": {"temperature": 2.0}}


@pytest.mark.parametrize("metrics,figures,match", [
    ({}, {"../evil": PNG + b"x"}, r"`figures` names must match"),
    ({}, {"a/b": PNG + b"x"}, r"`figures` names must match"),
    ({}, {"ok": b"GIF89a"}, r"`figures\['ok'\]` must be PNG bytes"),
    ({"x": object()}, {}, r"`metrics.x` must hold numbers, strings, lists or dicts, got object"),
    ({"x": {1: 2.0}}, {}, r"`metrics.x` keys must be strings, got 1"),
])
def test_report_rejects_invalid_input(tmp_path: Path, metrics: dict, figures: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        R.write_report(tmp_path, metrics, figures)
    assert list(tmp_path.iterdir()) == []


def test_public_api_is_importable() -> None:
    for name in calibration.__all__:
        assert callable(getattr(calibration, name)) or isinstance(getattr(calibration, name), type), name
    with pytest.raises(AttributeError):
        calibration.not_a_function  # noqa: B018
