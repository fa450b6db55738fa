"""`snodevit calibrate` on a tiny random model: what it stores, what it reports, and how it refuses bad input.

The fitted numbers are checked against the `calibration` package run independently on logits collected with
``snodevit.evaluation.collect``, and the stored calibration against what ``open_model(...).predict`` then
answers. The shifted and OOD inputs of ``snodevit.data.shift`` are checked here too.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

import calibration as cal
from snodevit import MNIST_OVERRIDES, create_model, save_model
from snodevit.cli.calibrate import _human
from snodevit.cli.main import main
from snodevit.data import ImageTensorDataset, load_dataset
from snodevit.evaluation import CalibrateConfig, collect
from snodevit.evaluation.goals import goals
from snodevit.evaluation.pipeline import SELECTION_NOTE, CalibrationResult, report_intro, selected_on_calibration_split
from snodevit.evaluation.sections import conformal_figures
from snodevit.inference.fitted import Calibration
from snodevit.inference.summary import summarize
from snodevit.inference.backends import open_model
from snodevit.data.shift import ROTATION_ANGLES, photo_crops, rotate_images, uniform_noise_images

TINY = dict(dim=24, depth=2, num_heads=2, rank=4, time_hidden_dim=16, noise_dim=4)
QUICK_IMAGES, QUICK_SAMPLES = 200, 4  # what --quick uses (snodevit.evaluation.quick_config)
TARGET_RISK = 0.9  # a random model is right 1 time in 10: a reachable target, so the threshold is finite
SECTIONS = ("goals", "temperature", "calibration", "conformal", "selective", "misclassification", "shift",
            "domain_shift", "ood", "ood_gate", "decisions_under_shift", "decisions_under_shift_one_sample", "samples_comparison",
            "setup")
FIGURES = ("calibration_reliability", "calibration_confidence_histogram", "selective_risk_coverage",
           "misclassification_max_probability", "misclassification_entropy", "misclassification_mutual_information",
           "misclassification_aleatoric", "shift_rotation", "ood_scores", "decisions_under_shift_rotation",
           "decisions_under_shift_sets")


def _tiny_model(directory: Path) -> Path:
    torch.manual_seed(0)
    m = create_model("tiny", **MNIST_OVERRIDES, **TINY)
    torch.nn.init.normal_(m.head.weight)  # the initial zero head would answer 0.1 for every class
    meta = {"class_names": [str(i) for i in range(10)],
            "preprocessing": load_dataset("mnist5k").preprocessing.to_dict()}
    return save_model(m, directory, meta=meta)


def _main(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One quick calibration of a tiny random model; the tests below read what it left behind."""
    model = _tiny_model(tmp_path_factory.mktemp("model"))
    meta_before = json.loads((model / "meta.json").read_text())
    out = tmp_path_factory.mktemp("report") / "calibration"
    code, stdout, stderr = _main(["calibrate", "--model", str(model), "--data", "mnist5k", "--out", str(out),
                                  "--quick", "--json", "--target-risk", str(TARGET_RISK), "--alphas", "0.1", "0.05"])
    assert code == 0, stderr
    return {"model": model, "out": out, "headline": json.loads(stdout), "meta_before": meta_before}


