"""Accuracy per backend row, the seed noise it is read against, and the headline that ranks both."""

from __future__ import annotations

import math
import statistics
from typing import Any

from attention_plan import BACKENDS, Plan


def summarize_accuracy(results: list[dict[str, Any]], aliases: dict[str, str]) -> dict[str, dict[str, Any]]:
    """Per backend row: mean and per-seed figures of the model standing for it."""
    rows = {}
    for name, _ in BACKENDS:
        runs = [r for r in results if r["model"] == aliases[name]]
        row: dict[str, Any] = {"same_model_as": None if aliases[name] == name else aliases[name],
                               "seeds": [r["seed"] for r in runs], "reused_checkpoints": all(r["reused"] for r in runs)}
        for k in ("accuracy", "nll", "ece", "brier", "train_seconds"):
            vals = [float(r[k]) for r in runs]
            row[k] = statistics.fmean(vals)
            row[f"{k}_per_seed"] = vals
        rows[name] = row
    return rows


def seed_noise(results: list[dict[str, Any]], n_seeds: int, test_images: int, mean_acc: float) -> dict[str, Any]:
    """Standard deviation of one run's test accuracy between seeds, pooled over models (or the binomial bound)."""
    if n_seeds >= 2:
        variances = []
        for model in sorted({r["model"] for r in results}):
            variances.append(statistics.variance([r["accuracy"] for r in results if r["model"] == model]))
        sd = math.sqrt(statistics.fmean(variances))
        kind = f"pooled std of test accuracy between {n_seeds} seeds over {len(variances)} models"
    else:
        sd = math.sqrt(max(mean_acc * (1 - mean_acc), 1e-12) / test_images)
        kind = f"binomial standard error of accuracy on {test_images} test images (no seed repeats)"
    # Two backends' means over n_seeds runs differ by noise alone with std sd * sqrt(2 / n_seeds).
    return {"sd": sd, "kind": kind, "threshold": 2 * sd * math.sqrt(2 / max(n_seeds, 1))}


def headline(acc: dict[str, dict[str, Any]], cost: list[dict[str, Any]], noise: dict[str, Any], plan: Plan) -> str:
    """The report's headline: latency and FLOPs at the most tokens, then accuracy, NLL and ECE against the noise."""
    n_max = max(r["patch_tokens"] for r in cost)
    top = {r["backend"]: r for r in cost if r["patch_tokens"] == n_max}
    by_time = sorted(top.values(), key=lambda r: r["latency_ms"])
    fast, slow, soft = by_time[0], by_time[-1], top["softmax"]
    by_flops = sorted(top.values(), key=lambda r: r["flops"])
    n_min = min(r["patch_tokens"] for r in cost)
    low = {r["backend"]: r for r in cost if r["patch_tokens"] == n_min}
    growth = {b: top[b]["latency_ms"] / low[b]["latency_ms"] for b in top}
    parts = [
        f"At {n_max} patch tokens the fastest backend on the CPU is **{fast['backend']}** "
        f"({fast['latency_ms']:.1f} ms for one image with S={plan.num_samples} samples), "
        + (f"{soft['latency_ms'] / fast['latency_ms']:.2f}x faster than fused softmax ({soft['latency_ms']:.1f} ms); "
           if fast["backend"] != "softmax" else "ahead of every efficient backend; ")
        + f"the slowest is {slow['backend']} ({slow['latency_ms']:.1f} ms). "
        f"Going from {n_min} to {n_max} tokens ({n_max / n_min:.0f}x) multiplies latency by "
        f"{min(growth.values()):.1f}x ({min(growth, key=growth.get)}) to {max(growth.values()):.1f}x "
        f"({max(growth, key=growth.get)}). Counted FLOPs at {n_max} tokens range from "
        f"{by_flops[0]['flops'] / 1e9:.3g} G ({by_flops[0]['backend']}) to {by_flops[-1]['flops'] / 1e9:.3g} G "
        f"({by_flops[-1]['backend']})."
    ]
    # A row that is another row's model (ksvd-adaptive at 49 tokens) would only repeat it.
    distinct = {n: r for n, r in acc.items() if r["same_model_as"] is None}
    ranked = sorted(distinct.items(), key=lambda kv: -kv[1]["accuracy"])
    best_name, best = ranked[0]
    worst_name, worst = ranked[-1]
    thr = noise["threshold"]
    below = [n for n, r in ranked if best["accuracy"] - r["accuracy"] > thr]
    seeds = len(plan.seeds)
    parts.append(
        f" On mnist5k after {plan.epochs} epoch(s) ({'mean of ' + str(seeds) + ' seeds' if seeds > 1 else 'one seed'}), "
        f"test accuracy goes from {100 * worst['accuracy']:.1f} % ({worst_name}) to {100 * best['accuracy']:.1f} % "
        f"({best_name}), a spread of {100 * (best['accuracy'] - worst['accuracy']):.1f} points against a noise level "
        f"of {100 * noise['sd']:.2f} points per run ({noise['kind']}); a difference of two such means must exceed "
        f"about {100 * thr:.1f} points to stand out of the noise. "
        + (f"Only {', '.join(below)} fall{'s' if len(below) == 1 else ''} behind {best_name} by more than that."
           if below else "No backend is behind the best by more than that: at this budget their accuracies are "
                         "indistinguishable.")
    )
    nll = sorted(distinct.items(), key=lambda kv: kv[1]["nll"])
    ece = sorted(distinct.items(), key=lambda kv: kv[1]["ece"])
    parts.append(f" NLL ranges from {nll[0][1]['nll']:.3f} ({nll[0][0]}) to {nll[-1][1]['nll']:.3f} ({nll[-1][0]}), "
                 f"ECE from {100 * ece[0][1]['ece']:.2f} % ({ece[0][0]}) to {100 * ece[-1][1]['ece']:.2f} % "
                 f"({ece[-1][0]}).")
    return "".join(parts)
