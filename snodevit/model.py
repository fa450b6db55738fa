"""SNodeViT: a Vision Transformer whose blocks are stochastic differential equations.

The forward contract follows timm's VisionTransformer (``forward_features`` / ``forward_head`` / ``forward``);
the SDE integration lives in ``forward_features``. Randomness is an input: every forward takes the noise tensor
(standard normals of shape ``noise_shape``) explicitly, ``None`` means "draw it here" (seedable with a
``torch.Generator``). Monte Carlo samples are folded into the batch of one forward pass, with the deterministic
prefix (stem, class token, position embedding) computed once per image.

References:
    Xiao et al. "Early Convolutions Help Transformers See Better." NeurIPS 2021 (the convolutional stem).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import torch
from torch import Tensor, nn

from snodevit.config import SNodeViTConfig, get_config
from snodevit.nn.sde import DiffusionMagnitude, FeatureMagnitude, SDEBlock


class ForwardAux(NamedTuple):
    attention: Tensor | None  # (B, depth, N, N) applied attention per block, mean over heads and steps
    reg: Tensor  # scalar: sum of the attention regularisers (KSVD J^2) over blocks, 0 when none
    features: Tensor | None = None  # (B, blocks run, 4 D): each block's patch tokens pooled by quadrant


def quadrant_pool(tokens: Tensor) -> Tensor:
    """The patch tokens (B, 1 + g*g, D) averaged over the four quadrants of the patch grid, concatenated: (B, 4 D).

    The quadrants of an odd grid share its middle row and column (what ``adaptive_avg_pool2d(..., 2)`` does, with
    plain slices so that the ONNX export needs no adaptive pooling). Unlike one mean over all patches, this keeps
    where things are, which is what tells a rotated digit from an upright one.
    """
    b, n, d = tokens.shape
    g = int(round((n - 1) ** 0.5))
    grid = tokens[:, 1:].reshape(b, g, g, d)
    lo, hi = (g + 1) // 2, g // 2  # first half [0, lo), second half [hi, g)
    parts = [grid[:, r, c].mean(dim=(1, 2)) for r in (slice(0, lo), slice(hi, g)) for c in (slice(0, lo), slice(hi, g))]
    return torch.cat(parts, dim=-1)  # (B, 4 D)


def _conv_stem(cfg: SNodeViTConfig) -> nn.Sequential:
    """A stride-1 3x3 conv, 3x3 stride-2 convs down to the patch grid, then a 1x1 projection (Xiao et al. 2021)."""
    n = cfg.patch_size.bit_length() - 1  # number of stride-2 convs
    widths = [max(16, cfg.dim // 2 ** (n - i)) for i in range(n)]
    layers: list[nn.Module] = [nn.Conv2d(cfg.in_channels, widths[0] // 2, 3, padding=1, bias=False),
                               nn.BatchNorm2d(widths[0] // 2), nn.ReLU(inplace=True)]
    c = widths[0] // 2
    for w in widths:
        layers += [nn.Conv2d(c, w, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True)]
        c = w
    layers.append(nn.Conv2d(c, cfg.dim, 1))
    return nn.Sequential(*layers)


class SNodeViT(nn.Module):
    """Stochastic neural-ODE Vision Transformer."""

    def __init__(self, cfg: SNodeViTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        if cfg.stem == "conv":
            self.stem = _conv_stem(cfg)
        else:
            self.stem = nn.Sequential(nn.Conv2d(cfg.in_channels, cfg.dim, cfg.patch_size, stride=cfg.patch_size))
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.num_tokens, cfg.dim))
        self.blocks = nn.ModuleList(SDEBlock(cfg, stochastic=i >= cfg.first_noise_block) for i in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.dim, eps=1e-6)
        self.head = nn.Linear(cfg.dim, cfg.num_classes)
        self._init_weights()
        # after _init_weights, which would overwrite its starting bias
        self.diffusion_head: nn.Module | None = None
        if cfg.ood_diffusion:
            self.diffusion_head = (FeatureMagnitude(1 + cfg.first_noise_block, cfg.gate_feature_dim)
                                   if cfg.magnitude_input == "features" else DiffusionMagnitude(cfg.dim))

    def _init_weights(self) -> None:
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        for name, m in self.named_modules():
            if isinstance(m, nn.Linear) and "timenet" not in name and "diff_out" not in name:
                nn.init.xavier_uniform_(m.weight)  # std 0.02 starves narrow (D=96) models of signal
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    # ----------------------------------------------------------------------------------------------- noise
    def noise_shape(self, batch_size: int, num_samples: int = 1) -> tuple[int, ...]:
        """Shape of the noise for ``num_samples`` samples of ``batch_size`` images: (S, B, depth, K, N, m)."""
        return self.cfg.noise_shape(batch_size, num_samples)

    def draw_noise(self, batch_size: int, num_samples: int = 1, generator: torch.Generator | None = None,
                   device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Tensor:
        """Standard normal noise of ``noise_shape``; drawn on the generator's device when one is given."""
        p = next(self.parameters())
        gen_device = generator.device if generator is not None else (device or p.device)
        noise = torch.randn(self.noise_shape(batch_size, num_samples), generator=generator, device=gen_device,
                            dtype=dtype or p.dtype)
        return noise.to(device or p.device)

    def _check_input(self, images: Tensor) -> None:
        self.cfg.check_images(images)

    def _check_noise(self, noise: Tensor, batch_size: int, num_samples: int | None) -> None:
        c = self.cfg
        tail = tuple(c.noise_shape(1, 1)[2:])
        ok = noise.dim() == 6 and tuple(noise.shape[2:]) == tail and noise.shape[1] == batch_size
        if ok and num_samples is not None:
            ok = noise.shape[0] == num_samples
        if not ok:
            want = self.noise_shape(batch_size, num_samples or 1)
            raise ValueError(f"noise must have shape (S, B, L, K, N, m) = {want} for this input, "
                             f"got {tuple(noise.shape)}")

    # ----------------------------------------------------------------------------------------------- SDE-Net
    @property
    def magnitude_from_features(self) -> bool:
        """Whether c(x) reads the pooled features of the layers before the first noise block (not the tokens)."""
        return self.diffusion_head is not None and self.cfg.magnitude_input == "features"

    def diffusion_magnitude(self, tokens: Tensor) -> Tensor | None:
        """Per-image noise multiplier ``ood_diffusion_scale * c(x)``, (B,): from the embedded tokens (B, N, D), or,
        with ``magnitude_input="features"``, from the pooled features (B, G, 4 D) of the layers before the first
        noise block; None when the diffusion does not depend on the image."""
        if self.diffusion_head is None:
            return None
        # in fp32 under any autocast: c(x) multiplies the noise by up to ood_diffusion_scale, so bf16's rounding of
        # it (8 bits of mantissa) would move every sample
        with torch.autocast(device_type=tokens.device.type, enabled=False):
            c = torch.sigmoid(self.diffusion_head(tokens.float()))
        return self.cfg.ood_diffusion_scale * c.to(tokens.dtype)

    def prefix_features(self, images: Tensor, need_weights: bool = False) -> tuple[Tensor, Tensor, ForwardAux | None]:
        """The deterministic prefix of ``images`` (B, C, H, W): the tokens entering the first noise block
        (B, N, D), the pooled features (B, 1 + first_noise_block, 4 D) of the embedding and each ODE block (what a
        ``magnitude_input="features"`` head reads), and the ODE blocks' auxiliary outputs (None without any)."""
        self._check_input(images)
        tokens = self.embed(images)
        feats = quadrant_pool(tokens).unsqueeze(1)  # (B, 1, 4 D)
        shared = self.cfg.first_noise_block
        if not shared:
            return tokens, feats, None
        tokens, aux = self.integrate(tokens, None, need_weights, stop=shared, final_norm=False, need_features=True)
        assert aux.features is not None
        return tokens, torch.cat((feats, aux.features), dim=1), aux

    def ood_diffusion_loss(self, images: Tensor, ood_images: Tensor) -> Tensor:
        """SDE-Net's diffusion loss: BCE(c(x), 0) on ``images`` plus BCE(c(x'), 1) on ``ood_images``.

        The tokens are computed without gradient and with the stem's batch norm in eval mode, so the perturbed
        images never enter its running statistics; only the magnitude head learns from this loss.

        Args:
            images: (B, C, H, W) training images (target: small diffusion).
            ood_images: (B', C, H, W) perturbed or out-of-distribution images (target: large diffusion).

        Returns:
            Scalar loss (mean BCE of each group, summed).

        Raises:
            ValueError: when the model has no magnitude head (``ood_diffusion_scale == 0``).
        """
        if self.diffusion_head is None:
            raise ValueError("ood_diffusion_loss needs a model with ood_diffusion_scale > 0")
        self._check_input(images)
        self._check_input(ood_images)
        was_training = self.training
        self.eval()  # the stem's batch norm and the blocks' dropout as served
        try:
            with torch.no_grad():
                both = torch.cat((images, ood_images))
                head_input = self.prefix_features(both)[1] if self.magnitude_from_features else self.embed(both)
        finally:
            self.train(was_training)
        logits = self.diffusion_head(head_input).float()  # (B + B',)
        b = images.shape[0]
        bce = torch.nn.functional.binary_cross_entropy_with_logits
        return bce(logits[:b], torch.zeros_like(logits[:b])) + bce(logits[b:], torch.ones_like(logits[b:]))

    # ----------------------------------------------------------------------------------------------- forward
    def embed(self, images: Tensor) -> Tensor:
        """Deterministic prefix: stem, class token, position embedding. (B, C, H, W) -> (B, N, D)."""
        x = self.stem(images).flatten(2).transpose(1, 2)  # (B, P, D)
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        return torch.cat((cls, x), dim=1) + self.pos_embed

    def integrate(self, tokens: Tensor, noise: Tensor | None, need_weights: bool = False, *,
                  start: int = 0, stop: int | None = None, final_norm: bool = True,
                  need_features: bool = False) -> tuple[Tensor, ForwardAux]:
        """Run blocks ``start`` to ``stop`` (all by default). tokens (B', N, D); noise (B', L, K, N, m) or None.

        The noise of the diffusion blocks among them is ``noise[:, i - first_noise_block]``; None integrates the
        ODE. ``final_norm`` applies the closing LayerNorm (for a run that ends with the last block).
        ``need_features`` also returns each block's pooled output (``ForwardAux.features``).
        """
        stop = len(self.blocks) if stop is None else stop
        first = self.cfg.first_noise_block
        weights = []
        pooled: list[Tensor] = []
        reg = tokens.new_zeros(())
        for i in range(start, stop):
            xi = None if (noise is None or i < first) else noise[:, i - first]
            tokens, aux = self.blocks[i](tokens, xi, need_weights)
            if aux.weights is not None:
                weights.append(aux.weights)
            if aux.reg is not None:
                reg = reg + aux.reg
            if need_features:
                pooled.append(quadrant_pool(tokens))
        attn = torch.stack(weights, dim=1) if weights else None  # (B', stop - start, N, N)
        feats = torch.stack(pooled, dim=1) if pooled else None  # (B', stop - start, 4 D)
        return self.norm(tokens) if final_norm else tokens, ForwardAux(attn, reg, feats)

    def forward_features(self, images: Tensor, noise: Tensor | None = None, *,
                         generator: torch.Generator | None = None, need_weights: bool = False,
                         return_aux: bool = False,
                         runner: Callable[..., tuple[Tensor, ForwardAux]] | None = None
                         ) -> Tensor | tuple[Tensor, ForwardAux]:
        """Tokens after the last block for one sample per image.

        Args:
            images: (B, C, H, W) normalised images.
            noise: (B, L, K, N, m) standard normals; None draws it (from ``generator`` if given) when the
                model is stochastic.
            runner: runs the blocks in place of :meth:`integrate`, with its signature (training's memory-saving
                backprop modes, ``snodevit.training.backprop``); None runs ``integrate``.
        """
        self._check_input(images)
        b = images.shape[0]
        if noise is None and self.cfg.stochastic:
            noise = self.draw_noise(b, 1, generator)[0]
        elif noise is not None:
            self._check_noise(noise.unsqueeze(0), b, 1)
        if not self.cfg.stochastic:
            noise = None
        if self.magnitude_from_features and noise is not None:
            if runner is not None:
                raise ValueError("a model whose diffusion magnitude reads its prefix features trains with the "
                                 "standard backprop only (its tail is trained by snodevit.training.tail)")
            tokens, feats, pre = self.prefix_features(images, need_weights)
            noise = noise * self.diffusion_magnitude(feats).view(b, 1, 1, 1, 1).to(noise.dtype)
            tokens, aux = self.integrate(tokens, noise, need_weights, start=self.cfg.first_noise_block)
            if pre is not None:
                attn = aux.attention if pre.attention is None else torch.cat((pre.attention, aux.attention), dim=1)
                aux = ForwardAux(attn, pre.reg + aux.reg)
            return (tokens, aux) if return_aux else tokens
        tokens = self.embed(images)
        scale = self.diffusion_magnitude(tokens) if noise is not None else None
        if scale is not None:
            noise = noise * scale.view(b, 1, 1, 1, 1).to(noise.dtype)  # (B, L, K, N, m)
        tokens, aux = (runner or self.integrate)(tokens, noise, need_weights)
        return (tokens, aux) if return_aux else tokens

    def forward_head(self, tokens: Tensor, pre_logits: bool = False) -> Tensor:
        """(B, N, D) -> (B, classes), or the pooled (B, D) features with ``pre_logits``."""
        x = tokens[:, 0] if self.cfg.pool == "cls" else tokens[:, 1:].mean(dim=1)
        return x if pre_logits else self.head(x)

    def forward(self, images: Tensor, noise: Tensor | None = None, *,
                generator: torch.Generator | None = None) -> Tensor:
        """One stochastic sample of logits per image, (B, classes)."""
        return self.forward_head(self.forward_features(images, noise, generator=generator))

    def forward_train(self, images: Tensor, generator: torch.Generator | None = None,
                      runner: Callable[..., tuple[Tensor, ForwardAux]] | None = None) -> tuple[Tensor, Tensor]:
        """Logits of one sample per image and the attention regulariser (already weighted) for the loss;
        ``runner`` as in :meth:`forward_features`."""
        tokens, aux = self.forward_features(images, generator=generator, return_aux=True, runner=runner)
        return self.forward_head(tokens), self.cfg.ksvd_loss_weight * aux.reg

    def sample_logits(self, images: Tensor, num_samples: int | None = None, noise: Tensor | None = None, *,
                      generator: torch.Generator | None = None, return_attention: bool = False,
                      return_features: bool = False) -> Tensor | tuple[Tensor, ...]:
        """Monte Carlo logits with the samples folded into one batch.

        Args:
            images: (B, C, H, W) normalised images.
            num_samples: S; taken from ``noise`` when it is given.
            noise: (S, B, L, K, N, m) standard normals or None to draw them (L = ``cfg.num_noise_blocks``).
            generator: seeds the noise drawn when ``noise`` is None.
            return_attention: also return the applied attention (S, B, depth, N, N).
            return_features: also return the pooled features the OOD gate models, (S, B, F, 4 D) with
                F = ``cfg.num_gate_features``: the embedded patch tokens and each block's output, each pooled by
                quadrant of the patch grid (:func:`quadrant_pool`; ``SNodeViTConfig.gate_feature_names``).

        Returns:
            Logits (S, B, classes) [, attention] [, features].

        Raises:
            ValueError: images or noise of the wrong shape, or neither num_samples nor noise given.
        """
        self._check_input(images)
        b = images.shape[0]
        noise, s = self._sample_noise(images, num_samples, noise, generator)
        tokens = self.embed(images)  # (B, N, D), computed once for all samples
        scale = None
        if noise is not None and not self.magnitude_from_features:
            scale = self.diffusion_magnitude(tokens)
        shared_feats = [quadrant_pool(tokens).unsqueeze(1)] if (return_features or self.magnitude_from_features) else []
        # the ODE blocks before the first diffusion block are deterministic: run once per image, shared by the
        # samples (none in a model without diffusion, whose S passes MC dropout tells apart)
        shared = self.cfg.first_noise_block if self.cfg.stochastic else 0
        prefix_attn = None
        if shared:
            tokens, prefix = self.integrate(tokens, None, return_attention, stop=shared, final_norm=False,
                                            need_features=bool(shared_feats))
            prefix_attn = prefix.attention
            if prefix.features is not None:
                shared_feats.append(prefix.features)  # (B, shared, 4 D)
        if noise is not None and self.magnitude_from_features:
            scale = self.diffusion_magnitude(torch.cat(shared_feats, dim=1))
        if scale is not None and noise is not None:
            noise = noise * scale.view(1, b, 1, 1, 1, 1).to(noise.dtype)  # (S, B, L, K, N, m)
        tokens, aux = self._sample_blocks(tokens, noise, s, shared, return_attention, return_features)
        out: tuple[Tensor, ...] = (self.forward_head(tokens).reshape(s, b, -1),)  # (S, B, classes)
        if return_attention:
            assert aux.attention is not None
            out += (_unfold_samples(aux.attention, prefix_attn, s, b),)  # (S, B, depth, N, N)
        if return_features:
            assert aux.features is not None
            prefix_f = torch.cat(shared_feats, dim=1)  # (B, 1 + shared, 4 D)
            out += (_unfold_samples(aux.features, prefix_f, s, b),)  # (S, B, F, 4 D)
        return out[0] if len(out) == 1 else out

    def _sample_blocks(self, tokens: Tensor, noise: Tensor | None, s: int, start: int, need_weights: bool,
                       need_features: bool) -> tuple[Tensor, ForwardAux]:
        """The blocks from ``start`` on for S samples of the shared tokens (B, N, D): the normed tokens
        (S*B, N, D), samples first, and their auxiliary outputs (attention and features of these blocks)."""
        b, n, d = tokens.shape
        if noise is not None and self.cfg.samples_share_all_but_last_step:
            # one Euler step from the state every sample shares: its drift once, per sample only the noise term
            tokens, aux = self.blocks[-1].forward_shared(tokens, noise[:, :, 0], need_weights)
            pooled = quadrant_pool(tokens).unsqueeze(1) if need_features else None
            weights = None if aux.weights is None else aux.weights.unsqueeze(1)  # (S*B, 1, N, N)
            return self.norm(tokens), ForwardAux(weights, tokens.new_zeros(()), pooled)
        tokens = tokens.unsqueeze(0).expand(s, b, n, d).reshape(s * b, n, d)  # (S*B, N, D)
        folded = noise.reshape(s * b, *noise.shape[2:]) if (noise is not None and self.cfg.stochastic) else None
        return self.integrate(tokens, folded, need_weights, start=start, need_features=need_features)

    def _sample_noise(self, images: Tensor, num_samples: int | None, noise: Tensor | None,
                      generator: torch.Generator | None) -> tuple[Tensor | None, int]:
        """The noise of :meth:`sample_logits`, checked when given, drawn otherwise (None for a model without
        diffusion), and the number of samples S."""
        b = images.shape[0]
        if noise is not None:
            self._check_noise(noise, b, num_samples)
            return noise, noise.shape[0]
        if num_samples is None or num_samples < 1:
            raise ValueError(f"num_samples must be >= 1 when no noise is given, got {num_samples!r}")
        if self.cfg.stochastic:
            noise = self.draw_noise(b, num_samples, generator, device=images.device, dtype=images.dtype)
        return noise, num_samples


def _unfold_samples(folded: Tensor, shared: Tensor | None, s: int, b: int) -> Tensor:
    """Per-block outputs of the folded samples (S*B, blocks, ...) as (S, B, blocks, ...), after those of the
    shared ODE prefix (B, shared blocks, ...), which every sample has in common."""
    own = folded.reshape(s, b, *folded.shape[1:])  # (S, B, blocks, ...)
    if shared is None:
        return own
    return torch.cat((shared.unsqueeze(0).expand(s, *shared.shape), own), dim=2)


def create_model(name: str = "tiny", **overrides: Any) -> SNodeViT:
    """Build a named variant (tiny, small, base, large) with config overrides.

    Example:
        >>> m = create_model("tiny", image_size=28, in_channels=1, patch_size=4)
        >>> m.sample_logits(torch.zeros(2, 1, 28, 28), 3).shape
        torch.Size([3, 2, 10])
    """
    return SNodeViT(get_config(name, **overrides))


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
