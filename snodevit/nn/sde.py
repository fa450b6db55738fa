"""Continuous blocks integrated as stochastic differential equations by the solvers of :mod:`snodevit.nn.solvers`.

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

from typing import NamedTuple

import torch
from torch import Tensor, nn

from snodevit.config import SNodeViTConfig
from snodevit.nn.attention import build_attention
from snodevit.nn.solvers import NOISE_GENERAL, NOISE_NONE, SOLVERS, Solver, check_solver
from snodevit.nn.timenet import TimeNet, TimeParams

__all__ = ["SOLVERS", "BlockAux", "DiffusionMagnitude", "FeatureMagnitude", "SDEBlock", "check_solver"]

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


class FeatureMagnitude(nn.Module):
    """The per-image diffusion magnitude c(x) read from the pooled features of every layer before the noise.

    The features (B, G, W) (the embedding and each ODE block, quadrant-pooled: ``SNodeViT.sample_logits``'s
    ``return_features`` groups before the first noise block) are standardised with a per-feature mean and standard
    deviation of the training images (buffers, set by the training that fits this head), then an MLP
    ``Linear(G W, hidden) -> GELU -> Dropout -> Linear(hidden, 1)`` gives the logit of c(x). Reading every layer,
    not only the embedded tokens, lets it see shapes as well as pixel statistics. The features are detached: only
    this head is shaped by what trains it. The final bias starts at ``init_logit`` (c = 0.018).

    References:
        Kong et al. "SDE-Net: Equipping Deep Neural Networks with Uncertainty Estimates." ICML 2020.
    """

    def __init__(self, groups: int, width: int, hidden: int = 256, dropout: float = 0.2,
                 init_logit: float = -4.0) -> None:
        super().__init__()
        self.register_buffer("feature_mean", torch.zeros(groups, width))
        self.register_buffer("feature_std", torch.ones(groups, width))
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(groups * width, hidden), nn.GELU(), nn.Dropout(dropout),
                                 nn.Linear(hidden, 1))
        nn.init.zeros_(self.net[-1].weight)
        nn.init.constant_(self.net[-1].bias, init_logit)

    def forward(self, features: Tensor) -> Tensor:
        """features (B, G, W) -> logits (B,) of c(x)."""
        z = (features.detach() - self.feature_mean) / self.feature_std
        return self.net(z).squeeze(-1)


class BlockAux(NamedTuple):
    weights: Tensor | None  # (B, N, N) attention applied, mean over heads and drift evaluations
    reg: Tensor | None  # scalar attention regulariser summed over drift evaluations


def _modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """``x * (1 + scale) + shift`` as one fused multiply-add over the (B, N, D) tokens."""
    return torch.addcmul(shift, x, 1.0 + scale)


class _BlockSDE:
    """One block's SDE on its time grid for one forward pass, as its solver sees it (:class:`SDEFunctions`).

    It also sums what every drift evaluation applied (attention weights, regulariser), whichever solver asks
    for how many, so that the block can report their mean and sum.
    """

    def __init__(self, block: "SDEBlock", tp: TimeParams, need_weights: bool) -> None:
        self.block, self.tp, self.need_weights = block, tp, need_weights
        self.dt = 1.0 / block.num_steps
        self.sqrt_dt = self.dt**0.5
        self.weights_sum: Tensor | None = None
        self.reg_sum: Tensor | None = None
        self.evals = 0

    def prepare(self, x: Tensor) -> Tensor:
        return self.block.norm1(x)  # read by the drift and the diffusion alike

    def drift(self, x: Tensor, prepared: Tensor, k: int) -> Tensor:
        f, w, r = self.block.drift(x, prepared, self.tp, k, self.need_weights)
        self.evals += 1
        if w is not None:
            self.weights_sum = w if self.weights_sum is None else self.weights_sum + w
        if r is not None:
            self.reg_sum = r if self.reg_sum is None else self.reg_sum + r
        return f

    def diffusion(self, prepared: Tensor, k: int, xi: Tensor) -> Tensor:
        return self.block.diffusion(prepared, self.tp, k, xi, self.sqrt_dt)

    def aux(self) -> BlockAux:
        """The mean attention over the drift evaluations and the summed regulariser."""
        weights = self.weights_sum / self.evals if self.weights_sum is not None else None
        return BlockAux(weights, self.reg_sum)


class SDEBlock(nn.Module):
    """One continuous block: drift = attention + MLP conditioned on t, low-rank diffusion."""

    def __init__(self, cfg: SNodeViTConfig, stochastic: bool | None = None) -> None:
        """``stochastic=False`` builds an ODE block (no diffusion parameters) in a stochastic model."""
        super().__init__()
        d = cfg.dim
        stochastic = cfg.stochastic if stochastic is None else (stochastic and cfg.stochastic)
        self.num_steps = cfg.num_steps
        self.noise_dim = cfg.noise_dim if stochastic else 0
        # chosen and checked against the block's noise once, here; forward only calls its step
        self.solver: Solver = check_solver(cfg.solver, NOISE_GENERAL if stochastic else NOISE_NONE)
        self.norm1 = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.norm2 = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.attn = build_attention(cfg)
        hidden = int(d * cfg.mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(d, hidden), nn.GELU(), nn.Dropout(cfg.dropout), nn.Linear(hidden, d),
                                 nn.Dropout(cfg.dropout))
        self.timenet = TimeNet(cfg, stochastic)
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
        tp = self.time_params(x.dtype)
        sde = _BlockSDE(self, tp, need_weights)
        stochastic = self.noise_dim > 0 and noise is not None
        for k in range(self.num_steps):
            x = self.solver.step(sde, k, x, noise[:, k] if stochastic else None)
        return x, sde.aux()

    def forward_shared(self, x: Tensor, noise: Tensor, need_weights: bool = False) -> tuple[Tensor, BlockAux]:
        """One Euler-Maruyama step from a state that S samples share: the drift is evaluated once, per sample only
        the diffusion term. Exactly :meth:`forward` of the expanded state (up to float rounding of the batch shape).

        Args:
            x: (B, N, D) tokens shared by every sample.
            noise: (S, B, 1, N, m) standard normals, one step's.
            need_weights: collect the applied attention (the same for every sample).

        Returns:
            The tokens of every sample at t = 1, (S*B, N, D), samples first; the auxiliary outputs, with the
            attention expanded to (S*B, N, N).

        Raises:
            ValueError: a block with more than one step, another solver, or no diffusion.
        """
        if self.num_steps != 1 or self.solver.name != "euler" or self.noise_dim == 0:
            raise ValueError("forward_shared is one Euler step of a stochastic block; use forward")
        s, (b, n, d) = noise.shape[0], x.shape
        tp = self.time_params(x.dtype)
        sde = _BlockSDE(self, tp, need_weights)
        prepared = sde.prepare(x)
        det = torch.add(x, sde.drift(x, prepared, 0), alpha=sde.dt)  # (B, N, D)
        g = sde.diffusion(prepared.unsqueeze(0), 0, noise[:, :, 0])  # (S, B, N, D)
        aux = sde.aux()
        weights = None if aux.weights is None else aux.weights.unsqueeze(0).expand(s, *aux.weights.shape)
        weights = None if weights is None else weights.reshape(s * b, n, n)
        return (det.unsqueeze(0) + g).reshape(s * b, n, d), BlockAux(weights, aux.reg)

    def time_params(self, dtype: torch.dtype) -> TimeParams:
        """The TimeNet's parameters at every point of the block's time grid, (K + 1, ...)."""
        return self.timenet(self.t_grid.to(dtype))

    def increment(self, x: Tensor, xi: Tensor | None, k: int, tp: TimeParams) -> tuple[Tensor, Tensor | None]:
        """One solver step's increment h_k(x) = X_{k+1} - X_k from x at t_k, and its attention regulariser.

        What BDIA (:mod:`snodevit.nn.reversible`) combines with the states before; ``forward`` takes the steps.

        Args:
            x: (B, N, D) tokens at t_k.
            xi: (B, N, m) standard normals of step k, or None (the ODE; also for a block without diffusion).
            k: the step's index on the block's time grid.
            tp: :meth:`time_params` of this forward pass.

        Returns:
            h (B, N, D) and the regulariser summed over the step's drift evaluations (None when there is none).
        """
        sde = _BlockSDE(self, tp, False)
        h = self.solver.increment(sde, k, x, xi if self.noise_dim > 0 else None)
        return h, sde.reg_sum

    def extra_repr(self) -> str:
        return f"solver={self.solver}, num_steps={self.num_steps}, noise_dim={self.noise_dim}"
