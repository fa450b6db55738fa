"""`snodevit train`: train a model on a data set and write the best checkpoint (safetensors + JSON)."""

from __future__ import annotations

import argparse
import importlib.metadata
import shlex
import sys
import time
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

import torch

from snodevit.config import ATTENTION_TYPES, POOL_TYPES, SOLVER_TYPES, SNodeViTConfig, get_config, list_variants
from snodevit.data.sets import load_dataset
from snodevit.machine import cpu_name
from snodevit.model import SNodeViT, count_parameters
from snodevit.training import distributed
from snodevit.training.backprop import BACKPROP_MODES
from snodevit.training.train import PRECISIONS, TrainConfig, train_model, use_bf16
from snodevit.cli._common import add_device_flag, add_json_flag, emit, positive_int, resolve_device


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a model", description=__doc__)
    p.add_argument("--variant", default="tiny", choices=list_variants(),
                   help="a named variant, or a preset such as snodevit_mnist, the shipped model's architecture "
                        "(tiny with one solver step per block); the flags below override its fields")
    p.add_argument("--data", default="mnist5k", help="mnist5k, digits, imagefolder:PATH or cifar10:PATH")
    p.add_argument("--out", required=True, type=Path, help="model directory to write")
    p.add_argument("--epochs", type=positive_int, default=TrainConfig.epochs)
    p.add_argument("--batch-size", type=positive_int, default=TrainConfig.batch_size)
    p.add_argument("--lr", type=float, default=TrainConfig.lr)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--precision", choices=PRECISIONS, default=TrainConfig.precision,
                   help="bf16 autocast: 'auto' (default) as in every other command ($SNODEVIT_PRECISION when "
                        "set, else bf16 on CUDA and on CPUs with native bf16, AVX512-BF16/AMX: 1.25x faster steps "
                        "there), 'bf16' (refused on a CPU that would emulate it), 'fp32' never")
    p.add_argument("--ema-decay", type=float, default=TrainConfig.ema_decay,
                   help="keep an exponential moving average of the weights with this decay (e.g. 0.998) and "
                        "validate and save it instead of the last weights; 0 (default) turns it off")
    p.add_argument("--backprop", choices=BACKPROP_MODES, default=TrainConfig.backprop,
                   help="gradients through the blocks: 'standard' keeps every activation, 'checkpoint' recomputes each "
                        "block in backward, 'reversible' trains with exactly invertible BDIA steps (gamma = +-0.5 per "
                        "sample and block, 0 at inference) and rebuilds the activations in backward (docs/memory.md)")
    p.add_argument("--keep", choices=["last", "best"], default="last",
                   help="checkpoint to write: the last epoch (default) or the best on the validation split, which is "
                        "the calibration split and biases later calibration")
    p.add_argument("--attention", choices=ATTENTION_TYPES, default=None, help="attention backend (variant default)")
    p.add_argument("--solver", choices=SOLVER_TYPES, default=None)
    p.add_argument("--num-steps", type=positive_int, default=None, help="solver steps per block")
    p.add_argument("--noise-dim", type=int, default=None, help="diffusion rank m; 0 trains a deterministic ODE ViT")
    p.add_argument("--noise-blocks", type=int, default=None,
                   help="diffusion only in the last N blocks; the blocks before them are ODE blocks run once per "
                        "image for all samples (default: every block)")
    p.add_argument("--diffusion-scale", type=float, default=None, help="upper bound of the diffusion gate sigma(t)")
    p.add_argument("--pool", choices=POOL_TYPES, default=None)
    p.add_argument("--dropout", type=float, default=None)
    p.add_argument("--ood-diffusion-weight", type=float, default=0.0,
                   help="SDE-Net: weight of the BCE that trains a per-image diffusion magnitude to stay small on the "
                        "training images and grow on noise-perturbed ones (0, the default, trains without it)")
    p.add_argument("--ood-diffusion-scale", type=float, default=None,
                   help=f"SDE-Net: largest noise multiplier of that magnitude (default {DEFAULT_OOD_DIFFUSION_SCALE:g} "
                        "when --ood-diffusion-weight > 0)")
    p.add_argument("--image-size", type=positive_int, default=None, help="resize images (image folders, CIFAR)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_device_flag(p)
    add_json_flag(p)
    p.set_defaults(func=run)


#: ``--ood-diffusion-scale`` when only ``--ood-diffusion-weight`` is given (the uncertainty benchmark's setting).
DEFAULT_OOD_DIFFUSION_SCALE = 20.0


def model_overrides_for(prep_size: int, channels: int, num_classes: int) -> dict:
    """Input-dependent config: 4x4 patches and a conv stem for small images, 16x16 patches otherwise."""
    patch = 4 if prep_size <= 64 else 16
    if prep_size % patch:
        raise ValueError(f"image size {prep_size} is not divisible by the patch size {patch}; pass --image-size")
    return dict(image_size=prep_size, in_channels=channels, patch_size=patch, num_classes=num_classes, stem="conv")


def model_config(args: argparse.Namespace, image_size: int, channels: int, num_classes: int) -> SNodeViTConfig:
    """The config to train: ``--variant`` (a variant or a preset), the data's input fields, then the flags given.

    Nothing else is changed: ``--variant tiny`` is plain tiny, the shipped architecture is ``--variant
    snodevit_mnist``.

    Raises:
        ValueError: an image size the patch size does not divide, or an invalid field value.
    """
    overrides = model_overrides_for(image_size, channels, num_classes)
    for key in ("attention", "solver", "num_steps", "noise_dim", "noise_blocks", "pool", "dropout", "diffusion_scale"):
        value = getattr(args, key)
        if value is not None:
            overrides[key] = value
    if args.ood_diffusion_scale is not None:
        overrides["ood_diffusion_scale"] = args.ood_diffusion_scale
    elif args.ood_diffusion_weight > 0:
        overrides["ood_diffusion_scale"] = DEFAULT_OOD_DIFFUSION_SCALE
    return get_config(args.variant, **overrides)


#: Parsed arguments that do not change what is trained: the rest of ``args`` is the recipe.
_NOT_RECIPE = frozenset({"command", "func", "verbose", "json", "no_progress"})


def provenance(args: argparse.Namespace, device: torch.device | str,
               job: distributed.Distributed | None = None) -> dict[str, str | int]:
    """How a checkpoint was made: the full `snodevit train` command (defaults spelled out), where and when; under
    torchrun also the launcher and the world size (the command's --batch-size is the global batch)."""
    parts = ["snodevit", "train"]
    for name, value in vars(args).items():
        if name in _NOT_RECIPE or value is None or value is False:
            continue
        parts.append(f"--{name.replace('_', '-')}")
        if value is not True:  # a switch is its flag alone
            parts.append(str(value))
    made: dict[str, str | int] = {"command": shlex.join(parts), "device": str(device), "cpu": cpu_name(),
                                  "torch": torch.__version__, "snodevit": _version(),
                                  "date": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}
    if job is not None:
        made.update(launcher="torchrun", world_size=job.world_size)
    return made


def _version() -> str:
    try:
        return importlib.metadata.version("snodevit")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def run(args: argparse.Namespace) -> int:
    job = distributed.from_env()  # torchrun: DDP, with rank 0 alone printing and saving
    device = resolve_device(args.device)
    if job is not None:
        device = distributed.start(job, device)
    augment = "light_flip" if args.data.startswith("cifar10") else "light"
    bundle = load_dataset(args.data, image_size=args.image_size, augment=augment)
    prep = bundle.preprocessing
    cfg = model_config(args, prep.image_size, prep.channels, bundle.num_classes)
    torch.manual_seed(args.seed)
    model = SNodeViT(cfg)
    tc = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed, keep=args.keep,
                     ood_diffusion_weight=args.ood_diffusion_weight, ema_decay=args.ema_decay,
                     precision=args.precision, backprop=args.backprop)
    meta = {"class_names": bundle.class_names, "preprocessing": prep.to_dict(), "data": bundle.spec,
            "variant": args.variant, "provenance": provenance(args, device, job)}
    if not args.json and (job is None or job.is_main):
        print(f"training {args.variant} ({count_parameters(model) / 1e6:.2f}M parameters, {cfg.attention} attention, "
              f"{cfg.solver} x {cfg.num_steps}, noise dim {cfg.noise_dim}"
              f"{f' in the last {cfg.num_noise_blocks} of {cfg.depth} blocks' if cfg.noise_blocks else ''}, "
              f"{'bf16' if use_bf16(tc.precision, torch.device(device)) else 'fp32'}) on {bundle.name}: "
              f"{len(bundle.train)} train / {len(bundle.calibration)} validation images, device {device}")
    start = time.perf_counter()
    show_bar = not args.no_progress and not args.json

    def report(row: dict) -> None:  # epoch lines when there is no bar to carry them
        if not show_bar and not args.json:
            print(f"epoch {row['epoch']:3d}  loss {row['train_loss']:.4f}  val acc {row['val_accuracy']:.4f}  "
                  f"({row['seconds']:.0f}s)", file=sys.stderr, flush=True)

    result = train_model(model, bundle.train, bundle.calibration, tc, out_dir=args.out, meta=meta, device=device,
                         progress=show_bar, on_epoch=report, job=job)
    if job is not None:
        distributed.stop()
        if not job.is_main:
            return 0
    final = result.history[-1]["val_accuracy"]
    figures = {"out": str(args.out), "keep": args.keep, "final_val_accuracy": final, "best_val_accuracy": result.best_val_accuracy, "best_epoch": result.best_epoch,
               "train_seconds": result.seconds, "total_seconds": time.perf_counter() - start,
               "config": cfg.to_dict(), "train_config": asdict(tc)}
    emit(args, figures, f"final validation accuracy {final:.4f}; best  {result.best_val_accuracy:.4f} at epoch {result.best_epoch}; "
                        f"{result.seconds:.0f}s; model written to {args.out}")
    return 0
