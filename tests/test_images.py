"""Tests of snodevit.data.decode and snodevit.data.preprocessing: refusal of bad input with the right code (and
the service's status for it), decoding of odd but valid input."""

from __future__ import annotations

import io
import struct
import warnings
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from service.errors import IMAGE_ERROR_STATUS
from snodevit.data import (DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS, ImageError, Preprocessing, decode_image,
    load_image_file, normalize, preprocess, resize_tensor, standardize_mode, to_uint8_tensor)


def _encode(image: Image.Image, fmt: str, **params: object) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **params)
    return buf.getvalue()


def _noise(size: tuple[int, int] = (64, 48), seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), "RGB")


def _png_with_size(width: int, height: int) -> bytes:
    """A valid 8x8 PNG whose IHDR is patched to claim width x height, with its CRC recomputed."""
    data = bytearray(_encode(Image.new("L", (8, 8), 0), "PNG"))
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])) & 0xFFFFFFFF)
    return bytes(data)


def _truncated(fmt: str) -> bytes:
    full = _encode(_noise((96, 96)), fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return full[: len(full) * 2 // 3]


def _gif_animation() -> bytes:
    frames = [Image.new("L", (6, 5), v) for v in (10, 200, 90)]
    return _encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)


def _exif_rotated() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    return _encode(Image.new("RGB", (40, 20), (0, 0, 255)), "JPEG", exif=exif, quality=95)


def _palette_with_transparency() -> bytes:
    im = Image.new("P", (4, 4), 1)
    im.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    im.putpixel((0, 0), 0)
    return _encode(im, "PNG", transparency=0)


def _ramp16() -> np.ndarray:
    return np.tile(np.linspace(0, 65535, 256).round().astype(np.uint16), (3, 1))  # (3, 256)


# (id, bytes factory, decode kwargs, expected status, expected error code)
BAD_INPUTS: list[tuple[str, Callable[[], bytes], dict[str, object], int, str]] = [
    ("zero_bytes", lambda: b"", {}, 400, "empty_body"),
    ("random_bytes", lambda: np.random.default_rng(1).bytes(2048), {}, 415, "not_an_image"),
    ("text_file", lambda: b"label,pixel0\n7,0\n" * 20, {}, 415, "not_an_image"),
    ("svg_xml", lambda: b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg" width="9"/>', {}, 415,
     "not_an_image"),
    ("html", lambda: b"<!DOCTYPE html><html><body>hi</body></html>", {}, 415, "not_an_image"),
    ("truncated_png", lambda: _truncated("PNG"), {}, 400, "truncated_image"),
    ("truncated_jpeg", lambda: _truncated("JPEG"), {}, 400, "truncated_image"),
    ("png_header_only", lambda: _encode(Image.new("L", (8, 8)), "PNG")[:30], {}, 400, "corrupt_image"),
    ("png_bomb_100000x100000", lambda: _png_with_size(100_000, 100_000), {}, 413, "too_many_pixels"),
    # 25 MP: over our cap but under Pillow's own guard, so only the header check can catch it (the tiny IDAT
    # would otherwise fail to decode as truncated, a 400).
    ("png_header_5000x5000", lambda: _png_with_size(5000, 5000), {}, 413, "too_many_pixels"),
    # 100 MP with our cap raised above it: Pillow's DecompressionBombWarning becomes a 413.
    ("png_pil_bomb_warning", lambda: _png_with_size(10_000, 10_000), {"max_pixels": 10**9}, 413, "too_many_pixels"),
    ("real_image_over_pixel_cap", lambda: _encode(_noise(), "PNG"), {"max_pixels": 1000}, 413, "too_many_pixels"),
    ("over_max_bytes", lambda: _encode(_noise(), "PNG"), {"max_bytes": 100}, 413, "too_large"),
    ("format_not_allowed", lambda: _encode(_noise(), "PNG"), {"allowed_formats": ("JPEG",)}, 415, "unsupported_format"),
    ("ico_not_allowed", lambda: _encode(Image.new("RGB", (16, 16)), "ICO"), {}, 415, "unsupported_format"),
    ("corrupt_webp", lambda: _truncated("WEBP"), {}, 400, "corrupt_image"),
]


@pytest.mark.parametrize(("make", "kwargs", "status", "error"), [c[1:] for c in BAD_INPUTS],
                         ids=[c[0] for c in BAD_INPUTS])
def test_bad_inputs_are_refused_with_status_and_code(make: Callable[[], bytes], kwargs: dict[str, object],
                                                     status: int, error: str) -> None:
    before = Image.MAX_IMAGE_PIXELS
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning may leak out either
        with pytest.raises(ImageError) as info:
            decode_image(make(), **kwargs)  # type: ignore[arg-type]
    err = info.value
    assert (IMAGE_ERROR_STATUS[err.error], err.error) == (status, error), err.detail  # the service's table
    assert isinstance(err, ValueError) and err.detail and str(err) == err.detail
    assert err.to_dict() == {"error": error, "detail": err.detail}
    assert Image.MAX_IMAGE_PIXELS == before and ImageFile.LOAD_TRUNCATED_IMAGES is False


def _check_gif_first_frame(im: Image.Image) -> None:
    assert (im.mode, im.size) == ("L", (6, 5))
    assert np.all(np.asarray(im) == 10)  # frames 2 and 3 are 200 and 90


def _check_ramp16(im: Image.Image) -> None:
    assert (im.mode, im.size) == ("L", (256, 3))
    row = np.asarray(im)[0].astype(int)
    expected = np.round(_ramp16()[0] / 257.0).astype(int)  # 16-bit -> 8-bit by scaling, not clipping
    assert row[0] == 0 and row[-1] == 255
    assert np.array_equal(row, expected)
    assert np.all(np.diff(row) >= 0) and len(np.unique(row)) > 200


def _check_la_on_black(im: Image.Image) -> None:
    assert im.mode == "L"
    assert im.getpixel((0, 0)) == 0  # alpha 0 -> black
    assert abs(im.getpixel((1, 0)) - 100) <= 1  # 200 at alpha 128 -> about 100
    assert im.getpixel((2, 0)) == 200  # opaque


def _la_image() -> bytes:
    gray = Image.new("L", (3, 1), 200)
    alpha = Image.frombytes("L", (3, 1), bytes([0, 128, 255]))
    return _encode(Image.merge("LA", [gray, alpha]), "PNG")


def _rgba_image() -> bytes:
    im = Image.new("RGBA", (2, 1), (200, 100, 50, 255))
    im.putpixel((1, 0), (200, 100, 50, 0))
    return _encode(im, "PNG")


def _float_tiff() -> bytes:
    return _encode(Image.fromarray(np.linspace(0, 1, 16, dtype=np.float32).reshape(4, 4), "F"), "TIFF")


def _int32_tiff() -> bytes:
    # Beyond the 16-bit range, so it is min-max stretched (see standardize_mode).
    return _encode(Image.fromarray((np.arange(16, dtype=np.int32) * 10_000 - 5).reshape(4, 4), "I"), "TIFF")


# (id, bytes factory, expected mode, expected size (w, h), extra check)
GOOD_INPUTS: list[tuple[str, Callable[[], bytes], str, tuple[int, int], Callable[[Image.Image], None] | None]] = [
    ("gif_animation_first_frame", _gif_animation, "L", (6, 5), _check_gif_first_frame),
    ("png_i16_ramp", lambda: _encode(Image.fromarray(_ramp16()), "PNG"), "L", (256, 3), _check_ramp16),
    ("tiff_i16_ramp", lambda: _encode(Image.fromarray(_ramp16()), "TIFF"), "L", (256, 3), _check_ramp16),
    ("tiff_float_0_1", _float_tiff, "L", (4, 4),
     lambda im: np.testing.assert_array_equal(np.asarray(im).ravel(), np.round(np.linspace(0, 255, 16)))),
    ("tiff_int32_wide_range", _int32_tiff, "L", (4, 4),
     lambda im: (np.asarray(im).min() == 0 and np.asarray(im).max() == 255) or pytest.fail("not stretched")),
    ("rgba_on_black", _rgba_image, "RGB", (2, 1),
     lambda im: (im.getpixel((0, 0)) == (200, 100, 50) and im.getpixel((1, 0)) == (0, 0, 0)) or pytest.fail()),
    ("la_on_black", _la_image, "L", (3, 1), _check_la_on_black),
    ("palette_transparency", _palette_with_transparency, "RGB", (4, 4),
     lambda im: (im.getpixel((0, 0)) == (0, 0, 0) and im.getpixel((1, 1)) == (0, 255, 0)) or pytest.fail()),
    ("cmyk_jpeg", lambda: _encode(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), "JPEG", quality=95), "RGB", (16, 16),
     lambda im: (np.abs(np.subtract(im.getpixel((8, 8)), (255, 0, 0))).max() <= 3) or pytest.fail("not red")),
    ("mode_1", lambda: _encode(Image.new("1", (5, 3), 1), "PNG"), "L", (5, 3),
     lambda im: np.all(np.asarray(im) == 255) or pytest.fail()),
    ("exif_orientation_6", _exif_rotated, "RGB", (20, 40), None),
    ("webp_lossless", lambda: _encode(_noise(), "WEBP", lossless=True), "RGB", (64, 48),
     lambda im: np.array_equal(np.asarray(im), np.asarray(_noise())) or pytest.fail()),
    ("bmp", lambda: _encode(_noise(), "BMP"), "RGB", (64, 48),
     lambda im: np.array_equal(np.asarray(im), np.asarray(_noise())) or pytest.fail()),
    ("tiff_rgb", lambda: _encode(_noise(), "TIFF"), "RGB", (64, 48),
     lambda im: np.array_equal(np.asarray(im), np.asarray(_noise())) or pytest.fail()),
    ("ppm", lambda: _encode(_noise(), "PPM"), "RGB", (64, 48), None),
    ("pgm_gray", lambda: _encode(Image.new("L", (7, 9), 33), "PPM"), "L", (7, 9), None),
    ("jpeg_gray_stays_gray", lambda: _encode(Image.new("L", (8, 8), 128), "JPEG"), "L", (8, 8), None),
    ("jpeg_ycbcr", lambda: _encode(_noise(), "JPEG"), "RGB", (64, 48), None),
    ("lowercase_allowed_formats", lambda: _encode(_noise(), "PNG"), "RGB", (64, 48), None),
]


