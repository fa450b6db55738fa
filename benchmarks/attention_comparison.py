"""The attention backends side by side: cost against token count, accuracy at equal budget, attention maps.

One command writes ``<out>/attention-comparison.md`` and ``.json``, ``<out>/attention-scaling.png`` (latency and
FLOPs against token count, log-log) and ``<out>/attention-maps.png`` (attention rollout of one fixed test image
per backend). For every backend (ksvd, ksvd with the adaptive rank, softmax, linformer, performer, nystrom,
hybrid):

* **Cost.** Parameters, forward FLOPs (``torch.utils.flop_counter.FlopCounterMode``: matmuls and convolutions)
  and the CPU latency of ``model.sample_logits`` for one image with S folded Monte Carlo samples, at
  28/56/84/112 px (49/196/441/784 patch tokens, plus the class token). Models are built per size with random
  weights (timing does not depend on them). Latency is always taken on the CPU, with a fixed thread count, the
  backends timed in alternation so drifting background load hits all of them alike; the median is reported.
* **Accuracy at equal budget.** ``tiny`` + ``MNIST_OVERRIDES`` (one Euler-Maruyama step per block, the demo's
  setting) trained with ``snodevit.train.train_model`` for the same epochs and seeds on the mnist5k train split,
  then accuracy / NLL / ECE (``calibration.calibration_summary``, no temperature) on the 500-image test split
  with S samples through ``snodevit.predict``. Independent models train in ``--jobs`` parallel processes
  (``torch.multiprocessing`` spawn context); checkpoints are kept under ``runs/attention_comparison/`` and reused
  on a rerun unless ``--retrain``.

Budget: the full run trains 30 epochs (the demo's) with seeds 0 and 1, i.e. 12 models (ksvd-adaptive is ksvd's
model at 49 tokens). On the H100 machine with ``--jobs 7``, a 4-epoch full run took 115 s in all (73 s training
and evaluation, about 7 s per epoch per model with seven models sharing the GPU; 37 s for the CPU cost sweep and
the maps), which extrapolates to about 7-8 minutes at 30 epochs. One 30-epoch training takes about 8 minutes on
2 CPU cores, so run the full mode on a GPU.

Usage (from the repository root)::

    PYTHONPATH=. python benchmarks/attention_comparison.py --device cuda --jobs 7 --out docs   # full run (GPU)
    PYTHONPATH=. python benchmarks/attention_comparison.py --quick --out /tmp/ac              # smoke run, < 1 min
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import platform
import shlex
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from snodevit.cli._common import positive_int
from snodevit.machine import cpu_name  # noqa: E402

# (row name, config overrides). ksvd-adaptive picks its rank from the token count: ceil(sqrt(N)) in [4, head_dim].
BACKENDS: tuple[tuple[str, dict[str, Any]], ...] = (
    ("ksvd", {"attention": "ksvd"}),
    ("ksvd-adaptive", {"attention": "ksvd", "rank_mode": "adaptive"}),
    ("softmax", {"attention": "softmax"}),
    ("linformer", {"attention": "linformer"}),
    ("performer", {"attention": "performer"}),
    ("nystrom", {"attention": "nystrom"}),
    ("hybrid", {"attention": "hybrid"}),
)
# The demo budget of `snodevit train --variant tiny`: one solver step per block.
MODEL_OVERRIDES: dict[str, Any] = {"num_steps": 1}
# --quick: a micro model that trains in about a second per backend on 2 cores.
MICRO_OVERRIDES: dict[str, Any] = dict(dim=32, depth=2, num_heads=2, rank=4, mlp_ratio=2.0, time_hidden_dim=16,
                                       noise_dim=4, num_steps=1)
FULL_SIZES = (28, 56, 84, 112)  # px at patch 4 -> 49, 196, 441, 784 patch tokens
QUICK_SIZES = (28, 56)
DEFAULT_EPOCHS = 30
MAP_IMAGE_INDEX = 0  # the test image whose attention maps are drawn
DATA = "mnist5k"
RUNS_ROOT = Path("runs") / "attention_comparison"


@dataclass(frozen=True)
class Plan:
    """What one invocation measures; everything a run's figures depend on."""

    quick: bool  # micro model, few images, two sizes
    epochs: int  # training epochs of every backend
    seeds: tuple[int, ...]  # training seeds, each backend trained once per seed
    sizes: tuple[int, ...]  # image sides (px) of the cost sweep
    num_samples: int  # S Monte Carlo samples, folded into one batch
    threads: int  # CPU threads of the latency measurement
    repeats: int  # timed calls per backend and size
    warmup: int  # untimed calls per backend and size first
    train_images: int | None  # first n images of the train split (None: all 4000)
    val_images: int | None  # first n images of the calibration split used for per-epoch validation
    device: str  # where training and evaluation run
    jobs: int  # parallel training processes

    @property
    def model_overrides(self) -> dict[str, Any]:
        return dict(MICRO_OVERRIDES if self.quick else MODEL_OVERRIDES)

    @property
    def variant_label(self) -> str:
        extra = ", ".join(f"{k}={v}" for k, v in self.model_overrides.items())
        return f"tiny + MNIST_OVERRIDES ({extra})"


