"""What ``benchmarks/uncertainty.py`` trains and evaluates: the goals of issue #7, the budget, the methods and the
config of each training kind (the shipped architecture, ``snodevit_mnist_every_block``, with the kind's overrides)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from snodevit.cli.train import DEFAULT_OOD_DIFFUSION_SCALE

#: Goals of issue #7.
GOAL_ACCURACY = 0.98
GOAL_OOD_MI_AUROC = 0.99
GOAL_ECE_VS_ENSEMBLE = 0.10  # mean rotated ECE within 10 % of the ensemble's ...
GOAL_COST_VS_ENSEMBLE = 1.0 / 3.0  # ... at no more than a third of its forward FLOPs
OOD_SETS = ("uniform_noise", "photo_crops")
MEMBER_SEED_STRIDE = 100  # member k of run seed s is trained with seed s + 100 k
EVAL_SEED_STRIDE = 1_000_000  # image i of run seed s is predicted with seed s * 1e6 + i
REJECTION_GRID = tuple(round(0.05 * i, 2) for i in range(20))  # rejected fractions of the accuracy-rejection curve
#: SDE-Net settings of ``snodevit-ood`` (see the doc's "What was tried"), as `snodevit train --ood-diffusion-weight 1`.
OOD_DIFFUSION_WEIGHT = 1.0
#: ``noise_blocks`` of ``snodevit-last`` / ``snodevit-ood-last``: diffusion only in the last block, so the first
#: depth - 1 blocks are shared by the samples and S samples cost (depth - 1 + S) / depth passes, not S.
LAST_NOISE_BLOCKS = 1
#: Epochs of the full run. TrainConfig's (and the demo model's) 30 do not fit the ~8 minute budget: the tiny model
#: is kernel-launch bound, 24 models train at ~1.2 model-epochs/s in aggregate on the H100 machine (measured: 10
#: epochs, --jobs 14: 205 s of training, 287 s in all), so 30 epochs would take ~10 min of training alone. Every
#: model gets 15 (~5 min of training, ~6.5 min in all). `--epochs 30` restores the demo budget.
FULL_EPOCHS = 15
#: ``--quick``: a depth-2 narrow model, 1 epoch on a few hundred images, few evaluation images.
QUICK_MODEL = dict(dim=32, depth=2, num_heads=2, rank=4, time_embed_dim=16, time_hidden_dim=16, noise_dim=4)
#: The preset every model is built from: the shipped architecture (tiny, MNIST_OVERRIDES, one solver step per block).
PRESET = "snodevit_mnist_every_block"


@dataclass(frozen=True)
class Budget:
    """How much is trained and evaluated."""

    epochs: int  # training epochs of every model
    seeds: tuple[int, ...]  # run seeds; every method is trained and evaluated once per seed
    num_samples: int  # S of the sampling methods (MC dropout, SNodeViT)
    ensemble_size: int  # M members of the deep ensemble
    model_overrides: dict[str, Any] = field(default_factory=dict)  # on top of the snodevit_mnist_every_block preset
    train_images: int | None = None  # first N images of the train split; None: all 4000
    eval_images: int | None = None  # first N images of the calibration/test/digits sets; None: all
    val_images: int | None = None  # first N calibration images of the per-epoch validation; None: all 500
    num_ood: int = 500  # images in each far-OOD set
    angles: tuple[float, ...] = tuple(float(a) for a in range(0, 181, 15))  # rotation angles, degrees
    num_workers: int = 1  # DataLoader workers per training process
    eval_batch: int = 250  # images per predict() call in evaluation
    timing_batch: int = 32  # images per timed predict() call
    timing_repeats: int = 7  # timed calls per method (median reported)
    cpu_threads: int = 1  # torch threads while timing on the CPU


@dataclass(frozen=True)
class Method:
    """One compared method: the checkpoints it evaluates and how it samples."""

    name: str
    kind: str  # the training kind whose checkpoints it evaluates
    samples: str  # "one", "S" or "members"
    description: str


def methods_for(budget: Budget) -> list[Method]:
    """The compared methods, in the order of every table."""
    m = budget.ensemble_size
    return [
        Method("det", "det", "one", "deterministic ViT of the same size (noise_dim=0), temperature-scaled"),
        Method("mc-dropout", "dropout", "S", "the same ViT trained with dropout 0.1, dropout active at test time"),
        Method(f"ensemble-{m}", "det", "members", f"{m} deterministic ViTs trained from different seeds"),
        Method("snodevit", "sde", "S", "SDE ViT (defaults: low-rank diffusion, noise dim 8)"),
        Method("snodevit-no-noise", "sde", "one", "the same SDE weights with the diffusion switched off (ODE path)"),
        Method("snodevit-ood", "sde-ood", "S", "SDE ViT whose diffusion is trained SDE-Net style to grow "
                                               "off-distribution"),
        Method("snodevit-last", "sde-last", "S", f"SDE ViT with diffusion in the last {LAST_NOISE_BLOCKS} block only "
                                                 "(noise_blocks); the ODE blocks before it run once per image"),
        Method("snodevit-ood-last", "sde-ood-last", "S", "snodevit-ood with the diffusion in the last "
                                                         f"{LAST_NOISE_BLOCKS} block only"),
    ]


def num_samples_of(method: Method, budget: Budget) -> int:
    """S of a method: 1, the budget's S, or the ensemble's members."""
    return {"one": 1, "S": budget.num_samples, "members": budget.ensemble_size}[method.samples]


def member_seeds(seed: int, size: int) -> list[int]:
    """Training seeds of the ensemble members of run seed ``seed`` (member 0 is that run's ``det`` model)."""
    return [seed + MEMBER_SEED_STRIDE * k for k in range(size)]


def kind_overrides(kind: str) -> dict[str, Any]:
    """Config overrides of each training kind (on top of the budget's model)."""
    ood = dict(ood_diffusion_scale=DEFAULT_OOD_DIFFUSION_SCALE)
    last = dict(noise_blocks=LAST_NOISE_BLOCKS)
    return {"det": dict(noise_dim=0), "dropout": dict(noise_dim=0, dropout=0.1), "sde": {}, "sde-ood": ood,
            "sde-last": last, "sde-ood-last": {**ood, **last}}[kind]


def kind_train_overrides(kind: str) -> dict[str, Any]:
    """TrainConfig overrides of each training kind: the SDE-Net term of the ``-ood`` kinds."""
    ood = dict(ood_diffusion_weight=OOD_DIFFUSION_WEIGHT)
    return {"sde-ood": ood, "sde-ood-last": ood}.get(kind, {})


def model_config(kind: str, budget: Budget) -> dict[str, Any]:
    """The model config of a training kind: the shipped preset, the budget's overrides, the kind's overrides."""
    from snodevit import get_config

    return get_config(PRESET, **{**budget.model_overrides, **kind_overrides(kind)}).to_dict()
