"""One error shape for every 4xx/5xx answer: ``{"error": <code>, "detail": <sentence>}``.

The service's own refusals raise :class:`ServiceError` and are answered by :meth:`ServiceError.response`.
Answers produced by BentoML or Starlette before the service code runs (pydantic validation of form fields,
unknown routes, an unexpected exception) come in other shapes; :class:`ErrorShapeMiddleware` rewrites them.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable, Mapping
from http import HTTPStatus
from typing import Any

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from snodevit.data import ImageError

logger = logging.getLogger(__name__)

# Error code of each status when the answer does not carry its own.
STATUS_CODES: dict[int, str] = {
    400: "bad_request", 404: "not_found", 405: "method_not_allowed", 408: "request_timeout",
    413: "too_large", 415: "unsupported_media_type", 422: "invalid_parameter", 429: "overloaded",
    500: "internal_error", 501: "not_available", 503: "unavailable", 504: "timeout",
}
#: The HTTP status of each refused-image code (``snodevit.data.IMAGE_ERROR_CODES``): 413 too large, 415 not
#: an image the service takes, 400 a broken or empty one.
IMAGE_ERROR_STATUS: dict[str, int] = {
    "empty_body": 400, "too_large": 413, "too_many_pixels": 413, "not_an_image": 415, "unsupported_format": 415,
    "truncated_image": 400, "corrupt_image": 400, "unreadable_file": 400,
}
_MAX_ERROR_BODY = 64 * 2**10  # error bodies are small; a larger one is passed through untouched


class ServiceError(Exception):
    """A request the service refuses, with the HTTP status and the JSON body to answer with."""

    def __init__(self, status: int, error: str, detail: str, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(detail)
        self.status = status
        self.error = error
        self.detail = detail
        self.headers = dict(headers or {})

    def to_dict(self) -> dict[str, str]:
        return {"error": self.error, "detail": self.detail}

    def response(self) -> JSONResponse:
        return JSONResponse(self.to_dict(), status_code=self.status, headers=self.headers)

    def __repr__(self) -> str:
        return f"ServiceError({self.status}, {self.error!r}, {self.detail!r})"

    @classmethod
    def from_image_error(cls, err: ImageError, where: str | None = None) -> ServiceError:
        """The decoder's refusal (status from ``IMAGE_ERROR_STATUS``), ``where`` (e.g. ``"images[2]"``) in front."""
        return cls(IMAGE_ERROR_STATUS[err.error], err.error, f"{where}: {err.detail}" if where else err.detail)


def invalid_parameter(name: str, detail: str) -> ServiceError:
    """400 naming the parameter: ``{"error": "invalid_parameter", "detail": "<name>: <detail>"}``."""
    return ServiceError(400, "invalid_parameter", f"{name}: {detail}")


def describe_validation_errors(errors: Iterable[Mapping[str, Any]]) -> str:
    """pydantic error dicts -> ``"num_samples: Input should be less than or equal to 256; seed: ..."``."""
    parts = []
    for e in errors:
        loc = ".".join(str(p) for p in e.get("loc", ()) if p != "__root__")
        msg = str(e.get("msg", "invalid value"))
        if e.get("type") == "extra_forbidden":
            msg = "unknown parameter"
        parts.append(f"{loc}: {msg}" if loc else msg)
    return "; ".join(parts) or "invalid request"


def _code(status: int) -> str:
    return STATUS_CODES.get(status, "bad_request" if status < 500 else "internal_error")


def reshape_error_body(status: int, body: bytes) -> dict[str, str]:
    """Turn any error body into ``{"error", "detail"}``.

    Shapes handled: ours (kept); BentoML's pydantic validation ``{"error": "1 validation error for Input",
    "detail": [...]}`` (-> ``invalid_parameter``); BentoML's exception body ``[{"error": msg}]`` and
    ``{"error": msg}`` (-> the status's code); plain text such as Starlette's "Not Found".
    """
    text = body.decode("utf-8", "replace").strip()
    try:
        data: Any = json.loads(text) if text else None
    except json.JSONDecodeError:
        data = None
    if isinstance(data, list) and len(data) == 1 and isinstance(data[0], dict):
        data = data[0]
    if isinstance(data, dict):
        error, detail = data.get("error"), data.get("detail")
        if isinstance(error, str) and isinstance(detail, str):
            return {"error": error, "detail": detail}
        if isinstance(detail, list) and status in (400, 422):
            return {"error": "invalid_parameter", "detail": describe_validation_errors(detail)}
        message = detail if isinstance(detail, str) else error if isinstance(error, str) else None
        if message:
            return {"error": _code(status), "detail": message}
    if data is None and text and len(text) < 1000:
        return {"error": _code(status), "detail": text}
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        phrase = "error"
    return {"error": _code(status), "detail": phrase}


class ErrorShapeMiddleware:
    """ASGI middleware: every answer with status >= 400 leaves with the ``{"error", "detail"}`` JSON body.

    Only error answers are buffered (they are small); successful answers stream through untouched.

    Args:
        app: the wrapped application.
        on_error: called with (error code, status) of every error answer, e.g. to count it.
        allow: path -> the methods it takes, for the ``Allow`` header of its 405 answers, where one path is served
            by two routers (BentoML's POST route and a mounted GET route both answer ``/metadata``; each alone would
            name only its own method).
    """

    def __init__(self, app: ASGIApp, on_error: Callable[[str, int], None] | None = None,
                 allow: Mapping[str, str] | None = None) -> None:
        self.app = app
        self.on_error = on_error
        self.allow = dict(allow or {})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start: Message | None = None
        chunks: list[bytes] = []
        size = 0
        passthrough = False

        async def shaping_send(message: Message) -> None:
            nonlocal start, size, passthrough
            if message["type"] == "http.response.start":
                if message["status"] < 400:
                    passthrough = True
                    await send(message)
                else:
                    start = message
                return
            if passthrough or start is None or message["type"] != "http.response.body":
                await send(message)
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > _MAX_ERROR_BODY:  # not an error body we know; give up and stream it as it is
                passthrough = True
                await send(start)
                await send({"type": "http.response.body", "body": b"".join(chunks), "more_body": True})
                if not message.get("more_body", False):
                    await send({"type": "http.response.body", "body": b"", "more_body": False})
                return
            if not message.get("more_body", False):
                status = int(start["status"])
                shaped = reshape_error_body(status, b"".join(chunks))
                if self.on_error is not None:
                    try:
                        self.on_error(shaped["error"], status)
                    except Exception:  # noqa: BLE001 - counting must never cost the client its answer
                        logger.exception("error callback failed")
                payload = json.dumps(shaped).encode()
                allow = self.allow.get(scope["path"]) if status == 405 else None
                drop = (b"content-length", b"content-type") + ((b"allow",) if allow else ())
                headers = [(k, v) for k, v in start.get("headers", []) if k.lower() not in drop]
                if allow:
                    headers.append((b"allow", allow.encode()))
                headers += [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
                await send({"type": "http.response.start", "status": status, "headers": headers})
                await send({"type": "http.response.body", "body": payload, "more_body": False})

        await self.app(scope, receive, shaping_send)
