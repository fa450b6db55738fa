"""Multipart forms and their rules: what one API route accepts, and the checks the guard runs on a form body.

:func:`scan_multipart` reads a multipart body's structure (names, file names, sizes, the small text values) with
``python-multipart`` and copies no file data; :func:`check_form` and :func:`check_params` apply a route's
:class:`RouteRule` to it. :mod:`service.guard` calls them before BentoML parses the body, so BentoML only ever
sees well-formed forms with valid parameters.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ValidationError
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header

from .errors import ServiceError, describe_validation_errors

MAX_FIELD_BYTES = 1024  # a non-file form field holds a number; anything longer is refused
MAX_FILENAME_CHARS = 200  # BentoML puts the upload's file name into a temporary file name


@dataclass(frozen=True)
class RouteRule:
    """What one API route accepts."""

    max_body: int  # largest request body, bytes
    file_field: str  # the multipart field holding the image(s)
    max_files: int  # the most images in that field
    fields: frozenset[str] = field(default_factory=frozenset)  # the other multipart fields (parameters)
    raw_path: str | None = None  # where a raw image body is routed; None: multipart only
    params: type[BaseModel] | None = None  # validates the parameters (the API signature's types); None: skipped


@dataclass
class _Part:
    name: str | None = None
    filename: str | None = None
    size: int = 0
    value: bytes = b""  # the first MAX_FIELD_BYTES + 1 bytes of a non-file field


def scan_multipart(body: bytes, content_type: str) -> list[_Part]:
    """Names, file names and sizes of the parts of a multipart body, and the values of its small text fields.

    File data is counted, never copied.

    Raises:
        ServiceError: 400 ``malformed_multipart`` when the body does not parse or has no closing boundary.
    """
    _, options = parse_options_header(content_type)
    boundary = options.get(b"boundary")
    if not boundary:
        raise ServiceError(400, "malformed_multipart", "the multipart Content-Type has no boundary parameter")
    parts: list[_Part] = []
    header: dict[str, bytes] = {}
    state = {"field": b"", "value": b"", "ended": False}

    def on_part_begin() -> None:
        parts.append(_Part())
        header.clear()

    def on_header_field(data: bytes, start: int, end: int) -> None:
        state["field"] += data[start:end]

    def on_header_value(data: bytes, start: int, end: int) -> None:
        state["value"] += data[start:end]

    def on_header_end() -> None:
        header[state["field"].decode("latin-1").lower()] = state["value"]
        state["field"] = state["value"] = b""

    def on_headers_finished() -> None:
        disposition, opts = parse_options_header(header.get("content-disposition", b""))
        if disposition != b"form-data" or b"name" not in opts:
            raise ServiceError(400, "malformed_multipart", "a multipart part lacks a "
                               "'Content-Disposition: form-data; name=...' header")
        parts[-1].name = opts[b"name"].decode("utf-8", "replace")
        if b"filename" in opts:
            parts[-1].filename = opts[b"filename"].decode("utf-8", "replace")

    def on_part_data(data: bytes, start: int, end: int) -> None:
        part = parts[-1]
        part.size += end - start
        if part.filename is None and len(part.value) <= MAX_FIELD_BYTES:
            part.value += data[start:min(end, start + MAX_FIELD_BYTES + 1 - len(part.value))]

    def on_end() -> None:
        state["ended"] = True

    callbacks = {"on_part_begin": on_part_begin, "on_header_field": on_header_field,
                 "on_header_value": on_header_value, "on_header_end": on_header_end,
                 "on_headers_finished": on_headers_finished, "on_part_data": on_part_data, "on_end": on_end}
    try:
        parser = MultipartParser(boundary, callbacks)  # type: ignore[arg-type]
        parser.write(body)
        parser.finalize()
    except MultipartParseError as err:
        raise ServiceError(400, "malformed_multipart", f"the multipart body does not parse: {err}") from None
    if not state["ended"]:
        raise ServiceError(400, "malformed_multipart", "the multipart body is incomplete (no closing boundary)")
    return parts


def check_form(parts: list[_Part], rule: RouteRule, route: str) -> None:
    """The form fields a route accepts: its image field as file uploads, known parameters, no duplicates.

    Raises:
        ServiceError: 400 naming the field (``too_many_images`` beyond the most files a request may carry).
    """
    files = [p for p in parts if p.name == rule.file_field]
    for p in parts:
        if p.name == rule.file_field:
            if p.filename is None:
                raise ServiceError(400, "invalid_parameter", f"{rule.file_field}: must be a file upload (a multipart "
                                   "part with a filename); text and URLs are not accepted")
            if len(p.filename) > MAX_FILENAME_CHARS:
                raise ServiceError(400, "invalid_parameter", f"{rule.file_field}: the file name is longer than "
                                   f"{MAX_FILENAME_CHARS} characters")
        elif p.name not in rule.fields:
            allowed = ", ".join([rule.file_field, *sorted(rule.fields)])
            raise ServiceError(400, "invalid_parameter", f"{p.name}: unknown form field; {route} takes {allowed}")
        elif p.filename is not None:
            raise ServiceError(400, "invalid_parameter", f"{p.name}: must be a plain form field, not a file")
        elif p.size > MAX_FIELD_BYTES:
            raise ServiceError(400, "invalid_parameter", f"{p.name}: value longer than {MAX_FIELD_BYTES} bytes")
    names = [p.name for p in parts if p.name != rule.file_field]
    dupes = sorted({n for n in names if names.count(n) > 1 and n is not None})
    if dupes:
        raise ServiceError(400, "invalid_parameter", f"{dupes[0]}: given more than once")
    if not files:
        raise ServiceError(400, "invalid_parameter", f"{rule.file_field}: missing; upload the image as a multipart "
                           f"file field named '{rule.file_field}'" + (" or send it as the raw body with Content-Type "
                                                                       "image/*" if rule.raw_path else ""))
    if len(files) > rule.max_files:
        if rule.max_files == 1:
            raise ServiceError(400, "invalid_parameter", f"{rule.file_field}: {len(files)} files given, {route} "
                               "takes one (use /classify_batch for several)")
        raise ServiceError(400, "too_many_images", f"{rule.file_field}: {len(files)} files given, the most one "
                           f"request may carry is {rule.max_files}")


def check_params(parts: list[_Part], rule: RouteRule) -> None:
    """Validate the form's parameters as BentoML will (each value JSON-decoded when it parses, else the text).

    Raises:
        ServiceError: 400 ``invalid_parameter`` naming the parameter.
    """
    if rule.params is None:
        return
    values: dict[str, Any] = {}
    for p in parts:
        if p.name in rule.fields:
            text = p.value.decode("utf-8", "replace")
            try:
                values[p.name] = json.loads(text)
            except json.JSONDecodeError:
                values[p.name] = text
    try:
        rule.params.model_validate(values)
    except ValidationError as err:
        raise ServiceError(400, "invalid_parameter", describe_validation_errors(err.errors())) from None
