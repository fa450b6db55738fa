"""The tables, goals and plot of ``benchmarks/memory.py`` (issue 22's goals, read from the measured rows)."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

#: Goals of issue 22.
GOAL_MEMORY_RATIO = 0.35  # reversible peak at depth 24 <= 0.35 x standard (and below checkpoint)
GOAL_TIME_RATIO = 1.6  # reversible time per step <= 1.6 x standard
GOAL_DEPTH = 24


def _find(rows: list[dict[str, Any]], size: int, depth: int, mode: str) -> dict[str, Any] | None:
    hits = [r for r in rows if r["size"] == size and r["depth"] == depth and r["mode"] == mode]
    return hits[0] if hits else None


def memory_table(rows: list[dict[str, Any]]) -> list[str]:
    """Markdown: one line per (size, depth, mode) with the peak and the time, and both as ratios to standard."""
    lines = ["| image | tokens | batch | depth | mode | peak memory (MiB) | vs standard | time / step (ms) "
             "| vs standard |", "|---:|---:|---:|---:|---|---:|---:|---:|---:|"]
    for r in rows:
        std = _find(rows, r["size"], r["depth"], "standard")
        mem = f"{r['peak_mib'] / std['peak_mib']:.3f}×" if std else "–"
        tim = f"{r['step_s'] / std['step_s']:.2f}×" if std else "–"
        lines.append(f"| {r['size']} px | {r['tokens']} | {r['batch']} | {r['depth']} | {r['mode']} | "
                     f"{r['peak_mib']:.1f} | {mem} | {1000 * r['step_s']:.0f} | {tim} |")
    return lines


def slope_table(rows: list[dict[str, Any]]) -> list[str]:
    """Markdown: the memory each added block costs (least squares over the depths) and what is left at depth 0."""
    lines = ["| image | mode | MiB per added block | MiB at depth 0 (stem, head, one block's backward) |",
             "|---:|---|---:|---:|"]
    for size in sorted({r["size"] for r in rows}):
        for mode in ("standard", "checkpoint", "reversible"):
            pts = [(r["depth"], r["peak_mib"]) for r in rows if r["size"] == size and r["mode"] == mode]
            if len(pts) < 2:
                continue
            slope, intercept = statistics.linear_regression([p[0] for p in pts], [p[1] for p in pts])
            lines.append(f"| {size} px | {mode} | {slope:.3f} | {intercept:.1f} |")
    return lines


def goal_lines(rows: list[dict[str, Any]]) -> list[str]:
    """Each goal of the issue, per image size, met or not, with the figures."""
    out = []
    for size in sorted({r["size"] for r in rows}):
        std, ckpt, rev = (_find(rows, size, GOAL_DEPTH, m) for m in ("standard", "checkpoint", "reversible"))
        if not (std and ckpt and rev):
            continue
        ratio = rev["peak_mib"] / std["peak_mib"]
        ok_mem = ratio <= GOAL_MEMORY_RATIO and rev["peak_mib"] < ckpt["peak_mib"]
        out.append(f"- {size} px, depth {GOAL_DEPTH}: reversible peak {rev['peak_mib']:.1f} MiB = {ratio:.3f}× "
                   f"standard ({std['peak_mib']:.1f}), checkpoint {ckpt['peak_mib']:.1f} MiB: "
                   f"**{'met' if ok_mem else 'not met'}** (goal ≤ {GOAL_MEMORY_RATIO}× and below checkpoint).")
    for size in sorted({r["size"] for r in rows}):
        for depth in sorted({r["depth"] for r in rows if r["size"] == size}):
            std, rev = _find(rows, size, depth, "standard"), _find(rows, size, depth, "reversible")
            if std and rev:
                t = rev["step_s"] / std["step_s"]
                out.append(f"- {size} px, depth {depth}: reversible time per step {t:.2f}× standard: "
                           f"**{'met' if t <= GOAL_TIME_RATIO else 'not met'}** (goal ≤ {GOAL_TIME_RATIO}×).")
    return out


def accuracy_table(rows: list[dict[str, Any]]) -> list[str]:
    """Markdown: test accuracy per seed and mode, then the mean and standard deviation of each mode."""
    modes = list(dict.fromkeys(r["mode"] for r in rows))
    seeds = sorted({r["seed"] for r in rows})
    lines = ["| seed | " + " | ".join(f"{m}: test acc. | {m}: train s" for m in modes) + " |",
             "|---:|" + "---:|---:|" * len(modes)]
    for seed in seeds:
        cells = []
        for m in modes:
            hit = [r for r in rows if r["seed"] == seed and r["mode"] == m]
            cells += [f"{100 * hit[0]['test_accuracy']:.1f} %", f"{hit[0]['train_seconds']:.0f}"] if hit else ["–", "–"]
        lines.append(f"| {seed} | " + " | ".join(cells) + " |")
    means = []
    for m in modes:
        accs = [100 * r["test_accuracy"] for r in rows if r["mode"] == m]
        sd = statistics.stdev(accs) if len(accs) > 1 else 0.0
        secs = statistics.mean(r["train_seconds"] for r in rows if r["mode"] == m)
        means += [f"**{statistics.mean(accs):.2f} ± {sd:.2f} %**", f"{secs:.0f}"]
    lines.append("| mean ± sd | " + " | ".join(means) + " |")
    return lines


def memory_figure(rows: list[dict[str, Any]], path: Path) -> None:
    """Peak memory (top) and time per step (bottom) against depth, one column per image size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = sorted({r["size"] for r in rows})
    fig, axes = plt.subplots(2, len(sizes), figsize=(5.2 * len(sizes), 7.2), squeeze=False)
    for col, size in enumerate(sizes):
        for mode, marker in (("standard", "o"), ("checkpoint", "s"), ("reversible", "^")):
            pts = sorted((r["depth"], r["peak_mib"], 1000 * r["step_s"]) for r in rows
                         if r["size"] == size and r["mode"] == mode)
            if not pts:
                continue
            depths = [p[0] for p in pts]
            axes[0][col].plot(depths, [p[1] for p in pts], marker=marker, label=mode)
            axes[1][col].plot(depths, [p[2] for p in pts], marker=marker, label=mode)
        batch = next(r["batch"] for r in rows if r["size"] == size)
        axes[0][col].set_title(f"{size} px, batch {batch}: peak training memory")
        axes[0][col].set_ylabel("MiB above weights + gradients")
        axes[1][col].set_title(f"{size} px: time per training step")
        axes[1][col].set_ylabel("ms (median)")
        for ax in (axes[0][col], axes[1][col]):
            ax.set_xlabel("depth (blocks)")
            ax.set_xticks(sorted({r["depth"] for r in rows}))
            ax.grid(alpha=0.3)
            ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
