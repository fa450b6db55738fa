"""Continuous blocks integrated as stochastic differential equations, and their solvers.

Each block integrates ``dX = f(X, t) dt + G(X, t) dW`` over t in [0, 1] in K fixed steps, where the drift
``f`` is a pre-norm attention + MLP update modulated by the TimeNet and the diffusion acts in a learned
low-rank subspace: ``G(X, t) dW = (sigma(t) * s(X) * dW) U`` with ``dW`` of width m << D per token.

Optionally (``ood_diffusion_scale > 0``) the diffusion also depends on the image as a whole, as in SDE-Net: a
small head (:class:`DiffusionMagnitude`) reads the embedded tokens and gives a per-image magnitude c(x) in
(0, 1) that scales the noise of every block by ``ood_diffusion_scale * c(x)``. Trained with a binary cross-entropy
term to be small on training images and large on perturbed ones, it makes the samples spread (mutual information
grow) off the training distribution while staying nearly deterministic on it.

The Brownian increments are an input: ``noise`` holds standard normals ``xi`` and ``dW = sqrt(dt) * xi``
(torchsde lets callers pass their own Brownian motion for the same reason). Zero noise gives the deterministic
ODE path. With K = 1, Euler and zero noise, a block is exactly a pre-norm transformer block.

References:
    Kloeden & Platen. "Numerical Solution of Stochastic Differential Equations." Springer, 1992
    (Euler-Maruyama; the Stratonovich Heun scheme).
    Li, Wong, Chen, Duvenaud. "Scalable Gradients for Stochastic Differential Equations." AISTATS 2020 (torchsde).
    Kong et al. "SDE-Net: Equipping Deep Neural Networks with Uncertainty Estimates." ICML 2020.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor, nn

from snodevit.nn.attention import build_attention
from snodevit.config import SNodeViTConfig
from snodevit.nn.timenet import TimeNet, TimeParams

# Noise types and SDE interpretations, named as in torchsde.
NOISE_GENERAL = "general"
NOISE_NONE = "none"
SDE_ITO = "ito"
SDE_STRATONOVICH = "stratonovich"


@dataclass(frozen=True)
class SolverSpec:
    """What a fixed-step solver supports; checked once when a model is built (torchsde ``base_solver``)."""

    name: str
    sde_type: str  # the interpretation of the stochastic integral it converges to
    noise_types: tuple[str, ...]  # noise structures it handles
    strong_order: float  # strong order for general (non-commutative) noise
    drift_evals_per_step: int  # cost in drift evaluations


SOLVERS: dict[str, SolverSpec] = {
    "euler": SolverSpec("euler", SDE_ITO, (NOISE_GENERAL, NOISE_NONE), 0.5, 1),
    "heun": SolverSpec("heun", SDE_STRATONOVICH, (NOISE_GENERAL, NOISE_NONE), 0.5, 2),
}


def check_solver(solver: str, noise_type: str) -> SolverSpec:
    """Return the solver's spec, raising ValueError if it cannot integrate this noise type."""
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {sorted(SOLVERS)}, got {solver!r}")
    spec = SOLVERS[solver]
    if noise_type not in spec.noise_types:
        raise ValueError(f"solver {solver!r} does not support noise type {noise_type!r}; it supports {spec.noise_types}")
    return spec


class DiffusionMagnitude(nn.Module):
    """SDE-Net's data-dependent diffusion: the logit of a per-image magnitude c(x) from the embedded tokens.

    Per token LayerNorm -> Linear(D, D) -> GELU, the mean over tokens, then Linear(D, 1). It reads the tokens
    detached, so only this head (not the stem) is shaped by what trains it; the final bias starts at
    ``init_logit`` (c = sigmoid(-4) = 0.018), so training starts with little noise everywhere.

    References:
        Kong et al. "SDE-Net: Equipping Deep Neural Networks with Uncertainty Estimates." ICML 2020.
    """

    def __init__(self, dim: int, init_logit: float = -4.0) -> None:
        super().__init__()
        self.token_mlp = nn.Sequential(nn.LayerNorm(dim, eps=1e-6), nn.Linear(dim, dim), nn.GELU())
        self.out = nn.Linear(dim, 1)
        nn.init.zeros_(self.out.weight)
        nn.init.constant_(self.out.bias, init_logit)

    def forward(self, tokens: Tensor) -> Tensor:
        """tokens (B, N, D) -> logits (B,) of c(x); c(x) = sigmoid(logit)."""
        h = self.token_mlp(tokens.detach()).mean(dim=1)  # (B, D)
        return self.out(h).squeeze(-1)


class BlockAux(NamedTuple):
    weights: Tensor | None  # (B, N, N) attention applied, mean over heads and drift evaluations
    reg: Tensor | None  # scalar attention regulariser summed over drift evaluations


def _modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """``x * (1 + scale) + shift`` as one fused multiply-add over the (B, N, D) tokens."""
    return torch.addcmul(shift, x, 1.0 + scale)


