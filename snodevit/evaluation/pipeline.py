"""The ``snodevit calibrate`` pipeline: fit post-hoc calibration, check it on held-out data, under shift and OOD.

Passes over the data, each image seeded with ``seed + its index in the pass`` (:mod:`snodevit.evaluation.passes`,
as ``snodevit evaluate`` does), so every number is reproducible and an image's noise does not depend on its batch:

1. **calibration split**: raw Monte Carlo logits -> temperature ``T`` (:func:`calibration.fit_temperature`), one
   conformal threshold per alpha (:func:`calibration.fit_conformal_threshold` on the temperature-scaled
   probabilities) and the accept/review threshold (:func:`calibration.fit_selective_threshold` on the chosen
   score at the target risk) (:func:`fit_calibration`);
2. **test split**: calibration errors before and after scaling, proper scores, conformal coverage and set size
   (of the served sets, which always hold the top class, and of the bare split-conformal sets, which may be empty
   and are what the coverage guarantee is about), selective coverage and risk, how well each uncertainty score
   flags errors (:mod:`snodevit.evaluation.sections`);
3. **shift**: the test split rotated 0-180 degrees in 15 degree steps (Ovadia et al. 2019) and, for digit models,
   scikit-learn's digits as a shifted domain; **OOD**: uniform-noise images and crops of photographs, scored
   by 1 - max probability, predictive entropy and mutual information (:mod:`snodevit.evaluation.sweeps`).

Every probability and uncertainty is what the service answers: :func:`snodevit.inference.summarize` of the raw
logits with the fitted ``T``, on images normalised with the model's own preprocessing. This module computes
results; :func:`calibration.write_report` renders them.

References:
    Guo et al. "On Calibration of Modern Neural Networks." ICML 2017 (temperature scaling).
    Angelopoulos & Bates. "A Gentle Introduction to Conformal Prediction." arXiv:2107.07511, 2021.
    Geifman & El-Yaniv. "Selective Classification for Deep Neural Networks." NeurIPS 2017.
    Ovadia et al. "Can You Trust Your Model's Uncertainty? Evaluating Predictive Uncertainty Under Dataset
    Shift." NeurIPS 2019.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import calibration as cal
from calibration.report import to_jsonable

from snodevit.data import PIXEL_NOISE_STD, DatasetBundle
from snodevit.evaluation.config import OOD_SCORES, OOD_SETS, CalibrateConfig, fitted_counts
from snodevit.evaluation.figures import report_figures
from snodevit.evaluation.goals import goals
from snodevit.evaluation.passes import Pass, Passes, run_passes
from snodevit.evaluation.sections import held_out_sections
from snodevit.evaluation.sweeps import decision_rows, gate_section, ood_section, samples_comparison, shift_sections
from snodevit.inference.backends import LoadedModel
from snodevit.inference.fitted import Calibration, CountRule, OodGate

logger = logging.getLogger(__name__)


@dataclass
class CalibrationResult:
    """Everything a calibration run produced."""

    calibration: Calibration  # what is stored with the model and applied by every consumer
    metrics: dict[str, Any]  # report sections, in display order (see calibration.write_report)
    figures: dict[str, bytes]  # figure name -> PNG bytes
    headline: dict[str, Any]  # the figures `--json` prints and meta.json keeps as ``calibration_figures``


def calibrate_model(loaded: LoadedModel, bundle: DatasetBundle, cfg: CalibrateConfig | None = None, *,
                    progress: bool = True, figures: bool = True) -> CalibrationResult:
    """Fit the calibration of ``loaded`` on ``bundle``'s calibration split and measure it everywhere else.

    Args:
        loaded: the model (its stored calibration is ignored: fitting starts from the raw logits).
        bundle: the data set; its calibration split fits, its test split evaluates.
        cfg: what to fit and how much data to use; default :class:`CalibrateConfig`.
        progress: show a progress bar over all passes (on stderr).
        figures: draw the PNG figures (the metrics do not depend on them).

    Returns:
        The fitted :class:`~snodevit.inference.Calibration`, the report sections, figures and headline figures.

    Raises:
        ValueError: images with another channel count or class count than the model, or an alpha too small for
            the calibration split (raised before the first forward pass).
    """
    cfg = cfg or CalibrateConfig()
    started = time.perf_counter()
    passes, density = run_passes(loaded, bundle, cfg, progress)
    inference_seconds = time.perf_counter() - started

    fitted, rule = fit_calibration(passes.calibration, cfg, density)
    fitted = dataclasses.replace(fitted, precision=loaded.precision)  # the passes the figures were fitted on
    test_one = passes.test.unscaled()
    passes.test.scale(fitted.temperature)
    passes.pixel_noise.scale(fitted.temperature)
    sections = held_out_sections(passes.calibration, passes.test, test_one, fitted, rule, cfg)
    sections |= shift_sections(passes, test_one, fitted, rule, cfg, bundle.name)
    sections["ood"] = ood_section(passes, fitted.temperature)
    sections["ood_gate"] = gate_section(passes, cfg)
    sections["decisions_under_shift"] = decision_rows(passes, fitted)
    if cfg.num_samples > 1:  # the same decisions from one sample per image, under the thresholds fitted for one
        sections["decisions_under_shift_one_sample"] = decision_rows(passes.at_count(1), fitted)
        sections["samples_comparison"] = samples_comparison(passes, fitted)
    setup = _setup(loaded, bundle, cfg, passes)
    setup |= {"inference_seconds": inference_seconds, "seconds": time.perf_counter() - started}
    metrics = {"goals": goals(sections, cfg), **sections, "setup": setup}
    pngs = report_figures(passes, test_one, metrics, cfg) if figures else {}
    return CalibrationResult(calibration=fitted, metrics=metrics, figures=pngs,
                             headline=_headline(fitted, metrics, bundle, cfg))


def _setup(loaded: LoadedModel, bundle: DatasetBundle, cfg: CalibrateConfig, passes: Passes) -> dict[str, Any]:
    """The report's ``setup`` section but its timings: what was run, on what, with which settings."""
    return {
        "model": loaded.source, "weights_sha256": loaded.weights_sha256, "data": bundle.spec,
        "calibration_images": len(passes.calibration.labels), "test_images": len(passes.test.labels),
        "model_selected_on_calibration_split": selected_on_calibration_split(loaded.meta, bundle.spec),
        "digits_images": 0 if passes.digits is None else len(passes.digits.labels),
        "ood_images_per_set": cfg.num_ood, "num_samples": cfg.num_samples, "seed": cfg.seed, "n_bins": cfg.n_bins,
        "alphas": list(cfg.alphas), "conformal_score": cfg.conformal_score, "decision_score": cfg.decision_score,
        "target_risk": cfg.target_risk, "rotation_angles": list(cfg.angles), "max_images": cfg.max_images,
        "gate_score": cfg.gate_score, "gate_review_rate": cfg.gate_review_rate, "calibrated_risk": cfg.calibrated_risk,
        "gate_training_images": min(len(bundle.train), cfg.max_train_images or len(bundle.train)),
        "pixel_noise_std": PIXEL_NOISE_STD}


