"""The BentoML service: uncertainty-aware digit classification over HTTP.

Endpoints (all answers JSON unless noted; every error is ``{"error": <code>, "detail": <sentence>}``):

==========================  =============================================================================
``POST /classify``          one image: multipart field ``image`` (+ form fields ``num_samples``, ``seed``,
                            ``top_k``, ``alpha``), or the raw image body with ``Content-Type: image/*`` and
                            the parameters in the query string (``/classify?seed=3``)
``POST /classify_batch``    several images: multipart field ``images`` repeated (at most ``max_images``)
``POST /explain``           prediction + attention maps per block + rollout (same uploads as /classify)
``POST /explain_image``     PNG heatmap of the rollout (or block ``layer``) blended over the input
``GET /metadata``           classes, preprocessing, model config, calibration figures, limits
``GET /ui``                 the web page (``service/ui``: static HTML + vanilla JS over the APIs above)
``GET /livez /readyz``      BentoML health probes (ready after the warm-up pass; ``/readyz`` answers 503 with the
                            reason while the model is broken or the worker drains, ``service.lifecycle``)
``GET /metrics``            Prometheus: BentoML's request metrics plus ``snodevit_*`` counters
==========================  =============================================================================

Images from concurrent requests share forward passes (``service.batching``); ``timing.batch_size`` of an
answer says how many images its pass held. Settings come from ``SNODEVIT_*`` variables (``service.settings``),
read when the service starts; the few its declaration needs (``DECLARED_FIELDS``: model tag, timeout, parameter
bounds and defaults) are read when this module is imported. The model comes from the BentoML model store
(``SNODEVIT_MODEL``, default ``snodevit-mnist:latest``; ``python -m service.demo`` puts one there).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import typing as t
from pathlib import Path

import bentoml
import torch
from pydantic import BaseModel, ValidationError
from starlette.applications import Starlette
from starlette.datastructures import QueryParams
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp

from .engine import Engine
from .errors import ErrorShapeMiddleware, ServiceError, describe_validation_errors
from .forms import RouteRule
from .guard import RAW_PREFIX, RequestGuard
from .lifecycle import (Lifecycle, admission_info, install_sigterm_drain, measure_throughput, open_engine,
                        size_admission)
from .metrics import service_metrics
from .openapi import service_document
from .schemas import (
    BatchItem,
    ClassifyBatchResponse,
    ClassifyResponse,
    ExplainResponse,
    MetadataResponse,
    parameter_types,
    params_model,
)
from .settings import DECLARED_FIELDS, ENV_PREFIX, ServiceSettings

logger = logging.getLogger(__name__)

#: The settings the class declaration below needs, read at import (``DECLARED_FIELDS``); the other fields hold
#: their defaults here, so nothing else reads this: the service reads its settings when it starts
#: (:func:`started_settings`).
DECLARED = ServiceSettings.from_env(only=DECLARED_FIELDS)
_TYPES = parameter_types(DECLARED)
NumSamples = _TYPES["num_samples"]
Seed = _TYPES["seed"]
TopK = _TYPES["top_k"]
Alpha = _TYPES["alpha"]
Layer = _TYPES["layer"]
PngImage = t.Annotated[Path, bentoml.validators.ContentType("image/png")]

# BentoML's own traffic timeout answers outside our middleware, in another body shape: it is only a backstop
# behind the engine's timeout. The concurrency limit lives in RequestGuard (429 in the common error shape) for
# the same reason, instead of traffic["max_concurrency"].
_TRAFFIC = {"timeout": DECLARED.timeout_s + 30}
_RESOURCES = {"gpu": 1} if torch.cuda.is_available() else {}
#: This worker's state (starting, ready, broken, draining), set by the service instance, read by the request guard.
LIFECYCLE = Lifecycle()
#: The APIs that also take a raw image body (``Content-Type: image/*``): the guard routes it to ``/raw/<api>``.
RAW_APIS = ("classify", "explain", "explain_image")


def started_settings() -> ServiceSettings:
    """Every setting, read from ``SNODEVIT_*`` now that the service starts.

    Raises:
        ValueError: a bad value, or a declared setting (``DECLARED_FIELDS``) that changed since this module was
            imported: the API signatures and the decorator already hold the old value, and a service half on one
            value and half on another would answer inconsistently.
    """
    settings = ServiceSettings.from_env()
    changed = [f"{ENV_PREFIX}{name.upper()}" for name in DECLARED_FIELDS
               if getattr(settings, name) != getattr(DECLARED, name)]
    if changed:
        raise ValueError(f"{', '.join(changed)} changed after service.service was imported; set them before "
                         "importing it (they shape the API signatures and the service declaration)")
    return settings

UPLOADS = {
    "/classify": "multipart/form-data with file field 'image' and form fields num_samples, seed, top_k, alpha; or "
                 "the raw image body with Content-Type image/* (or application/octet-stream) and the parameters "
                 "in the query string",
    "/classify_batch": "multipart/form-data with file field 'images' repeated, and form fields num_samples, seed, "
                       "top_k, alpha",
    "/explain": "as /classify",
    "/explain_image": "as /classify, plus layer (a block index; default: the rollout)",
}


def _bento_model_tag() -> str | None:
    """Inside a built Bento: the exact model version it was built with (None elsewhere, or with SNODEVIT_MODEL set).

    BentoML 1.4 resolves ``name:latest`` against the model store each time a service starts, even when it serves a
    built Bento (it pins only Hugging Face models), so without this a Bento would serve whatever model was
    registered after it was built.
    """
    bento = getattr(SNodeViTService, "bento", None)
    if bento is None or "SNODEVIT_MODEL" in os.environ:
        return None
    wanted = SNodeViTService.models[0].tag.name  # type: ignore[attr-defined]
    for info in bento.info.services:
        if info.name == SNodeViTService.name:
            return next((str(m.tag) for m in info.models if m.tag.name == wanted), None)
    return None


async def _answered(work: t.Awaitable[t.Any]) -> t.Any:
    """The API's answer, or the JSON error response of a refused request."""
    try:
        return await work
    except ServiceError as err:
        return err.response()


