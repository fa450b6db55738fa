"""Request guard: the checks that must happen before BentoML parses a request body.

BentoML 1.4 has no request-size limit, turns a malformed multipart body into a 500, and fetches a URL when a
file field arrives as text. :class:`RequestGuard`, an ASGI middleware, sits in front of the API routes and

1. refuses what the worker's state refuses (``service.lifecycle``: 503 while the model is broken or the worker
   drains, ``/readyz`` included, with the reason), and more requests in progress than the admission limit sized
   from the measured throughput (429 with ``Retry-After``: the seconds the requests ahead take at that rate);
2. caps the body: ``Content-Length`` above the route's limit is refused before reading (413), a body without
   one is counted while it streams in (413 as soon as it passes the limit); the body is buffered and replayed;
3. sends raw image bodies (``Content-Type: image/*`` or ``application/octet-stream``) of ``POST /classify``,
   ``/explain`` and ``/explain_image`` to the raw-upload handler (``/raw/<route>``), parameters in the query;
4. checks multipart forms (:mod:`service.forms`) with a scan that copies no file data: well-formed, the image
   field(s) are file uploads (never text that BentoML would fetch as a URL), no unknown, repeated or oversized
   fields, the image count, and the parameters valid under the same pydantic types as the API signature (so
   BentoML's validation, which logs a traceback for every refusal, only ever sees valid values);
5. refuses every other content type with 415;
6. keeps the bodies buffered at once under ``max_buffered_bytes`` (429 beyond), so many large uploads in
   flight cannot exhaust memory.

Every refusal is the common ``{"error", "detail"}`` body.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import ServiceError
from .forms import RouteRule, check_form, check_params, scan_multipart
from .lifecycle import Lifecycle

logger = logging.getLogger(__name__)

RAW_PREFIX = "/raw"
READY_PATH = "/readyz"  # BentoML's readiness probe: answered here, with the reason, whenever the worker is not ready
RAW_MEDIA_TYPES = ("image/", "application/octet-stream")


def _media_type(scope: Scope) -> tuple[str, str]:
    """The request's Content-Type and its media type (lower case, without parameters); empty when absent."""
    content_type = dict(scope.get("headers", [])).get(b"content-type", b"").decode("latin-1").strip()
    return content_type, content_type.split(";")[0].strip().lower()