def fit_calibration(p: Pass, cfg: CalibrateConfig,
                    density: cal.FeatureDensity) -> tuple[Calibration, cal.SelectiveThreshold]:
    """Temperature, then conformal and accept/review thresholds and the OOD gate on the scaled calibration split.

    Args:
        p: the calibration split's raw pass (scaled here with the fitted temperature).
        cfg: alphas, scores, target risk and gate settings.
        density: the feature density a ``feature_density`` gate serves.

    Returns:
        The calibration to store and the accept/review rule with its figures on the calibration split.
    """
    temperature = cal.fit_temperature(p.logits, p.labels)
    p.scale(temperature)
    thresholds = {str(a): cal.fit_conformal_threshold(p.s.probs, p.labels, a, cfg.conformal_score)
                  for a in cfg.alphas}
    rule = _selective_rule(p, cfg)
    if rule.coverage == 0.0:
        logger.warning("no %s threshold keeps the calibration error rate at %.1f%%: every image will be sent to "
                       "review", cfg.decision_score, 100 * cfg.target_risk)
    gate = None if cfg.gate_score == "none" else _fit_gate(p, cfg, density)
    fitted = Calibration(temperature=temperature, conformal_score=cfg.conformal_score,
                         conformal_thresholds=thresholds, decision_score=cfg.decision_score,
                         decision_threshold=rule.threshold, target_risk=cfg.target_risk, ood_gate=gate,
                         count_rules=_count_rules(p, cfg, gate is not None))
    return fitted, rule


