"""The report of benchmarks/attention_comparison.py as markdown (one function per section) and as a stdout table.

Every function reads the report dict that ``main`` writes as JSON; none recomputes a figure.
"""

from __future__ import annotations

from typing import Any

from attention_plan import BACKENDS

Cells = dict[tuple[str, int], dict[str, Any]]  # (backend, patch tokens) -> that cost row


def _title(report: dict[str, Any]) -> list[str]:
    quick = (" **Quick mode: a micro model trained for a moment on a few hundred images. These figures only show that "
             "the pipeline runs; they say nothing about the backends.**" if report["plan"]["quick"] else "")
    return ["# Attention backends compared", "",
            f"Written by `{report['command']}` on {report['written']}." + quick, ""]


def _headline(report: dict[str, Any]) -> list[str]:
    return ["## Headline", "", report["headline"], ""]


def _setup(report: dict[str, Any]) -> list[str]:
    plan, env = report["plan"], report["environment"]
    seeds = ", ".join(str(s) for s in plan["seeds"])
    return [
        "## Setup", "",
        f"- Model: {report['variant']}, one model per backend; the backends differ only in the attention of the "
        "SDE blocks.",
        f"- Training: `snodevit.training.train.train_model`, {plan['epochs']} epoch(s), seed(s) {seeds}, batch 64, "
        f"AdamW, light augmentation, on {report['train_images']} mnist5k train images "
        f"(validation: {report['val_images']} calibration images). "
        f"Training and evaluation ran on **{env['train_device']}**, {plan['jobs']} model(s) at a time; "
        f"{report['seconds']['train_and_evaluate']:.0f} s of the run's {report['seconds']['total']:.0f} s.",
        f"- Evaluation: the {report['test_images']} images of the mnist5k test split, S={plan['num_samples']} Monte "
        "Carlo samples per image through `snodevit.predict` (image i seeded with i), no temperature scaling; "
        "accuracy, NLL and ECE (15 equal-width bins) from `calibration.calibration_summary`.",
        f"- Cost: latency measured on the CPU, **{env['cpu']}** ({env['cpu_count']} logical CPUs), "
        f"{plan['threads']} torch thread(s), median of {plan['repeats']} calls after {plan['warmup']} warm-up "
        f"call(s), backends timed in alternation; B=1 image, S={plan['num_samples']} folded samples, "
        "`model.sample_logits` under `torch.inference_mode`, random weights. torch "
        f"{env['torch']}, Python {env['python']}.",
        "",
    ]


def _accuracy(report: dict[str, Any], cell: Cells, first: int) -> list[str]:
    plan = report["plan"]
    lines = ["## Accuracy at equal budget (mnist5k test)", "",
             "| backend | params | accuracy | NLL | ECE | train time / model |",
             "|---|---:|---:|---:|---:|---:|"]
    for name, row in report["accuracy"].items():
        note = f" (= {row['same_model_as']}, see notes)" if row["same_model_as"] else ""
        per_seed = row["accuracy_per_seed"]
        spread = (f" ({'/'.join(f'{100 * v:.1f}' for v in per_seed)})" if len(per_seed) > 1 else "")
        lines.append(f"| {name}{note} | {cell[(name, first)]['params'] / 1e6:.3f} M | {100 * row['accuracy']:.2f} %"
                     f"{spread} | {row['nll']:.4f} | {100 * row['ece']:.2f} % | {row['train_seconds']:.0f} s |")
    noise = report["noise"]
    lines += ["", f"Noise: {100 * noise['sd']:.2f} accuracy points per run ({noise['kind']}). Per-seed accuracies "
              "in brackets. Train time is the wall time of one model's training in the run that trained it"
              + (f", with {plan['jobs']} models training at once." if plan["jobs"] > 1 else "."), ""]
    return lines


def _token_table(caption: str, tokens: list[int], value: Any) -> list[str]:
    """A caption, then one row per backend and one column per token count, ``value(name, tokens)`` in each cell."""
    lines = [caption, "",
             "| backend | " + " | ".join(f"{n} tokens" for n in tokens) + " |",
             "|---|" + "---:|" * len(tokens)]
    for name, _ in BACKENDS:
        lines.append(f"| {name} | " + " | ".join(value(name, n) for n in tokens) + " |")
    return lines


