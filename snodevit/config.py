"""Model configuration and the registry of named variants.

The configuration is a frozen dataclass (nanoGPT's ``GPTConfig``): every field has a one-line comment, it is
stored inside every checkpoint and every exported ONNX graph, so a model can always be rebuilt from its files.
Named variants are small factory functions that merge their defaults with the caller's overrides
(timm's ``@register_model``). Named presets are registered the same way: a preset is a variant with its input
and recipe fixed, such as ``snodevit_mnist``, the architecture of the shipped model (``models/snodevit-mnist``),
so that ``create_model("snodevit_mnist")`` builds exactly what ships.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from typing import Any, Callable, Literal, get_args

import torch

AttentionType = Literal["ksvd", "softmax", "linformer", "performer", "nystrom", "hybrid"]
RankMode = Literal["fixed", "adaptive"]
SolverType = Literal["euler", "heun"]
StemType = Literal["patch", "conv"]
PoolType = Literal["cls", "mean"]
MagnitudeInput = Literal["tokens", "features"]

ATTENTION_TYPES: tuple[str, ...] = get_args(AttentionType)
SOLVER_TYPES: tuple[str, ...] = get_args(SolverType)
STEM_TYPES: tuple[str, ...] = get_args(StemType)
POOL_TYPES: tuple[str, ...] = get_args(PoolType)
RANK_MODES: tuple[str, ...] = get_args(RankMode)
MAGNITUDE_INPUTS: tuple[str, ...] = get_args(MagnitudeInput)


def _check_choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {list(allowed)}, got {value!r}")


def _check_positive(name: str, value: Any, *, allow_zero: bool = False) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else ">= 1"
        raise ValueError(f"{name} must be an integer {bound}, got {value!r}")


@dataclass(frozen=True)
class SNodeViTConfig:
    """Everything needed to rebuild a SNodeViT. Saved in checkpoints and ONNX metadata."""

    image_size: int = 224  # input height and width in pixels (square images)
    in_channels: int = 3  # 1 for grayscale (MNIST), 3 for RGB
    patch_size: int = 16  # side of one patch: the token grid is (image_size // patch_size) ** 2
    num_classes: int = 10  # size of the classification head
    dim: int = 96  # token width D
    depth: int = 6  # number of continuous (SDE) blocks
    num_heads: int = 3  # attention heads; dim must be divisible by it
    rank: int = 8  # KSVD rank r: number of e/r score directions per head
    mlp_ratio: float = 4.0  # hidden width of the drift MLP is mlp_ratio * dim
    attention: AttentionType = "ksvd"  # ksvd (Primal-Attention), softmax (plain ViT), linformer, performer, nystrom, hybrid
    rank_mode: RankMode = "fixed"  # ksvd: "fixed" uses `rank`; "adaptive" picks it from token count and width
    linformer_k: int = 16  # linformer: length the keys/values are projected to (needs a static token count)
    performer_features: int = 32  # performer: number of positive orthogonal random features per head
    nystrom_landmarks: int = 8  # nystrom: landmarks (segment means of queries/keys)
    hybrid_window: int = 1  # hybrid: local window radius on the patch grid (in dilated steps)
    hybrid_dilation: int = 2  # hybrid: dilation of the local window
    fused_attn: bool = True  # fused kernels: softmax's scaled_dot_product_attention, ksvd's merged eval path; maps, ksvd training and softmax export stay explicit
    stem: StemType = "patch"  # "patch" (one strided conv) or "conv" (3x3 conv stack, Xiao et al. 2021)
    pool: PoolType = "cls"  # read the class token ("cls") or average the patch tokens ("mean")
    solver: SolverType = "euler"  # "euler" (Euler-Maruyama, Ito) or "heun" (Stratonovich Heun)
    num_steps: int = 2  # solver steps K per block over t in [0, 1]
    noise_dim: int = 8  # m: width of the low-rank diffusion subspace; 0 turns the model into a deterministic ODE ViT
    noise_blocks: int = 0  # diffusion only in the last noise_blocks blocks; the earlier (ODE) blocks run once per image for all samples; 0 = every block
    diffusion_scale: float = 1.0  # upper bound of the diffusion gate sigma(t); 0.1 gave 30x smaller epistemic spread at equal accuracy
    ood_diffusion_scale: float = 0.0  # SDE-Net: > 0 scales every block's noise by this * c(x), c(x) in (0, 1) a per-image magnitude; 0 = off
    magnitude_input: MagnitudeInput = "tokens"  # what c(x) reads: the embedded "tokens", or the pooled "features" of every layer before the first noise block
    time_embed_dim: int = 32  # sinusoidal embedding width of t fed to the TimeNet
    time_hidden_dim: int = 64  # hidden width of each block's TimeNet
    dropout: float = 0.0  # dropout on attention output and MLP (0 for the SDE model; used by the MC-dropout baseline)
    ksvd_loss_weight: float = 0.01  # eta: weight of the KSVD regularisation J^2 added to the training loss

    def __post_init__(self) -> None:
        _check_choice("attention", self.attention, ATTENTION_TYPES)
        _check_choice("solver", self.solver, SOLVER_TYPES)
        _check_choice("stem", self.stem, STEM_TYPES)
        _check_choice("pool", self.pool, POOL_TYPES)
        _check_choice("rank_mode", self.rank_mode, RANK_MODES)
        _check_choice("magnitude_input", self.magnitude_input, MAGNITUDE_INPUTS)
        for name in ("image_size", "in_channels", "patch_size", "num_classes", "dim", "depth", "num_heads", "rank",
                     "num_steps", "time_embed_dim", "time_hidden_dim", "linformer_k", "performer_features",
                     "nystrom_landmarks", "hybrid_window", "hybrid_dilation"):
            _check_positive(name, getattr(self, name))
        _check_positive("noise_dim", self.noise_dim, allow_zero=True)
        if not (isinstance(self.noise_blocks, int) and 0 <= self.noise_blocks <= self.depth):
            raise ValueError(f"noise_blocks must be an integer in [0, depth={self.depth}] (0 = every block), "
                             f"got {self.noise_blocks!r}")
        if self.dim % self.num_heads:
            raise ValueError(f"dim ({self.dim}) must be divisible by num_heads ({self.num_heads})")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size ({self.image_size}) must be divisible by patch_size ({self.patch_size})")
        if self.stem == "conv" and (self.patch_size & (self.patch_size - 1) or self.patch_size < 2):
            raise ValueError(f"stem='conv' needs a power-of-two patch_size >= 2, got {self.patch_size}")
        if self.time_embed_dim % 2:
            raise ValueError(f"time_embed_dim must be even, got {self.time_embed_dim}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.mlp_ratio <= 0 or self.diffusion_scale < 0 or self.ksvd_loss_weight < 0:
            raise ValueError("mlp_ratio must be > 0, diffusion_scale and ksvd_loss_weight >= 0")
        if not (isinstance(self.ood_diffusion_scale, (int, float)) and math.isfinite(self.ood_diffusion_scale)
                and self.ood_diffusion_scale >= 0):
            raise ValueError(f"ood_diffusion_scale must be a finite number >= 0, got {self.ood_diffusion_scale!r}")
        if self.ood_diffusion_scale > 0 and self.noise_dim == 0:
            raise ValueError("ood_diffusion_scale > 0 scales the diffusion, so it needs noise_dim > 0, got noise_dim=0")

    @property
    def grid_size(self) -> int:
        """Patches per side."""
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size**2

    @property
    def num_tokens(self) -> int:
        """Tokens seen by the blocks: patches plus the class token."""
        return self.num_patches + 1

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def effective_rank(self) -> int:
        """KSVD rank: ``rank``, or with rank_mode="adaptive" ceil(sqrt(N)) clamped to [4, head_dim]
        (more directions for more tokens, never more than a head can hold)."""
        if self.rank_mode == "fixed":
            return self.rank
        return max(4, min(self.head_dim, math.ceil(math.sqrt(self.num_tokens))))

    @property
    def stochastic(self) -> bool:
        """True when the blocks carry a diffusion term."""
        return self.noise_dim > 0

    @property
    def ood_diffusion(self) -> bool:
        """True when the diffusion magnitude depends on the image (SDE-Net style, ``ood_diffusion_scale > 0``)."""
        return self.ood_diffusion_scale > 0

    @property
    def samples_share_all_but_last_step(self) -> bool:
        """True when the Monte Carlo samples differ only by the noise of one Euler step in the last block: every
        earlier block is an ODE block run once per image, and the last block's drift is evaluated once at the state
        the samples share (``SDEBlock.forward_shared``). A sample then costs a few elementwise operations, not a
        block, and passes can hold many more images."""
        return (self.stochastic and self.first_noise_block == self.depth - 1 and self.num_steps == 1
                and self.solver == "euler")

    @property
    def num_noise_blocks(self) -> int:
        """L: the number of final blocks that take noise (``noise_blocks``, or every block when it is 0)."""
        return self.noise_blocks or self.depth

    @property
    def first_noise_block(self) -> int:
        """Index of the first block that takes noise; in a stochastic model the blocks before it are ODE blocks."""
        return self.depth - self.num_noise_blocks

    @property
    def gate_feature_names(self) -> tuple[str, ...]:
        """Names of the pooled feature vectors ``sample_logits(return_features=True)`` returns, in order."""
        return ("embed", *(f"block{i}" for i in range(self.depth)))

    @property
    def num_gate_features(self) -> int:
        """F: how many pooled vectors per sample the OOD gate reads (the embedding and every block: 1 + depth)."""
        return 1 + self.depth

    @property
    def gate_feature_dim(self) -> int:
        """Width of one gate feature vector: the patch tokens' four quadrant means, 4 * dim."""
        return 4 * self.dim

    def noise_shape(self, batch_size: int, num_samples: int = 1) -> tuple[int, ...]:
        """Shape of the noise of ``num_samples`` samples of ``batch_size`` images: (S, B, L, K, N, m).

        L is :attr:`num_noise_blocks` (the depth unless ``noise_blocks`` limits the diffusion to the last blocks).
        """
        return (num_samples, batch_size, self.num_noise_blocks, self.num_steps, self.num_tokens, self.noise_dim)

    def check_images(self, images: Any) -> None:
        """The input contract of every backend: a float (B, C, H, W) tensor of this model's size.

        Raises:
            ValueError: naming the expected and the given shape or dtype.
        """
        if not isinstance(images, torch.Tensor) or images.dim() != 4:
            got = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise ValueError(f"images must be a (B, C, H, W) tensor, got {got}")
        if tuple(images.shape[1:]) != (self.in_channels, self.image_size, self.image_size):
            raise ValueError(f"images must have shape (B, {self.in_channels}, {self.image_size}, {self.image_size}) "
                             f"for this model, got {tuple(images.shape)}")
        if not images.is_floating_point():
            raise ValueError(f"images must be a floating point tensor (normalised pixels), got {images.dtype}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "SNodeViTConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown config fields {unknown}; known fields: {sorted(known)}")
        return cls(**data)

    def replace(self, **overrides: Any) -> "SNodeViTConfig":
        return dataclasses.replace(self, **overrides)


_VARIANTS: dict[str, Callable[..., SNodeViTConfig]] = {}


def register_variant(fn: Callable[..., SNodeViTConfig]) -> Callable[..., SNodeViTConfig]:
    """Register a named variant factory under its function name."""
    _VARIANTS[fn.__name__] = fn
    return fn


def _merge(defaults: dict[str, Any], overrides: dict[str, Any]) -> SNodeViTConfig:
    known = {f.name for f in dataclasses.fields(SNodeViTConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"unknown override(s) {unknown}; known fields: {sorted(known)}")
    return SNodeViTConfig(**{**defaults, **overrides})


# Input of 28x28 grayscale digits (MNIST, scikit-learn digits): a convolutional stem reaching 4x4 patches.
MNIST_OVERRIDES: dict[str, Any] = dict(image_size=28, in_channels=1, patch_size=4, num_classes=10, stem="conv")


@register_variant
def tiny(**overrides: Any) -> SNodeViTConfig:
    return _merge(dict(dim=96, depth=6, num_heads=3, rank=8), overrides)


@register_variant
def small(**overrides: Any) -> SNodeViTConfig:
    return _merge(dict(dim=192, depth=8, num_heads=4, rank=16), overrides)


@register_variant
def base(**overrides: Any) -> SNodeViTConfig:
    return _merge(dict(dim=384, depth=12, num_heads=6, rank=24, mlp_ratio=3.0), overrides)


@register_variant
def large(**overrides: Any) -> SNodeViTConfig:
    return _merge(dict(dim=768, depth=16, num_heads=12, rank=32, mlp_ratio=2.0), overrides)


@register_variant
def snodevit_mnist(**overrides: Any) -> SNodeViTConfig:
    """The shipped model's architecture (``models/snodevit-mnist``): ``tiny`` on 28x28 grayscale digits with one
    Euler-Maruyama step per block, five ODE blocks run once per image and one stochastic block whose samples share
    its drift, the noise scaled by a magnitude c(x) read from the ODE blocks' pooled features
    (``magnitude_input="features"``). `snodevit tail` makes it from a ``snodevit_mnist_every_block`` model
    (:mod:`snodevit.training.tail`); 32 samples cost about 1.5 deterministic passes."""
    return snodevit_mnist_every_block(**{"noise_blocks": 1, "ood_diffusion_scale": 8.0, "magnitude_input": "features",
                                         **overrides})


@register_variant
def snodevit_mnist_every_block(**overrides: Any) -> SNodeViTConfig:
    """What the shipped model is trained as before `snodevit tail`: ``tiny`` on 28x28 grayscale digits, noise in
    every block, one Euler-Maruyama step per block (the demo's training budget: half the cost of two steps). Also
    the baseline of the Monte Carlo speed comparison."""
    return tiny(**{**MNIST_OVERRIDES, "num_steps": 1, **overrides})


def list_variants() -> list[str]:
    """The registered variant and preset names, sorted."""
    return sorted(_VARIANTS)


def get_config(name: str, **overrides: Any) -> SNodeViTConfig:
    """Build the config of a named variant with overrides applied.

    Raises:
        ValueError: unknown variant name or unknown/invalid override.
    """
    if name not in _VARIANTS:
        raise ValueError(f"unknown variant {name!r}; available: {list_variants()}")
    return _VARIANTS[name](**overrides)