class RequestGuard:
    """ASGI middleware enforcing :class:`RouteRule` per route and the service's concurrency limit.

    Args:
        app: the wrapped application.
        rules: route path -> its rule; raw-upload paths (``/raw/...``) are derived from them.
        max_concurrency: requests in progress on guarded routes before new ones get 429.
        max_buffered_bytes: request bodies held at once (all requests together) before new ones get 429.
        guarded_paths: further paths counted against ``max_concurrency`` (e.g. ``/metadata``), with a 64 KiB cap.
        lifecycle: the worker's state (``service.lifecycle``); None: always ready, admitting ``max_concurrency``.
    """

    def __init__(self, app: ASGIApp, rules: Mapping[str, RouteRule], max_concurrency: int,
                 max_buffered_bytes: int = 256 * 2**20, guarded_paths: tuple[str, ...] = (),
                 lifecycle: Lifecycle | None = None) -> None:
        self.app = app
        self.rules = dict(rules)
        self.raw_rules = {r.raw_path: r for r in self.rules.values() if r.raw_path}
        self.other = {p: RouteRule(64 * 2**10, "", 0) for p in guarded_paths}
        self.max_concurrency = max_concurrency
        self.max_buffered_bytes = max_buffered_bytes
        self.in_flight = 0
        self.buffered = 0  # bytes of request bodies held by requests in progress
        self.lifecycle = lifecycle
        self._admitted: set[asyncio.Task[None]] = set()  # requests handed to the app, not answered yet
        self._expired = False  # the drain deadline passed: what is still running is answered 503
        if lifecycle is not None:
            lifecycle.guard = self

    def _refusal(self) -> ServiceError | None:
        """The 503 of the worker's state, else a 429 when the requests in progress fill the admission limit."""
        refusal = self.lifecycle.refusal() if self.lifecycle is not None else None
        if refusal is not None or self._expired:
            return refusal or ServiceError(503, "shutting_down", "the server is shutting down; retry shortly")
        admission = self.lifecycle.admission if self.lifecycle is not None else None
        limit = self.max_concurrency if admission is None else min(self.max_concurrency, admission.max_in_flight)
        if self.in_flight < limit:
            return None
        retry = 1 if admission is None else admission.retry_after_s(self.in_flight)
        sized = "" if admission is None else (f" (about {admission.max_queue_wait_s:g} s of work at the "
                                              f"{admission.images_per_s:.1f} images/s measured at start)")
        return ServiceError(429, "overloaded", f"the service is answering {self.in_flight} requests, the most it "
                            f"admits at once{sized}; retry after {retry} s", headers={"Retry-After": str(retry)})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] == "http" and path == READY_PATH and self.lifecycle is not None:
            refusal = self.lifecycle.refusal()
            if refusal is not None:  # the reason, instead of BentoML's "__is_ready__() returns False"
                await self._refuse(scope, receive, send, refusal)
                return
        if scope["type"] != "http" or not (path in self.rules or path in self.raw_rules or path in self.other):
            await self.app(scope, receive, send)
            return
        refusal = self._refusal()
        if refusal is not None:
            await self._refuse(scope, receive, send, refusal)
            return
        self.in_flight += 1
        try:
            await self._guard(scope, receive, send, path)
        finally:
            self.in_flight -= 1

    async def _guard(self, scope: Scope, receive: Receive, send: Send, path: str) -> None:
        rule = self.rules.get(path) or self.raw_rules.get(path) or self.other[path]
        held = [0]  # bytes of this request counted in self.buffered
        try:
            try:
                body = await self._read_body(scope, receive, rule.max_body, path, held)
                if body is None:
                    return  # the client went away
                if scope["method"] == "POST" and rule.file_field:
                    scope = self._route(scope, body, rule, path)
                elif scope["method"] == "POST" and (media := _media_type(scope)[1]) not in ("", "application/json"):
                    raise ServiceError(415, "unsupported_media_type", f"POST {path} takes JSON ({{}}) or no body; "
                                       f"got {media!r}")  # here, before BentoML's parser answers it with a 500
            except ServiceError as err:
                await self._refuse(scope, receive, send, err)
                return
            await self._forward(scope, receive, send, body)
        finally:
            self.buffered -= held[0]

    async def _forward(self, scope: Scope, receive: Receive, send: Send, body: bytes) -> None:
        """Hand the request to the app (as a task the drain can stop at its deadline: then a 503 answers it)."""
        replayed = False
        started = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        async def tracked_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        if self._expired:
            await self._refuse(scope, receive, send, ServiceError(503, "shutting_down", "the server is shutting "
                               "down; retry shortly", headers={"Retry-After": "1"}))
            return
        task = asyncio.ensure_future(self.app(scope, replay, tracked_send))
        self._admitted.add(task)
        try:
            await task
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if not self._expired or started or (current is not None and current.cancelling()):
                raise
            await self._refuse(scope, receive, send, ServiceError(
                503, "shutting_down", "the server is shutting down and this request did not finish within "
                "SNODEVIT_DRAIN_S; retry it", headers={"Retry-After": "1"}))
        finally:
            self._admitted.discard(task)

    async def drain(self, timeout_s: float, linger_s: float) -> int:
        """Wait up to ``timeout_s`` for the requests in progress; answer those still running 503; keep refusing new
        ones for ``linger_s`` more. The lifecycle refuses new requests meanwhile.

        Returns:
            How many requests were cut (answered 503) at the deadline.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while self.in_flight and loop.time() < deadline:
            await asyncio.sleep(0.02)
        cut = len(self._admitted)
        if self.in_flight:
            self._expired = True
            for task in list(self._admitted):
                task.cancel()
            settle = loop.time() + 5.0
            while self.in_flight and loop.time() < settle:
                await asyncio.sleep(0.02)
        await asyncio.sleep(linger_s)
        return cut

    def _hold(self, held: list[int], size: int) -> None:
        """Count ``size`` more buffered bytes for this request, refusing it when the budget is spent."""
        if size > held[0]:
            if self.buffered + size - held[0] > self.max_buffered_bytes:
                raise ServiceError(429, "overloaded", "the service is holding too many large uploads; retry shortly",
                                   headers={"Retry-After": "1"})
            self.buffered += size - held[0]
            held[0] = size

    async def _read_body(self, scope: Scope, receive: Receive, limit: int, path: str,
                         held: list[int]) -> bytes | None:
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
            self._hold(held, length)
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
            self._hold(held, total)
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    def _route(self, scope: Scope, body: bytes, rule: RouteRule, path: str) -> Scope:
        content_type, media = _media_type(scope)
        if path in self.raw_rules:  # the raw handler itself: the body is the image
            return scope
        if media.startswith(RAW_MEDIA_TYPES) and rule.raw_path:
            return {**scope, "path": rule.raw_path, "raw_path": rule.raw_path.encode()}
        if media == "multipart/form-data":
            if scope.get("query_string"):
                raise ServiceError(400, "invalid_parameter", "query parameters are read only with a raw image body; "
                                   f"send {', '.join(sorted(rule.fields))} as form fields of the multipart upload")
            parts = scan_multipart(body, content_type)
            check_form(parts, rule, path)
            check_params(parts, rule)
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
