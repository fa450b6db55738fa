"""Safe decoding of untrusted image bytes into a loaded "L" or "RGB" Pillow image.

:func:`decode_image` enforces, in this order:

1. a byte cap (``max_bytes``: ``too_large``) and a non-empty body (``empty_body``);
2. a format allow-list (Pillow only tries the allowed plugins; anything else is ``unsupported_format`` or
   ``not_an_image``);
3. a pixel cap checked on the header's ``im.size`` *before* any pixel data is decoded (``too_many_pixels``);
   Pillow's own decompression-bomb guard (``Image.MAX_IMAGE_PIXELS``, read here, never written) gives
   ``too_many_pixels`` too;
4. a full ``im.load()`` so that truncated or corrupt files fail here (``truncated_image``, ``corrupt_image``),
   not later inside a model (``ImageFile.LOAD_TRUNCATED_IMAGES`` is left at its default, False);
5. first frame only for animations, EXIF orientation applied, and every Pillow mode mapped to "L" or "RGB"
   (:func:`snodevit.data.modes.standardize_mode`).

Every refusal is an :class:`~snodevit.data.image_errors.ImageError` whose code the service maps to an HTTP status.
:func:`load_image_file` does the same for a file on disk (``unreadable_file`` when it cannot be read).
"""

from __future__ import annotations

import io
import logging
import os
import struct
import threading
import warnings
import zlib
from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

from snodevit.data.image_errors import ImageError
from snodevit.data.modes import standardize_mode

logger = logging.getLogger(__name__)

#: Largest accepted encoded file, in bytes (10 MiB). Bigger bodies are refused (``too_large``) before parsing.
DEFAULT_MAX_BYTES: int = 10 * 2**20
#: Largest accepted image, in pixels (width * height, 4096 x 4096 = 16.8 MP), checked on the header before the
#: pixel data is decoded. A decoded 16.8 MP RGB image takes about 50 MB.
DEFAULT_MAX_PIXELS: int = 4096 * 4096
#: Pillow format names tried by default. Anything else (EPS, PSD, ICO, SVG ...) is refused.
DEFAULT_ALLOWED_FORMATS: tuple[str, ...] = ("PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP", "PPM")

# Leading bytes of the allowed formats: a file that starts like one but cannot be parsed is
# ``corrupt_image``, not "something else" (``not_an_image`` / ``unsupported_format``).
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
        ImageError: as :func:`decode_image`, with the path in ``detail``; ``unreadable_file`` when the path
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