@pytest.mark.parametrize(("make", "mode", "size", "check"), [c[1:] for c in GOOD_INPUTS],
                         ids=[c[0] for c in GOOD_INPUTS])
def test_odd_but_valid_inputs_decode(make: Callable[[], bytes], mode: str, size: tuple[int, int],
                                     check: Callable[[Image.Image], None] | None) -> None:
    im = decode_image(make(), allowed_formats=("png", "jpeg", "gif", "bmp", "tiff", "webp", "ppm"))
    assert (im.mode, im.size) == (mode, size)
    assert im.tobytes()  # fully loaded
    if check is not None:
        check(im)


def test_defaults_are_documented_values() -> None:
    assert DEFAULT_MAX_BYTES == 10 * 2**20
    assert DEFAULT_MAX_PIXELS == 4096 * 4096


def test_pixel_cap_is_inclusive() -> None:
    data = _encode(_noise((10, 10)), "PNG")
    assert decode_image(data, max_pixels=100).size == (10, 10)
    with pytest.raises(ImageError, match="100"):
        decode_image(data, max_pixels=99)


@pytest.mark.parametrize("kwargs", [{"max_bytes": 0}, {"max_pixels": -1}, {"allowed_formats": ()},
                                    {"allowed_formats": ("PNG", "NOPE")}, {"allowed_formats": "PNG"}])
