"""Figures of ``benchmarks/uncertainty.py`` (PNG bytes): ECE and accuracy against the rotation angle,
accuracy-rejection curves, and cost against NLL."""

from __future__ import annotations

import io
from typing import Any, Sequence

import numpy as np

from uncertainty_plan import REJECTION_GRID

_COLORS = ("#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860", "#da8bc3", "#8c8c8c", "#ccb974")


def _png(fig: Any) -> bytes:
    """The figure as PNG bytes, without the software stamp (so a rerun writes the same bytes)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight", metadata={"Software": None})
    return buf.getvalue()


def figure_rotation(summary: dict[str, Any], angles: Sequence[float]) -> bytes:
    """ECE and accuracy of every method against the rotation angle (mean ± std over seeds)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 3.8))
    axes = fig.subplots(1, 2)
    for color, (name, s) in zip(_COLORS, summary.items()):
        for ax, metric in zip(axes, ("ece", "accuracy")):
            mean = np.array([s[f"rotation.{a:g}.{metric}"]["mean"] for a in angles]) * 100
            std = np.array([s[f"rotation.{a:g}.{metric}"]["std"] for a in angles]) * 100
            ax.plot(angles, mean, marker="o", ms=3, color=color, lw=1.5, label=name)
            ax.fill_between(angles, mean - std, mean + std, color=color, alpha=0.15, lw=0)
    for ax, title in zip(axes, ("ECE % (after temperature scaling)", "accuracy %")):
        ax.set_xlabel("rotation angle (degrees)")
        ax.set_title(f"rotated test digits: {title}", fontsize=10)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7)
    return _png(fig)


def figure_rejection(summary: dict[str, Any]) -> bytes:
    """Accuracy-rejection curves of every method (mean over seeds)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.8, 3.8))
    ax = fig.subplots()
    grid = np.array(REJECTION_GRID) * 100
    for color, (name, s) in zip(_COLORS, summary.items()):
        ax.plot(grid, np.array(s["rejection_accuracy"]["mean"]) * 100, marker="o", ms=3, color=color, lw=1.5,
                label=name)
    ax.set_xlabel("rejected test images, least confident first (%)")
    ax.set_ylabel("accuracy on the accepted images (%)")
    ax.set_title("accuracy-rejection curves (mean over seeds)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _png(fig)


def figure_cost(summary: dict[str, Any], cost: dict[str, Any], batch: int) -> bytes:
    """Test NLL and mean rotated NLL of every method against its CPU milliseconds per image."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 3.8))
    axes = fig.subplots(1, 2)
    for ax, key, title in zip(axes, ("test.nll", "rotation_mean.nll"), ("test NLL", "mean NLL over rotations")):
        for color, (name, s) in zip(_COLORS, summary.items()):
            x = cost[name]["cpu_ms_per_image"]
            ax.errorbar([x], [s[key]["mean"]], yerr=[s[key]["std"]], fmt="o", color=color, capsize=3, label=name)
            ax.annotate(name, (x, s[key]["mean"]), textcoords="offset points", xytext=(5, 4), fontsize=7)
        ax.set_xscale("log")
        ax.set_xlabel(f"CPU ms per image (predict, batch {batch}, all samples)")
        ax.set_title(f"cost vs {title}", fontsize=10)
        ax.grid(alpha=0.3, which="both")
    axes[0].legend(fontsize=7)
    return _png(fig)


def figures(summary: dict[str, Any], cost: dict[str, Any], angles: Sequence[float], batch: int) -> dict[str, bytes]:
    """Every figure by file name."""
    return {"uncertainty-rotation.png": figure_rotation(summary, angles),
            "uncertainty-rejection.png": figure_rejection(summary),
            "uncertainty-cost.png": figure_cost(summary, cost, batch)}
