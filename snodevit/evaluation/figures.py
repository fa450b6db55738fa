"""The calibration report's PNG figures. Every number a figure prints is read from the report sections, never
recomputed; the scores it plots come from the passes. matplotlib is imported where a figure is drawn, so the
pipeline runs (``figures=False``) without it.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

import calibration as cal

from snodevit.evaluation.config import OOD_SCORES, UNCERTAINTY_SCORES, CalibrateConfig
from snodevit.evaluation.goals import GOAL_FAR_OOD_REVIEW, GOAL_SHIFT_ERROR
from snodevit.evaluation.passes import Pass, Passes

_AXIS = {"max_probability": "1 - max probability", "entropy": "predictive entropy (nats)",
         "mutual_information": "mutual information (epistemic, nats)",
         "aleatoric": "expected entropy (aleatoric, nats)"}
LOG_FLOOR = 1e-8  # figures show log10(max(score, LOG_FLOOR)): a confident model's scores pile up near 0


def report_figures(passes: Passes, test_one: Pass, m: Mapping[str, Any], cfg: CalibrateConfig) -> dict[str, bytes]:
    """The report's PNGs, by name; every number they print is read from the metrics ``m``.

    Args:
        passes: every pass, scaled with the fitted temperature.
        test_one: the test split at T = 1.
        m: the report sections.
        cfg: the bins of the reliability diagram.
    """
    test = passes.test
    before, after, shift = m["calibration"]["before"], m["calibration"]["after"], m["shift"]
    panel_before, panel_after = "before scaling (T = 1)", f"after scaling (T = {m['temperature']['temperature']:.3f})"
    uncertainty = {name: test.uncertainty(name) for name in UNCERTAINTY_SCORES}
    out = {
        "calibration_reliability": cal.reliability_diagram(
            {panel_before: cal.reliability_bins(test_one.s.probs, test.labels, cfg.n_bins),
             panel_after: cal.reliability_bins(test.s.probs, test.labels, cfg.n_bins)},
            ece={panel_before: before["ece"], panel_after: after["ece"]}),
        "calibration_confidence_histogram": cal.confidence_histogram(
            {"before scaling": test_one.s.confidence, "after scaling": test.s.confidence},
            accuracy=after["accuracy"]),
        "selective_risk_coverage": cal.risk_coverage_plot(
            {name: cal.risk_coverage_curve(u, test.correct, higher_is_confident=False)
             for name, u in uncertainty.items()},
            aurc={name: row["aurc"] for name, row in m["misclassification"].items()}),
    }
    for name, u in uncertainty.items():  # log10: the ranking (and so AUROC) is that of the score itself
        out[f"misclassification_{name}"] = cal.uncertainty_histogram(_log10(u), test.correct,
                                                                     score_name=_log_label(name))
    out["shift_rotation"] = cal.shift_plot(shift["angle"], {
        "accuracy": shift["accuracy"], "ECE (after scaling)": shift["ece"],
        "ECE (before scaling)": shift["ece_before_scaling"], "mean confidence": shift["mean_confidence"],
        "accepted fraction": shift["accepted_fraction"]})
    scores = {"test": {s: uncertainty[s] for s in OOD_SCORES}}
    scores |= {name: {s: p.uncertainty(s) for s in OOD_SCORES} for name, p in passes.ood.items()}
    auroc = {name: {s: m["ood"][f"{name}/{s}"]["auroc"] for s in OOD_SCORES} for name in passes.ood}
    out["ood_scores"] = _ood_figure(scores, auroc)
    out |= decision_figures(m["decisions_under_shift"])
    return out


def decision_figures(rows: Mapping[str, Mapping[str, Any]]) -> dict[str, bytes]:
    """Accepted share and error among accepted against rotation angle; one bar per far-OOD and shifted set
    (values read from the ``decisions_under_shift`` rows).

    Returns:
        ``decisions_under_shift_rotation`` and ``decisions_under_shift_sets``, PNG bytes.
    """
    return {"decisions_under_shift_rotation": _rotation_decisions(rows),
            "decisions_under_shift_sets": _set_decisions(rows)}


def _rotation_decisions(rows: Mapping[str, Mapping[str, Any]]) -> bytes:
    """Accepted share, error among accepted, gate reviews and accuracy against the rotation angle."""
    from matplotlib.figure import Figure

    angles = [0.0] + [float(k.split()[1]) for k in rows if k.startswith("rotated ")]
    keys = ["test"] + [k for k in rows if k.startswith("rotated ")]
    fig = Figure(figsize=(6.4, 3.8))
    ax = fig.subplots()
    nan = float("nan")
    ax.plot(angles, [rows[k]["accepted"] for k in keys], "o-", color="#4c72b0", label="accepted")
    ax.plot(angles, [nan if rows[k]["error_among_accepted"] is None else rows[k]["error_among_accepted"]
                     for k in keys], "s-", color="#d62728", label="error among accepted")
    ax.plot(angles, [rows[k]["review_out_of_distribution"] for k in keys], "^--", color="#2ca02c",
            label="sent to review: out of distribution")
    ax.plot(angles, [rows[k]["accuracy"] for k in keys], ":", color="#7f7f7f", label="accuracy")
    ax.axhline(GOAL_SHIFT_ERROR, color="#d62728", lw=0.8, ls=":")
    ax.set_xlabel("rotation of the test digits (degrees)")
    ax.set_ylabel("share of images")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title("decisions under rotation", fontsize=10)
    ax.legend(fontsize=7)
    return _png(fig)


def _set_decisions(rows: Mapping[str, Mapping[str, Any]]) -> bytes:
    """Stacked review shares (gate, low confidence) of every set but the test split and its rotations."""
    from matplotlib.figure import Figure

    names = [k for k in rows if not k.startswith("rotated ") and k != "test"]
    fig = Figure(figsize=(max(6.4, 1.0 * len(names)), 3.8))
    ax = fig.subplots()
    x = list(range(len(names)))
    ood = [rows[k]["review_out_of_distribution"] for k in names]
    low = [rows[k]["review_low_confidence"] for k in names]
    ax.bar(x, ood, color="#2ca02c", label="review: out of distribution")
    ax.bar(x, low, bottom=ood, color="#ff7f0e", label="review: low confidence")
    for i, k in enumerate(names):
        err = rows[k]["error_among_accepted"]
        if err is not None and rows[k]["accepted"] > 0:
            ax.text(i, min(1.0, ood[i] + low[i]) + 0.02, f"err {err:.0%}", ha="center", fontsize=7)
    ax.axhline(GOAL_FAR_OOD_REVIEW, color="#444", lw=0.8, ls=":")
    ax.set_xticks(x, [k.replace("_", " ") for k in names], rotation=20, fontsize=8)
    ax.set_ylabel("share sent to review")
    ax.set_ylim(0, 1.3)
    ax.set_title("decisions on shifted and out-of-distribution sets (err: error among accepted)", fontsize=10)
    ax.legend(fontsize=7, loc="upper left", ncol=2)
    return _png(fig)


def _png(fig: Any) -> bytes:
    """The figure as PNG bytes, without a timestamp or software tag (so a rerun writes the same bytes)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight", metadata={"Software": None})
    return buf.getvalue()


