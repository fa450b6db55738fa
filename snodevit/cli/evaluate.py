"""`snodevit evaluate`: accuracy, NLL, mean uncertainties and selective-prediction figures of a model on a data
split."""

from __future__ import annotations

import argparse

import torch
from torch import Tensor

import calibration as cal

from snodevit.cli._common import add_json_flag, add_precision_flag, emit, positive_int
from snodevit.data.sets import load_dataset
from snodevit.evaluation.passes import collect
from snodevit.inference.backends import open_model
from snodevit.inference.summary import summarize

SELECTIVE_COLUMNS = (("aurc", "AURC"), ("augrc", "AUGRC"), ("risk_at_80_coverage", "risk@80%cov"),
                     ("coverage_at_1_risk", "cov@1%risk"), ("coverage_at_5_risk", "cov@5%risk"))


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``snodevit evaluate`` and its flags."""
    p = sub.add_parser("evaluate", help="evaluate a model on a data split", description=__doc__)
    p.add_argument("--model", required=True, help="model directory (or .onnx file with --backend onnx)")
    p.add_argument("--data", default="mnist5k")
    p.add_argument("--split", default="test", choices=["train", "calibration", "test", "all"])
    p.add_argument("--num-samples", type=positive_int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=positive_int, default=64)
    p.add_argument("--backend", choices=["torch", "onnx"], default="torch")
    p.add_argument("--device", default="auto")
    add_precision_flag(p)
    add_json_flag(p)
    p.set_defaults(func=run)


def _selective_by_confidence(probs: Tensor, labels: Tensor) -> dict[str, float]:
    """:func:`calibration.selective_metrics` of the served confidence (the top mean probability) on ``probs``.

    Args:
        probs: (N, C) served (calibrated) mean probabilities.
        labels: (N,) int64 true classes.
    """
    confidence, prediction = probs.max(dim=-1)
    return cal.selective_metrics(confidence, prediction == labels)


def run(args: argparse.Namespace) -> int:
    """Evaluate ``--model`` on one split of ``--data`` (image i seeded with ``--seed`` + i) and print the figures.

    The selective figures rank the images by the served confidence, at the requested S and at S = 1. The S = 1
    figures read the first Monte Carlo sample of the same pass: the noise is drawn per image sample by sample
    from its seed (``draw_noise``), so that sample is the noise of an S = 1 draw, and its logits scaled by the
    stored temperature are what ``predict`` answers at S = 1 (up to float32 rounding where the folded passes
    differ in shape); no second pass is run.

    Returns:
        0; a data set whose channel count is not the model's raises ``ValueError``.
    """
    loaded = open_model(args.model, args.backend, args.device, args.precision)
    bundle = load_dataset(args.data, image_size=loaded.preprocessing.image_size)
    if bundle.preprocessing.channels != loaded.cfg.in_channels:
        raise ValueError(f"data set {args.data} has {bundle.preprocessing.channels} channels, the model expects "
                         f"{loaded.cfg.in_channels}")
    r = collect(loaded, bundle.split(args.split), args.num_samples, args.seed, args.batch_size, not args.json)
    probs, labels = r["probs"], r["labels"]
    t = loaded.calibration.temperature
    acc = (probs.argmax(-1) == labels).float().mean().item()
    nll = torch.nn.functional.nll_loss(probs.clamp_min(1e-12).log(), labels).item()
    selective = _selective_by_confidence(probs, labels)
    selective_one = _selective_by_confidence(summarize(r["logits"][:1], t).probs, labels)  # (1, N, C): sample 0
    figures = {"model": args.model, "data": args.data, "split": args.split, "images": len(labels),
               "num_samples": args.num_samples, "backend": args.backend, "precision": loaded.precision,
               "accuracy": acc, "nll": nll,
               "temperature": t,
               "mean_total_uncertainty": r["total"].mean().item(),
               "mean_aleatoric_uncertainty": r["aleatoric"].mean().item(),
               "mean_epistemic_uncertainty": r["epistemic"].mean().item(),
               "selective": selective, "selective_one_sample": selective_one}
    emit(args, figures, (f"{args.split} split of {args.data}: {len(labels)} images, S={args.num_samples}\n"
                         f"  accuracy {acc:.4f}   NLL {nll:.4f}   (temperature {t:.3f})\n"
                         f"  mean uncertainty: total {figures['mean_total_uncertainty']:.4f}  aleatoric "
                         f"{figures['mean_aleatoric_uncertainty']:.4f}  epistemic "
                         f"{figures['mean_epistemic_uncertainty']:.4f} nats\n"
                         + _selective_table({f"S={args.num_samples}": selective, "S=1": selective_one})))
    return 0


def _selective_table(rows: dict[str, dict[str, float]]) -> str:
    """The selective figures, one row per S (one row when S = 1 was requested: the keys coincide)."""
    head = "  selective, by confidence" + "".join(f"  {title:>11}" for _, title in SELECTIVE_COLUMNS)
    lines = [head] + [f"    {name:<22}" + "".join(f"  {m[key]:>11.4f}" for key, _ in SELECTIVE_COLUMNS)
                      for name, m in rows.items()]
    return "\n".join(lines)