# ------------------------------------------------------------------------------------------------ configs


def model_config(name: str, overrides: dict[str, Any], plan: Plan, image_size: int = 28) -> Any:
    """The SNodeViTConfig of one backend at one image size."""
    from snodevit import MNIST_OVERRIDES, get_config

    return get_config("tiny", **{**MNIST_OVERRIDES, **plan.model_overrides, **overrides, "image_size": image_size})


def resolved(cfg: Any) -> Any:
    """The config with the adaptive KSVD rank written out, so two configs that build the same model compare equal."""
    if cfg.attention == "ksvd" and cfg.rank_mode == "adaptive":
        return cfg.replace(rank=cfg.effective_rank, rank_mode="fixed")
    return cfg


def train_config(plan: Plan, seed: int) -> Any:
    from snodevit.training.train import TrainConfig

    # Quick runs load augmentation in the main process: a DataLoader worker costs more than it saves there.
    return TrainConfig(epochs=plan.epochs, seed=seed, num_workers=0 if plan.quick else 1)


# ------------------------------------------------------------------------------------------------ training


def _subset(dataset: Any, n: int | None) -> Any:
    from torch.utils.data import Subset

    return dataset if n is None or n >= len(dataset) else Subset(dataset, range(n))


@torch.no_grad()
def evaluate(model: Any, dataset: Any, num_samples: int, seed: int, device: str,
             batch_size: int = 250) -> dict[str, float]:
    """Accuracy, NLL and ECE of the mean of S samples per image; image i's noise is seeded with seed + i."""
    from calibration import calibration_summary
    from snodevit import predict

    model.eval()
    probs, labels = [], []
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False)
    start = 0
    for images, y in loader:
        seeds = list(range(seed + start, seed + start + len(y)))
        start += len(y)
        pred = predict(model, images.to(device), num_samples=num_samples, seed=seeds, pool=model.cfg.pool)
        probs.append(pred.summary.probs.cpu())
        labels.append(y)
    s = calibration_summary(torch.cat(probs).double(), torch.cat(labels))
    return {"accuracy": s["accuracy"], "nll": s["nll"], "ece": s["ece"], "brier": s["brier"],
            "test_images": s["n_samples"]}


