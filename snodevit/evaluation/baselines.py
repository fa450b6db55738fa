"""Uncertainty baselines behind the ``SamplingBackend`` protocol of :func:`snodevit.inference.predict`.

So that every method of the uncertainty benchmark is summarised, calibrated and scored by the same code as
the SDE model, each baseline is a small wrapper that turns images (and the explicit noise ``predict`` draws
from each image's seed) into Monte Carlo logits (S, B, C):

* :class:`MCDropout`: a deterministic SNodeViT (``noise_dim=0``) trained with dropout, evaluated with its dropout
  layers active. Sample s of image b uses masks drawn from a generator seeded by that image's noise, so an
  answer is reproducible from the seed and does not depend on the other images of the batch.
* :class:`DeepEnsemble`: M independently trained deterministic models; sample m is member m.
* :class:`DiffusionOff`: an SDE model with its diffusion switched off (zero Brownian increments), which
  integrates the drift alone (the ODE path): what the continuous blocks give without the noise.

References:
    Gal & Ghahramani. "Dropout as a Bayesian Approximation: Representing Model Uncertainty in Deep
    Learning." ICML 2016.
    Lakshminarayanan, Pritzel & Blundell. "Simple and Scalable Predictive Uncertainty Estimation using Deep
    Ensembles." NeurIPS 2017.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from snodevit.config import SNodeViTConfig
from snodevit.model import SNodeViT

__all__ = ["DeepEnsemble", "DiffusionOff", "MCDropout"]

logger = logging.getLogger(__name__)

_SEED_WIDTH = 2  # standard normals per (sample, image) of MC-dropout "noise": only their bits are used, as a seed


def _check_samples(num_samples: int | None, noise: Tensor | None) -> int:
    if noise is not None:
        if noise.dim() < 2:
            raise ValueError(f"noise must have shape (S, B, ...), got {tuple(noise.shape)}")
        if num_samples is not None and noise.shape[0] != num_samples:
            raise ValueError(f"noise has {noise.shape[0]} samples but num_samples={num_samples}")
        return int(noise.shape[0])
    if num_samples is None or isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be an integer >= 1 when no noise is given, got {num_samples!r}")
    return num_samples


def _check_deterministic(model: SNodeViT, who: str) -> None:
    if not isinstance(model, SNodeViT):
        raise ValueError(f"{who} wraps SNodeViT models, got {type(model).__name__}")
    if model.cfg.stochastic:
        raise ValueError(f"{who} needs a deterministic model (noise_dim=0), got noise_dim={model.cfg.noise_dim}")


def _image_seed(column: Tensor) -> int:
    """A 63-bit seed from the bits of one image's noise column (S, k): same seed -> same column -> same masks."""
    digest = hashlib.sha256(column.detach().to("cpu", torch.float32).contiguous().numpy().tobytes()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


class MCDropout:
    """Monte Carlo dropout over a deterministic SNodeViT: every ``nn.Dropout`` stays active at inference.

    The model itself stays in eval mode (the stem's batch norm uses its running statistics); a forward hook on
    each dropout layer multiplies its input by a Bernoulli(1 - p) mask scaled by 1 / (1 - p), exactly what
    ``nn.Dropout`` does in training. The masks of image b come from one generator seeded from ``noise[:, b]``
    (the "noise" is seed material: ``noise_shape`` is (S, B, 2)), consumed in the order the layers run.

    Args:
        model: a deterministic (``noise_dim=0``) SNodeViT; ``cfg.dropout = 0`` gives S copies of its logits.

    Raises:
        ValueError: for a stochastic model.
    """

    def __init__(self, model: SNodeViT) -> None:
        _check_deterministic(model, "MCDropout")
        self.model = model
        self.dropouts = [m for m in model.modules() if isinstance(m, nn.Dropout)]
        self._gens: list[torch.Generator] | None = None
        self._shape: tuple[int, int] = (0, 0)
        self._ran: set[int] = set()  # dropout layers run during the current sample_logits call
        self._warned = False
        for m in self.dropouts:
            m.register_forward_hook(self._hook)

    @property
    def cfg(self) -> SNodeViTConfig:
        return self.model.cfg

    def noise_shape(self, batch_size: int, num_samples: int = 1) -> tuple[int, ...]:
        """(S, B, 2): two standard normals per sample and image whose bits seed that image's masks."""
        return (num_samples, batch_size, _SEED_WIDTH)

    def _hook(self, module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> Tensor | None:
        if self._gens is None or module.training:  # outside sample_logits, or training: nn.Dropout's own behaviour
            return None
        self._ran.add(id(module))
        p = float(module.p)  # type: ignore[attr-defined]
        if p == 0.0:
            return None
        x = inputs[0]  # (S*B, ...), samples folded sample-major as in SNodeViT.sample_logits
        s, b = self._shape
        rest = tuple(x.shape[1:])
        keep = torch.stack([torch.rand((s, *rest), generator=g, device=x.device) >= p for g in self._gens], dim=1)
        return x * keep.reshape(s * b, *rest).to(x.dtype) / (1.0 - p)  # (S*B, ...)

    @torch.no_grad()
    def sample_logits(self, images: Tensor, num_samples: int | None = None, noise: Tensor | None = None, *,
                      generator: torch.Generator | None = None,
                      return_attention: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """Logits (S, B, classes) [and attention (S, B, depth, N, N)] with fresh dropout masks per sample.

        Args:
            images: (B, C, H, W) normalised images.
            num_samples: S; taken from ``noise`` when it is given.
            noise: (S, B, 2) standard normals (seed material) or None to draw it from ``generator``.
            return_attention: also return the applied attention.

        Raises:
            ValueError: bad images, noise of the wrong shape, or neither num_samples nor noise.
        """
        self.model.cfg.check_images(images)
        b = images.shape[0]
        s = _check_samples(num_samples, noise)
        if noise is None:
            noise = torch.randn(self.noise_shape(b, s), generator=generator)
        if tuple(noise.shape) != self.noise_shape(b, s):
            raise ValueError(f"noise must have shape (S, B, {_SEED_WIDTH}) = {self.noise_shape(b, s)}, "
                             f"got {tuple(noise.shape)}")
        device = images.device
        self._gens = [torch.Generator(device=device).manual_seed(_image_seed(noise[:, i])) for i in range(b)]
        self._shape = (s, b)
        self._ran = set()
        try:
            out = self.model.sample_logits(images, s, return_attention=return_attention)
        finally:
            self._gens = None
        skipped = [name for name, m in self.model.named_modules()
                   if isinstance(m, nn.Dropout) and m.p > 0 and id(m) not in self._ran]
        if skipped and not self._warned:
            self._warned = True
            logger.warning("MC dropout: %d dropout layer(s) did not run at inference (%s); an eval-mode path that "
                           "skips them makes the samples less diverse than training", len(skipped),
                           ", ".join(skipped[:4]))
        return out


class DeepEnsemble:
    """M deterministic SNodeViTs; the Monte Carlo samples are the members (S = M, sample m = member m).

    Args:
        members: two or more deterministic models with the same input size, channels and classes.

    Raises:
        ValueError: fewer than two members, a stochastic member, or members with different input contracts.
    """

    def __init__(self, members: Sequence[SNodeViT]) -> None:
        members = list(members)
        if len(members) < 2:
            raise ValueError(f"an ensemble needs at least 2 members, got {len(members)}")
        for m in members:
            _check_deterministic(m, "DeepEnsemble")
        first = members[0].cfg
        for i, m in enumerate(members[1:], start=1):
            c = m.cfg
            if (c.image_size, c.in_channels, c.num_classes) != (first.image_size, first.in_channels, first.num_classes):
                raise ValueError(f"member {i} takes {c.in_channels}x{c.image_size}^2 images into {c.num_classes} "
                                 f"classes, member 0 {first.in_channels}x{first.image_size}^2 into {first.num_classes}")
        self.members = members

    @property
    def cfg(self) -> SNodeViTConfig:
        return self.members[0].cfg

    def __len__(self) -> int:
        return len(self.members)

    def noise_shape(self, batch_size: int, num_samples: int = 1) -> tuple[int, ...]:
        """(S, B, 0): the members need no noise."""
        return (num_samples, batch_size, 0)

    def to(self, device: torch.device | str) -> DeepEnsemble:
        for m in self.members:
            m.to(device)
        return self

    def eval(self) -> DeepEnsemble:
        for m in self.members:
            m.eval()
        return self

    @torch.no_grad()
    def sample_logits(self, images: Tensor, num_samples: int | None = None, noise: Tensor | None = None, *,
                      generator: Any = None, return_attention: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """Each member's logits, stacked: (M, B, classes) [and attention (M, B, depth, N, N)].

        Raises:
            ValueError: bad images, or a sample count other than the number of members.
        """
        s = len(self.members) if num_samples is None and noise is None else _check_samples(num_samples, noise)
        if s != len(self.members):
            raise ValueError(f"num_samples must equal the number of ensemble members ({len(self.members)}), got {s}")
        self.cfg.check_images(images)
        outs = [m.sample_logits(images, 1, return_attention=return_attention) for m in self.members]
        if return_attention:
            return (torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs]))  # (M, B, C), (M, B, ...)
        return torch.cat(outs)  # (M, B, C)


class DiffusionOff:
    """An SDE model with the diffusion switched off: every Brownian increment is zero (the ODE path).

    ``noise_shape`` is the model's, so ``predict`` works unchanged; the drawn noise is replaced by zeros. With
    S > 1 every sample is identical, so use S = 1.
    """

    def __init__(self, model: SNodeViT) -> None:
        if not isinstance(model, SNodeViT) or not model.cfg.stochastic:
            raise ValueError("DiffusionOff wraps a stochastic SNodeViT (noise_dim > 0)")
        self.model = model

    @property
    def cfg(self) -> SNodeViTConfig:
        return self.model.cfg

    def noise_shape(self, batch_size: int, num_samples: int = 1) -> tuple[int, ...]:
        return self.model.noise_shape(batch_size, num_samples)

    @torch.no_grad()
    def sample_logits(self, images: Tensor, num_samples: int | None = None, noise: Tensor | None = None, *,
                      generator: Any = None, return_attention: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """Logits (S, B, classes) of the drift alone [and attention]."""
        s = _check_samples(num_samples, noise)
        zeros = torch.zeros(self.noise_shape(images.shape[0], s), device=images.device, dtype=images.dtype)
        return self.model.sample_logits(images, noise=zeros, return_attention=return_attention)
