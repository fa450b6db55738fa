"""Figures of the calibration report, drawn with matplotlib's Agg renderer and returned as PNG bytes.

Every function draws on its own ``matplotlib.figure.Figure`` (no pyplot, so no global state and no GUI backend),
returns the PNG bytes and, when ``path`` is given, also writes them there atomically. The figures show metric
results computed elsewhere (``calibration.calibration_error``, ``calibration.selective``); they never recompute a
metric.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Mapping, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch import Tensor

from .files import atomic_write_bytes
from ._validation import check_float_tensor, check_int_arg, check_scores, check_scores_correct
from .calibration_error import ReliabilityBins

__all__ = [
    "confidence_histogram",
    "reliability_diagram",
    "risk_coverage_plot",
    "shift_plot",
    "uncertainty_histogram",
]

DPI = 110
_COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f")

PathLike = str | os.PathLike[str]


def _finish(fig: Figure, path: PathLike | None) -> bytes:
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight", metadata={"Software": None})
    data = buf.getvalue()
    if path is not None:
        atomic_write_bytes(path, data)
    return data


def _check_nonempty_mapping(value: object, name: str) -> None:
    if not isinstance(value, Mapping) or not value:
        raise ValueError(f"`{name}` must be a non-empty mapping of name -> data, got {type(value).__name__}")


def _np(x: Tensor) -> np.ndarray:
    return x.detach().double().cpu().numpy()


def reliability_diagram(panels: Mapping[str, ReliabilityBins], *, ece: Mapping[str, float] | None = None,
                        path: PathLike | None = None) -> bytes:
    """Reliability diagrams side by side (e.g. before and after temperature scaling).

    Each panel draws the accuracy of every equal-width confidence bin as a bar, the diagonal of perfect
    calibration, the gap between a bin's mean confidence and its accuracy shaded in red (overconfidence above
    the bar, underconfidence inside it), and the number of samples above each bar. A bin of confidences equal to
    1.0 exactly (see :class:`~calibration.calibration_error.ReliabilityBins`) is drawn as a marker at confidence 1.

    Args:
        panels: panel title -> bins from :func:`calibration.calibration_error.reliability_bins`, in display order.
        ece: optional panel title -> ECE to print in the panel title (computed by :mod:`calibration.calibration_error`).
        path: also write the PNG here.

    Returns:
        PNG bytes.

    Raises:
        ValueError: when ``panels`` is empty or holds something else than ``ReliabilityBins``.
    """
    _check_nonempty_mapping(panels, "panels")
    for name, bins in panels.items():
        if not isinstance(bins, ReliabilityBins):
            raise ValueError(f"`panels[{name!r}]` must be a ReliabilityBins, got {type(bins).__name__}")
    fig = Figure(figsize=(4.6 * len(panels), 4.6))
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (title, bins) in zip(axes, panels.items()):
        edges = _np(bins.edges)
        m = bins.n_bins
        width = edges[1:] - edges[:-1]
        count = bins.count.cpu().numpy()
        acc, conf = _np(bins.accuracy), _np(bins.confidence)
        full = count[:m] > 0
        ax.bar(edges[:m][full], acc[:m][full], width=width[full], align="edge", color="#4c72b0", edgecolor="white",
               label="accuracy")
        lo, hi = np.minimum(acc[:m], conf[:m]), np.maximum(acc[:m], conf[:m])
        ax.bar(edges[:m][full], (hi - lo)[full], bottom=lo[full], width=width[full], align="edge",
               color="#d62728", alpha=0.35, hatch="//", edgecolor="#d62728", linewidth=0.0,
               label="gap to confidence")
        ax.plot([0, 1], [0, 1], ls="--", color="gray", lw=1, label="perfect calibration")
        for i in np.flatnonzero(full):
            ax.text(edges[i] + width[i] / 2, max(acc[i], conf[i]) + 0.01, f"{count[i]}", ha="center", va="bottom",
                    fontsize=6 if m > 10 else 8, rotation=90 if m > 10 else 0)
        if count[m] > 0:
            ax.plot([1.0], [acc[m]], marker="D", color="black", ms=5, ls="none",
                    label=f"confidence = 1 (n={count[m]})")
        ax.set_xlim(0, 1.02)
        ax.set_ylim(0, 1.12)
        ax.set_xlabel("confidence (top-class probability)")
        ax.set_ylabel("accuracy")
        suffix = f"  ECE {ece[title]:.4f}" if ece is not None and title in ece else ""
        ax.set_title(f"{title}{suffix}", fontsize=10)
        ax.legend(loc="lower right", fontsize=7, framealpha=0.9)
    return _finish(fig, path)


def confidence_histogram(confidences: Mapping[str, Tensor], n_bins: int = 20, *,
                         accuracy: float | None = None, path: PathLike | None = None) -> bytes:
    """Histogram of top-class confidence, one outline per entry (e.g. before and after scaling).

    Args:
        confidences: name -> (N,) confidences in [0, 1].
        n_bins: number of equal-width bins over [0, 1], >= 1.
        accuracy: optional accuracy to mark with a vertical line (a calibrated model's mean confidence is near it).
        path: also write the PNG here.

    Returns:
        PNG bytes.

    Raises:
        ValueError: on a bad ``n_bins`` or invalid tensors.
    """
    check_int_arg(n_bins, "n_bins", 1)
    _check_nonempty_mapping(confidences, "confidences")
    for name, c in confidences.items():
        check_scores(c, f"confidences[{name!r}]")
    fig = Figure(figsize=(5.5, 3.8))
    ax = fig.subplots()
    edges = np.linspace(0, 1, n_bins + 1)
    for color, (name, c) in zip(_COLORS * 4, confidences.items()):
        x = _np(c)
        ax.hist(x, bins=edges, histtype="step", lw=1.8, color=color, label=f"{name} (mean {x.mean():.3f})")
    if accuracy is not None:
        ax.axvline(accuracy, color="black", ls="--", lw=1, label=f"accuracy {accuracy:.3f}")
    ax.set_xlabel("confidence (top-class probability)")
    ax.set_ylabel("number of samples")
    ax.set_title("confidence histogram", fontsize=10)
    ax.legend(fontsize=7, loc="upper left")
    return _finish(fig, path)


def risk_coverage_plot(curves: Mapping[str, tuple[Tensor, Tensor]], *, aurc: Mapping[str, float] | None = None,
                       path: PathLike | None = None) -> bytes:
    """Risk-coverage curves of one or several scores (from :func:`calibration.selective.risk_coverage_curve`).

    Args:
        curves: method name -> ``(coverage, risk)`` pair of (N,) tensors.
        aurc: optional method name -> AURC, shown in the legend.
        path: also write the PNG here.

    Returns:
        PNG bytes.

    Raises:
        ValueError: on an empty mapping or mismatched curve tensors.
    """
    _check_nonempty_mapping(curves, "curves")
    fig = Figure(figsize=(5.5, 3.8))
    ax = fig.subplots()
    for color, (name, pair) in zip(_COLORS * 4, curves.items()):
        if not isinstance(pair, tuple) or len(pair) != 2:
            raise ValueError(f"`curves[{name!r}]` must be a (coverage, risk) tuple, got {type(pair).__name__}")
        cov, risk = pair
        check_float_tensor(cov, f"curves[{name!r}] coverage", 1, "(N,)")
        check_float_tensor(risk, f"curves[{name!r}] risk", 1, "(N,)")
        if cov.shape != risk.shape:
            raise ValueError(f"`curves[{name!r}]` coverage and risk must have the same shape, got "
                             f"{tuple(cov.shape)} and {tuple(risk.shape)}")
        label = f"{name} (AURC {aurc[name]:.4f})" if aurc is not None and name in aurc else name
        ax.plot(_np(cov), _np(risk), color=color, lw=1.6, label=label)
    ax.set_xlim(0, 1)
    ax.set_ylim(bottom=0)
    ax.set_xlabel("coverage (fraction of predictions accepted)")
    ax.set_ylabel("risk (error rate among accepted)")
    ax.set_title("risk-coverage", fontsize=10)
    ax.legend(fontsize=7, loc="upper left")
    return _finish(fig, path)


def uncertainty_histogram(scores: Tensor, correct: Tensor, score_name: str = "entropy", n_bins: int = 30, *,
                          path: PathLike | None = None) -> bytes:
    """Density histograms of an uncertainty score for right and wrong predictions.

    A useful score puts the wrong predictions (red) to the right of the right ones (blue).

    Args:
        scores: (N,) uncertainty scores.
        correct: (N,) bool, True where the prediction was right.
        score_name: axis label, e.g. ``"mutual information (nats)"``.
        n_bins: number of equal-width bins over the score range, >= 1.
        path: also write the PNG here.

    Returns:
        PNG bytes.

    Raises:
        ValueError: on a bad ``n_bins`` or invalid tensors.
    """
    check_int_arg(n_bins, "n_bins", 1)
    check_scores_correct(scores, correct)
    x, ok = _np(scores), correct.bool().cpu().numpy()
    lo, hi = float(x.min()), float(x.max())
    edges = np.linspace(lo, hi if hi > lo else lo + 1e-9, n_bins + 1)
    fig = Figure(figsize=(5.5, 3.8))
    ax = fig.subplots()
    for mask, color, label in ((ok, "#4c72b0", "right"), (~ok, "#d62728", "wrong")):
        if mask.any():
            ax.hist(x[mask], bins=edges, density=True, alpha=0.5, color=color, label=f"{label} (n={int(mask.sum())})")
    ax.set_xlabel(score_name)
    ax.set_ylabel("density")
    ax.set_title(f"{score_name}: right vs wrong predictions", fontsize=10)
    ax.legend(fontsize=7)
    return _finish(fig, path)


def shift_plot(angles: Sequence[float], metrics: Mapping[str, Sequence[float]], *,
               xlabel: str = "rotation angle (degrees)", path: PathLike | None = None) -> bytes:
    """Metrics (e.g. accuracy and ECE) against the strength of a distribution shift such as rotation.

    Args:
        angles: the K shift levels (e.g. rotation angles in degrees).
        metrics: metric name -> K values, one per level (NaN allowed: drawn as a gap).
        xlabel: the x-axis label.
        path: also write the PNG here.

    Returns:
        PNG bytes.

    Raises:
        ValueError: on an empty input or a metric whose length is not K.
    """
    x = [float(a) for a in angles]
    if not x or not all(math.isfinite(a) for a in x):
        raise ValueError(f"`angles` must be a non-empty sequence of finite numbers, got {list(angles)!r}")
    _check_nonempty_mapping(metrics, "metrics")
    for name, values in metrics.items():
        if len(values) != len(x):
            raise ValueError(f"`metrics[{name!r}]` must have {len(x)} values (one per angle), got {len(values)}")
    fig = Figure(figsize=(5.5, 3.8))
    ax = fig.subplots()
    for color, (name, values) in zip(_COLORS * 4, metrics.items()):
        ax.plot(x, [float(v) for v in values], marker="o", color=color, lw=1.6, label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("value")
    ax.set_title("metrics under shift", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _finish(fig, path)
