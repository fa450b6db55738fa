"""SDE-Net's out-of-distribution training inputs: the training images with noise at several spatial scales, and
with the cells of a grid shuffled.

Training with ``TrainConfig.ood_diffusion_weight > 0`` drives the per-image diffusion magnitude towards 1 on these
(:meth:`snodevit.model.SNodeViT.ood_diffusion_loss`) and towards 0 on the training images.

References:
    Kong et al. "SDE-Net: Equipping Deep Neural Networks with Uncertainty Estimates." ICML 2020.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

#: Grid sides of the SDE-Net perturbation noise as fractions of the image side (28 px: 1, 2, 4, 7 and 28 cells).
OOD_NOISE_SCALES: tuple[float, ...] = (0.0, 1 / 14, 1 / 7, 1 / 4, 1.0)


def ood_perturb(images: Tensor, std: float, generator: torch.Generator | None = None,
                shuffle_grid: int = 0) -> Tensor:
    """SDE-Net's out-of-distribution inputs: the images plus Gaussian noise, here at several spatial scales.

    The batch is split into ``len(OOD_NOISE_SCALES)`` consecutive chunks; chunk j gets standard normal noise
    drawn on a g x g grid, g = ``OOD_NOISE_SCALES[j]`` (a fraction of the image side: 1 grid cell is one offset
    for the whole image, the last scale is one value per pixel, as in SDE-Net), upsampled bilinearly to the
    image size and multiplied by ``std``. Pixel noise alone taught the magnitude head "high-frequency noise is
    out of distribution" and left smooth inputs (photographs) looking in-distribution; the coarse scales cover them.

    With ``shuffle_grid`` = g >= 2 the batch gets one more chunk, whose images keep their pixels but have the
    cells of a g x g grid permuted (:func:`shuffle_cells`): local strokes in places and orientations digits do
    not have, a near-distribution perturbation that noise does not cover.

    Args:
        images: (B, C, H, W) normalised images.
        std: noise standard deviation in normalised units.
        generator: seeds the noise and the permutations (on the images' device).
        shuffle_grid: cells per side of the shuffled chunk; 0 = no shuffled chunk.

    Returns:
        (B, C, H, W) perturbed images.
    """
    h, w = images.shape[-2:]
    chunks = images.chunk(len(OOD_NOISE_SCALES) + (1 if shuffle_grid else 0))
    parts = []
    for frac, chunk in zip(OOD_NOISE_SCALES, chunks):
        g = max(1, round(frac * min(h, w)))
        z = torch.randn((chunk.shape[0], chunk.shape[1], g, g), generator=generator, device=images.device,
                        dtype=images.dtype)
        parts.append(chunk + std * F.interpolate(z, size=(h, w), mode="bilinear", align_corners=False))
    if shuffle_grid and len(chunks) > len(OOD_NOISE_SCALES):
        parts.append(shuffle_cells(chunks[-1], shuffle_grid, generator))
    return torch.cat(parts)


def shuffle_cells(images: Tensor, grid: int, generator: torch.Generator | None = None) -> Tensor:
    """Each image with the cells of a ``grid`` x ``grid`` partition put in a random order of its own.

    Cells are (H // grid) x (W // grid) pixels from the top-left corner; the rows and columns left over when the
    side is not a multiple of ``grid`` stay in place.

    Args:
        images: (B, C, H, W) images.
        grid: cells per side, 2 <= grid <= min(H, W).
        generator: seeds the permutations (on the images' device).

    Returns:
        (B, C, H, W) images with their cells permuted.
    """
    b, c, h, w = images.shape
    if not 2 <= grid <= min(h, w):
        raise ValueError(f"grid must be between 2 and min(H, W) = {min(h, w)}, got {grid}")
    ch, cw = h // grid, w // grid
    g2 = grid * grid
    cells = (images[..., :grid * ch, :grid * cw].reshape(b, c, grid, ch, grid, cw)
             .permute(0, 2, 4, 1, 3, 5).reshape(b, g2, c, ch, cw))
    order = torch.rand((b, g2), generator=generator, device=images.device).argsort(dim=1)
    cells = cells[torch.arange(b, device=images.device)[:, None], order]
    out = images.clone()
    out[..., :grid * ch, :grid * cw] = (cells.reshape(b, grid, grid, c, ch, cw).permute(0, 3, 1, 4, 2, 5)
                                        .reshape(b, c, grid * ch, grid * cw))
    return out