def run_job(job: dict[str, Any]) -> dict[str, Any]:
    """Train one (model, seed) unless a matching checkpoint exists, then evaluate it on the test split.

    Runs in a spawned process when ``--jobs`` > 1, so it takes and returns plain data.
    """
    from snodevit import SNodeViT, SNodeViTConfig, load_model
    from snodevit.checkpoint import read_meta
    from snodevit.data.sets import load_dataset
    from snodevit.training.train import TrainConfig, train_model

    torch.set_num_threads(job["threads"])
    out = Path(job["dir"])
    key = job["key"]
    bundle = load_dataset(DATA, augment="light")
    reused = (not job["retrain"] and (out / "model.safetensors").is_file()
              and read_meta(out).get("comparison") == key)
    if reused:
        model, meta = load_model(out, map_location=job["device"])
        seconds = float(meta["training"]["history"][-1]["seconds"])
    else:
        cfg = SNodeViTConfig.from_dict(key["config"])
        tc = TrainConfig(**key["train"])
        torch.manual_seed(tc.seed)
        model = SNodeViT(cfg)
        meta = {"class_names": bundle.class_names, "preprocessing": bundle.preprocessing.to_dict(),
                "data": bundle.spec, "variant": "tiny", "comparison": key}
        result = train_model(model, _subset(bundle.train, key["train_images"]), _subset(bundle.calibration,
                             key["val_images"]), tc, out_dir=out, meta=meta, device=job["device"],
                             progress=job["progress"])
        seconds = result.seconds
    figures = evaluate(model, bundle.test, job["num_samples"], seed=0, device=job["device"])
    return {"model": job["model"], "seed": key["train"]["seed"], "dir": str(out), "reused": reused,
            "train_seconds": seconds, **figures}


def make_jobs(plan: Plan, runs_dir: Path, retrain: bool) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """One job per distinct model and seed; ``aliases`` maps a backend row to the model that stands for it."""
    jobs, aliases, seen = [], {}, {}
    # Micro models spin more than they compute on several threads when the CPU is shared.
    job_threads = 1 if plan.quick else max(1, (os.cpu_count() or 1) // plan.jobs)
    for name, overrides in BACKENDS:
        cfg = resolved(model_config(name, overrides, plan))
        ident = cfg.to_json()
        if ident in seen:  # e.g. ksvd-adaptive at 49 tokens picks rank 8, exactly ksvd's fixed rank
            aliases[name] = seen[ident]
            continue
        seen[ident] = aliases[name] = name
        for seed in plan.seeds:
            key = {"config": cfg.to_dict(), "train": asdict(train_config(plan, seed)), "data": DATA,
                   "train_images": plan.train_images, "val_images": plan.val_images}
            jobs.append({"model": name, "dir": str(runs_dir / f"{name}-seed{seed}"), "key": key,
                         "retrain": retrain, "device": plan.device, "num_samples": plan.num_samples,
                         "threads": job_threads, "progress": plan.jobs == 1 and not plan.quick})
    return jobs, aliases


def train_all(jobs: list[dict[str, Any]], n_procs: int, progress: bool) -> list[dict[str, Any]]:
    """Run the jobs, in ``n_procs`` spawned processes when more than one."""
    from tqdm.auto import tqdm

    results = []
    bar = tqdm(total=len(jobs), desc="train+evaluate", unit="model", disable=not progress, dynamic_ncols=True)
    if n_procs <= 1:
        for job in jobs:
            results.append(run_job(job))
            bar.update(1)
    else:
        ctx = torch.multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=min(n_procs, len(jobs)), mp_context=ctx) as pool:
            futures = [pool.submit(run_job, job) for job in jobs]
            for fut in as_completed(futures):
                r = fut.result()
                results.append(r)
                bar.update(1)
                bar.set_postfix_str(f"{r['model']} seed {r['seed']}: acc {r['accuracy']:.4f}")
    bar.close()
    order = {job["dir"]: i for i, job in enumerate(jobs)}
    return sorted(results, key=lambda r: order[r["dir"]])


# ------------------------------------------------------------------------------------------------ cost




