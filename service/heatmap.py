"""Attention heatmap overlays: a matplotlib colormap blended over the image the model saw, encoded as PNG."""

from __future__ import annotations

import io
import math

import numpy as np
import torch
from PIL import Image

DISPLAY_SIZE = 224  # the overlay is drawn at least this many pixels wide (MNIST's 28 px become 224 px)


def overlay_png(image: torch.Tensor, heat: torch.Tensor, *, colormap: str = "inferno", opacity: float = 0.5) -> bytes:
    """Blend a patch-grid heatmap over an image and encode the result as PNG.

    Args:
        image: uint8 (C, S, S), C = 1 or 3: the model's input before normalisation
            (``snodevit.data.to_uint8_tensor``).
        heat: (g, g) non-negative map over patches, e.g. the attention rollout.
        colormap: a matplotlib colormap name.
        opacity: weight of the colormap in the blend, in [0, 1].

    Returns:
        PNG bytes of an RGB image, ``S * ceil(224 / S)`` pixels square: the image scaled up with nearest
        neighbours, the heatmap min-max scaled to [0, 1] and upsampled bilinearly to the same size.
    """
    from matplotlib import colormaps

    if image.dtype != torch.uint8 or image.ndim != 3 or image.shape[0] not in (1, 3):
        raise ValueError(f"image must be uint8 (C, S, S) with C in (1, 3), got {image.dtype} {tuple(image.shape)}")
    if heat.ndim != 2:
        raise ValueError(f"heat must be (g, g), got shape {tuple(heat.shape)}")
    if not 0.0 <= opacity <= 1.0:
        raise ValueError(f"opacity must be in [0, 1], got {opacity}")
    side = image.shape[-1]
    size = side * max(1, math.ceil(DISPLAY_SIZE / side))
    base = Image.fromarray(image.permute(1, 2, 0).squeeze(-1).numpy()).convert("RGB").resize((size, size),
                                                                                             Image.Resampling.NEAREST)
    h = heat.detach().double().cpu()
    h = (h - h.min()) / (h.max() - h.min()) if float(h.max() - h.min()) > 0 else torch.zeros_like(h)
    grid = Image.fromarray(h.float().numpy()).resize((size, size), Image.Resampling.BILINEAR)
    colours = colormaps[colormap](np.clip(np.asarray(grid), 0.0, 1.0))[..., :3]  # (size, size, 3) in [0, 1]
    blended = (1.0 - opacity) * (np.asarray(base, dtype=np.float64) / 255.0) + opacity * colours
    out = Image.fromarray(np.rint(blended * 255.0).astype(np.uint8))
    buf = io.BytesIO()
    out.save(buf, format="PNG")
    return buf.getvalue()
