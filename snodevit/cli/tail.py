"""`snodevit tail`: give a trained model a stochastic tail (noise in the last block only, scaled by a magnitude
trained to grow off the training distribution) and write it as a new model directory, to calibrate next.

See :mod:`snodevit.training.tail` for what is fitted. The training images are the ``train`` split of the data set
the model was trained on; nothing else is read.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import asdict
from pathlib import Path

import torch

from snodevit.checkpoint import load_model, save_model
from snodevit.cli._common import add_json_flag, emit, positive_int
from snodevit.cli.errors import CLIError
from snodevit.data import normalize, resize_tensor
from snodevit.data.preprocessing import Preprocessing
from snodevit.data.sets import load_dataset
from snodevit.training.tail import TailConfig, stochastic_tail_of, synthetic_outliers, train_stochastic_tail

#: Metadata of the source that describes its calibration, which the new model does not have yet.
_CALIBRATION_KEYS = ("calibration", "calibration_figures")


def add_parser(sub: argparse._SubParsersAction) -> None:
    d = TailConfig()
    p = sub.add_parser("tail", help="give a trained model a stochastic tail (then run `snodevit calibrate`)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, type=Path, help="trained model directory (noise in every block, "
                   "one Euler step per block, e.g. from `snodevit train --variant snodevit_mnist_every_block`)")
    p.add_argument("--out", required=True, type=Path, help="model directory to write (not the source)")
    p.add_argument("--data", default=None, help="data set whose train split is used (default: the model's own)")
    p.add_argument("--scale", type=float, default=d.ood_diffusion_scale,
                   help="largest noise multiplier, for an image the magnitude calls unfamiliar (default: %(default)s)")
    p.add_argument("--magnitude-steps", type=positive_int, default=d.magnitude_steps,
                   help="optimiser steps of the magnitude head (default: %(default)s)")
    p.add_argument("--diffusion-steps", type=positive_int, default=d.diffusion_steps,
                   help="optimiser steps of the last block's diffusion (default: %(default)s)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_json_flag(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Build, fit and write the tail model. Returns 0; bad arguments raise ``CLIError`` (exit 2)."""
    if args.out.resolve() == args.model.resolve():
        raise CLIError("--out must be a new directory, not the source model's (its calibration would no longer fit)")
    if not args.scale > 0:
        raise CLIError(f"--scale must be > 0, got {args.scale:g}")
    torch.manual_seed(args.seed)
    source, meta = load_model(args.model)
    try:
        model = stochastic_tail_of(source, args.scale)
    except ValueError as e:
        raise CLIError(str(e)) from None
    spec = args.data or meta.get("data") or "mnist5k"
    prep = Preprocessing.from_dict(meta["preprocessing"]) if "preprocessing" in meta else None
    bundle = load_dataset(spec, image_size=prep.image_size if prep else None)
    prep = prep or bundle.preprocessing
    raw, labels = bundle.raw("train")
    tc = TailConfig(ood_diffusion_scale=args.scale, seed=args.seed, magnitude_steps=args.magnitude_steps,
                    diffusion_steps=args.diffusion_steps)
    outliers = synthetic_outliers(raw, tc.num_outliers, torch.Generator().manual_seed(args.seed))
    start = time.perf_counter()
    figures = train_stochastic_tail(model, normalize(resize_tensor(raw, prep), prep), labels.to(torch.int64),
                                    normalize(resize_tensor(outliers, prep), prep), tc,
                                    progress=not (args.no_progress or args.json))
    seconds = time.perf_counter() - start
    kept = {k: v for k, v in meta.items() if k not in (*_CALIBRATION_KEYS, "weights_sha256")}
    kept["stochastic_tail"] = {"source": str(args.model), "source_weights_sha256": meta.get("weights_sha256"),
                               "data": spec, "config": asdict(tc), "figures": figures, "seconds": seconds}
    save_model(model, args.out, kept)
    out = {"out": str(args.out), "seconds": seconds, **figures}
    emit(args, out, f"stochastic tail fitted in {seconds:.0f}s: magnitude {figures['magnitude_train_mean']:.3f} on "
                    f"training images, {figures['magnitude_outlier_mean']:.3f} on synthetic outliers; written to "
                    f"{args.out} (next: snodevit calibrate --model {args.out} --out {args.out}/calibration)")
    return 0