def _selective_rule(p: Pass, cfg: CalibrateConfig) -> cal.SelectiveThreshold:
    """The accept/review threshold of the scaled pass ``p`` at the target risk (with the calibrated-risk bound of
    ``cfg.calibrated_risk``: the mean of 1 - confidence among the accepted at most the target too)."""
    scores, higher = p.decision_scores(cfg.decision_score)
    p_wrong = (1.0 - p.s.confidence.double()).clamp(0.0, 1.0) if cfg.calibrated_risk else None
    return cal.fit_selective_threshold(scores, p.correct, cfg.target_risk, higher_is_confident=higher,
                                       score_name=cfg.decision_score, error_probabilities=p_wrong)


def _count_rules(p: Pass, cfg: CalibrateConfig, gated: bool) -> dict[int, CountRule]:
    """The decision and gate thresholds fitted again on the first n samples of the scaled calibration pass, for
    every n of :func:`fitted_counts` (n = S gives the calibration's own thresholds)."""
    rules = {}
    for n in fitted_counts(cfg.num_samples):
        pn = p.at_count(n)
        rule = _selective_rule(pn, cfg)
        gate = cal.fit_novelty_threshold(pn.gate_score(cfg.gate_score), cfg.gate_review_rate) if gated else None
        rules[n] = CountRule(decision_threshold=rule.threshold, gate_threshold=gate)
    return rules


def _fit_gate(p: Pass, cfg: CalibrateConfig, density: cal.FeatureDensity) -> OodGate:
    """The out-of-distribution gate: the conformal novelty threshold of its score on the scaled calibration split."""
    gate_threshold = cal.fit_novelty_threshold(p.gate_score(cfg.gate_score), cfg.gate_review_rate)
    if math.isinf(gate_threshold):
        logger.warning("the calibration split (%d images) is too small for a %.2f%% review rate: the "
                       "out-of-distribution gate will never fire", len(p.labels), 100 * cfg.gate_review_rate)
    return OodGate(score=cfg.gate_score, threshold=gate_threshold,  # type: ignore[arg-type]
                   review_rate=cfg.gate_review_rate,
                   density=density if cfg.gate_score == "feature_density" else None,
                   calibration_images=len(p.labels))


def _headline(fitted: Calibration, m: Mapping[str, Any], bundle: DatasetBundle, cfg: CalibrateConfig) -> dict[str, Any]:
    """The figures a user reads first (also stored as ``calibration_figures`` in meta.json). JSON-safe."""
    conformal = m["conformal"]
    test_sel = m["selective"]["test"]
    head = {
        "data": bundle.spec, "num_samples": cfg.num_samples,
        "calibration_images": m["setup"]["calibration_images"], "test_images": m["setup"]["test_images"],
        "accuracy": m["calibration"]["after"]["accuracy"], "temperature": fitted.temperature,
        "ece_before": m["calibration"]["before"]["ece"], "ece_after": m["calibration"]["after"]["ece"],
        "nll_before": m["calibration"]["before"]["nll"], "nll_after": m["calibration"]["after"]["nll"],
        "conformal_score": fitted.conformal_score,
        "coverage": {str(a): conformal[f"alpha={a:g}"]["coverage"] for a in cfg.alphas},
        "mean_set_size": {str(a): conformal[f"alpha={a:g}"]["mean_set_size"] for a in cfg.alphas},
        "bare_coverage": {str(a): conformal[f"alpha={a:g}"]["bare_coverage"] for a in cfg.alphas},
        "bare_mean_set_size": {str(a): conformal[f"alpha={a:g}"]["bare_mean_set_size"] for a in cfg.alphas},
        "empty_fraction": {str(a): conformal[f"alpha={a:g}"]["empty_fraction"] for a in cfg.alphas},
        "decision_score": fitted.decision_score, "decision_threshold": fitted.decision_threshold,
        "target_risk": fitted.target_risk, "selective_coverage": test_sel["coverage"],
        "selective_risk": test_sel["risk"],
    }
    for score in OOD_SCORES:
        head[f"ood_auroc_{score}"] = {s: m["ood"][f"{s}/{score}"]["auroc"] for s in OOD_SETS}
    head["rotation_accuracy"] = {f"{a:g}": acc for a, acc in zip(m["shift"]["angle"], m["shift"]["accuracy"])}
    head["ood_gate"] = None if fitted.ood_gate is None else fitted.ood_gate.summary()
    head["decisions"] = {name: {k: row[k] for k in ("accepted", "error_among_accepted", "review_out_of_distribution")}
                         for name, row in m["decisions_under_shift"].items()}
    if "decisions_under_shift_one_sample" in m:
        head["decisions_one_sample"] = {
            name: {k: row[k] for k in ("accepted", "error_among_accepted", "review_out_of_distribution")}
            for name, row in m["decisions_under_shift_one_sample"].items()}
    if "samples_comparison" in m:
        head["samples_comparison"] = m["samples_comparison"]
    head["count_rules"] = {str(n): r.to_dict() for n, r in sorted(fitted.count_rules.items())}
    head["seconds"] = m["setup"]["seconds"]
    return to_jsonable(head)