def _log10(u: Tensor) -> Tensor:
    return u.double().clamp_min(LOG_FLOOR).log10()


def _log_label(score: str) -> str:
    return f"log10 {_AXIS[score]} (floored at {LOG_FLOOR:g})"


def _ood_figure(scores: Mapping[str, Mapping[str, Tensor]], auroc: Mapping[str, Mapping[str, float]]) -> bytes:
    """Density histograms of each OOD score (log10): the test split against each OOD set (AUROCs read, not recomputed).

    Args:
        scores: set name ("test" first, then the OOD sets) -> score name -> (N,) scores.
        auroc: OOD set name -> score name -> AUROC against the test split.
    """
    from matplotlib.figure import Figure

    names = list(next(iter(scores.values())))
    fig = Figure(figsize=(4.4 * len(names), 3.6))
    axes = fig.subplots(1, len(names), squeeze=False)[0]
    colors = ("#4c72b0", "#d62728", "#2ca02c", "#9467bd")
    for ax, score in zip(axes, names):
        values = {k: _log10(v[score]).cpu().numpy() for k, v in scores.items()}
        lo = min(float(v.min()) for v in values.values())
        hi = max(float(v.max()) for v in values.values())
        edges = torch.linspace(lo, hi if hi > lo else lo + 1e-9, 31).numpy()
        for color, (set_name, v) in zip(colors, values.items()):
            label = set_name if set_name not in auroc else f"{set_name} (AUROC {auroc[set_name][score]:.3f})"
            ax.hist(v, bins=edges, density=True, histtype="stepfilled", alpha=0.4, color=color, label=label)
        ax.set_xlabel(_log_label(score), fontsize=8)
        ax.set_ylabel("density")
        ax.set_title(f"{score.replace('_', ' ')}: test vs OOD", fontsize=10)
        ax.legend(fontsize=7)
    return _png(fig)