def _cost(report: dict[str, Any], cell: Cells, tokens: list[int]) -> list[str]:
    plan, env = report["plan"], report["environment"]
    return ["## CPU latency and FLOPs against token count", "",
            "![latency and FLOPs against tokens](attention-scaling.png)", "",
            *_token_table(f"Median latency in ms (B=1, S={plan['num_samples']}; {plan['threads']} thread(s) of "
                          f"{env['cpu']}):", tokens, lambda b, n: f"{cell[(b, n)]['latency_ms']:.1f}"), "",
            *_token_table(f"Forward GFLOPs (B=1, S={plan['num_samples']}), FlopCounterMode:", tokens,
                          lambda b, n: f"{cell[(b, n)]['flops'] / 1e9:.2f}"), "",
            *_token_table("Parameters (M) per model size (the position embedding grows with the tokens for every "
                          "backend):", tokens, lambda b, n: f"{cell[(b, n)]['params'] / 1e6:.3f}")]


def _maps(report: dict[str, Any]) -> list[str]:
    maps, plan = report["maps"], report["plan"]
    return [
        "", "## Attention maps", "",
        "![attention rollout per backend](attention-maps.png)", "",
        f"Attention rollout (Abnar & Zuidema 2020, via `snodevit.inference.attention_maps`) of mnist5k test image "
        f"{maps['test_index']} (label {maps['label']}) for the seed-{plan['seeds'][0]} model of each backend: the "
        "class token's share of each patch after all blocks, mean of the samples. Each backend exposes the token "
        "mixing it actually applied (KSVD: its rank-r pooling; Linformer: through the |F| projection; Performer, "
        "Nystrom and the hybrid's global half: their implicit kernels), so the maps are comparable in kind but "
        "not in sharpness.", "",
    ]


def _notes(report: dict[str, Any], cell: Cells, tokens: list[int]) -> list[str]:
    first = tokens[0]
    ranks = [f"{cell[('ksvd-adaptive', n)]['rank']} at {n}" for n in tokens]
    return [
        "## Notes", "",
        "- **Linformer needs a static token count**: its key/value projections E, F are (k, N) matrices learned for "
        "one N. It is therefore built separately at every size of the cost sweep (as are all backends, whose "
        "position embedding is also per size), and its parameter count grows with N.",
        f"- **ksvd-adaptive** picks rank ceil(sqrt(N)) clamped to [4, head_dim]: rank {', '.join(ranks)} tokens. "
        + (f"At {first} tokens that is ksvd's fixed rank {cell[('ksvd', first)]['rank']}, so the two are the same "
           "model there and the accuracy row of ksvd-adaptive is ksvd's trained model (trained once)."
           if report["accuracy"]["ksvd-adaptive"]["same_model_as"] else ""),
        "- **FLOPs** are what `torch.utils.flop_counter.FlopCounterMode` counts: matrix products and convolutions "
        "(elementwise work, softmax and exp are not counted). Fused softmax (`scaled_dot_product_attention`) is "
        "not counted on the CPU by it, so softmax is counted on its explicit path with the same weights; the "
        "latency is that of the fused path.",
        "- **Hybrid** computes its dilated local window with a mask over the full score matrix, so its cost is "
        "O(N^2) like softmax plus the linear global part.",
        "- Token counts are patch tokens; the blocks also see one class token (N+1).",
    ]


def markdown(report: dict[str, Any]) -> str:
    """The report page: title, headline, setup, accuracy, cost tables, attention maps, notes."""
    tokens = sorted({r["patch_tokens"] for r in report["cost"]})
    cell = {(r["backend"], r["patch_tokens"]): r for r in report["cost"]}
    lines = [*_title(report), *_headline(report), *_setup(report), *_accuracy(report, cell, tokens[0]),
             *_cost(report, cell, tokens), *_maps(report), *_notes(report, cell, tokens)]
    return "\n".join(lines) + "\n"


def stdout_table(report: dict[str, Any]) -> str:
    """One line per backend: accuracy, NLL, ECE, and latency and GFLOPs at the most tokens."""
    cost = report["cost"]
    n_max = max(r["patch_tokens"] for r in cost)
    top = {r["backend"]: r for r in cost if r["patch_tokens"] == n_max}
    lines = [f"{'backend':<14} {'acc %':>7} {'NLL':>7} {'ECE %':>6} {f'ms@{n_max}':>9} {f'GFLOP@{n_max}':>11}"]
    for name, row in report["accuracy"].items():
        lines.append(f"{name:<14} {100 * row['accuracy']:7.2f} {row['nll']:7.4f} {100 * row['ece']:6.2f} "
                     f"{top[name]['latency_ms']:9.1f} {top[name]['flops'] / 1e9:11.2f}")
    return "\n".join(lines)
