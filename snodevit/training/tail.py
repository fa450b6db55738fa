"""A stochastic tail for a trained model: its first blocks become ODE blocks run once per image, the last block
keeps its diffusion, and that noise is scaled by a per-image magnitude c(x) trained to grow off the training
distribution.

Two fits, both on the trained model's frozen prefix (computed once per image, so the whole run takes about a minute
on two CPU cores):

1. **Magnitude** (SDE-Net's objective): :class:`snodevit.nn.sde.FeatureMagnitude` reads the pooled features of the
   embedding and every ODE block and is trained with a binary cross-entropy to give c(x) = 0 on training images and
   c(x) = 1 on :func:`synthetic_outliers` made from training images only (cells shuffled, two digits cut together,
   two digits superimposed). None of the sets the project reports as held out (rotations, other digit sources,
   letters, inverted images, noise) is used.
2. **Diffusion**: the last block's state-dependent diffusion (its gate and subspace) is trained so that on the
   training images every sample stays right (cross-entropy of each sample) and on the outliers the samples
   disagree (their mutual information is maximised). Off the training distribution the samples then spread, and
   their mean probability, which the decision reads, loses its confidence.

With one Euler step in the last block, the samples differ only by the noise term added to a state they share, so
both fits (and :meth:`snodevit.model.SNodeViT.sample_logits`) evaluate the drift once per image.

References:
    Kong et al. "SDE-Net: Equipping Deep Neural Networks with Uncertainty Estimates." ICML 2020.
    Du, Wang, Cai, Li. "VOS: Learning What You Don't Know by Virtual Outlier Synthesis." ICLR 2022 (outliers made
    from the training distribution alone).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from snodevit.model import SNodeViT
from snodevit.nn.sde import _BlockSDE
from snodevit.training.perturb import shuffle_cells

__all__ = ["TailConfig", "stochastic_tail_of", "synthetic_outliers", "train_stochastic_tail"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TailConfig:
    """Settings of :func:`train_stochastic_tail`."""

    ood_diffusion_scale: float = 8.0  # largest noise multiplier (the noise of an image with c(x) = 1), for stochastic_tail_of
    magnitude_steps: int = 2000  # optimiser steps of the magnitude head
    diffusion_steps: int = 1500  # optimiser steps of the last block's diffusion
    batch_size: int = 128  # training images (and as many outliers) per step
    lr: float = 1e-3  # learning rate of both fits (AdamW for the head, Adam for the diffusion)
    disagreement_weight: float = 1.0  # weight of the outliers' mutual information against the cross-entropy
    samples_in: int = 4  # samples per training image in the diffusion fit
    samples_out: int = 8  # samples per outlier in the diffusion fit
    num_outliers: int = 4000  # synthetic outliers made from the training images
    seed: int = 0  # seeds the outliers, the batches and the noise

    def __post_init__(self) -> None:
        for name in ("magnitude_steps", "diffusion_steps", "batch_size", "samples_in", "samples_out", "num_outliers"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"TailConfig.{name} must be an integer >= 1, got {value!r}")
        if self.samples_out < 2:
            raise ValueError(f"TailConfig.samples_out must be >= 2 (disagreement needs two samples), got "
                             f"{self.samples_out}")
        for name in ("ood_diffusion_scale", "lr"):
            if not getattr(self, name) > 0:
                raise ValueError(f"TailConfig.{name} must be > 0, got {getattr(self, name)!r}")
        if not self.disagreement_weight >= 0:
            raise ValueError(f"TailConfig.disagreement_weight must be >= 0, got {self.disagreement_weight!r}")


def synthetic_outliers(images: Tensor, n: int, generator: torch.Generator) -> Tensor:
    """``n`` images that are not digits, made from training digits alone: a quarter each of cells shuffled on a
    2x2, 3x3 or 4x4 grid, the top of one digit over the bottom of another, the left of one beside the right of
    another, and two digits superimposed with weights in [0.35, 0.65].

    Args:
        images: (N, C, H, W) uint8 training images.
        n: how many to make (>= 4).
        generator: seeds the choice of images, the permutations and the weights.

    Returns:
        (n, C, H, W) uint8.
    """
    if images.dtype != torch.uint8 or images.dim() != 4:
        raise ValueError(f"images must be uint8 (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
    if n < 4:
        raise ValueError(f"n must be >= 4, got {n}")
    h, w = images.shape[-2:]
    a = images[torch.randint(len(images), (n,), generator=generator)].clone()
    b = images[torch.randint(len(images), (n,), generator=generator)]
    k = n // 4
    grids = [a[i * k // 3:(i + 1) * k // 3].float() for i in range(3)]
    shuffled = torch.cat([shuffle_cells(g, side, generator) for g, side in zip(grids, (2, 3, 4))]).to(torch.uint8)
    top = a[k:2 * k].clone()
    top[..., h // 2:, :] = b[k:2 * k][..., h // 2:, :]
    side = a[2 * k:3 * k].clone()
    side[..., :, w // 2:] = b[2 * k:3 * k][..., :, w // 2:]
    lam = torch.empty(n - 3 * k, 1, 1, 1).uniform_(0.35, 0.65, generator=generator)
    mixed = (lam * a[3 * k:].float() + (1 - lam) * b[3 * k:].float()).round().to(torch.uint8)
    return torch.cat([shuffled, top, side, mixed])


def stochastic_tail_of(source: SNodeViT, ood_diffusion_scale: float = 8.0) -> SNodeViT:
    """A copy of ``source`` with noise in its last block only and a feature-reading magnitude head (untrained).

    The weights of ``source`` carry over; the ODE blocks drop their diffusion parameters and their TimeNets the
    outputs of the diffusion gate.

    Raises:
        ValueError: a source without diffusion, or whose last block is not one Euler step.
    """
    c = source.cfg
    if not c.stochastic or c.num_steps != 1 or c.solver != "euler":
        raise ValueError("a stochastic tail needs a stochastic source model with one Euler step per block "
                         f"(got noise_dim={c.noise_dim}, num_steps={c.num_steps}, solver={c.solver!r})")
    cfg = c.replace(noise_blocks=1, ood_diffusion_scale=ood_diffusion_scale, magnitude_input="features")
    model = SNodeViT(cfg)
    own = model.state_dict()
    state = {}
    for key, value in source.state_dict().items():
        if key not in own:
            continue  # the ODE blocks' diffusion, and the source's own magnitude head
        if value.shape != own[key].shape:  # an ODE block's TimeNet output: the diffusion gate rows go
            value = value[: own[key].shape[0]]
        state[key] = value
    missing = model.load_state_dict(state, strict=False).missing_keys
    if any(not k.startswith("diffusion_head.") for k in missing):
        raise ValueError(f"weights of the source do not fit the tail model: missing {missing[:5]}")
    return model.to(next(source.parameters()).device).eval()


def _entropy(p: Tensor) -> Tensor:
    return -(p * p.clamp_min(1e-12).log()).sum(-1)


@torch.no_grad()
def _prefix(model: SNodeViT, images: Tensor, batch_size: int = 256) -> tuple[Tensor, Tensor, Tensor]:
    """Pooled prefix features (N, G, 4 D), and the last block's shared pieces for the class token: the state after
    the drift (N, D) and the pre-norm its diffusion reads (N, D)."""
    feats, det, prep = [], [], []
    block = model.blocks[-1]
    tp = block.time_params(images.dtype)
    for start in range(0, len(images), batch_size):
        tokens, f, _ = model.prefix_features(images[start:start + batch_size])
        sde = _BlockSDE(block, tp, False)
        prepared = sde.prepare(tokens)
        state = torch.add(tokens, sde.drift(tokens, prepared, 0), alpha=sde.dt)
        feats.append(f)
        det.append(state[:, 0])
        prep.append(prepared[:, 0])
    return torch.cat(feats), torch.cat(det), torch.cat(prep)


def train_stochastic_tail(model: SNodeViT, images: Tensor, labels: Tensor, outliers: Tensor,
                          tc: TailConfig | None = None, progress: bool = True) -> dict[str, float]:
    """Fit the magnitude head and the last block's diffusion of a :func:`stochastic_tail_of` model in place.

    Args:
        model: a model with ``magnitude_input="features"`` and noise in its last block only, one Euler step.
        images: (N, C, H, W) normalised training images; labels: (N,) int64.
        outliers: (M, C, H, W) normalised synthetic outliers (:func:`synthetic_outliers`, then normalised).
        tc: the settings; default :class:`TailConfig`.
        progress: show a progress bar (stderr).

    Returns:
        Final figures: the magnitude's mean on the training images and on the outliers, the training images'
        cross-entropy and the outliers' mutual information (nats).
    """
    tc = tc or TailConfig()
    cfg = model.cfg
    if not (model.magnitude_from_features and cfg.num_noise_blocks == 1 and cfg.num_steps == 1):
        raise ValueError("train_stochastic_tail needs a model built by stochastic_tail_of")
    gen = torch.Generator().manual_seed(tc.seed)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    f_in, det_in, prep_in = _prefix(model, images)
    f_out, det_out, prep_out = _prefix(model, outliers)
    bar = tqdm(total=tc.magnitude_steps + tc.diffusion_steps, desc="stochastic tail", unit="step",
               disable=not progress, dynamic_ncols=True)
    try:
        c_in, c_out = _fit_magnitude(model, f_in, f_out, tc, gen, bar)
        ce, mi = _fit_diffusion(model, (det_in, prep_in, c_in, labels), (det_out, prep_out, c_out), tc, gen, bar)
    finally:
        bar.close()
        for p in model.parameters():
            p.requires_grad_(True)
        model.eval()
    figures = {"magnitude_train_mean": float(c_in.mean()), "magnitude_outlier_mean": float(c_out.mean()),
               "train_cross_entropy": ce, "outlier_mutual_information": mi}
    log.info("stochastic tail: %s", figures)
    return figures


def _fit_magnitude(model: SNodeViT, f_in: Tensor, f_out: Tensor, tc: TailConfig, gen: torch.Generator,
                   bar: tqdm) -> tuple[Tensor, Tensor]:
    """Standardise the head's input on the training features, train it (BCE: 0 on training images, 1 on outliers),
    and return c(x) of both sets, (N,) and (M,)."""
    head = model.diffusion_head
    assert head is not None
    head.feature_mean.copy_(f_in.mean(0))
    head.feature_std.copy_(f_in.std(0) + 1e-3)  # a feature constant on the training images must not divide by 0
    params = list(head.parameters())
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=tc.lr, weight_decay=0.05)
    bs = tc.batch_size
    target = torch.cat([torch.zeros(bs), torch.ones(bs)])
    head.train()
    for _ in range(tc.magnitude_steps):
        i = torch.randint(len(f_in), (bs,), generator=gen)
        o = torch.randint(len(f_out), (bs,), generator=gen)
        loss = F.binary_cross_entropy_with_logits(head(torch.cat([f_in[i], f_out[o]])), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        bar.update(1)
    head.eval()
    for p in params:
        p.requires_grad_(False)
    with torch.no_grad():
        return torch.sigmoid(head(f_in)), torch.sigmoid(head(f_out))


def _fit_diffusion(model: SNodeViT, train: tuple[Tensor, ...], out: tuple[Tensor, ...], tc: TailConfig,
                   gen: torch.Generator, bar: tqdm) -> tuple[float, float]:
    """Train the last block's diffusion gate and subspace: cross-entropy of every sample on the training images
    minus the weighted mutual information of the outliers' samples. ``train`` is (state, pre-norm, c, labels) and
    ``out`` (state, pre-norm, c) of the class token. Returns the last step's cross-entropy and mutual information."""
    block = model.blocks[-1]
    params = list(block.diff_gate.parameters()) + list(block.diff_out.parameters())
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=tc.lr)
    sigma = block.time_params(train[0].dtype).sigma[0]  # (m,), dt = 1
    scale = model.cfg.ood_diffusion_scale

    def sample_logits(det: Tensor, prep: Tensor, c: Tensor, k: int) -> Tensor:  # (k, B, classes)
        gate = torch.sigmoid(block.diff_gate(prep)) * sigma  # (B, m)
        xi = torch.randn((k, *gate.shape), generator=gen) * (scale * c).view(1, -1, 1)
        return model.head(model.norm(det.unsqueeze(0) + block.diff_out(gate.unsqueeze(0) * xi)))

    det_in, prep_in, c_in, labels = train
    det_out, prep_out, c_out = out
    bs = tc.batch_size
    ce = mi = torch.zeros(())
    for _ in range(tc.diffusion_steps):
        i = torch.randint(len(det_in), (bs,), generator=gen)
        o = torch.randint(len(det_out), (bs,), generator=gen)
        logits_in = sample_logits(det_in[i], prep_in[i], c_in[i], tc.samples_in)
        ce = F.cross_entropy(logits_in.reshape(-1, logits_in.shape[-1]), labels[i].repeat(tc.samples_in))
        p_s = torch.softmax(sample_logits(det_out[o], prep_out[o], c_out[o], tc.samples_out), dim=-1)
        mi = (_entropy(p_s.mean(0)) - _entropy(p_s).mean(0)).mean()
        loss = ce - tc.disagreement_weight * mi
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        bar.update(1)
        bar.set_postfix(ce=f"{ce.item():.3f}", mi=f"{mi.item():.3f}")
    return float(ce.detach()), float(mi.detach())
