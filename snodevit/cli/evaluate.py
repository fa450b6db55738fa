"""`snodevit evaluate`: accuracy, NLL and mean uncertainties of a model on a data split."""

from __future__ import annotations

import argparse

import torch

from snodevit.cli._common import add_json_flag, add_precision_flag, emit, positive_int
from snodevit.data.sets import load_dataset
from snodevit.evaluation.passes import collect
from snodevit.inference.backends import open_model


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


def run(args: argparse.Namespace) -> int:
    """Evaluate ``--model`` on one split of ``--data`` (image i seeded with ``--seed`` + i) and print the figures.

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
    acc = (probs.argmax(-1) == labels).float().mean().item()
    nll = torch.nn.functional.nll_loss(probs.clamp_min(1e-12).log(), labels).item()
    figures = {"model": args.model, "data": args.data, "split": args.split, "images": len(labels),
               "num_samples": args.num_samples, "backend": args.backend, "precision": loaded.precision,
               "accuracy": acc, "nll": nll,
               "temperature": loaded.calibration.temperature,
               "mean_total_uncertainty": r["total"].mean().item(),
               "mean_aleatoric_uncertainty": r["aleatoric"].mean().item(),
               "mean_epistemic_uncertainty": r["epistemic"].mean().item()}
    emit(args, figures, (f"{args.split} split of {args.data}: {len(labels)} images, S={args.num_samples}\n"
                         f"  accuracy {acc:.4f}   NLL {nll:.4f}   (temperature {loaded.calibration.temperature:.3f})\n"
                         f"  mean uncertainty: total {figures['mean_total_uncertainty']:.4f}  aleatoric "
                         f"{figures['mean_aleatoric_uncertainty']:.4f}  epistemic "
                         f"{figures['mean_epistemic_uncertainty']:.4f} nats"))
    return 0