def test_bad_caps_raise_value_error(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError) as info:
        decode_image(_encode(_noise(), "PNG"), **kwargs)  # type: ignore[arg-type]
    assert not isinstance(info.value, ImageError)


def test_standardize_mode_palette_alpha_and_gray_palette() -> None:
    pa = Image.new("PA", (2, 1))
    pa.putpalette([0, 0, 255] * 256)
    pa.putpixel((0, 0), (0, 255))
    pa.putpixel((1, 0), (0, 0))
    out = standardize_mode(pa)
    assert out.mode == "RGB" and out.getpixel((0, 0)) == (0, 0, 255) and out.getpixel((1, 0)) == (0, 0, 0)
    gray_palette = Image.new("P", (2, 2), 3)
    gray_palette.putpalette([v for i in range(256) for v in (i, i, i)])
    out = standardize_mode(gray_palette)
    assert out.mode == "L" and out.getpixel((0, 0)) == 3


def test_load_image_file(tmp_path: Path) -> None:
    path = tmp_path / "x.png"
    path.write_bytes(_encode(_noise(), "PNG"))
    assert load_image_file(path).size == (64, 48)
    with pytest.raises(ImageError) as info:
        load_image_file(tmp_path / "missing.png")
    assert info.value.error == "unreadable_file" and IMAGE_ERROR_STATUS[info.value.error] == 400
    assert "missing.png" in info.value.detail
    with pytest.raises(ImageError) as info:
        load_image_file(tmp_path)
    assert IMAGE_ERROR_STATUS[info.value.error] == 400 and str(tmp_path) in info.value.detail
    with pytest.raises(ImageError) as info:
        load_image_file(path, max_bytes=10)
    assert IMAGE_ERROR_STATUS[info.value.error] == 413 and "x.png" in info.value.detail
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(_truncated("JPEG"))
    with pytest.raises(ImageError) as info:
        load_image_file(bad)
    assert info.value.error == "truncated_image" and "bad.jpg" in info.value.detail


