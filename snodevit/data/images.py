"""Safe image decoding and the one preprocessing path shared by training, the HTTP service and the CLI.

Untrusted bytes go through :func:`decode_image`, which enforces, in this order:

1. a byte cap (``max_bytes``, 413) and a non-empty body (400);
2. a format allow-list (Pillow only tries the allowed plugins; anything else is 415);
3. a pixel cap checked on the header's ``im.size`` *before* any pixel data is decoded (413); Pillow's own
   decompression-bomb guard (``Image.MAX_IMAGE_PIXELS``, read here, never written) is turned into a 413 too;
4. a full ``im.load()`` so that truncated or corrupt files fail here with a 400, not later inside a model
   (``ImageFile.LOAD_TRUNCATED_IMAGES`` is left at its default, False);
5. first frame only for animations, EXIF orientation applied, and every Pillow mode mapped to "L" or "RGB"
   (:func:`standardize_mode`).

:func:`preprocess` turns such an image into the model's input tensor. It is split into
:func:`to_uint8_tensor` (mode, resize) and :func:`normalize` (scale, mean/std) so that the data sets, which
store uint8 tensors, go through exactly the same arithmetic as a served image.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import os
import struct
import threading
import warnings
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image, ImageOps, UnidentifiedImageError
from torchvision.transforms.v2 import InterpolationMode

logger = logging.getLogger(__name__)

#: Largest accepted encoded file, in bytes (10 MiB). Bigger bodies are refused with 413 before parsing.
DEFAULT_MAX_BYTES: int = 10 * 2**20
#: Largest accepted image, in pixels (width * height, 4096 x 4096 = 16.8 MP), checked on the header before the
#: pixel data is decoded. A decoded 16.8 MP RGB image takes about 50 MB.
DEFAULT_MAX_PIXELS: int = 4096 * 4096
#: Pillow format names tried by default. Anything else (EPS, PSD, ICO, SVG ...) is refused with 415.
DEFAULT_ALLOWED_FORMATS: tuple[str, ...] = ("PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP", "PPM")

ResizeMode = Literal["resize", "pad_resize"]
RESIZE_MODES: tuple[str, ...] = get_args(ResizeMode)

# Leading bytes of the allowed formats: a file that starts like one but cannot be parsed is corrupt (400),
# not "something else" (415).
_SIGNATURES: tuple[tuple[bytes, str], ...] = (
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"\xff\xd8\xff", "JPEG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"BM", "BMP"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"RIFF", "WEBP"),
)
# warnings.catch_warnings mutates process-wide state; serialise our own uses of it (header parsing only).
_WARNINGS_LOCK = threading.Lock()
# Exceptions Pillow's decoders raise on malformed input.
_DECODE_ERRORS: tuple[type[BaseException], ...] = (OSError, SyntaxError, ValueError, EOFError, struct.error, zlib.error,
                                                   IndexError, KeyError, TypeError)


#: The one vocabulary of refused images, shared by the service (which maps each code to an HTTP status in
#: ``service.errors``) and `snodevit score` (whose error rows carry the code).
ImageErrorCode = Literal["empty_body", "too_large", "too_many_pixels", "not_an_image", "unsupported_format",
                         "truncated_image", "corrupt_image", "unreadable_file"]
IMAGE_ERROR_CODES: tuple[str, ...] = get_args(ImageErrorCode)


class ImageError(ValueError):
    """An image was refused.

    Attributes:
        error: short machine-readable code, one of ``IMAGE_ERROR_CODES``.
        detail: a human-readable sentence naming the problem.
    """

    def __init__(self, error: ImageErrorCode, detail: str) -> None:
        if error not in IMAGE_ERROR_CODES:
            raise ValueError(f"ImageError code must be one of {list(IMAGE_ERROR_CODES)}, got {error!r}")
        super().__init__(detail)
        self.error = error
        self.detail = detail

    def to_dict(self) -> dict[str, str]:
        """JSON body for an error response: ``{"error": ..., "detail": ...}``."""
        return {"error": self.error, "detail": self.detail}

    def __repr__(self) -> str:
        return f"ImageError(error={self.error!r}, detail={self.detail!r})"


def undecodable(err: BaseException, where: str | None = None) -> ImageError:
    """The refusal of a file that broke the decoder in a way its own checks did not foresee: still the sender's
    file (``corrupt_image``), never a crash. The service and `snodevit score` both call this."""
    prefix = f"{where}: " if where else ""
    return ImageError("corrupt_image", f"{prefix}the image could not be decoded ({type(err).__name__}: {err})")


def _check_caps(max_bytes: int, max_pixels: int, allowed_formats: Sequence[str]) -> tuple[str, ...]:
    for name, value in (("max_bytes", max_bytes), ("max_pixels", max_pixels)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    if isinstance(allowed_formats, str) or not allowed_formats:
        raise ValueError(f"allowed_formats must be a non-empty sequence of format names, got {allowed_formats!r}")
    Image.init()
    known = tuple(sorted(Image.OPEN))
    formats = tuple(str(f).upper() for f in allowed_formats)
    unknown = [f for f in formats if f not in Image.OPEN]
    if unknown:
        raise ValueError(f"allowed_formats has unknown format(s) {unknown}; Pillow can open {list(known)}")
    return formats


def _sniff(data: bytes) -> str | None:
    for magic, fmt in _SIGNATURES:
        if data.startswith(magic) and (fmt != "WEBP" or data[8:12] == b"WEBP"):
            return fmt
    if len(data) >= 2 and data[:1] == b"P" and data[1:2] in b"123456":
        return "PPM"
    return None


def _open(data: bytes, formats: tuple[str, ...], max_pixels: int) -> Image.Image:
    """Parse the header only (no pixel data) and enforce the pixel cap."""
    try:
        with _WARNINGS_LOCK, warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data), formats=list(formats))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ImageError("too_many_pixels", f"image refused by the decompression-bomb guard: {err}") from None
    except UnidentifiedImageError:
        raise _unidentified(data, formats) from None
    except _DECODE_ERRORS as err:
        raise _broken(err, "the image header could not be parsed") from None
    width, height = im.size
    if width < 1 or height < 1:
        im.close()
        raise ImageError("corrupt_image", f"the image header declares an empty size {width}x{height}")
    if width * height > max_pixels:
        im.close()
        raise ImageError("too_many_pixels",
            f"image is {width}x{height} = {width * height} pixels, more than the limit of {max_pixels}",
        )
    return im


def _unidentified(data: bytes, formats: tuple[str, ...]) -> ImageError:
    sniffed = _sniff(data)
    if sniffed in formats:
        return ImageError("corrupt_image", f"the data starts like a {sniffed} file but could not be parsed "
                                               "(truncated or corrupt header)")
    try:  # Header-only identification, to say which format was refused; no pixel data is read.
        with _WARNINGS_LOCK, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data)) as other:
                found = other.format
    except Exception:  # noqa: BLE001 - any failure just means "not an image we know"
        found = None
    if found is not None:
        return ImageError("unsupported_format",
                          f"{found} images are not accepted; allowed formats: {', '.join(formats)}")
    head = data[:256].lstrip().lower()
    if head.startswith((b"<?xml", b"<svg", b"<!doctype", b"<html")) or b"<svg" in head:
        what = "XML/SVG/HTML text, which is not a raster image"
    elif all(32 <= b < 127 or b in b"\t\r\n" for b in data[:512]):
        what = "text, not an image"
    else:
        what = "not a recognised image"
    return ImageError("not_an_image", f"the data is {what}; allowed formats: {', '.join(formats)}")


def _broken(err: BaseException, context: str) -> ImageError:
    message = str(err) or type(err).__name__
    if isinstance(err, EOFError) or "truncat" in message.lower():
        return ImageError("truncated_image", f"{context}: the file is truncated ({message})")
    return ImageError("corrupt_image", f"{context}: the file is corrupt ({message})")


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
        ImageError: 415 ``unsupported_format`` when Pillow has no conversion for the mode.
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


def decode_image(
    data: bytes | bytearray | memoryview,
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    allowed_formats: Sequence[str] = DEFAULT_ALLOWED_FORMATS,
) -> Image.Image:
    """Decode untrusted bytes into a fully loaded "L" or "RGB" image.

    Args:
        data: the encoded file.
        max_bytes: largest accepted ``len(data)``.
        max_pixels: largest accepted width * height, checked on the header before decoding. Pillow's own
            bomb guard (``Image.MAX_IMAGE_PIXELS``, about 89 MP) also applies, whichever is lower.
        allowed_formats: Pillow format names to try (e.g. "PNG", "JPEG"); case-insensitive.

    Returns:
        A loaded image of mode "L" (grayscale sources) or "RGB": the first frame of an animation, with its
        EXIF orientation applied and any transparency composited onto black.

    Raises:
        ImageError: ``empty_body`` / ``truncated_image`` / ``corrupt_image``; ``too_large`` /
            ``too_many_pixels``; ``not_an_image`` (not a recognised image, including text and SVG) /
            ``unsupported_format`` (an image format or pixel mode that is not allowed).
        ValueError: when the caps themselves are invalid.
    """
    formats = _check_caps(max_bytes, max_pixels, allowed_formats)
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"data must be bytes, got {type(data).__name__}")
    data = bytes(data)
    if not data:
        raise ImageError("empty_body", "the image is empty (0 bytes)")
    if len(data) > max_bytes:
        raise ImageError("too_large", f"the image is {len(data)} bytes, more than the limit of {max_bytes}")
    im = _open(data, formats, max_pixels)
    try:
        try:
            im.load()  # frame 0 only: animations are never decoded further
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
            raise ImageError("too_many_pixels", f"image refused by the decompression-bomb guard: {err}") from None
        except _DECODE_ERRORS as err:
            raise _broken(err, f"the {im.format} image could not be decoded") from None
        try:
            oriented = ImageOps.exif_transpose(im)
        except _DECODE_ERRORS as err:  # a broken EXIF block should not cost the user their image
            logger.warning("ignoring unreadable EXIF orientation: %s", err)
            oriented = im
        out = standardize_mode(oriented)
        if out is im:  # the original is closed below; hand back an independent copy
            out = im.copy()
        out.load()
        return out
    finally:
        im.close()


def load_image_file(
    path: str | os.PathLike[str],
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    allowed_formats: Sequence[str] = DEFAULT_ALLOWED_FORMATS,
) -> Image.Image:
    """Read an image file and decode it with :func:`decode_image`.

    The size is checked with ``os.stat`` before reading, and at most ``max_bytes + 1`` bytes are read.

    Args:
        path: the file.
        max_bytes / max_pixels / allowed_formats: as for :func:`decode_image`.

    Returns:
        A loaded "L" or "RGB" image.

    Raises:
        ImageError: as :func:`decode_image`, with the path in ``detail``; 400 ``unreadable_file`` when the path
            is missing, not a regular file, or cannot be read.
    """
    _check_caps(max_bytes, max_pixels, allowed_formats)
    path = Path(path)
    try:
        st = path.stat()
        if not path.is_file():
            raise ImageError("unreadable_file", f"{path} is not a regular file")
        if st.st_size > max_bytes:
            raise ImageError("too_large", f"{path} is {st.st_size} bytes, more than the limit of {max_bytes}")
        with path.open("rb") as f:
            data = f.read(max_bytes + 1)
    except FileNotFoundError:
        raise ImageError("unreadable_file", f"{path} does not exist") from None
    except OSError as err:
        raise ImageError("unreadable_file", f"cannot read {path}: {err.strerror or err}") from None
    try:
        return decode_image(data, max_bytes=max_bytes, max_pixels=max_pixels, allowed_formats=allowed_formats)
    except ImageError as err:
        raise ImageError(err.error, f"{path}: {err.detail}") from None


@dataclass(frozen=True)
class Preprocessing:
    """How an image becomes a model input. Stored in checkpoints and ONNX metadata (``to_dict``)."""

    image_size: int  # the model's input height and width in pixels
    channels: int  # 1 (images converted to "L") or 3 (converted to "RGB")
    mean: tuple[float, ...]  # per-channel mean subtracted after scaling pixels to [0, 1]
    std: tuple[float, ...]  # per-channel standard deviation divided by after the mean
    resize: ResizeMode = "resize"  # "resize" (stretch to a square) or "pad_resize" (pad with black to a square first)

    def __post_init__(self) -> None:
        if not isinstance(self.image_size, int) or isinstance(self.image_size, bool) or self.image_size < 1:
            raise ValueError(f"image_size must be an integer >= 1, got {self.image_size!r}")
        if self.channels not in (1, 3):
            raise ValueError(f"channels must be one of [1, 3], got {self.channels!r}")
        if self.resize not in RESIZE_MODES:
            raise ValueError(f"resize must be one of {list(RESIZE_MODES)}, got {self.resize!r}")
        object.__setattr__(self, "mean", tuple(float(m) for m in self.mean))
        object.__setattr__(self, "std", tuple(float(s) for s in self.std))
        for name, values in (("mean", self.mean), ("std", self.std)):
            if len(values) != self.channels:
                raise ValueError(f"{name} needs {self.channels} value(s) (one per channel), got {len(values)}")
        if any(not np.isfinite(s) or s <= 0 for s in self.std):
            raise ValueError(f"std must be positive and finite, got {self.std}")
        if any(not np.isfinite(m) for m in self.mean):
            raise ValueError(f"mean must be finite, got {self.mean}")

    @property
    def mode(self) -> Literal["L", "RGB"]:
        """The Pillow mode images are converted to."""
        return "L" if self.channels == 1 else "RGB"

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable dict (tuples become lists)."""
        d = dataclasses.asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Preprocessing:
        """Inverse of :meth:`to_dict`. Raises ValueError on unknown or missing fields."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown preprocessing fields {unknown}; known fields: {sorted(known)}")
        fields = dict(data)
        for name in ("mean", "std"):
            if name in fields:
                fields[name] = tuple(fields[name])
        try:
            return cls(**fields)
        except TypeError as err:
            raise ValueError(f"incomplete preprocessing {data!r}: {err}") from None


def resize_tensor(images: torch.Tensor, prep: Preprocessing) -> torch.Tensor:
    """Resize uint8 images to ``prep.image_size`` squared (bilinear, antialiased), as :func:`preprocess` does.

    Args:
        images: uint8 tensor of shape (C, H, W) or (N, C, H, W).
        prep: target size and resize mode ("pad_resize" first pads the short side with black, centred).

    Returns:
        uint8 tensor of shape (C, S, S) or (N, C, S, S) with S = ``prep.image_size``; the input itself when it
        already has that size.
    """
    if images.dtype != torch.uint8 or images.ndim not in (3, 4):
        raise ValueError(f"expected a uint8 tensor (C, H, W) or (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
    height, width = images.shape[-2:]
    size = prep.image_size
    if prep.resize == "pad_resize" and height != width:
        side = max(height, width)
        left, top = (side - width) // 2, (side - height) // 2
        images = TF.pad(images, [left, top, side - width - left, side - height - top], fill=0)  # (.., C, side, side)
        height = width = side
    if (height, width) == (size, size):
        return images
    return TF.resize(images, [size, size], interpolation=InterpolationMode.BILINEAR, antialias=True)


def to_uint8_tensor(image: Image.Image, prep: Preprocessing) -> torch.Tensor:
    """Mode conversion and resize: the uint8 half of :func:`preprocess`.

    Args:
        image: any Pillow image; non-"L"/"RGB" modes go through :func:`standardize_mode` first.
        prep: target channels, size and resize mode.

    Returns:
        uint8 tensor of shape (C, S, S), C = ``prep.channels``, S = ``prep.image_size``.
    """
    image = standardize_mode(image)
    if image.mode != prep.mode:
        image = image.convert(prep.mode)  # RGB -> L uses ITU-R 601-2 luma; L -> RGB repeats the channel
    return resize_tensor(TF.pil_to_tensor(image), prep)  # (C, S, S)


def normalize(images: torch.Tensor, prep: Preprocessing) -> torch.Tensor:
    """Scale uint8 pixels to [0, 1] and normalise with the per-channel mean and std.

    Args:
        images: uint8 tensor of shape (C, H, W) or (N, C, H, W), C = ``prep.channels``.
        prep: the mean and std.

    Returns:
        float32 tensor of the same shape: ``(x / 255 - mean) / std``.
    """
    if images.dtype != torch.uint8:
        raise ValueError(f"expected a uint8 tensor, got {images.dtype}")
    if images.ndim not in (3, 4) or images.shape[-3] != prep.channels:
        raise ValueError(f"expected shape (C, H, W) or (N, C, H, W) with C={prep.channels}, got {tuple(images.shape)}")
    x = images.to(torch.float32).div_(255.0)
    return TF.normalize(x, list(prep.mean), list(prep.std))


def preprocess(image: Image.Image, prep: Preprocessing) -> torch.Tensor:
    """Turn a decoded image into the model's input. Deterministic.

    Args:
        image: a Pillow image, normally from :func:`decode_image`.
        prep: the model's preprocessing.

    Returns:
        float32 tensor of shape (C, S, S): converted to ``prep.mode``, resized (bilinear, antialiased),
        scaled to [0, 1] and normalised by ``prep.mean`` / ``prep.std``.
    """
    return normalize(to_uint8_tensor(image, prep), prep)
