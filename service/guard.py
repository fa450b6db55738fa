"""Request guard: the checks that must happen before BentoML parses a request body.

BentoML 1.4 has no request-size limit, turns a malformed multipart body into a 500, and fetches a URL when a
file field arrives as text. :class:`RequestGuard`, an ASGI middleware, sits in front of the API routes and

1. refuses more than ``max_concurrency`` requests in progress (429, ``Retry-After: 1``);
2. caps the body: ``Content-Length`` above the route's limit is refused before reading (413), a body without
   one is counted while it streams in (413 as soon as it passes the limit); the body is buffered and replayed;
3. sends raw image bodies (``Content-Type: image/*`` or ``application/octet-stream``) of ``POST /classify``,
   ``/explain`` and ``/explain_image`` to the raw-upload handler (``/raw/<route>``), parameters in the query;
4. checks multipart forms with a header-only scan (no data is copied): well-formed, the image field(s) are file
   uploads (never text that BentoML would fetch as a URL), no unknown or oversized fields, the image count;
5. refuses every other content type with 415.

Every refusal is the common ``{"error", "detail"}`` body.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import ServiceError

logger = logging.getLogger(__name__)

RAW_PREFIX = "/raw"
RAW_MEDIA_TYPES = ("image/", "application/octet-stream")
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


@dataclass
class _Part:
    name: str | None = None
    filename: str | None = None
    size: int = 0


def scan_multipart(body: bytes, content_type: str) -> list[_Part]:
    """Names, file names and sizes of the parts of a multipart body, without copying their data.

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
        parts[-1].size += end - start

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
        ServiceError: 400 naming the field, or 413 ``too_many_images``.
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
        raise ServiceError(413, "too_many_images", f"{rule.file_field}: {len(files)} files given, the most one "
                           f"request may carry is {rule.max_files}")


class RequestGuard:
    """ASGI middleware enforcing :class:`RouteRule` per route and the service's concurrency limit.

    Args:
        app: the wrapped application.
        rules: route path -> its rule; raw-upload paths (``/raw/...``) are derived from them.
        max_concurrency: requests in progress on guarded routes before new ones get 429.
        guarded_paths: further paths counted against ``max_concurrency`` (e.g. ``/metadata``), with a 64 KiB cap.
    """

    def __init__(self, app: ASGIApp, rules: Mapping[str, RouteRule], max_concurrency: int,
                 guarded_paths: tuple[str, ...] = ()) -> None:
        self.app = app
        self.rules = dict(rules)
        self.raw_rules = {r.raw_path: r for r in self.rules.values() if r.raw_path}
        self.other = {p: RouteRule(64 * 2**10, "", 0) for p in guarded_paths}
        self.max_concurrency = max_concurrency
        self.in_flight = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or not (path in self.rules or path in self.raw_rules or path in self.other):
            await self.app(scope, receive, send)
            return
        if self.in_flight >= self.max_concurrency:
            await self._refuse(scope, receive, send, ServiceError(
                429, "overloaded", f"the service is answering {self.in_flight} requests, the most it takes at once; "
                "retry shortly", headers={"Retry-After": "1"}))
            return
        self.in_flight += 1
        try:
            await self._guard(scope, receive, send, path)
        finally:
            self.in_flight -= 1

    async def _guard(self, scope: Scope, receive: Receive, send: Send, path: str) -> None:
        rule = self.rules.get(path) or self.raw_rules.get(path) or self.other[path]
        try:
            body = await self._read_body(scope, receive, rule.max_body, path)
            if body is None:
                return  # the client went away
            if scope["method"] == "POST" and rule.file_field:
                scope = self._route(scope, body, rule, path)
        except ServiceError as err:
            await self._refuse(scope, receive, send, err)
            return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    @staticmethod
    async def _read_body(scope: Scope, receive: Receive, limit: int, path: str) -> bytes | None:
        headers = dict(scope.get("headers", []))
        declared = headers.get(b"content-length")
        if declared is not None:
            try:
                length = int(declared)
            except ValueError:
                raise ServiceError(400, "bad_request", f"Content-Length {declared[:40]!r} is not a number") from None
            if length > limit:
                raise ServiceError(413, "request_too_large", f"the request body is {length} bytes, more than the "
                                   f"limit of {limit} bytes for {path}")
        chunks: list[bytes] = []
        total = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            total += len(chunk)
            if total > limit:
                raise ServiceError(413, "request_too_large", f"the request body is more than the limit of {limit} "
                                   f"bytes for {path}")
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    def _route(self, scope: Scope, body: bytes, rule: RouteRule, path: str) -> Scope:
        headers = dict(scope.get("headers", []))
        content_type = headers.get(b"content-type", b"").decode("latin-1").strip()
        media = content_type.split(";")[0].strip().lower()
        if path in self.raw_rules:  # the raw handler itself: the body is the image
            return scope
        if media.startswith(RAW_MEDIA_TYPES) and rule.raw_path:
            return {**scope, "path": rule.raw_path, "raw_path": rule.raw_path.encode()}
        if media == "multipart/form-data":
            if scope.get("query_string"):
                raise ServiceError(400, "invalid_parameter", "query parameters are read only with a raw image body; "
                                   f"send {', '.join(sorted(rule.fields))} as form fields of the multipart upload")
            check_form(scan_multipart(body, content_type), rule, path)
            return scope
        raw_hint = (" or the raw image bytes with Content-Type image/* (parameters in the query string)"
                    if rule.raw_path else "")
        raise ServiceError(415, "unsupported_media_type",
                           f"{path} takes multipart/form-data with a file field '{rule.file_field}'{raw_hint}; got "
                           f"{media or 'no Content-Type'!r}")

    @staticmethod
    async def _refuse(scope: Scope, receive: Receive, send: Send, err: ServiceError) -> None:
        logger.info("refused %s %s: %d %s", scope.get("method"), scope.get("path"), err.status, err.detail)
        await err.response()(scope, receive, send)