MNIST_PREP = Preprocessing(image_size=28, channels=1, mean=(0.1312,), std=(0.3084,))


def test_preprocessing_round_trips_through_json() -> None:
    import json

    prep = Preprocessing(image_size=32, channels=3, mean=(0.5, 0.4, 0.3), std=(0.2, 0.2, 0.25), resize="pad_resize")
    again = Preprocessing.from_dict(json.loads(json.dumps(prep.to_dict())))
    assert again == prep and isinstance(again.mean, tuple)
    with pytest.raises(ValueError, match="unknown preprocessing fields"):
        Preprocessing.from_dict({**prep.to_dict(), "extra": 1})


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"channels": 2, "mean": (0, 0), "std": (1, 1)}, "channels must be one of"),
    ({"resize": "crop"}, r"resize must be one of \['resize', 'pad_resize'\], got 'crop'"),
    ({"mean": (0.1, 0.2)}, "mean needs 1"),
    ({"std": (0.0,)}, "std must be positive"),
    ({"image_size": 0}, "image_size must be"),
])
def test_preprocessing_validates(kwargs: dict[str, object], message: str) -> None:
    fields: dict[str, object] = {"image_size": 28, "channels": 1, "mean": (0.5,), "std": (0.5,), **kwargs}
    with pytest.raises(ValueError, match=message):
        Preprocessing(**fields)  # type: ignore[arg-type]


def test_preprocess_shape_dtype_and_known_pixel() -> None:
    arr = np.zeros((28, 28), dtype=np.uint8)
    arr[3, 5] = 255
    x = preprocess(Image.fromarray(arr, "L"), MNIST_PREP)
    assert x.shape == (1, 28, 28) and x.dtype == torch.float32
    assert x[0, 3, 5].item() == pytest.approx((1.0 - 0.1312) / 0.3084, abs=1e-6)
    assert x[0, 0, 0].item() == pytest.approx(-0.1312 / 0.3084, abs=1e-6)
    assert torch.equal(x, preprocess(Image.fromarray(arr, "L"), MNIST_PREP))  # deterministic


def test_preprocess_converts_channels_and_resizes() -> None:
    rgb = Image.new("RGB", (50, 30), (255, 0, 0))
    x = preprocess(rgb, MNIST_PREP)  # RGB -> L (luma of pure red = 76), stretched to 28x28
    assert x.shape == (1, 28, 28)
    assert x[0, 14, 14].item() == pytest.approx((76 / 255 - 0.1312) / 0.3084, abs=1e-5)
    prep3 = Preprocessing(image_size=16, channels=3, mean=(0.5,) * 3, std=(0.5,) * 3)
    y = preprocess(Image.new("L", (8, 8), 255), prep3)  # L -> RGB, upsampled
    assert y.shape == (3, 16, 16) and torch.allclose(y, torch.ones_like(y))


def test_pad_resize_pads_with_black_and_keeps_aspect() -> None:
    prep = Preprocessing(image_size=20, channels=1, mean=(0.0,), std=(1.0,), resize="pad_resize")
    u8 = to_uint8_tensor(Image.new("L", (40, 20), 255), prep)  # 40x20 -> padded 40x40 -> 20x20
    assert u8.shape == (1, 20, 20) and u8.dtype == torch.uint8
    assert u8[0, 0, 10] == 0 and u8[0, 10, 10] == 255 and u8[0, 19, 10] == 0


def test_normalize_and_resize_tensor_contracts() -> None:
    batch = torch.full((2, 1, 28, 28), 255, dtype=torch.uint8)
    assert resize_tensor(batch, MNIST_PREP) is batch  # already the right size: untouched
    assert torch.allclose(normalize(batch, MNIST_PREP), torch.tensor((1 - 0.1312) / 0.3084))
    with pytest.raises(ValueError, match="uint8"):
        normalize(batch.float(), MNIST_PREP)
    with pytest.raises(ValueError, match="C=1"):
        normalize(torch.zeros(3, 28, 28, dtype=torch.uint8), MNIST_PREP)
