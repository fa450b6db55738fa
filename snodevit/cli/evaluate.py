"""`snodevit evaluate`: accuracy, NLL and mean uncertainties of a model on a data split."""

from __future__ import annotations

import argparse

import torch
from tqdm.auto import tqdm

from snodevit.data.sets import load_dataset
from snodevit.inference.backends import open_model
from snodevit.cli._common import add_json_flag, add_precision_flag, emit, positive_int


def add_parser(sub: argparse._SubParsersAction) -> None:
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


def collect(loaded, dataset, num_samples: int, seed: int, batch_size: int, progress: bool = True) -> dict:
    """Run the shared inference function over a dataset; seeds are seed + index, so results are reproducible."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False)
    out: dict[str, list] = {k: [] for k in ("probs", "labels", "total", "aleatoric", "epistemic", "logits")}
    start = 0
    for images, labels in tqdm(loader, desc="evaluate", unit="batch", disable=not progress):
        seeds = list(range(seed + start, seed + start + len(labels)))
        start += len(labels)
        pred = loaded.predict(images, num_samples=num_samples, seed=seeds)
        s = pred.summary
        out["probs"].append(s.probs.cpu())
        out["labels"].append(labels)
        out["total"].append(s.total.cpu())
        out["aleatoric"].append(s.aleatoric.cpu())
        out["epistemic"].append(s.epistemic.cpu())
        out["logits"].append(pred.logits.cpu())
    cat = {k: torch.cat(v, dim=1 if k == "logits" else 0) for k, v in out.items()}
    return cat


def run(args: argparse.Namespace) -> int:
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
                         f"{figures['mean_aleatoric_uncertainty']:.4f}  epistemic {figures['mean_epistemic_uncertainty']:.4f} nats"))
    return 0