def count_flops(model: Any, images: torch.Tensor, noise: torch.Tensor) -> int:
    """Forward FLOPs of ``sample_logits`` as FlopCounterMode counts them (2 per multiply-add of matmuls/convs).

    FlopCounterMode does not count the CPU kernel behind fused ``scaled_dot_product_attention``, so a fused
    softmax model is counted on its explicit twin (same weights, same arithmetic).
    """
    from torch.utils.flop_counter import FlopCounterMode

    from snodevit import SNodeViT

    if model.cfg.fused_attn and model.cfg.attention == "softmax":
        twin = SNodeViT(model.cfg.replace(fused_attn=False)).eval()
        twin.load_state_dict(model.state_dict())
        model = twin
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model.sample_logits(images, noise=noise)
    return int(counter.get_total_flops())


def _time_alternating(fns: dict[str, Callable[[], Any]], warmup: int, repeats: int) -> dict[str, list[float]]:
    """Milliseconds per call of each function, the functions called in turn so background load hits all alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - t) * 1e3)
    return times


def measure_cost(plan: Plan, progress: bool) -> list[dict[str, Any]]:
    """Params, FLOPs and median CPU latency of every backend at every size, B=1 and S folded samples."""
    from tqdm.auto import tqdm

    from snodevit import SNodeViT, count_parameters

    torch.set_num_threads(plan.threads)
    rows = []
    for size in tqdm(plan.sizes, desc="CPU cost", unit="size", disable=not progress, dynamic_ncols=True):
        models = {}
        for name, overrides in BACKENDS:
            torch.manual_seed(0)
            models[name] = SNodeViT(model_config(name, overrides, plan, image_size=size)).eval()
        first = next(iter(models.values()))
        gen = torch.Generator().manual_seed(size)
        images = torch.randn(1, 1, size, size, generator=gen)
        noise = torch.randn(first.noise_shape(1, plan.num_samples), generator=gen)

        def call(m: Any) -> Callable[[], Any]:
            def fn() -> Any:
                with torch.inference_mode():
                    return m.sample_logits(images, noise=noise)
            return fn

        times = _time_alternating({n: call(m) for n, m in models.items()}, plan.warmup, plan.repeats)
        for name, m in models.items():
            t = sorted(times[name])
            q1, _, q3 = statistics.quantiles(t, n=4) if len(t) > 1 else (t[0], t[0], t[0])
            rows.append({"backend": name, "image_size": size, "patch_tokens": m.cfg.num_patches,
                         "tokens": m.cfg.num_tokens, "params": count_parameters(m),
                         "rank": m.cfg.effective_rank if m.cfg.attention == "ksvd" else None,
                         "flops": count_flops(m, images, noise), "latency_ms": statistics.median(t),
                         "latency_q1_ms": q1, "latency_q3_ms": q3, "runs": len(t)})
    return rows


# ------------------------------------------------------------------------------------------------ maps


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


def plan_tokens(plan: Plan) -> list[int]:
    return [(s // 4) ** 2 for s in plan.sizes]


# ------------------------------------------------------------------------------------------------ summary


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


def markdown(report: dict[str, Any]) -> str:
    plan, env = report["plan"], report["environment"]
    acc, cost = report["accuracy"], report["cost"]
    tokens = sorted({r["patch_tokens"] for r in cost})
    cell = {(r["backend"], r["patch_tokens"]): r for r in cost}
    seeds = ", ".join(str(s) for s in plan["seeds"])
    lines = [
        "# Attention backends compared", "",
        f"Written by `{report['command']}` on {report['written']}." + (
            " **Quick mode: a micro model trained for a moment on a few hundred images. These figures only show that "
            "the pipeline runs; they say nothing about the backends.**" if plan["quick"] else ""), "",
        "## Headline", "", report["headline"], "",
        "## Setup", "",
        f"- Model: {report['variant']}, one model per backend; the backends differ only in the attention of the "
        "SDE blocks.",
        f"- Training: `snodevit.train.train_model`, {plan['epochs']} epoch(s), seed(s) {seeds}, batch 64, AdamW, "
        f"light augmentation, on {report['train_images']} mnist5k train images "
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
        "", "## Accuracy at equal budget (mnist5k test)", "",
        "| backend | params | accuracy | NLL | ECE | train time / model |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    first = tokens[0]
    for name, row in acc.items():
        note = f" (= {row['same_model_as']}, see notes)" if row["same_model_as"] else ""
        per_seed = row["accuracy_per_seed"]
        spread = (f" ({'/'.join(f'{100 * v:.1f}' for v in per_seed)})" if len(per_seed) > 1 else "")
        lines.append(f"| {name}{note} | {cell[(name, first)]['params'] / 1e6:.3f} M | {100 * row['accuracy']:.2f} %"
                     f"{spread} | {row['nll']:.4f} | {100 * row['ece']:.2f} % | {row['train_seconds']:.0f} s |")
    noise = report["noise"]
    lines += ["", f"Noise: {100 * noise['sd']:.2f} accuracy points per run ({noise['kind']}). Per-seed accuracies "
              "in brackets. Train time is the wall time of one model's training in the run that trained it"
              + (f", with {plan['jobs']} models training at once." if plan["jobs"] > 1 else "."), "",
              "## CPU latency and FLOPs against token count", "",
              "![latency and FLOPs against tokens](attention-scaling.png)", "",
              f"Median latency in ms (B=1, S={plan['num_samples']}; {plan['threads']} thread(s) of {env['cpu']}):", "",
              "| backend | " + " | ".join(f"{n} tokens" for n in tokens) + " |",
              "|---|" + "---:|" * len(tokens)]
    for name, _ in BACKENDS:
        lines.append(f"| {name} | " + " | ".join(f"{cell[(name, n)]['latency_ms']:.1f}" for n in tokens) + " |")
    lines += ["", f"Forward GFLOPs (B=1, S={plan['num_samples']}), FlopCounterMode:", "",
              "| backend | " + " | ".join(f"{n} tokens" for n in tokens) + " |",
              "|---|" + "---:|" * len(tokens)]
    for name, _ in BACKENDS:
        lines.append(f"| {name} | " + " | ".join(f"{cell[(name, n)]['flops'] / 1e9:.2f}" for n in tokens) + " |")
    lines += ["", "Parameters (M) per model size (the position embedding grows with the tokens for every backend):", "",
              "| backend | " + " | ".join(f"{n} tokens" for n in tokens) + " |",
              "|---|" + "---:|" * len(tokens)]
    for name, _ in BACKENDS:
        lines.append(f"| {name} | " + " | ".join(f"{cell[(name, n)]['params'] / 1e6:.3f}" for n in tokens) + " |")
    ranks = [f"{cell[('ksvd-adaptive', n)]['rank']} at {n}" for n in tokens]
    maps = report["maps"]
    lines += [
        "", "## Attention maps", "",
        "![attention rollout per backend](attention-maps.png)", "",
        f"Attention rollout (Abnar & Zuidema 2020, via `snodevit.inference.attention_maps`) of mnist5k test image "
        f"{maps['test_index']} (label {maps['label']}) for the seed-{plan['seeds'][0]} model of each backend: the "
        "class token's share of each patch after all blocks, mean of the samples. Each backend exposes the token "
        "mixing it actually applied (KSVD: its rank-r pooling; Linformer: through the |F| projection; Performer, "
        "Nystrom and the hybrid's global half: their implicit kernels), so the maps are comparable in kind but "
        "not in sharpness.", "",
        "## Notes", "",
        "- **Linformer needs a static token count**: its key/value projections E, F are (k, N) matrices learned for "
        "one N. It is therefore built separately at every size of the cost sweep (as are all backends, whose "
        "position embedding is also per size), and its parameter count grows with N.",
        f"- **ksvd-adaptive** picks rank ceil(sqrt(N)) clamped to [4, head_dim]: rank {', '.join(ranks)} tokens. "
        + (f"At {first} tokens that is ksvd's fixed rank {cell[('ksvd', first)]['rank']}, so the two are the same "
           "model there and the accuracy row of ksvd-adaptive is ksvd's trained model (trained once)."
           if acc["ksvd-adaptive"]["same_model_as"] else ""),
        "- **FLOPs** are what `torch.utils.flop_counter.FlopCounterMode` counts: matrix products and convolutions "
        "(elementwise work, softmax and exp are not counted). Fused softmax (`scaled_dot_product_attention`) is "
        "not counted on the CPU by it, so softmax is counted on its explicit path with the same weights; the "
        "latency is that of the fused path.",
        "- **Hybrid** computes its dilated local window with a mask over the full score matrix, so its cost is "
        "O(N^2) like softmax plus the linear global part.",
        "- Token counts are patch tokens; the blocks also see one class token (N+1).",
    ]
    return "\n".join(lines) + "\n"


def stdout_table(report: dict[str, Any]) -> str:
    cost = report["cost"]
    n_max = max(r["patch_tokens"] for r in cost)
    top = {r["backend"]: r for r in cost if r["patch_tokens"] == n_max}
    lines = [f"{'backend':<14} {'acc %':>7} {'NLL':>7} {'ECE %':>6} {f'ms@{n_max}':>9} {f'GFLOP@{n_max}':>11}"]
    for name, row in report["accuracy"].items():
        lines.append(f"{name:<14} {100 * row['accuracy']:7.2f} {row['nll']:7.4f} {100 * row['ece']:6.2f} "
                     f"{top[name]['latency_ms']:9.1f} {top[name]['flops'] / 1e9:11.2f}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("docs"), help="folder of the .md, .json and .png files")
    p.add_argument("--device", default="auto", help="training/evaluation device: auto, cpu, cuda or cuda:N "
                   "(latency is always measured on the CPU)")
    p.add_argument("--jobs", type=positive_int, default=1, help="models trained in parallel processes")
    p.add_argument("--epochs", type=positive_int, default=None,
                   help=f"training epochs of every backend (default {DEFAULT_EPOCHS}, quick 1)")
    p.add_argument("--seeds", type=positive_int, default=None,
                   help="training seeds per backend, 0..n-1 (default 2, quick 1); two or more measure seed noise")
    p.add_argument("--num-samples", type=positive_int, default=8, help="Monte Carlo samples S per image")
    p.add_argument("--threads", type=positive_int, default=None,
                   help="torch threads of the CPU latency measurement (default min(4, CPUs), quick 1)")
    p.add_argument("--repeats", type=positive_int, default=None, help="timed calls per backend and size "
                   "(default 15, quick 3)")
    p.add_argument("--runs-dir", type=Path, default=None,
                   help=f"where checkpoints are kept (default {RUNS_ROOT}/full or {RUNS_ROOT}/quick)")
    p.add_argument("--retrain", action="store_true", help="train again even when a matching checkpoint exists")
    p.add_argument("--quick", action="store_true", help="micro model, 1 epoch on 320 images, 2 sizes: a smoke run")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    if args.device != "auto":
        try:
            dev = torch.device(args.device)
        except RuntimeError:
            p.error(f"--device {args.device!r} is not a device name; use auto, cpu, cuda or cuda:N")
        if dev.type not in ("cpu", "cuda"):
            p.error(f"--device must be auto, cpu, cuda or cuda:N, got {args.device!r}")
        if dev.type == "cuda" and not torch.cuda.is_available():
            p.error(f"--device {args.device}: CUDA is not available on this machine; use --device cpu")
    if args.out.exists() and not args.out.is_dir():
        p.error(f"--out {args.out} exists and is not a folder")
    return args


def make_plan(args: argparse.Namespace) -> Plan:
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    cpus = os.cpu_count() or 1
    return Plan(quick=args.quick, epochs=args.epochs or (1 if args.quick else DEFAULT_EPOCHS),
                seeds=tuple(range(args.seeds or (1 if args.quick else 2))),
                sizes=QUICK_SIZES if args.quick else FULL_SIZES, num_samples=args.num_samples,
                threads=args.threads or (1 if args.quick else min(4, cpus)), repeats=args.repeats or (3 if args.quick else 15),
                warmup=1 if args.quick else 3, train_images=320 if args.quick else None,
                val_images=100 if args.quick else None, device=device, jobs=args.jobs)


def _readable_by_all(tmp_path: str) -> None:
    os.chmod(tmp_path, 0o644)  # mkstemp creates 0600; these are documents


def main(argv: list[str] | None = None) -> int:
    from calibration.files import atomic_write_bytes

    args = parse_args(argv)
    plan = make_plan(args)
    progress = not args.no_progress
    runs_dir = args.runs_dir or RUNS_ROOT / ("quick" if plan.quick else "full")
    start = time.perf_counter()

    jobs, aliases = make_jobs(plan, runs_dir, args.retrain)
    if not plan.quick and plan.device == "cpu":
        print(f"note: training {len(jobs)} models of {plan.epochs} epochs on the CPU; one 30-epoch training takes "
              "about 8 minutes on 2 cores (checkpoints are reused on a rerun). --device cuda is much faster.",
              file=sys.stderr)
    t0 = time.perf_counter()
    results = train_all(jobs, plan.jobs, progress)
    train_wall = time.perf_counter() - t0
    # Cost after training: the parallel trainings would otherwise share the CPU with the timing.
    cost = measure_cost(plan, progress)
    torch.set_num_threads(plan.threads)
    maps_png, maps = attention_figure(plan, results, aliases)

    cpu = cpu_name()
    dev = torch.device(plan.device)
    train_device = (f"GPU {torch.cuda.get_device_name(dev)} ({plan.device})" if dev.type == "cuda"
                    else f"the CPU ({cpu})")
    acc = summarize_accuracy(results, aliases)
    test_images = results[0]["test_images"]
    noise = seed_noise(results, len(plan.seeds), test_images,
                       statistics.fmean(r["accuracy"] for r in acc.values()))
    report = {
        "command": "python " + shlex.join(sys.argv if argv is None else [Path(__file__).as_posix(), *argv]),
        "written": time.strftime("%Y-%m-%d %H:%M %Z"),
        "backends": {name: overrides for name, overrides in BACKENDS},  # row order = BACKENDS (keys get sorted)
        "plan": {**asdict(plan), "seeds": list(plan.seeds), "sizes": list(plan.sizes)},
        "variant": plan.variant_label,
        "train_images": plan.train_images or 4000, "val_images": plan.val_images or 500, "test_images": test_images,
        "environment": {"cpu": cpu, "cpu_count": os.cpu_count(), "processor": platform.processor(),
                        "machine": platform.machine(), "torch": torch.__version__,
                        "python": platform.python_version(), "train_device": train_device},
        "accuracy": acc, "noise": noise, "runs": results, "cost": cost, "maps": maps,
        "seconds": {"train_and_evaluate": train_wall},
    }
    report["headline"] = headline(acc, cost, noise, plan)
    scaling_png = scaling_figure(cost, plan, cpu)
    report["seconds"]["total"] = time.perf_counter() - start
    # Everything is rendered before the first file is replaced; each file is replaced atomically.
    out = args.out
    files = {"attention-scaling.png": scaling_png, "attention-maps.png": maps_png,
             "attention-comparison.json": (json.dumps(report, indent=2, sort_keys=True) + "\n").encode(),
             "attention-comparison.md": markdown(report).encode()}
    for name, data in files.items():
        atomic_write_bytes(out / name, data, check=_readable_by_all)
    print(stdout_table(report))
    print(f"wrote {out}/attention-comparison.md (+ .json, attention-scaling.png, attention-maps.png) "
          f"in {report['seconds']['total']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
