"""Schemathesis hooks for the service's OpenAPI document: image bodies that are images.

A JSON schema cannot say "a decodable image", so schemathesis would fill the image parts (binary strings of the
form) and the raw ``image/*`` / ``application/octet-stream`` bodies with random bytes, which the service
rightly refuses (415 ``not_an_image``). Following schemathesis' guide on custom media types, these strategies draw
real images instead: every format the service decodes, in every pixel mode that format stores, from 1x1 to 64x64
pixels, with random pixel values. Random bytes still reach the service in schemathesis' negative phase, where a
refusal is what is checked. ``schemathesis.toml`` at the repository root loads this file.
"""

from __future__ import annotations

import io
import json
from typing import Any

import numpy as np
import schemathesis
from schemathesis.generation.modes import GenerationMode
from hypothesis import strategies as st
from openapi_schema_validator import OAS30Validator
from PIL import Image

#: The form fields that carry image files (everything else is a JSON-encoded parameter).
FILE_FIELDS = ("image", "images")
#: Pillow format -> pixel modes it writes.
FORMATS: dict[str, tuple[str, ...]] = {
    "PNG": ("L", "LA", "RGB", "RGBA", "P", "I;16", "1"),
    "JPEG": ("L", "RGB", "CMYK"),
    "GIF": ("L", "P"),
    "BMP": ("L", "RGB", "P", "1"),
    "TIFF": ("L", "RGB", "RGBA", "CMYK", "1"),
    "WEBP": ("RGB", "RGBA"),
    "PPM": ("L", "RGB"),
}


@st.composite
def image_files(draw: st.DrawFn) -> bytes:
    """One image file: a format, a mode it stores, a size and random pixels (drawn from a seed, so it shrinks)."""
    fmt = draw(st.sampled_from(sorted(FORMATS)))
    mode = draw(st.sampled_from(FORMATS[fmt]))
    width, height = draw(st.integers(1, 64)), draw(st.integers(1, 64))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    rgba = Image.fromarray(rng.integers(0, 256, (height, width, 4), dtype=np.uint8), "RGBA")
    image = rgba.convert("RGB").convert(mode) if mode in ("P", "1", "CMYK", "I;16") else rgba.convert(mode)
    out = io.BytesIO()
    image.save(out, format=fmt)
    return out.getvalue()


# Binary strings: the form's file parts (``image``, ``images[]``); media types: the raw bodies.
schemathesis.openapi.format("binary", image_files())
for media_type in ("image/*", "application/octet-stream"):
    schemathesis.openapi.media_type(media_type, image_files())



def _as_json(body: dict[str, Any]) -> dict[str, Any]:
    """The form as the JSON instance its schema describes, as the wire carries it: a file is a string (empty when
    the file is empty); a string in a JSON-encoded part goes out bare, so ``"3"`` arrives as the JSON number 3."""
    def value(v: Any) -> Any:
        if isinstance(v, list):
            return [value(x) for x in v]
        data = getattr(v, "data", v)  # schemathesis wraps drawn files in ``Binary``
        return ("x" if data else "") if isinstance(data, (bytes, bytearray)) else v

    def sent(k: str, v: Any) -> Any:
        if k in FILE_FIELDS or not isinstance(v, str):
            return value(v)
        try:
            return json.loads(v)
        except ValueError:
            return v
    return {k: sent(k, v) for k, v in body.items()}


def _form_schema(case: schemathesis.Case) -> dict[str, Any] | None:
    content = case.operation.definition.raw.get("requestBody", {}).get("content", {})
    return content.get("multipart/form-data", {}).get("schema") if case.media_type == "multipart/form-data" else None


@schemathesis.hook
def before_call(ctx: schemathesis.HookContext, case: schemathesis.Case, kwargs: dict) -> None:
    """Two corrections of how schemathesis sends or labels a multipart case, so each check judges what was sent
    (the form as the service receives it: :func:`_as_json`).

    1. A form field that the document encodes as ``application/json`` goes out as JSON text, lists included.
       schemathesis writes a list as one part per element, so the negative case "seed is an array" ``[5]`` went
       out as one part ``5``: a valid request, which the service rightly answers. The encoding says the part *is*
       JSON, so ``[5]`` is what such a client sends (and the service refuses it with 400).
    2. A "negative" form that is valid under the document (OpenAPI 3.0 ``nullable`` included) is relabelled
       positive. schemathesis' negative mutations can land on a valid value (``alpha`` mutated to null, which
       ``nullable`` allows) and shrinking can drop the one invalid part (schemathesis issue #4332); it then
       reports the service's correct answer as a schema violation accepted. The positive checks still apply.
    """
    if not isinstance(case.body, dict):
        return
    body, meta, schema = case.body, case.meta, _form_schema(case)
    if meta is not None and schema is not None and meta.generation.mode.is_negative:
        if OAS30Validator(schema).is_valid(_as_json(body)):
            meta.generation.mode = GenerationMode.POSITIVE
    fixed = {k: json.dumps(v) if k not in FILE_FIELDS and isinstance(v, (list, dict)) else v for k, v in body.items()}
    if fixed != body:
        case.body = fixed