def _png_response(png: bytes, answer: ExplainResponse) -> Response:
    p = answer.prediction
    return Response(png, media_type="image/png", headers={
        "X-SNodeViT-Label": p.label, "X-SNodeViT-Confidence": f"{p.confidence:.6f}",
        "X-SNodeViT-Decision": p.decision, "X-SNodeViT-Reason-Code": p.reason_code, "X-SNodeViT-Seed": str(p.seed),
        "X-SNodeViT-Model": answer.model.tag})


@bentoml.service(name="snodevit", workers=DECLARED.workers, resources=_RESOURCES, traffic=_TRAFFIC,
                 labels={"project": "snodevit"})
class SNodeViTService:
    """Stochastic SDE Vision Transformer with calibrated, decomposed uncertainty."""

    # at class scope: `bentoml build` packs the model it names into the Bento
    model_ref = bentoml.models.BentoModel(DECLARED.model)
    engine: Engine | None = None  # None when the model cannot be served (LIFECYCLE says why)

    def __init__(self) -> None:
        LIFECYCLE.start()
        t0 = time.perf_counter()
        self.settings = s = started_settings()
        # One worker process, one model: its intra-op threads are set here (by default the cores shared out over
        # SNODEVIT_WORKERS). On a CPU shared with other work, fewer
        # threads than cores can be faster (a parallel region waits for every thread to be scheduled).
        torch.set_num_threads(s.threads)
        pinned = _bento_model_tag()
        stored = bentoml.models.get(pinned) if pinned else self.model_ref
        install_sigterm_drain(LIFECYCLE, s.drain_s)  # in a server worker; a no-op in a test process
        # loaded on the inference thread, so that no other thread ever runs the model's torch operators
        engine = open_engine(stored, s, LIFECYCLE, metrics=service_metrics())
        if engine is None:
            return
        self.engine = engine
        loaded = engine.loaded
        warm = engine.warm_up()
        rate = measure_throughput(engine, images=min(s.max_batch_size, max(1, s.max_batch_rows // s.num_samples)),
                                  num_samples=s.num_samples)
        admission = size_admission(rate, num_samples=s.num_samples, max_queue_wait_s=s.max_queue_wait_s,
                                   max_concurrency=s.max_concurrency, min_in_flight=s.max_batch_size)
        LIFECYCLE.serve(admission)
        logger.info("serving %s (%s, weights %s) on %s; loaded and warmed up in %.2f s (warm-up %.2f s); admitting "
                    "%d requests at once (%.1f images/s at S=%d)", stored.tag, loaded.backend_name, loaded.version,
                    loaded.device, time.perf_counter() - t0, warm, admission.max_in_flight, rate, s.num_samples)

    def __is_ready__(self) -> bool:
        return LIFECYCLE.ready

    @bentoml.on_shutdown
    def _shutdown(self) -> None:
        if self.engine is not None:
            self.engine.close()

    # ------------------------------------------------------------------------------------------ APIs
    @bentoml.api
    async def classify(self, image: Path, num_samples: NumSamples = DECLARED.num_samples, seed: Seed = None,
                       top_k: TopK = DECLARED.top_k, alpha: Alpha = None) -> ClassifyResponse:
        """Classify one image: label, calibrated confidence, uncertainty, prediction set and accept/review."""
        return await _answered(self._classify(lambda: self.engine.read_upload(image, "image"),
                                              num_samples=num_samples, seed=seed, top_k=top_k, alpha=alpha))

    @bentoml.api
    async def classify_batch(self, images: list[Path], num_samples: NumSamples = DECLARED.num_samples,
                             seed: Seed = None, top_k: TopK = DECLARED.top_k,
                             alpha: Alpha = None) -> ClassifyBatchResponse:
        """Classify several images (multipart field ``images`` repeated); answers in upload order."""
        return await _answered(self._classify_batch(images, num_samples=num_samples, seed=seed, top_k=top_k,
                                                    alpha=alpha))

    @bentoml.api
    async def explain(self, image: Path, num_samples: NumSamples = DECLARED.num_samples, seed: Seed = None,
                      top_k: TopK = DECLARED.top_k, alpha: Alpha = None) -> ExplainResponse:
        """The prediction plus attention maps of every block and the attention rollout, as (g, g) grids."""
        return await _answered(self._explain(lambda: self.engine.read_upload(image, "image"), num_samples=num_samples,
                                             seed=seed, top_k=top_k, alpha=alpha))

    @bentoml.api
    async def explain_image(self, image: Path, num_samples: NumSamples = DECLARED.num_samples, seed: Seed = None,
                            top_k: TopK = DECLARED.top_k, alpha: Alpha = None, layer: Layer = None) -> PngImage:
        """PNG: the attention rollout (or block ``layer``) as a heatmap over the image the model saw.

        The prediction travels in the ``X-SNodeViT-Label``, ``-Confidence``, ``-Decision``, ``-Reason-Code`` and
        ``-Seed`` headers.
        """
        return await _answered(self._explain_png(lambda: self.engine.read_upload(image, "image"),
                                                 num_samples=num_samples, seed=seed, top_k=top_k, alpha=alpha,
                                                 layer=layer))

    # ------------------------------------------------------------------------------------------ the work
    async def _read(self, read: t.Callable[[], bytes]) -> bytes:
        return await asyncio.to_thread(read)

    async def _classify(self, read: t.Callable[[], bytes], **params: t.Any) -> ClassifyResponse:
        checked = self.engine.check(**params)
        data = await self._read(read)
        [(record, timing)], _ = await self.engine.classify([data], checked, endpoint="classify")
        return ClassifyResponse(**record, model=self.engine.info, timing=timing)

    async def _classify_batch(self, images: list[Path], **params: t.Any) -> ClassifyBatchResponse:
        checked = self.engine.check(**params)
        if not images:
            raise ServiceError(400, "invalid_parameter", "images: no file given")
        if len(images) > self.settings.max_images:
            raise ServiceError(400, "too_many_images", f"images: {len(images)} files given, the most one request may "
                               f"carry is {self.settings.max_images}")
        where = [f"images[{i}]" for i in range(len(images))]
        data = await asyncio.gather(*(asyncio.to_thread(self.engine.read_upload, p, w) for p, w in zip(images, where)))
        answers, total_ms = await self.engine.classify(list(data), checked, endpoint="classify_batch", where=where)
        return ClassifyBatchResponse(results=[BatchItem(**record, index=i, timing=timing)
                                              for i, (record, timing) in enumerate(answers)],
                                     model=self.engine.info, total_ms=total_ms)

    async def _explain(self, read: t.Callable[[], bytes], **params: t.Any) -> ExplainResponse:
        checked = self.engine.check(**params)
        answer, _ = await self.engine.explain(await self._read(read), checked, endpoint="explain")
        return answer

    async def _explain_png(self, read: t.Callable[[], bytes], **params: t.Any) -> Response:
        checked = self.engine.check(**params)
        png, answer = await self.engine.explain_png(await self._read(read), checked, endpoint="explain_image")
        return _png_response(png, answer)

    # ------------------------------------------------------------------------------------------ raw bodies
    async def answer_raw(self, route: str, body: bytes, query: QueryParams) -> Response:
        """Answer a raw image body (``Content-Type: image/*``) sent to ``route``, parameters from the query string."""
        try:
            params = _query_params(route, query)
            if route == "classify":
                out: BaseModel = await self._classify(lambda: body, **params)
            elif route == "explain":
                out = await self._explain(lambda: body, **params)
            else:
                return await self._explain_png(lambda: body, **params)
        except ServiceError as err:
            return err.response()
        return JSONResponse(out.model_dump(mode="json"))

    @bentoml.api(route="/metadata")
    def metadata(self) -> MetadataResponse:
        """Classes, preprocessing, model configuration, calibration figures and limits of the served model.

        ``POST /metadata`` (a JSON object, ``{}``) is this API, listed in ``/schema.json`` so that
        ``bentoml.SyncHTTPClient(...).metadata()`` finds it; ``GET /metadata`` answers the same through
        ``_extra_routes``.
        """
        return self._metadata()  # type: ignore[return-value]

    def _metadata(self) -> MetadataResponse | Response:
        if self.engine is None or LIFECYCLE.admission is None:
            return (LIFECYCLE.refusal() or ServiceError(503, "unavailable", "not ready")).response()
        answer = self.engine.metadata(UPLOADS)
        answer.admission = admission_info(LIFECYCLE.admission, self.settings)
        return answer

    def metadata_response(self) -> Response:
        answer = self._metadata()
        return answer if isinstance(answer, Response) else JSONResponse(answer.model_dump(mode="json"))

    def openapi_document(self) -> JSONResponse:
        """``GET /docs.json``: BentoML's document made true to the guard's rules and the served model's bounds."""
        if self.engine is None:
            return (LIFECYCLE.refusal() or ServiceError(503, "unavailable", "not ready")).response()
        return JSONResponse(service_document(SNodeViTService.openapi_spec.asdict(), route_rules(self.settings),
                                             num_classes=self.engine.num_classes, depth=self.engine.loaded.cfg.depth,
                                             alphas=self.engine.alphas))


def _input_fields(api: str) -> frozenset[str]:
    """The parameters (non-file fields) of an API, read from BentoML's input model of its signature."""
    return frozenset(k for k in SNodeViTService.apis[api].input_spec.model_fields if k not in ("image", "images"))


# The parameters of each API as one pydantic model: validates raw-upload query strings and, in the guard, form fields.
_PARAMS: dict[str, type[BaseModel]] = {
    name: params_model(DECLARED, tuple(sorted(_input_fields(name))))
    for name in ("classify", "classify_batch", "explain", "explain_image")
}


def _query_params(route: str, query: QueryParams) -> dict[str, t.Any]:
    repeated = sorted({k for k, _ in query.multi_items() if len(query.getlist(k)) > 1})
    if repeated:
        raise ServiceError(400, "invalid_parameter", f"{repeated[0]}: given more than once")
    try:
        return dict(_PARAMS[route].model_validate(dict(query)))  # the values as validated (num_samples may be "auto")
    except ValidationError as err:
        raise ServiceError(400, "invalid_parameter", describe_validation_errors(err.errors())) from None


async def _raw_endpoint(request: Request) -> Response:
    service = bentoml.get_current_service()
    route = request.url.path.rsplit("/", 1)[-1]
    return await service.answer_raw(route, await request.body(), request.query_params)


async def _metadata_endpoint(request: Request) -> Response:
    return bentoml.get_current_service().metadata_response()


async def _docs_endpoint(request: Request) -> Response:
    return bentoml.get_current_service().openapi_document()


def _raw_path(api: str) -> str:
    return f"{RAW_PREFIX}/{api}"


def route_rules(settings: ServiceSettings) -> dict[str, RouteRule]:
    """What each API route accepts under ``settings`` (body caps, image counts), its parameters as declared."""
    return {
        "/classify": RouteRule(settings.max_single_request_bytes, "image", 1, _input_fields("classify"),
                               _raw_path("classify"), _PARAMS["classify"]),
        "/classify_batch": RouteRule(settings.max_request_bytes, "images", settings.max_images,
                                     _input_fields("classify_batch"), None, _PARAMS["classify_batch"]),
        "/explain": RouteRule(settings.max_single_request_bytes, "image", 1, _input_fields("explain"),
                              _raw_path("explain"), _PARAMS["explain"]),
        "/explain_image": RouteRule(settings.max_single_request_bytes, "image", 1, _input_fields("explain_image"),
                                    _raw_path("explain_image"), _PARAMS["explain_image"]),
    }


class StartedGuard(RequestGuard):
    """The request guard with the limits of the settings read when BentoML builds the app (the service starts)."""

    def __init__(self, app: ASGIApp) -> None:
        settings = started_settings()
        super().__init__(app, rules=route_rules(settings), max_concurrency=settings.max_concurrency,
                         max_buffered_bytes=settings.max_buffered_bytes, guarded_paths=("/metadata",),
                         lifecycle=LIFECYCLE)


_extra_routes = Starlette(routes=[
    Route("/metadata", _metadata_endpoint, methods=["GET"]),  # POST /metadata is the API (for bentoml clients)
    Route("/docs.json", _docs_endpoint, methods=["GET"]),  # before BentoML's own (mounts match first)
    *(Route(_raw_path(api), _raw_endpoint, methods=["POST"]) for api in RAW_APIS),
    Mount("/ui", StaticFiles(directory=Path(__file__).with_name("ui"), html=True), name="ui"),  # /ui -> /ui/
])
SNodeViTService.mount_asgi_app(_extra_routes, path="/", name="snodevit-extra")
# Added first = outermost: the error shaping sees the guard's refusals and everything behind it.
SNodeViTService.add_asgi_middleware(ErrorShapeMiddleware,
                                    on_error=lambda code, status: service_metrics().record_error(code, status),
                                    allow={"/metadata": "GET, POST"})
SNodeViTService.add_asgi_middleware(StartedGuard)
