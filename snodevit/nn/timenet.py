"""TimeNet: time-dependent parameters of a continuous block.

A block's drift and diffusion depend on the integration time t in [0, 1] through a small network that maps a
sinusoidal embedding of t to per-channel modulation (shift, scale, gate of the two pre-norms, as in adaLN),
the KSVD singular values lambda(t) and the diffusion gate sigma(t). The time grid is fixed by the solver, so
all parameters are computed once per forward pass for every grid point, independent of the batch.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from snodevit.config import SNodeViTConfig


class TimeParams(NamedTuple):
    shift1: Tensor  # (T, D)
    scale1: Tensor  # (T, D)
    gate1: Tensor  # (T, D)
    shift2: Tensor  # (T, D)
    scale2: Tensor  # (T, D)
    gate2: Tensor  # (T, D)
    lam: Tensor  # (T, H, r) positive KSVD singular values
    sigma: Tensor  # (T, m) diffusion gate in [0, diffusion_scale]


def sinusoidal_embedding(t: Tensor, dim: int) -> Tensor:
    """Transformer-style embedding of scalar times. t: (T,) -> (T, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(1000.0) * torch.arange(half, dtype=t.dtype, device=t.device) / half)
    args = t[:, None] * freqs[None, :] * 10.0
    return torch.cat((torch.sin(args), torch.cos(args)), dim=-1)


class TimeNet(nn.Module):
    """MLP from the embedding of t to the time-dependent parameters of one block."""

    def __init__(self, cfg: SNodeViTConfig, stochastic: bool = True) -> None:
        """The TimeNet of one block of a model with config ``cfg`` (nanoGPT's ``Block(config)``).

        Args:
            cfg: the model's config: ``dim``, ``num_heads``, ``effective_rank``, ``noise_dim``, ``time_embed_dim``,
                ``time_hidden_dim`` and ``diffusion_scale`` shape it.
            stochastic: whether the block has a diffusion term; an ODE block (False, or a model with
                ``noise_dim == 0``) gets no diffusion gate sigma(t).
        """
        super().__init__()
        self.dim, self.num_heads, self.rank = cfg.dim, cfg.num_heads, cfg.effective_rank
        self.noise_dim = cfg.noise_dim if stochastic else 0
        self.embed_dim = cfg.time_embed_dim
        self.diffusion_scale = cfg.diffusion_scale
        self.net = nn.Sequential(nn.Linear(self.embed_dim, cfg.time_hidden_dim), nn.SiLU(),
                                 nn.Linear(cfg.time_hidden_dim, self._out_dim))
        # Start as a plain pre-norm residual block: zero modulation, unit gates, lambda = 1, sigma = scale / 2.
        out = self.net[-1]
        nn.init.zeros_(out.weight)
        nn.init.zeros_(out.bias)
        with torch.no_grad():
            d = self.dim
            out.bias[2 * d:3 * d] = 1.0
            out.bias[5 * d:6 * d] = 1.0
            out.bias[6 * d:6 * d + self.num_heads * self.rank] = math.log(math.e - 1.0)  # softplus^-1(1)

    @property
    def _out_dim(self) -> int:
        return 6 * self.dim + self.num_heads * self.rank + self.noise_dim

    def forward(self, t: Tensor) -> TimeParams:
        """t: (T,) times -> parameters with a leading T axis."""
        raw = self.net(sinusoidal_embedding(t, self.embed_dim))  # (T, out_dim)
        d, hr = self.dim, self.num_heads * self.rank
        chunks = raw[:, : 6 * d].chunk(6, dim=-1)
        lam = F.softplus(raw[:, 6 * d:6 * d + hr]).reshape(-1, self.num_heads, self.rank) + 1e-4
        sigma = self.diffusion_scale * torch.sigmoid(raw[:, 6 * d + hr:])
        return TimeParams(*chunks, lam=lam, sigma=sigma)