@pytest.fixture(scope="module")
def independent(run: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Raw logits of the quick calibration and test subsets, collected without the command."""
    loaded = open_model(run["model"])
    bundle = load_dataset("mnist5k")
    out = {}
    for split in ("calibration", "test"):
        images, labels = bundle.raw(split)
        ds = ImageTensorDataset(images[:QUICK_IMAGES], labels[:QUICK_IMAGES], loaded.preprocessing)
        r = collect(loaded, ds, QUICK_SAMPLES, seed=0, batch_size=64, progress=False)
        out[f"{split}_logits"], out[f"{split}_labels"] = r["logits"], r["labels"]
    return out


def _strict_json(text: str) -> Any:
    def refuse(name: str) -> None:
        raise ValueError(f"non-standard JSON constant {name}")

    return json.loads(text, parse_constant=refuse)


# ------------------------------------------------------------------------------------------- what is stored


def test_stored_calibration_is_what_open_model_reads_back(run: dict[str, Any]) -> None:
    meta = json.loads((run["model"] / "meta.json").read_text())
    h = run["headline"]
    for key, value in run["meta_before"].items():  # calibrate only adds to meta.json
        assert meta[key] == value
    c = open_model(run["model"]).calibration
    assert c.to_dict() == meta["calibration"]
    assert c.temperature == h["temperature"] and c.temperature != 1.0
    assert sorted(c.conformal_thresholds) == ["0.05", "0.1"] and c.conformal_score == "lac"
    assert c.decision_score == "confidence" and c.target_risk == TARGET_RISK
    assert c.decision_threshold is not None and 0.0 < c.decision_threshold <= 1.0
    assert meta["calibration_figures"] == h


def test_fit_equals_the_calibration_package_on_independently_collected_logits(
        run: dict[str, Any], independent: dict[str, torch.Tensor]) -> None:
    c = open_model(run["model"]).calibration
    logits, labels = independent["calibration_logits"], independent["calibration_labels"]
    assert logits.shape == (QUICK_SAMPLES, QUICK_IMAGES, 10)
    t = cal.fit_temperature(logits, labels)
    assert c.temperature == pytest.approx(t, rel=1e-6)
    probs = cal.apply_temperature(logits.double(), t)
    for alpha in (0.05, 0.1):
        assert c.threshold_for(alpha) == pytest.approx(cal.fit_conformal_threshold(probs, labels, alpha, c.conformal_score),
                                                       abs=1e-6)
    conf = probs.max(dim=1)
    rule = cal.fit_selective_threshold(conf.values, conf.indices == labels, TARGET_RISK,
                                       error_probabilities=1 - conf.values)  # the calibrated-risk bound
    assert c.decision_threshold == pytest.approx(rule.threshold, abs=1e-6)

    # the test-split figures are those of the fitted T on the test logits
    m = _strict_json((run["out"] / "metrics.json").read_text())
    test_probs = cal.apply_temperature(independent["test_logits"].double(), t)
    test_labels = independent["test_labels"]
    raw_probs = cal.apply_temperature(independent["test_logits"].double(), 1.0)
    assert m["calibration"]["after"]["ece"] == pytest.approx(
        cal.expected_calibration_error(test_probs, test_labels, n_bins=15), abs=1e-6)
    assert m["calibration"]["before"]["ece"] == pytest.approx(
        cal.expected_calibration_error(raw_probs, test_labels, n_bins=15), abs=1e-6)
    # set membership can sit on a threshold near 1: compare on the float32 probabilities the service computes
    served = summarize(independent["test_logits"], t).probs
    sets = cal.prediction_sets(served, c.threshold_for(0.1), c.conformal_score)
    assert m["conformal"]["alpha=0.1"]["coverage"] == pytest.approx(cal.conformal_coverage(sets, test_labels)[0])
    bare = cal.prediction_sets(served, c.threshold_for(0.1), c.conformal_score, allow_empty=True)
    assert m["conformal"]["alpha=0.1"]["bare_coverage"] == pytest.approx(cal.conformal_coverage(bare, test_labels)[0])
    assert m["conformal"]["alpha=0.1"]["empty_fraction"] == pytest.approx(float((~bare.any(dim=1)).double().mean()))


def test_predict_applies_the_stored_calibration(run: dict[str, Any], independent: dict[str, torch.Tensor]) -> None:
    loaded = open_model(run["model"])
    images, _ = load_dataset("mnist5k").raw("test")
    batch = ImageTensorDataset(images[:8], torch.zeros(8, dtype=torch.int64), loaded.preprocessing)
    x = torch.stack([batch[i][0] for i in range(8)])
    pred = loaded.predict(x, num_samples=QUICK_SAMPLES, seed=list(range(8)))
    expected = cal.apply_temperature(independent["test_logits"][:, :8].double(), loaded.calibration.temperature)
    torch.testing.assert_close(pred.summary.probs.double(), expected, atol=1e-5, rtol=0)
    assert pred.prediction_sets is not None and pred.alpha == 0.05
    assert pred.accept.tolist() == (pred.summary.confidence >= loaded.calibration.decision_threshold).tolist()


# ------------------------------------------------------------------------------------------- what is reported


def test_report_is_self_contained_and_metrics_hold_every_section(run: dict[str, Any]) -> None:
    out = run["out"]
    page = (out / "report.html").read_text()
    uris = re.findall(r'src="(data:image/png;base64,[A-Za-z0-9+/=]+)"', page)
    assert len(uris) == len(FIGURES)
    assert all(base64.b64decode(u.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n" for u in uris)
    assert not re.search(r'(src|href)="(?!data:)', page), "the report must not load anything from elsewhere"
    assert "<script" not in page
    for name in FIGURES:
        assert (out / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    m = _strict_json((out / "metrics.json").read_text())
    assert tuple(m) == SECTIONS
    assert m["shift"]["angle"] == [0.0, 90.0, 180.0]
    assert {len(v) for v in m["shift"].values()} == {3}
    assert m["shift"]["accuracy"][0] == pytest.approx(m["calibration"]["after"]["accuracy"])
    assert set(m["ood"]) == {f"{s}/{k}" for s in ("uniform_noise", "photo_crops", "constant", "inverted_digits",
                                                  "letters")
                             for k in ("max_probability", "entropy", "mutual_information")}
    assert all(0.0 <= r["auroc"] <= 1.0 for r in m["ood"].values())
    assert set(m["domain_shift"]) == {"mnist5k test", "sklearn digits"}
    assert m["setup"]["calibration_images"] == m["setup"]["test_images"] == QUICK_IMAGES
    assert m["setup"]["num_samples"] == QUICK_SAMPLES
    assert m["setup"]["model_selected_on_calibration_split"] is False  # the test model was never trained
    assert m["temperature"]["calibration_nll_after"] <= m["temperature"]["calibration_nll_before"]

    # served sets (top class added) and bare split-conformal sets (may be empty) of every (alpha, score) row
    assert len(m["conformal"]) == 4  # 2 alphas x (stored score, the other one)
    for row in m["conformal"].values():
        assert 0.0 <= row["empty_fraction"] <= 1.0
        assert 0.0 <= row["bare_coverage"] <= row["coverage"] <= 1.0
        assert row["coverage"] >= row["top1_accuracy"]
        assert 0.0 <= row["bare_mean_set_size"] <= row["mean_set_size"] <= 10.0
        # the top class adds exactly one class to every empty bare set and at most one to the others
        assert row["mean_set_size"] - row["bare_mean_set_size"] >= row["empty_fraction"] - 1e-12
        assert row["bare_coverage_std_error"] == pytest.approx(
            (row["bare_coverage"] * (1 - row["bare_coverage"]) / QUICK_IMAGES) ** 0.5)
    for a in ("0.05", "0.1"):
        row = m["conformal"][f"alpha={a}"]
        goal = m["goals"][f"coverage alpha={a}"]
        assert goal["measured"] == row["bare_coverage"]  # judged on the sets the conformal guarantee is about
        assert goal["met"] is (abs(row["bare_coverage"] - (1 - float(a))) <= 0.02 + 1e-9)
        assert "unreachable" not in goal["note"] and f"cover {row['coverage']:.3f}" in goal["note"]
        assert m["shift"][f"bare_coverage_alpha_{a}"][0] == pytest.approx(row["bare_coverage"])
        assert m["shift"][f"empty_fraction_alpha_{a}"][0] == pytest.approx(row["empty_fraction"])
        assert m["shift"][f"coverage_alpha_{a}"][0] == pytest.approx(row["coverage"])
    page = (out / "report.html").read_text()
    assert "bare_coverage" in page and "empty_fraction" in page


def test_json_headline_reads_the_metrics(run: dict[str, Any]) -> None:
    h = run["headline"]
    m = _strict_json((run["out"] / "metrics.json").read_text())
    assert h["ece_before"] == m["calibration"]["before"]["ece"] and h["ece_after"] == m["calibration"]["after"]["ece"]
    assert h["coverage"] == {"0.05": m["conformal"]["alpha=0.05"]["coverage"],
                             "0.1": m["conformal"]["alpha=0.1"]["coverage"]}
    assert h["mean_set_size"]["0.1"] == m["conformal"]["alpha=0.1"]["mean_set_size"]
    for key in ("bare_coverage", "bare_mean_set_size", "empty_fraction"):
        assert h[key] == {a: m["conformal"][f"alpha={a}"][key] for a in ("0.05", "0.1")}
    assert h["selective_coverage"] == m["selective"]["test"]["coverage"]
    assert h["ood_auroc_mutual_information"] == {s: m["ood"][f"{s}/mutual_information"]["auroc"]
                                                 for s in ("uniform_noise", "photo_crops")}
    assert h["quick"] is True and h["num_samples"] == QUICK_SAMPLES


def test_conformal_figures_measure_bare_and_served_sets_and_the_goal_reads_the_bare_ones() -> None:
    """On an accurate classifier the two kinds of set differ; the quick run's random model has no empty sets."""
    # calibrated synthetic probabilities, ~99 % top-1 accuracy: one class per image gets a logit boost of ~10
    g = torch.Generator().manual_seed(0)
    n, c, alpha = 6000, 10, 0.1
    logits = torch.randn(n, c, generator=g, dtype=torch.float64)
    logits[torch.arange(n), torch.randint(0, c, (n,), generator=g)] += 10.0 + 2.0 * torch.randn(
        n, generator=g, dtype=torch.float64)
    probs = logits.softmax(dim=1)
    labels = torch.multinomial(probs, 1, generator=g).squeeze(1)
    q = cal.fit_conformal_threshold(probs[:2000], labels[:2000], alpha, "lac")
    test_p, test_y = probs[2000:], labels[2000:]

    row = conformal_figures(test_p, test_y, q, "lac", alpha)
    served = cal.prediction_sets(test_p, q, "lac")
    bare = cal.prediction_sets(test_p, q, "lac", allow_empty=True)
    assert (row["coverage"], row["mean_set_size"]) == pytest.approx(cal.conformal_coverage(served, test_y))
    assert (row["bare_coverage"], row["bare_mean_set_size"]) == pytest.approx(cal.conformal_coverage(bare, test_y))
    assert row["empty_fraction"] == pytest.approx(float((~bare.any(dim=1)).double().mean()))
    assert 0.05 < row["empty_fraction"] < 0.15
    assert abs(row["bare_coverage"] - (1 - alpha)) <= 0.02  # ~2.5 sd (calibration split 0.0067, test 0.0047)
    assert row["coverage"] >= row["top1_accuracy"] > 1 - alpha + 0.02  # the served sets over-cover

    m = {"calibration": {"after": {"ece": 0.005, "accuracy": row["top1_accuracy"]}}, "conformal": {"alpha=0.1": row}}
    goal = goals(m, CalibrateConfig(alphas=(alpha,)))["coverage alpha=0.1"]
    assert goal["measured"] == row["bare_coverage"] and goal["met"] is True
    assert "unreachable" not in goal["note"]
    assert f"cover {row['coverage']:.3f} (>= top-1 accuracy {row['top1_accuracy']:.3f})" in goal["note"]
    assert f"{100 * row['empty_fraction']:.1f}% of them empty" in goal["note"]


def test_human_printout_shows_bare_and_served_sets(run: dict[str, Any]) -> None:
    h = run["headline"]
    text = _human(h, run["model"], run["out"], quick=True)
    for a in ("0.05", "0.1"):
        assert f"alpha {a}, target coverage {100 * (1 - float(a)):.2f}%:" in text
        assert (f"bare sets {{y : score <= q}}: coverage {100 * h['bare_coverage'][a]:.2f}%, mean size "
                f"{h['bare_mean_set_size'][a]:.3f}, {100 * h['empty_fraction'][a]:.2f}% empty") in text
        assert (f"served sets (top class added, never empty): coverage {100 * h['coverage'][a]:.2f}%, mean size "
                f"{h['mean_set_size'][a]:.3f}") in text


@pytest.mark.parametrize("meta, selected", [
    ({"data": "mnist5k", "training": {"best_epoch": 19}}, True),  # before `keep` was recorded: best epoch kept
    ({"data": "mnist5k", "training": {"keep": "best"}}, True),
    ({"data": "mnist5k", "training": {"keep": "last"}}, False),
    ({"data": "digits", "training": {"keep": "best"}}, False),  # validated on another data set
    ({}, False),
])
def test_the_report_warns_when_the_model_was_selected_on_the_calibration_split(meta: dict, selected: bool) -> None:
    assert selected_on_calibration_split(meta, "mnist5k") is selected
    setup = {"calibration_images": 500, "test_images": 500, "data": "mnist5k", "num_samples": 32,
             "model_selected_on_calibration_split": selected}
    intro = report_intro(CalibrationResult(Calibration(), {"setup": setup}, {}, {}), "m")
    assert (SELECTION_NOTE in intro) is selected


# ------------------------------------------------------------------------------------------- refusals


def _rgb_folder(root: Path) -> Path:
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        (root / name).mkdir(parents=True)
        for i in range(10):
            Image.fromarray(rng.integers(0, 255, size=(16, 16, 3), dtype=np.uint8)).save(root / name / f"{i}.png")
    return root


BAD_INPUT = {  # name -> (extra arguments, given the test's tmp_path; what stderr must say)
    "alpha above 1": (lambda tmp: ["--alphas", "0.1", "1.5"], "--alphas must each be in (0, 1), got 1.5"),
    "alpha 0": (lambda tmp: ["--alphas", "0"], "--alphas must each be in (0, 1), got 0"),
    "alpha too small": (lambda tmp: ["--alphas", "0.001"], "alpha 0.001 is too small for 200 calibration images"),
    "target risk": (lambda tmp: ["--target-risk", "2"], "--target-risk must be in [0, 1]"),
    "rgb data": (lambda tmp: ["--data", f"imagefolder:{_rgb_folder(tmp / 'rgb')}"],
                 "3-channel images, but the model expects 1"),
    "missing model": (lambda tmp: ["--model", str(tmp / "no-such-model")], "does not exist"),
}


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_input_exits_2_with_a_message_and_leaves_the_model_alone(tmp_path: Path, case: str) -> None:
    extra, message = BAD_INPUT[case]
    model = _tiny_model(tmp_path / "model")
    meta = (model / "meta.json").read_bytes()
    # a later --model/--data replaces the earlier one (argparse keeps the last)
    argv = ["calibrate", "--model", str(model), "--data", "mnist5k", "--out", str(tmp_path / "out"), "--quick"]
    code, stdout, stderr = _main([*argv, *extra(tmp_path)])
    assert code == 2
    assert stderr.startswith("snodevit calibrate: error: ") and message in stderr, stderr
    assert stdout == ""
    assert (model / "meta.json").read_bytes() == meta
    assert not (tmp_path / "out").exists()


def test_an_unknown_choice_is_an_argparse_error() -> None:
    with contextlib.redirect_stderr(io.StringIO()), pytest.raises(SystemExit) as e:
        main(["calibrate", "--model", "m", "--out", "o", "--decision-score", "entropy"])
    assert e.value.code == 2


# ------------------------------------------------------------------------------------------- shifted inputs


def test_rotation_turns_counter_clockwise_and_zero_is_the_identity() -> None:
    images = torch.randint(0, 256, (3, 1, 28, 28), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    assert rotate_images(images, 0.0) is images
    assert torch.equal(rotate_images(images, 90.0), torch.rot90(images, 1, dims=(2, 3)))
    assert torch.equal(rotate_images(images, 180.0), torch.rot90(images, 2, dims=(2, 3)))
    half = rotate_images(images, 45.0)
    assert half.dtype == torch.uint8 and half.shape == images.shape
    assert ROTATION_ANGLES == tuple(float(a) for a in range(0, 181, 15))
    with pytest.raises(ValueError, match="uint8"):
        rotate_images(images.float(), 15.0)


def test_far_ood_inputs_are_seeded_uint8_images_of_the_model_size() -> None:
    prep = load_dataset("mnist5k").preprocessing
    for make in (uniform_noise_images, photo_crops):
        a, b, c = make(6, prep, seed=1), make(6, prep, seed=1), make(6, prep, seed=2)
        assert a.dtype == torch.uint8 and a.shape == (6, 1, 28, 28)
        assert torch.equal(a, b) and not torch.equal(a, c)
    noise = uniform_noise_images(64, prep).float()
    assert noise.min() < 10 and noise.max() > 245 and abs(noise.mean().item() - 127.5) < 5
    crops = photo_crops(16, prep).float()
    assert crops.std(dim=(1, 2, 3)).min() > 0  # photographs, not blank squares
    with pytest.raises(ValueError, match=">= 1"):
        photo_crops(0, prep)


# ------------------------------------------------------------------------------------------- out-of-distribution gate


def _gate_scores(loaded: Any, images: torch.Tensor) -> torch.Tensor:
    """Served gate scores of uint8 images (image i seeded with i, S as --quick), computed through ``predict``
    with the stored density and a gate that never fires."""
    import dataclasses

    gate = loaded.calibration.ood_gate
    probe = dataclasses.replace(loaded.calibration, ood_gate=dataclasses.replace(gate, threshold=float("inf")))
    x = torch.stack([ImageTensorDataset(images, torch.zeros(len(images), dtype=torch.int64),
                                        loaded.preprocessing)[i][0] for i in range(len(images))])
    pred = loaded.predict(x, num_samples=QUICK_SAMPLES, seed=list(range(len(images))), calibration=probe)
    assert pred.ood_score is not None
    return pred.ood_score


def test_gate_threshold_is_the_conformal_novelty_threshold_of_the_calibration_split(run: dict[str, Any]) -> None:
    loaded = open_model(run["model"])
    gate = loaded.calibration.ood_gate
    assert gate is not None and gate.score == "feature_density" and gate.density is not None
    assert gate.review_rate == CalibrateConfig().gate_review_rate and gate.calibration_images == QUICK_IMAGES
    assert gate.density.num_groups == 1 + TINY["depth"] and gate.density.dim == 4 * TINY["dim"]
    images, _ = load_dataset("mnist5k").raw("calibration")
    scores = _gate_scores(loaded, images[:QUICK_IMAGES])
    # an independent reference: the k-th smallest score, k = ceil((n + 1)(1 - rate)) (Bates et al. 2023)
    k = int(np.ceil((QUICK_IMAGES + 1) * (1 - gate.review_rate) - 1e-9))
    assert gate.threshold == pytest.approx(float(scores.sort().values[k - 1]), rel=1e-9)
    assert run["headline"]["ood_gate"]["threshold"] == pytest.approx(gate.threshold)


def test_decisions_under_shift_are_what_predict_answers(run: dict[str, Any]) -> None:
    m = _strict_json((run["out"] / "metrics.json").read_text())
    rows = m["decisions_under_shift"]
    assert list(rows)[:4] == ["test", "rotated 90", "rotated 180", "sklearn digits"]
    assert {"pixel noise", "uniform_noise", "photo_crops", "constant", "inverted_digits", "letters"} <= set(rows)
    loaded = open_model(run["model"])
    images, labels = load_dataset("mnist5k").raw("test")
    images, labels = images[:QUICK_IMAGES], labels[:QUICK_IMAGES]
    x = torch.stack([ImageTensorDataset(images, labels, loaded.preprocessing)[i][0] for i in range(QUICK_IMAGES)])
    pred = loaded.predict(x, num_samples=QUICK_SAMPLES, seed=list(range(QUICK_IMAGES)))
    assert pred.out_of_distribution is not None
    accepted = pred.accept
    row = rows["test"]
    assert row["accepted"] == pytest.approx(float(accepted.double().mean()))
    assert row["review_out_of_distribution"] == pytest.approx(float(pred.out_of_distribution.double().mean()))
    wrong = pred.summary.prediction != labels
    assert row["error_among_accepted"] == (pytest.approx(float(wrong[accepted].double().mean()))
                                           if bool(accepted.any()) else None)
    assert row["accepted"] + row["review_out_of_distribution"] + row["review_low_confidence"] == pytest.approx(1.0)
    # the gate flags the far-OOD sets of a random model too: its first layer already sees pixel statistics
    assert rows["uniform_noise"]["review_out_of_distribution"] > 0.9
    assert rows["uniform_noise"]["gate_auroc"] > 0.9
    # every candidate is in the report, each fitted at the stated rate
    cands = m["ood_gate"]
    assert set(cands) == {"feature_density", "energy", "mutual_information", "feature_density_last",
                          "max_probability", "feature_density|mutual_information"}
    assert cands["feature_density"]["review test"] == pytest.approx(row["review_out_of_distribution"])
    goals = m["goals"]
    assert goals["test: accepted"]["measured"] == row["accepted"]
    assert goals["uniform_noise: sent to review"]["measured"] == pytest.approx(1 - rows["uniform_noise"]["accepted"])
    page = (run["out"] / "report.html").read_text()
    assert "Decisions under shift" in page or "decisions_under_shift" in page


def test_gate_none_fits_no_gate(tmp_path: Path) -> None:
    model = _tiny_model(tmp_path / "model")
    code, _, stderr = _main(["calibrate", "--model", str(model), "--data", "mnist5k", "--out", str(tmp_path / "c"),
                             "--quick", "--json", "--target-risk", str(TARGET_RISK), "--gate-score", "none",
                             "--num-samples", "2"])
    assert code == 0, stderr
    assert "ood_gate" not in json.loads((model / "meta.json").read_text())["calibration"]
    assert open_model(model).calibration.ood_gate is None


@pytest.mark.parametrize("rate", ["0", "1", "1.5", "-0.1"])
def test_bad_gate_review_rate_is_refused(rate: str, tmp_path: Path) -> None:
    model = _tiny_model(tmp_path / "model")
    code, _, stderr = _main(["calibrate", "--model", str(model), "--data", "mnist5k", "--out", str(tmp_path / "c"),
                             "--quick", "--gate-review-rate", rate])
    assert code == 2 and "--gate-review-rate" in stderr
