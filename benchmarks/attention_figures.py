"""The figures of benchmarks/attention_comparison.py: attention rollout per backend, cost against token count."""

from __future__ import annotations

import io
from typing import Any

from attention_plan import BACKENDS, DATA, MAP_IMAGE_INDEX, Plan, plan_tokens


def attention_figure(plan: Plan, results: list[dict[str, Any]], aliases: dict[str, str]) -> tuple[bytes, dict]:
    """One row: the input image, then each backend's attention rollout (class token -> patches) for it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from snodevit import load_model, predict
    from snodevit.data.sets import load_dataset

    bundle = load_dataset(DATA)
    image, label = bundle.test[MAP_IMAGE_INDEX]
    raw = bundle.raw("test")[0][MAP_IMAGE_INDEX, 0]  # (28, 28) uint8
    dirs = {r["model"]: r["dir"] for r in results if r["seed"] == plan.seeds[0]}
    fig, axes = plt.subplots(1, len(BACKENDS) + 1, figsize=(1.9 * (len(BACKENDS) + 1), 2.3))
    axes[0].imshow(raw.numpy(), cmap="gray")
    axes[0].set_title(f"input (label {bundle.class_names[label]})", fontsize=8)
    info = {}
    for ax, (name, _) in zip(axes[1:], BACKENDS):
        model, _ = load_model(dirs[aliases[name]])
        pred = predict(model, image[None], num_samples=plan.num_samples, seed=0, attention=True, pool=model.cfg.pool)
        roll = pred.rollout[0]  # (g, g), sums to 1
        k = int(pred.summary.prediction[0])
        conf = float(pred.summary.confidence[0])
        ax.imshow(roll.numpy(), cmap="inferno", interpolation="nearest")
        ax.set_title(f"{name}\npred {bundle.class_names[k]} ({conf:.2f})", fontsize=8)
        info[name] = {"prediction": bundle.class_names[k], "confidence": conf,
                      "rollout_max_share": float(roll.max()), "rollout": roll.tolist()}
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"attention rollout, mnist5k test image {MAP_IMAGE_INDEX}, mean of S={plan.num_samples} samples",
                 fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=130)
    plt.close(fig)
    return buf.getvalue(), {"test_index": MAP_IMAGE_INDEX, "label": bundle.class_names[label], "backends": info}


def scaling_figure(cost: list[dict[str, Any]], plan: Plan, cpu: str) -> bytes:
    """Two log-log panels against patch tokens: median CPU latency and counted forward GFLOPs, one line per backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_f) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, _ in BACKENDS:
        rows = [r for r in cost if r["backend"] == name]
        n = [r["patch_tokens"] for r in rows]
        style = "--" if name == "ksvd-adaptive" else "-"
        ax_t.plot(n, [r["latency_ms"] for r in rows], style, marker="o", label=name)
        ax_f.plot(n, [r["flops"] / 1e9 for r in rows], style, marker="o", label=name)
    for ax, ylabel in ((ax_t, f"CPU latency, ms (median, B=1, S={plan.num_samples})"),
                       (ax_f, f"forward GFLOPs (B=1, S={plan.num_samples})")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("patch tokens")
        ax.set_ylabel(ylabel)
        ax.set_xticks(plan_tokens(plan))
        ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.grid(True, which="both", alpha=0.3)
    ax_t.set_title(f"{cpu[:40]}, {plan.threads} thread(s)", fontsize=9)
    ax_f.set_title("FlopCounterMode (matmuls and convolutions)", fontsize=9)
    ax_f.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    return buf.getvalue()
