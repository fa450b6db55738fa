"""Attention backends of the SDE blocks: fixed-rank KSVD (primal) attention and plain softmax attention.

Every backend maps normalised tokens ``(B, N, D)`` to ``(B, N, D)`` and, when asked, exposes the token-mixing
matrix it applied, ``(B, N, N)`` averaged over heads, so attention maps and rollout work for all of them.

References:
    Chen, Tao, Tonin, Suykens. "Primal-Attention: Self-attention through Asymmetric Kernel SVD in Primal
    Representation." NeurIPS 2023.
    Dosovitskiy et al. "An Image is Worth 16x16 Words." ICLR 2021 (softmax ViT attention).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import SNodeViTConfig


class AttentionOutput(NamedTuple):
    out: Tensor  # (B, N, D)
    weights: Tensor | None  # (B, N, N) mixing actually applied, mean over heads; None unless requested
    reg: Tensor | None  # scalar regulariser of the backend (KSVD: mean J^2), None when it has none


class SoftmaxAttention(nn.Module):
    """Multi-head softmax attention with merged QKV (timm's ``Attention``).

    ``fused=True`` runs ``scaled_dot_product_attention``; the explicit path computes the same thing with
    matmuls and is taken whenever the weights are needed (attention maps) or for export.
    """

    def __init__(self, cfg: SNodeViTConfig) -> None:
        super().__init__()
        self.num_heads = cfg.num_heads
        self.head_dim = cfg.head_dim
        self.scale = self.head_dim**-0.5
        self.fused = cfg.fused_attn
        self.qkv = nn.Linear(cfg.dim, 3 * cfg.dim)
        self.proj = nn.Linear(cfg.dim, cfg.dim)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor, lam: Tensor | None = None, need_weights: bool = False) -> AttentionOutput:
        """Args: x (B, N, D) normalised tokens; lam unused (time enters through the block's modulation)."""
        b, n, d = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (B, H, N, hd)
        weights = None
        if self.fused and not need_weights and not torch.onnx.is_in_onnx_export():
            o = F.scaled_dot_product_attention(q, k, v)
        else:
            attn = (q * self.scale) @ k.transpose(-2, -1)  # (B, H, N, N)
            attn = attn.softmax(dim=-1)
            o = attn @ v
            if need_weights:
                weights = attn.mean(dim=1)
        o = o.transpose(1, 2).reshape(b, n, d)  # (B, N, D)
        return AttentionOutput(self.drop(self.proj(o)), weights, None)


class KSVDAttention(nn.Module):
    """Fixed-rank KSVD attention in its primal representation (Primal-Attention, Chen et al. 2023).

    Per head, queries and keys are L2-normalised (the feature maps phi_q, phi_k) and projected on ``r``
    directions. The directions are data dependent: a learned base ``W_e`` (``W_r``) plus the keys (queries)
    of the same image pooled with softmax weights ``a_{js} = softmax_j(tau * k_j . W_e[:, s])``::

        D_e = W_e + K^T A_e,   e = Q D_e   (the e-scores, (N, r))
        D_r = W_r + Q^T A_r,   r = K D_r   (the r-scores, (N, r))

    so every token is compared with ``r`` summaries of the whole image at O(N r) cost. The scores are scaled by
    the time-dependent singular values ``lambda(t)`` from the TimeNet and combined by a linear map
    ``W_c [lambda e; lambda r]`` as in the paper. Because the primal output alone passes only 2r scalars per
    head between tokens, the e-scores also weight the ``r`` value vectors pooled with the same ``A_e``
    (a rank-r attention readout); this keeps token content flowing at fixed rank.

    The KSVD regulariser of the paper pushes the primal objective towards a stationary point; per head::

        J = 1/2 mean_n sum_s lambda_s e_ns^2 + 1/2 mean_n sum_s lambda_s r_ns^2 - Tr(W_e^T W_r)

    and the training loss adds ``eta * mean(J^2)``.

    Pooling is strictly per image: no statistic mixes images or Monte Carlo samples of a folded batch.
    """

    def __init__(self, cfg: SNodeViTConfig) -> None:
        super().__init__()
        h, hd, r = cfg.num_heads, cfg.head_dim, cfg.rank
        self.num_heads, self.head_dim, self.rank = h, hd, r
        self.qkv = nn.Linear(cfg.dim, 3 * cfg.dim)
        self.we = nn.Parameter(torch.empty(h, hd, r))
        self.wr = nn.Parameter(torch.empty(h, hd, r))
        for i in range(h):
            nn.init.orthogonal_(self.we.data[i])
            nn.init.orthogonal_(self.wr.data[i])
        self.log_tau = nn.Parameter(torch.full((h, 1, 1), math.log(10.0)))  # pooling sharpness per head
        self.concat = nn.Linear(2 * r, hd)
        self.proj = nn.Linear(cfg.dim, cfg.dim)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor, lam: Tensor | None = None, need_weights: bool = False) -> AttentionOutput:
        """Args:
            x: (B, N, D) normalised tokens.
            lam: (H, r) positive singular values lambda(t); ones when None.
            need_weights: also return the applied token mixing (B, N, N).
        """
        b, n, d = x.shape
        h, hd, r = self.num_heads, self.head_dim, self.rank
        qkv = self.qkv(x).reshape(b, n, 3, h, hd).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # (B, H, N, hd)
        q = F.normalize(q, dim=-1)
        k = F.normalize(k, dim=-1)
        tau = self.log_tau.exp()
        a_e = torch.softmax(tau * (k @ self.we), dim=2)  # (B, H, N, r): pooling over tokens j
        a_r = torch.softmax(tau * (q @ self.wr), dim=2)
        d_e = self.we + k.transpose(-2, -1) @ a_e  # (B, H, hd, r)
        d_r = self.wr + q.transpose(-2, -1) @ a_r
        e = q @ d_e  # (B, H, N, r)
        rs = k @ d_r
        lam_ = torch.ones(h, r, dtype=x.dtype, device=x.device) if lam is None else lam
        lam_b = lam_[:, None, :]  # (H, 1, r)
        e_s, r_s = e * lam_b, rs * lam_b
        v_pool = a_e.transpose(-2, -1) @ v  # (B, H, r, hd): r pooled value vectors
        o = self.concat(torch.cat((e_s, r_s), dim=-1)) + (e_s / r) @ v_pool  # (B, H, N, hd)
        o = o.transpose(1, 2).reshape(b, n, d)
        weights = None
        if need_weights:
            pi = e_s.abs()
            pi = pi / pi.sum(dim=-1, keepdim=True).clamp_min(1e-12)  # (B, H, N, r)
            weights = (pi @ a_e.transpose(-2, -1)).mean(dim=1)  # (B, N, N), rows sum to 1
        reg = None
        if self.training:
            j = (0.5 * (lam_b * e.pow(2)).sum(-1).mean(-1) + 0.5 * (lam_b * rs.pow(2)).sum(-1).mean(-1)
                 - torch.einsum("hds,hds->h", self.we, self.wr))  # (B, H)
            reg = j.pow(2).mean()
        return AttentionOutput(self.drop(self.proj(o)), weights, reg)


def build_attention(cfg: SNodeViTConfig) -> nn.Module:
    """Attention backend named by ``cfg.attention``."""
    if cfg.attention == "ksvd":
        return KSVDAttention(cfg)
    if cfg.attention == "softmax":
        return SoftmaxAttention(cfg)
    raise ValueError(f"attention must be one of ['ksvd', 'softmax'], got {cfg.attention!r}")
