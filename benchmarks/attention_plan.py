"""What benchmarks/attention_comparison.py measures: the backends, the plan of one invocation, the model configs."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
# The full run's model is the shipped architecture, the `snodevit_mnist_every_block` preset (`snodevit train --variant
# snodevit_mnist_every_block`): tiny + MNIST_OVERRIDES with one solver step per block, the demo's budget. The preset sets
# num_steps=1 itself; it is repeated here because the report's model label names it.
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


def plan_tokens(plan: Plan) -> list[int]:
    """The patch token counts of the cost sweep's image sizes (patch 4)."""
    return [(s // 4) ** 2 for s in plan.sizes]


def model_config(name: str, overrides: dict[str, Any], plan: Plan, image_size: int = 28) -> Any:
    """The SNodeViTConfig of one backend at one image size: the `snodevit_mnist_every_block` preset with the plan's overrides."""
    from snodevit import get_config

    return get_config("snodevit_mnist_every_block", **{**plan.model_overrides, **overrides, "image_size": image_size})


def resolved(cfg: Any) -> Any:
    """The config with the adaptive KSVD rank written out, so two configs that build the same model compare equal."""
    if cfg.attention == "ksvd" and cfg.rank_mode == "adaptive":
        return cfg.replace(rank=cfg.effective_rank, rank_mode="fixed")
    return cfg


def train_config(plan: Plan, seed: int) -> Any:
    """The TrainConfig of every backend's training with ``seed``."""
    from snodevit.training.train import TrainConfig

    # Quick runs load augmentation in the main process: a DataLoader worker costs more than it saves there.
    return TrainConfig(epochs=plan.epochs, seed=seed, num_workers=0 if plan.quick else 1)
