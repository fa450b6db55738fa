"""`snodevit evaluate` on a tiny random model: the selective figures it prints, at the requested S and at S = 1,
against ``calibration.selective_metrics`` run on logits collected independently with ``collect``; and the same
figures in the calibration report's selective section (``snodevit.evaluation.sections``), on synthetic passes."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path
from typing import Any

import pytest
import torch

import calibration as cal
import snodevit
from snodevit.cli.main import main
from snodevit.data import load_dataset
from snodevit.evaluation import CalibrateConfig, collect
from snodevit.evaluation.passes import Pass
from snodevit.evaluation.sections import _selective_section
from snodevit.inference.backends import open_model
from snodevit.inference.summary import summarize

TINY = dict(snodevit.MNIST_OVERRIDES, dim=24, depth=2, num_heads=2, rank=4, time_hidden_dim=16, noise_dim=4)
TEMPERATURE = 1.3  # not 1, so a figure that forgot the stored temperature would differ
CALIBRATION = {"temperature": TEMPERATURE, "conformal_score": "aps", "conformal_thresholds": {"0.05": 0.9},
               "decision_score": "confidence", "decision_threshold": 0.5, "target_risk": 0.02}
DATA, SPLIT, IMAGES = "digits", "test", 179  # scikit-learn's digits, resized to the model's 28 px: small and local
SAMPLES, SEED = 4, 3
KEYS = ["aurc", "augrc", "risk_at_80_coverage", "coverage_at_1_risk", "coverage_at_5_risk"]


def _evaluate(model: Path, *flags: str) -> str:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["evaluate", "--model", str(model), "--data", DATA, "--split", SPLIT, "--seed", str(SEED), *flags])
    assert code == 0, err.getvalue()
    return out.getvalue()


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    m = snodevit.create_model("tiny", **TINY)
    torch.nn.init.normal_(m.head.weight)  # the initial zero head would answer 0.1 for every class
    return snodevit.save_model(m, tmp_path_factory.mktemp("model"),
                               meta={"class_names": [str(i) for i in range(10)],
                                     "preprocessing": load_dataset("mnist5k").preprocessing.to_dict(),
                                     "calibration": CALIBRATION})


@pytest.fixture(scope="module")
def reported(model: Path) -> dict[int, dict[str, Any]]:
    """The --json output at S = SAMPLES and at S = 1."""
    return {s: json.loads(_evaluate(model, "--num-samples", str(s), "--json")) for s in (SAMPLES, 1)}


@pytest.fixture(scope="module")
def collected(model: Path) -> dict[int, dict[str, torch.Tensor]]:
    """``collect`` at S = SAMPLES and at S = 1, seeded and batched as the command does by default."""
    loaded = open_model(model)
    assert loaded.calibration.temperature == TEMPERATURE
    data = load_dataset(DATA, image_size=loaded.preprocessing.image_size).split(SPLIT)
    return {s: collect(loaded, data, s, SEED, batch_size=64, progress=False) for s in (SAMPLES, 1)}


def _by_confidence(probs: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    conf = probs.double().max(dim=1)
    return cal.selective_metrics(conf.values, conf.indices == labels)


def test_selective_figures_equal_the_calibration_package_on_collected_logits(
        reported: dict[int, dict[str, Any]], collected: dict[int, dict[str, torch.Tensor]]) -> None:
    r = collected[SAMPLES]
    logits, labels = r["logits"], r["labels"]
    figures = reported[SAMPLES]
    assert figures["images"] == len(labels) == IMAGES and figures["num_samples"] == SAMPLES
    assert sorted(figures["selective"]) == sorted(figures["selective_one_sample"]) == sorted(KEYS)
    # the requested S: the served confidence, the top of the mean probabilities at the stored temperature
    assert figures["selective"] == _by_confidence(r["probs"], labels)
    served = cal.apply_temperature(logits.double(), TEMPERATURE)
    assert figures["selective"] == pytest.approx(_by_confidence(served, labels), abs=1e-4)
    # S = 1: the first Monte Carlo sample alone, at the stored temperature
    assert figures["selective_one_sample"] == _by_confidence(summarize(logits[:1], TEMPERATURE).probs, labels)
    first = torch.softmax(logits[0].double() / TEMPERATURE, dim=-1)  # (N, C)
    assert figures["selective_one_sample"] == pytest.approx(_by_confidence(first, labels), abs=1e-4)
    assert figures["selective_one_sample"] != figures["selective"]  # S matters, so the test tells them apart


def test_the_first_of_s_samples_is_the_one_sample_draw(
        reported: dict[int, dict[str, Any]], collected: dict[int, dict[str, torch.Tensor]]) -> None:
    """Noise is drawn per image sample by sample, so sample 0 of an S-sample pass is what S = 1 answers."""
    torch.testing.assert_close(collected[SAMPLES]["logits"][:1], collected[1]["logits"],
                               atol=1e-5, rtol=0)  # float32 rounding where the folded passes differ in shape
    assert reported[1]["selective"] == reported[1]["selective_one_sample"]
    assert reported[SAMPLES]["selective_one_sample"] == pytest.approx(reported[1]["selective"], abs=1e-4)


def test_human_output_shows_both_rows(model: Path, reported: dict[int, dict[str, Any]]) -> None:
    lines = _evaluate(model, "--num-samples", str(SAMPLES)).splitlines()
    head = next(i for i, line in enumerate(lines) if line.strip().startswith("selective, by confidence"))
    assert lines[head].split()[3:] == ["AURC", "AUGRC", "risk@80%cov", "cov@1%risk", "cov@5%risk"]
    assert len(lines) == head + 3
    for line, key, name in zip(lines[head + 1:], ("selective", "selective_one_sample"), (f"S={SAMPLES}", "S=1")):
        assert line.split() == [name] + [f"{reported[SAMPLES][key][k]:.4f}" for k in KEYS]
    lines = _evaluate(model, "--num-samples", "1").splitlines()
    assert [line.split()[0] for line in lines if line.startswith("    S=")] == ["S=1"]  # one row when S = 1


# ------------------------------------------------------------------------------------------- the calibration report


def test_report_selective_section_ranks_the_served_s_and_one_sample(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    s, n, c, t = 5, 300, 4, 1.7
    logits = 3.0 * torch.randn(s, n, c, generator=g)  # (S, N, C) float32, as the passes keep them
    labels = torch.randint(0, c, (n,), generator=g)
    test = Pass(logits, labels).scale(t)
    rule = cal.fit_selective_threshold(test.s.confidence, test.correct, 0.3)
    section = _selective_section(test, rule, CalibrateConfig())  # test is scaled at t
    assert list(section) == ["calibration", "test", "test_ranking", "test_ranking_one_sample"]
    assert section["test"]["coverage"] == cal.selective_figures(test.s.confidence, test.correct, rule)["coverage"]
    for key, probs, samples in (("test_ranking", torch.softmax(logits.double() / t, -1).mean(0), s),
                                ("test_ranking_one_sample", torch.softmax(logits[0].double() / t, -1), 1)):
        row = dict(section[key])
        assert (row.pop("score"), row.pop("num_samples"), row.pop("images")) == ("confidence", samples, n)
        assert row == pytest.approx(_by_confidence(probs, labels), abs=1e-6), key
    assert section["test_ranking"] != section["test_ranking_one_sample"]
    page = cal.write_report(tmp_path, {"selective": section}, {}).read_text()
    assert "test_ranking_one_sample" in page and "augrc" in page and "coverage_at_5_risk" in page
