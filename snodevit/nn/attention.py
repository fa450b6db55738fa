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

from snodevit.config import SNodeViTConfig


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

    In inference (eval mode, no weights asked) ``cfg.fused_attn`` selects an algebraically identical fused path
    (``_fused``): q and k share every kernel, the singular values are folded into the directions, and the
    combination ``W_c`` and the rank-r readout are one matmul, so it runs about half the explicit path's kernels
    and copies q, k and v once instead of at every matmul. The two agree to float32 rounding (tests hold them
    equal). The explicit path is what training (the regulariser needs the raw scores) and attention maps use.
    """

    def __init__(self, cfg: SNodeViTConfig) -> None:
        super().__init__()
        h, hd, r = cfg.num_heads, cfg.head_dim, cfg.effective_rank
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
        self.fused = cfg.fused_attn

    def forward(self, x: Tensor, lam: Tensor | None = None, need_weights: bool = False) -> AttentionOutput:
        """Args:
            x: (B, N, D) normalised tokens.
            lam: (H, r) positive singular values lambda(t); ones when None.
            need_weights: also return the applied token mixing (B, N, N).
        """
        if self.fused and not need_weights and not self.training:
            return AttentionOutput(self.drop(self._fused(x, lam)), None, None)
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

    def _fused(self, x: Tensor, lam: Tensor | None) -> Tensor:
        """The eval-mode output of ``forward`` in fewer, larger kernels.

        q and k go through each step together (one normalisation, one score matmul for ``k W_e`` and ``q W_r``,
        one softmax, one direction update), the scores come out already scaled (``q (D_e * lam)``), and the
        combination ``W_c [e_s; r_s]`` plus the rank-r readout ``e_s v_pool / r`` is one matmul against
        ``[W_ce^T + v_pool / r; W_cr^T]``. q, k and v are made contiguous once, so no matmul copies its operands.

        Args:
            x: (B, N, D) normalised tokens.
            lam: (H, r) singular values or None (ones).

        Returns:
            (B, N, D), equal to the explicit path's output up to float32 rounding.
        """
        b, n, d = x.shape
        h, hd, r = self.num_heads, self.head_dim, self.rank
        # Heads outermost: the score matmul against the shared W_e / W_r is then one GEMM per head over all
        # B*N tokens instead of B*H tiny ones.
        qkv = self.qkv(x).reshape(b, n, 3, h, hd).permute(2, 3, 0, 1, 4).contiguous()  # (3, H, B, N, hd)
        qk = F.normalize(qkv[:2], dim=-1)  # (2, H, B, N, hd): q, k
        v = qkv[2]  # (H, B, N, hd)
        base = torch.stack((self.wr, self.we))  # (2, H, hd, r): q pools with W_r, k with W_e
        logits = qk.reshape(2, h, b * n, hd) @ (self.log_tau.exp() * base)  # (2, H, B*N, r)
        a = torch.softmax(logits.reshape(2, h, b, n, r), dim=3)  # (2, H, B, N, r): A_r, A_e (over tokens)
        dirs = base[:, :, None] + qk.transpose(-2, -1) @ a  # (2, H, B, hd, r): D_r, D_e
        lam_ = torch.ones(h, r, dtype=x.dtype, device=x.device) if lam is None else lam
        scores = qk @ (dirs.flip(0) * lam_[:, None, None, :])  # (2, H, B, N, r): e_s = q D_e lam, r_s = k D_r lam
        v_pool = a[1].transpose(-2, -1) @ v  # (H, B, r, hd): values pooled with A_e
        wc = self.concat.weight  # (hd, 2r)
        mix = torch.cat((wc[:, :r].T + v_pool / r, wc[:, r:].T.expand(h, b, r, hd)), dim=-2)  # (H, B, 2r, hd)
        cat = scores.permute(1, 2, 3, 0, 4).reshape(h * b, n, 2 * r)  # (H*B, N, 2r): [e_s, r_s] per token
        o = torch.baddbmm(self.concat.bias, cat, mix.reshape(h * b, 2 * r, hd))  # (H*B, N, hd)
        o = o.reshape(h, b, n, hd).permute(1, 2, 0, 3).reshape(b, n, d)  # (B, N, D)
        return self.proj(o)


class _QKVAttention(nn.Module):
    """Shared plumbing of the efficient backends: merged QKV projection, heads, output projection."""

    def __init__(self, cfg: SNodeViTConfig) -> None:
        super().__init__()
        self.num_heads, self.head_dim = cfg.num_heads, cfg.head_dim
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(cfg.dim, 3 * cfg.dim)
        self.proj = nn.Linear(cfg.dim, cfg.dim)
        self.drop = nn.Dropout(cfg.dropout)

    def _split(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        b, n, _ = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        return qkv.unbind(0)  # each (B, H, N, hd)

    def _merge(self, o: Tensor) -> Tensor:
        b, h, n, hd = o.shape
        return self.drop(self.proj(o.transpose(1, 2).reshape(b, n, h * hd)))


class LinformerAttention(_QKVAttention):
    """Linformer (Wang et al. 2020): keys and values projected along the token axis to length k.

    The projection E (k, N) is learned for one token count, so the image size is static for this backend.
    """

    def __init__(self, cfg: SNodeViTConfig) -> None:
        super().__init__(cfg)
        k = min(cfg.linformer_k, cfg.num_tokens)
        self.e = nn.Parameter(torch.randn(k, cfg.num_tokens) / math.sqrt(cfg.num_tokens))
        self.f = nn.Parameter(torch.randn(k, cfg.num_tokens) / math.sqrt(cfg.num_tokens))

    def forward(self, x: Tensor, lam: Tensor | None = None, need_weights: bool = False) -> AttentionOutput:
        q, k, v = self._split(x)
        kp = self.e @ k  # (B, H, k, hd)
        vp = self.f @ v
        attn = ((q * self.scale) @ kp.transpose(-2, -1)).softmax(dim=-1)  # (B, H, N, k)
        o = attn @ vp
        weights = None
        if need_weights:  # token n's weight on token j: sum over projected slots of attn * |F| share
            f = self.f.abs() / self.f.abs().sum(dim=-1, keepdim=True)
            weights = (attn @ f).mean(dim=1)
        return AttentionOutput(self._merge(o), weights, None)


class PerformerAttention(_QKVAttention):
    """Performer FAVOR+ (Choromanski et al. 2021): positive orthogonal random features.

    The features are redrawn at every training forward and fixed (a buffer) in eval and in export, so
    inference is deterministic given the noise. Stabilisers are per image and head, never across the batch.
    """

    def __init__(self, cfg: SNodeViTConfig) -> None:
        super().__init__(cfg)
        self.num_features = cfg.performer_features
        self.register_buffer("omega", self._draw())

    def _draw(self) -> Tensor:
        m, d = self.num_features, self.head_dim
        blocks = []
        for _ in range(math.ceil(m / d)):
            qm, _ = torch.linalg.qr(torch.randn(d, d))
            blocks.append(qm.T)
        w = torch.cat(blocks)[:m]  # (m, d) orthogonal rows
        norms = torch.randn(m, d).norm(dim=1, keepdim=True)  # chi-distributed lengths
        return w * norms

    def _features(self, x: Tensor, is_query: bool) -> Tensor:
        x = x * self.head_dim**-0.25
        proj = x @ self.omega.T  # (B, H, N, m)
        sq = 0.5 * x.pow(2).sum(dim=-1, keepdim=True)
        if is_query:
            stab = proj.amax(dim=-1, keepdim=True)
        else:
            stab = proj.amax(dim=(-1, -2), keepdim=True)  # one constant per image and head
        return torch.exp(proj - sq - stab.detach()) / math.sqrt(self.num_features) + 1e-6

    def forward(self, x: Tensor, lam: Tensor | None = None, need_weights: bool = False) -> AttentionOutput:
        if self.training:
            self.omega = self._draw().to(self.omega)
        q, k, v = self._split(x)
        qf, kf = self._features(q, True), self._features(k, False)  # (B, H, N, m)
        kv = kf.transpose(-2, -1) @ v  # (B, H, m, hd)
        norm = qf @ kf.sum(dim=2, keepdim=True).transpose(-2, -1)  # (B, H, N, 1)
        o = (qf @ kv) / norm
        weights = None
        if need_weights:
            a = qf @ kf.transpose(-2, -1)
            weights = (a / a.sum(dim=-1, keepdim=True)).mean(dim=1)
        return AttentionOutput(self._merge(o), weights, None)


def _iterative_pinv(a: Tensor, iters: int = 6) -> Tensor:
    """Moore-Penrose pseudo-inverse by the Newton-Schulz style iteration of Nystromformer, per matrix.

    The initial scaling uses each matrix's own norms (the reference implementation takes the max over the whole
    batch, which would couple images and Monte Carlo samples).
    """
    eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
    col = a.abs().sum(dim=-2).amax(dim=-1)[..., None, None]
    row = a.abs().sum(dim=-1).amax(dim=-1)[..., None, None]
    z = a.transpose(-2, -1) / (col * row)
    for _ in range(iters):
        az = a @ z
        z = 0.25 * z @ (13 * eye - az @ (15 * eye - az @ (7 * eye - az)))
    return z


class NystromAttention(_QKVAttention):
    """Nystromformer (Xiong et al. 2021): softmax attention through landmarks = segment means of Q and K."""

    def __init__(self, cfg: SNodeViTConfig) -> None:
        super().__init__(cfg)
        self.landmarks = min(cfg.nystrom_landmarks, cfg.num_tokens)

    def _segment_means(self, x: Tensor) -> Tensor:
        b, h, n, d = x.shape
        pooled = F.adaptive_avg_pool1d(x.reshape(b * h, n, d).transpose(1, 2), self.landmarks)
        return pooled.transpose(1, 2).reshape(b, h, self.landmarks, d)

    def forward(self, x: Tensor, lam: Tensor | None = None, need_weights: bool = False) -> AttentionOutput:
        q, k, v = self._split(x)
        q = q * self.scale
        ql, kl = self._segment_means(q), self._segment_means(k)
        k1 = (q @ kl.transpose(-2, -1)).softmax(dim=-1)  # (B, H, N, L)
        k2 = (ql @ kl.transpose(-2, -1)).softmax(dim=-1)  # (B, H, L, L)
        k3 = (ql @ k.transpose(-2, -1)).softmax(dim=-1)  # (B, H, L, N)
        left = k1 @ _iterative_pinv(k2)
        o = left @ (k3 @ v)
        weights = None
        if need_weights:
            a = (left @ k3).clamp_min(0)
            weights = (a / a.sum(dim=-1, keepdim=True).clamp_min(1e-12)).mean(dim=1)
        return AttentionOutput(self._merge(o), weights, None)


class HybridAttention(_QKVAttention):
    """Dilated local softmax attention on the patch grid plus a global linear attention, mixed by a learned gate.

    Local: each patch attends to patches within ``hybrid_window`` dilated steps (``hybrid_dilation``) on the
    grid and to the class token; the class token attends everywhere. Global: linear attention with the
    elu+1 feature map (Katharopoulos et al. 2020). The local part is computed with a mask over the full score
    matrix, so its cost is still O(N^2) here; only its receptive field is local.
    """

    def __init__(self, cfg: SNodeViTConfig) -> None:
        super().__init__(cfg)
        g = cfg.grid_size
        rows = torch.arange(g).repeat_interleave(g)
        cols = torch.arange(g).repeat(g)
        dr = rows[:, None] - rows[None, :]
        dc = cols[:, None] - cols[None, :]
        r, dil = cfg.hybrid_window, cfg.hybrid_dilation
        local = (dr.abs() <= r * dil) & (dc.abs() <= r * dil) & (dr % dil == 0) & (dc % dil == 0)
        mask = torch.ones(cfg.num_tokens, cfg.num_tokens, dtype=torch.bool)
        mask[1:, 1:] = local
        self.register_buffer("bias", torch.zeros(mask.shape).masked_fill(~mask, float("-inf")), persistent=False)
        self.gate = nn.Parameter(torch.zeros(cfg.num_heads, 1, 1))

    def forward(self, x: Tensor, lam: Tensor | None = None, need_weights: bool = False) -> AttentionOutput:
        q, k, v = self._split(x)
        local = ((q * self.scale) @ k.transpose(-2, -1) + self.bias).softmax(dim=-1)  # (B, H, N, N)
        qf, kf = F.elu(q) + 1, F.elu(k) + 1
        norm = qf @ kf.sum(dim=2, keepdim=True).transpose(-2, -1)
        glob = (qf @ (kf.transpose(-2, -1) @ v)) / norm
        g = torch.sigmoid(self.gate)
        o = (1 - g) * (local @ v) + g * glob
        weights = None
        if need_weights:
            a = qf @ kf.transpose(-2, -1)
            weights = ((1 - g) * local + g * a / a.sum(dim=-1, keepdim=True)).mean(dim=1)
        return AttentionOutput(self._merge(o), weights, None)


_BACKENDS: dict[str, type[nn.Module]] = {
    "ksvd": KSVDAttention, "softmax": SoftmaxAttention, "linformer": LinformerAttention,
    "performer": PerformerAttention, "nystrom": NystromAttention, "hybrid": HybridAttention,
}


def build_attention(cfg: SNodeViTConfig) -> nn.Module:
    """Attention backend named by ``cfg.attention``."""
    if cfg.attention not in _BACKENDS:
        raise ValueError(f"attention must be one of {sorted(_BACKENDS)}, got {cfg.attention!r}")
    return _BACKENDS[cfg.attention](cfg)