class SDEBlock(nn.Module):
    """One continuous block: drift = attention + MLP conditioned on t, low-rank diffusion."""

    def __init__(self, cfg: SNodeViTConfig, stochastic: bool | None = None) -> None:
        """``stochastic=False`` builds an ODE block (no diffusion parameters) in a stochastic model."""
        super().__init__()
        d = cfg.dim
        stochastic = cfg.stochastic if stochastic is None else (stochastic and cfg.stochastic)
        self.num_steps = cfg.num_steps
        self.noise_dim = cfg.noise_dim if stochastic else 0
        self.spec = check_solver(cfg.solver, NOISE_GENERAL if stochastic else NOISE_NONE)
        self.norm1 = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.norm2 = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.attn = build_attention(cfg)
        hidden = int(d * cfg.mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(d, hidden), nn.GELU(), nn.Dropout(cfg.dropout), nn.Linear(hidden, d),
                                 nn.Dropout(cfg.dropout))
        self.timenet = TimeNet(d, cfg.num_heads, cfg.effective_rank, self.noise_dim, cfg.time_embed_dim,
                               cfg.time_hidden_dim, cfg.diffusion_scale)
        if stochastic:
            self.diff_gate = nn.Linear(d, cfg.noise_dim)  # s(X): state dependence of the diffusion
            self.diff_out = nn.Linear(cfg.noise_dim, d, bias=False)  # U: the diffusion subspace
            nn.init.normal_(self.diff_out.weight, std=cfg.noise_dim**-0.5)
        self.register_buffer("t_grid", torch.linspace(0.0, 1.0, cfg.num_steps + 1), persistent=False)

    def drift(self, x: Tensor, x_norm: Tensor, tp: TimeParams, k: int,
              need_weights: bool) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """f(X, t_k): (B, N, D) -> (B, N, D), plus the attention weights and regulariser of this evaluation.

        ``x_norm`` is ``norm1(x)``, computed once by the caller because the diffusion reads it too.
        """
        h = _modulate(x_norm, tp.shift1[k], tp.scale1[k])
        a = self.attn(h, tp.lam[k], need_weights)
        a_out = tp.gate1[k] * a.out
        y = x + a_out
        m = tp.gate2[k] * self.mlp(_modulate(self.norm2(y), tp.shift2[k], tp.scale2[k]))
        return a_out + m, a.weights, a.reg

    def diffusion(self, x_norm: Tensor, tp: TimeParams, k: int, xi: Tensor, sqrt_dt: float) -> Tensor:
        """G(X, t_k) dW with dW = sqrt(dt) xi: x_norm = norm1(X) (B, N, D), xi (B, N, m) normals -> (B, N, D).

        sqrt(dt) is folded into the (m,) gate sigma(t_k) rather than into the (B, N, m) noise.
        """
        s = torch.sigmoid(self.diff_gate(x_norm))  # (B, N, m)
        return self.diff_out(s * (tp.sigma[k] * sqrt_dt) * xi)

    def forward(self, x: Tensor, noise: Tensor | None, need_weights: bool = False) -> tuple[Tensor, BlockAux]:
        """Integrate the block from t = 0 to 1.

        Args:
            x: (B, N, D) tokens.
            noise: (B, K, N, m) standard normals (the Brownian increments divided by sqrt(dt)); None or a
                model without diffusion integrates the ODE.
            need_weights: collect the applied attention.

        Returns:
            The tokens at t = 1, (B, N, D), and the block's auxiliary outputs.
        """
        steps = self.num_steps
        dt = 1.0 / steps
        sqrt_dt = dt**0.5
        tp = self.timenet(self.t_grid.to(x.dtype))
        stochastic = self.noise_dim > 0 and noise is not None
        weights_sum: Tensor | None = None
        reg_sum: Tensor | None = None
        evals = 0

        def collect(w: Tensor | None, r: Tensor | None) -> None:
            nonlocal weights_sum, reg_sum, evals
            evals += 1
            if w is not None:
                weights_sum = w if weights_sum is None else weights_sum + w
            if r is not None:
                reg_sum = r if reg_sum is None else reg_sum + r

        for k in range(steps):
            x_norm = self.norm1(x)  # shared by the drift and the diffusion at (x, t_k)
            f0, w, r = self.drift(x, x_norm, tp, k, need_weights)
            collect(w, r)
            g0 = self.diffusion(x_norm, tp, k, noise[:, k], sqrt_dt) if stochastic else None
            x_pred = torch.add(x, f0, alpha=dt)  # x + f dt (+ G dW): the Euler-Maruyama step
            if g0 is not None:
                x_pred = x_pred + g0
            if self.spec.name == "euler":
                x = x_pred
            else:  # Stratonovich Heun: predictor, then trapezoidal corrector for drift and diffusion
                pred_norm = self.norm1(x_pred)
                f1, w, r = self.drift(x_pred, pred_norm, tp, k + 1, need_weights)
                collect(w, r)
                x = torch.add(x, f0 + f1, alpha=0.5 * dt)
                if g0 is not None:
                    x = x + 0.5 * (g0 + self.diffusion(pred_norm, tp, k + 1, noise[:, k], sqrt_dt))
        weights = weights_sum / evals if weights_sum is not None else None
        return x, BlockAux(weights, reg_sum)