def selected_on_calibration_split(meta: Mapping[str, Any], spec: str) -> bool:
    """Whether `snodevit train` picked the saved epoch by accuracy on this data set's calibration split.

    It validates on the calibration split; with ``keep="best"`` (the only behaviour before ``keep`` was recorded)
    the saved weights are the ones that scored best there, which biases anything fitted on that split.
    """
    training = meta.get("training")
    if not isinstance(training, Mapping) or meta.get("data") != spec:
        return False
    return training.get("keep", "best") == "best"


REPORT_INTRO = (
    "This report checks whether the confidence of {model} can be acted on: accepted automatically when it is high, "
    "sent to a person when it is not. Everything was fitted on the {n_cal}-image calibration split of {data} and "
    "measured on its {n_test}-image test split, which the fit never saw; the model was not trained on either. Each "
    "image got S = {s} Monte Carlo samples (noise seeded per image, so rerunning gives the same numbers), and all "
    "probabilities are exactly what the service answers with the stored calibration. Read 'goals' first: the "
    "targets of the calibration work and whether this run met them. Then 'temperature' and 'calibration' (is a "
    "stated confidence honest?), 'conformal' (do the prediction sets contain the answer as often as promised? The "
    "promise is about the bare sets, which may be empty; the served sets always hold the top class, so they cover "
    "at least as often as the model is right), 'selective' (what share of images can be accepted at the target "
    "error rate?), and 'misclassification' (which uncertainty score best flags wrong answers?). 'shift' rotates "
    "the test digits to see how confidence degrades as inputs move away from the training data; 'domain_shift', "
    "when present, compares the test split with scikit-learn's digits, upsampled 8x8 scans from another source: "
    "the same classes drawn differently, so accuracy drops and the guarantees of the conformal sets and the accept "
    "rule no longer hold, which its bare coverage and risk rows show. 'ood' asks whether images that are not "
    "digits at all (uniform noise, crops of photographs) get higher uncertainty than real test images. 'setup' "
    "lists what was run. With a few hundred test images, differences below about one percentage point are within "
    "sampling noise (coverage carries its standard error).")


SELECTION_NOTE = (
    " One caveat applies to this model: `snodevit train` chose its best epoch by accuracy on this same calibration "
    "split, so the model looks a little better there than on unseen images (compare calibration_accuracy and "
    "test_accuracy under 'temperature'), and what is fitted there can be slightly too optimistic on the test split.")


def report_intro(result: CalibrationResult, model_name: str) -> str:
    """The report's opening paragraph for ``result`` (plain language; reads the figures, computes none)."""
    setup = result.metrics["setup"]
    text = REPORT_INTRO.format(model=model_name, n_cal=setup["calibration_images"], data=setup["data"],
                               n_test=setup["test_images"], s=setup["num_samples"])
    return text + (SELECTION_NOTE if setup["model_selected_on_calibration_split"] else "")
