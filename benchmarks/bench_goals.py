"""Section 5 of ``benchmarks/bench.py``: the issue's goals against the measured figures, one function per section
whose figures they read."""

from __future__ import annotations

import math
from typing import Any


def _finite(x: float) -> float | None:
    return x if isinstance(x, (int, float)) and math.isfinite(x) else None


def _cell(rows: list[dict], variant: str, device: str, method: str, b: int, s: int) -> dict | None:
    for r in rows:
        if (r["variant"], r["device"], r["method"], r["batch_size"], r["num_samples"]) == (variant, device, method,
                                                                                          b, s):
            return r
    return None


def _goal(goal: str, target: str, value: float | None, met: bool | None, detail: str) -> dict[str, Any]:
    return {"goal": goal, "target": target, "measured": _finite(value) if value is not None else None, "met": met,
            "detail": detail}


def goals(result: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's goals against this run's figures (met: None when the figure was not measured)."""
    rows = result["model_path"]["cpu"]
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    native = (result.get("precision") or {}).get("native_bf16")
    return (_folded_goals(rows, variants) + _ceiling_goals(rows, variants, result["ceiling"]["cpu"]["gflops"])
            + _onnx_goals(rows, variants) + _bf16_speed_goals(rows, variants, native)
            + _precision_goals(result.get("precision") or {})
            + _int8_goals((result.get("ort_options") or {}).get("int8_decisions") or {})
            + _mc_goals(result.get("mc_speed") or {}) + _service_goals(result.get("service") or {})
            + _adaptive_goals(result.get("adaptive") or {}))


def _folded_goals(rows: list[dict], variants: list[str]) -> list[dict[str, Any]]:
    out = []
    b1_s8 = [(v, _cell(rows, v, "cpu", "loop", 1, 8), _cell(rows, v, "cpu", "folded", 1, 8)) for v in variants]
    for v, loop, fold in b1_s8:
        if loop and fold:
            r = loop["ms"] / fold["ms"]
            out.append(_goal(f"folded vs loop at S=8, B=1 ({v})", ">= 3x", r, r >= 3,
                             f"{loop['ms']:.1f} ms -> {fold['ms']:.1f} ms"))
    return out


def _ceiling_goals(rows: list[dict], variants: list[str], ceiling_gflops: float) -> list[dict[str, Any]]:
    out = []
    big = [r for r in rows if r["batch_size"] * r["num_samples"] >= 256 and r["method"] != "loop"]
    for v in variants:
        cand = [r for r in big if r["variant"] == v]
        if cand:
            best = max(cand, key=lambda r: r["ceiling_fraction"])
            out.append(_goal(f"share of the fp32 GEMM ceiling at B*S >= 256 ({v})", ">= 60 %",
                             100 * best["ceiling_fraction"], best["ceiling_fraction"] >= 0.6,
                             f"best: {best['method']} at B={best['batch_size']}, S={best['num_samples']}, "
                             f"{best['gflops']:.1f} of {ceiling_gflops:.1f} GFLOP/s"))
    return out


def _onnx_goals(rows: list[dict], variants: list[str]) -> list[dict[str, Any]]:
    out = []
    for v in variants:
        pairs = [(_cell(rows, v, "cpu", "folded", 1, s), _cell(rows, v, "cpu", "onnx", 1, s))
                 for s in sorted({r["num_samples"] for r in rows})]
        pairs = [(t, o) for t, o in pairs if t and o]
        if pairs:
            ratios = [t["ms"] / o["ms"] for t, o in pairs]
            worst = min(ratios)
            out.append(_goal(f"ONNX Runtime vs torch eager (folded) at B=1 ({v})", ">= 1.5x", worst, worst >= 1.5,
                             "S=" + ", ".join(f"{t['num_samples']}: {r:.2f}x" for (t, _), r in zip(pairs, ratios))
                             + " (worst)"))
    return out


def _bf16_speed_goals(rows: list[dict], variants: list[str], native: bool | None) -> list[dict[str, Any]]:
    out = []
    why = "" if native is None else (" (this CPU multiplies bf16 natively)" if native else
                                     " (this CPU has no native bf16: oneDNN emulates it, so bf16 cannot win here)")
    for v in variants:
        pairs = [(r, _cell(rows, v, "cpu", "folded_bf16", r["batch_size"], r["num_samples"])) for r in rows
                 if r["variant"] == v and r["method"] == "folded" and r["batch_size"] * r["num_samples"] >= 256]
        pairs = [(f, b) for f, b in pairs if b]
        if pairs:
            f, b = max(pairs, key=lambda p: p[0]["ms"] / p[1]["ms"])
            r = f["ms"] / b["ms"]
            out.append(_goal(f"bf16 vs fp32 in-process at B*S >= 256 ({v})", ">= 1.5x", r, r >= 1.5,
                             f"best: B={f['batch_size']}, S={f['num_samples']}: {f['ms']:.1f} -> {b['ms']:.1f} "
                             f"ms{why}"))
    return out


def _precision_goals(pr: dict[str, Any]) -> list[dict[str, Any]]:
    if "same_decisions" not in pr:
        return []
    return [_goal("bf16: decisions unchanged on test images", ">= 99.5 %", 100 * pr["same_decisions"],
                  pr["same_decisions"] >= 0.995, f"{pr['changed']} of {pr['images']} differ (labels "
                  f"{pr['changed_labels']}, accept/review {pr['changed_accept']}, gate {pr['changed_ood_flags']}); "
                  f"S={pr['num_samples']}"),
            _goal("bf16: largest probability difference", "<= 1e-2", pr["max_prob_diff"],
                  pr["max_prob_diff"] <= 1e-2, f"{pr['max_prob_diff']:.2e}; {pr['model']}, {pr['images']} test images")]


def _int8_goals(q: dict[str, Any]) -> list[dict[str, Any]]:
    if "same_decisions" not in q:
        return []
    return [_goal("ONNX Runtime int8 MatMuls: decisions unchanged on test images", ">= 99.5 %",
                  100 * q["same_decisions"], q["same_decisions"] >= 0.995,
                  f"{q['changed']} of {q['images']} differ; largest probability difference {q['max_prob_diff']:.2e}")]


def _mc_goals(mc_speed: dict[str, Any]) -> list[dict[str, Any]]:
    mc = mc_speed.get("servers") or {}
    if "every" not in mc or "last" not in mc:
        return []
    top = max(lv[1] for lv in mc_speed["levels"])
    s_top = max(lv[0] for lv in mc_speed["levels"])

    def rate(key: str) -> float:
        return next(r["requests_per_s"] for r in mc[key]["rows"]
                    if r["concurrency"] == top and r["num_samples"] == s_top)
    r = rate("last") / rate("every")
    return [_goal(f"served images/s at S={s_top}, concurrency {top}: last block vs every block (fp32)", ">= 4x", r,
                  r >= 4, f"{rate('last'):.1f} vs {rate('every'):.1f} images/s ({mc_speed['model']})")]


def _service_goals(svc: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for mode, key, name in (("on", "in_process", "torch"), ("onnx", "in_process_onnx", "ONNX Runtime")):
        if mode not in svc.get("http", {}) or key not in svc:
            continue
        http = {r["concurrency"]: r for r in svc["http"][mode]["rows"]}
        inproc = {r["concurrency"]: r for r in svc[key]["closed_loop"]}
        top = max(http)
        ratio = http[top]["requests_per_s"] / inproc[top]["requests_per_s"]
        out.append(_goal(f"HTTP vs in-process throughput at concurrency {top} ({name})", ">= 85 %", 100 * ratio,
                         ratio >= 0.85, f"{http[top]['requests_per_s']:.1f} vs {inproc[top]['requests_per_s']:.1f} "
                         f"images/s (S={svc['num_samples']}, mean batch {http[top]['mean_batch_size']:.1f} vs "
                         f"{inproc[top]['mean_batch_size']:.1f})"))
        paired = svc.get("paired_c1") if mode == "on" else None
        if paired:
            gap = paired["gap_p99_ms"]
            detail = (f"{paired['http']['p99_ms']:.1f} vs {paired['in_process']['p99_ms']:.1f} ms over "
                      f"{paired['rounds']} alternating rounds of {paired['requests_per_round']} requests; per-round "
                      f"gaps {min(paired['round_gaps_p99_ms']):+.1f} to {max(paired['round_gaps_p99_ms']):+.1f} ms")
        else:
            gap = http[1]["p99_ms"] - inproc[1]["p99_ms"]
            detail = (f"{http[1]['p99_ms']:.1f} vs {inproc[1]['p99_ms']:.1f} ms (one level of "
                      f"{http[1]['requests']} requests each, not alternated)")
        out.append(_goal(f"p99 at concurrency 1, HTTP minus in-process ({name})", "<= 10 ms", gap, gap <= 10, detail))
    return out


def _adaptive_goals(ad: dict[str, Any]) -> list[dict[str, Any]]:
    if "mean_samples" not in ad:
        return []
    return [_goal("adaptive sampling: fewer passes than S=32", ">= 2x", ad["pass_reduction"],
                  ad["pass_reduction"] >= 2, f"mean {ad['mean_samples']:.2f} samples per image over {ad['images']} "
                  "images"),
            _goal("adaptive sampling: decisions that differ from S=32", "<= 0.5 %", 100 * ad["changed_rate"],
                  ad["changed_rate"] <= 0.005, f"{ad['changed_labels']} labels, {ad['changed_decisions']} "
                  f"accept/review of {ad['images']}")]
