"""Every Pillow pixel mode mapped to "L" (grayscale sources) or "RGB" (everything else), without clipping.

Shared by the decoder (:func:`snodevit.data.decode.decode_image`), which hands back only "L" or "RGB" images, and
by the preprocessing (:func:`snodevit.data.preprocessing.to_uint8_tensor`), which accepts any Pillow image.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from PIL import Image

from snodevit.data.image_errors import ImageError


def _scale_to_uint8(arr: np.ndarray, mode: str) -> np.ndarray:
    """Map a 16/32-bit integer or float image to uint8 without clipping.

    "I;16*" is scaled by its bit depth: v -> round(v * 255 / 65535). "I" is taken as 8-bit when it lies in
    [0, 255], as 16-bit when it lies in [0, 65535], otherwise min-max stretched. "F" is taken as [0, 1] when it
    lies there, otherwise min-max stretched; NaN becomes 0.
    """
    if mode.startswith("I;16") and arr.dtype.kind == "u":
        wide = arr.astype(np.uint32)
        return ((wide * 255 + 32767) // 65535).astype(np.uint8)
    values = arr.astype(np.float64)
    finite = np.isfinite(values)
    if not finite.any():
        return np.zeros(arr.shape, dtype=np.uint8)
    lo, hi = float(values[finite].min()), float(values[finite].max())
    if mode == "I" and lo >= 0 and hi <= 255:
        scaled = values
    elif mode == "I" and lo >= 0 and hi <= 65535:
        scaled = values * (255.0 / 65535.0)
    elif mode == "F" and lo >= 0 and hi <= 1:
        scaled = values * 255.0
    elif hi > lo:
        scaled = (values - lo) * (255.0 / (hi - lo))
    else:
        scaled = np.zeros_like(values)
    scaled = np.where(finite, scaled, 0.0)
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def _on_black(im: Image.Image, base_mode: Literal["L", "RGB"]) -> Image.Image:
    """Composite an image with alpha onto black (digits are white on black): out = colour * alpha / 255."""
    rgba = im.convert("RGBA")  # P/PA/LA/RGBa -> RGBA honours palette transparency and un-premultiplies
    out = Image.new("RGB", im.size, 0)
    out.paste(rgba.convert("RGB"), mask=rgba.getchannel("A"))
    return out if base_mode == "RGB" else out.convert("L")  # exact for gray pixels (luma weights sum to 1)


def _palette_is_gray(im: Image.Image) -> bool:
    """True when every palette entry the image uses has R == G == B."""
    indices = np.asarray(im)
    if im.mode == "PA":
        indices = indices[..., 0]  # (H, W, 2) -> palette indices
    used = np.flatnonzero(np.bincount(indices.ravel(), minlength=256))
    palette = np.zeros((256, 3), dtype=np.int64)
    entries = np.asarray(im.getpalette("RGB") or [], dtype=np.int64).reshape(-1, 3)[:256]
    palette[: len(entries)] = entries
    rgb = palette[used]
    return bool(np.all(rgb[:, 0] == rgb[:, 1]) and np.all(rgb[:, 1] == rgb[:, 2]))


def standardize_mode(image: Image.Image) -> Image.Image:
    """Convert any Pillow mode to "L" (grayscale sources) or "RGB" (everything else).

    Rules: "1" -> L (0/255); "L" kept; "LA"/"La" composited onto black -> L; "P"/"PA" -> L when every used
    palette entry is gray, else RGB, composited onto black when the palette has transparency; "RGBA"/"RGBa"
    composited onto black -> RGB; "I;16*" scaled by 255/65535 -> L; "I"/"F" scaled (see ``_scale_to_uint8``,
    never clipped) -> L; CMYK, YCbCr, LAB, HSV, RGBX ... -> RGB through Pillow's converters (ICC profiles are
    not applied).

    Args:
        image: any Pillow image (loaded or not).

    Returns:
        A loaded image in mode "L" or "RGB", same size.

    Raises:
        ImageError: ``unsupported_format`` when Pillow has no conversion for the mode.
    """
    mode = image.mode
    if mode in ("L", "RGB"):
        return image
    if mode == "1":
        return image.convert("L")
    if mode.startswith("I") or mode == "F":
        return Image.fromarray(_scale_to_uint8(np.asarray(image), mode), mode="L")
    if mode in ("LA", "La"):
        return _on_black(image, "L")
    if mode in ("P", "PA"):
        gray = _palette_is_gray(image)
        has_alpha = mode == "PA" or "transparency" in image.info
        base: Literal["L", "RGB"] = "L" if gray else "RGB"
        return _on_black(image, base) if has_alpha else image.convert("RGB").convert(base)
    if mode in ("RGBA", "RGBa"):
        return _on_black(image, "RGB")
    try:
        return image.convert("RGB")
    except ValueError as err:
        raise ImageError("unsupported_format",
                         f"images in pixel mode {mode!r} are not supported ({err})") from None
