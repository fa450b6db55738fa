"""What the HTTP endpoints do, without BentoML: check parameters, decode, batch, predict, answer.

The BentoML service (``service.service``) is a thin shell around :class:`Engine`; the engine can be built from
any ``LoadedModel``, which keeps it testable without a server. Every number in an answer comes from
``LoadedModel.predict`` (``snodevit.inference.predict``) and ``snodevit.inference.records.prediction_records``,
the same functions the batch-scoring CLI uses; the parameters follow ``snodevit.inference.params``.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

# The "onnx" backend of open_model registers itself when export.runtime is imported. An installed snodevit finds it
# through pyproject's "snodevit.backends" entry point, but a Bento runs from the sources bentofile.yaml includes,
# not from an installed package, so it has no entry points: this import is what makes SNODEVIT_BACKEND=onnx work
# in a Bento.
from export.runtime import ONNX
from snodevit.data import ImageError, decode_image, normalize, to_uint8_tensor, undecodable
from snodevit.inference.adaptive import AdaptiveSampling
from snodevit.inference.backends import LoadedModel, open_model
from snodevit.inference.params import (AUTO, MAX_SEED, NumSamples, check_num_samples, check_seed, default_alpha,
                                       resolve_seeds)
from snodevit.inference.predictor import Prediction
from snodevit.inference.records import prediction_records

from .batching import MicroBatcher
from .describe import calibration_figures, fitted_alphas, metadata_response, model_info
from .errors import ServiceError, invalid_parameter
from .heatmap import overlay_png
from .metrics import ServiceMetrics
from .schemas import Classification, ExplainResponse, MetadataResponse, Timing
from .settings import ServiceSettings

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Params:
    """Checked request parameters (``alpha`` resolved to a fitted key, or None without conformal calibration)."""

    num_samples: NumSamples  # an int, or "auto" for adaptive sampling
    seed: int | None
    top_k: int
    alpha: float | None
    layer: int | None = None


@dataclass(frozen=True)
class Decoded:
    pixels: torch.Tensor  # uint8 (C, S, S): what the model sees before normalisation (drawn under heatmaps)
    tensor: torch.Tensor  # float32 (C, S, S): the model input
    decode_ms: float


@dataclass(frozen=True)
class _Item:
    image: torch.Tensor  # (C, S, S) model input
    seed: int
    num_samples: NumSamples
    alpha: float | None
    top_k: int
    enqueued: float  # time.perf_counter() when queued


@dataclass(frozen=True)
class _Answer:
    record: dict[str, Any]  # prediction_records entry
    batch_size: int
    queue_ms: float
    inference_ms: float


def _ms(seconds: float) -> float:
    return round(seconds * 1000.0, 3)


def _passes(check: Callable[[Any], object], value: Any) -> bool:
    """Whether ``check`` (a rule of ``snodevit.inference.params``) accepts ``value``."""
    try:
        check(value)
    except ValueError:
        return False
    return True


def has_attention(loaded: LoadedModel) -> bool:
    """Whether the model gives attention maps: a torch model always does, an ONNX graph when exported with them."""
    return loaded.backend_name != ONNX or bool(getattr(loaded.backend, "has_attention", True))


def inference_executor() -> ThreadPoolExecutor:
    """The one thread that runs a served model's forward passes (and, via :meth:`Engine.open`, its loading)."""
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="snodevit-inference")


class Engine:
    """Serve one loaded model: parameter checks, safe decoding, batched Monte Carlo inference, answers.

    Args:
        loaded: the model (``snodevit.inference.backends.open_model``).
        settings: limits and defaults.
        name: the model's store name, reported in answers.
        tag: the model's store tag, reported in answers.
        metrics: Prometheus metrics to update; None counts nothing.
    """

    def __init__(self, loaded: LoadedModel, settings: ServiceSettings, *, name: str, tag: str,
                 metrics: ServiceMetrics | None = None, executor: ThreadPoolExecutor | None = None) -> None:
        self.loaded = loaded
        self.settings = settings
        self.metrics = metrics
        cal = loaded.calibration
        self.info = model_info(loaded, name=name, tag=tag)
        if cal.is_fitted and cal.precision != loaded.precision:
            logger.warning("serving in %s a model calibrated in %s: its thresholds were fitted on %s passes, so "
                           "answers may differ slightly from the calibration report's (SNODEVIT_PRECISION=%s "
                           "matches them)", loaded.precision, cal.precision, cal.precision, cal.precision)
        self.num_classes = len(loaded.class_names)
        self.alphas = fitted_alphas(loaded)
        self.calibration_figures = calibration_figures(loaded)
        self.adaptive = AdaptiveSampling(max_samples=settings.auto_max_samples,
                                         first_round=min(AdaptiveSampling.first_round, settings.auto_max_samples))
        self._executor = executor or inference_executor()
        self.batcher: MicroBatcher[_Item, _Answer] = MicroBatcher(
            self._run_batch, self._executor, max_batch_size=settings.max_batch_size,
            max_wait_s=settings.batch_wait_ms / 1000.0)

    @classmethod
    def open(cls, path: str | Path, settings: ServiceSettings, *, name: str, tag: str,
             metrics: ServiceMetrics | None = None) -> Engine:
        """Load the model at ``path`` on the engine's inference thread, then build the engine around it.

        Every torch computation of the model then runs on that one thread. A second thread that has run a
        parallel torch operator (loading the weights copies tensors in parallel) keeps its own OpenMP team;
        with more OpenMP threads than cores, libgomp stops spinning between parallel regions, and each of the
        model's many small operators pays for waking its threads: measured on the 2-core CPU, B=1 S=8 took
        50-73 ms instead of 20-31 ms.

        Raises:
            CheckpointError: the path holds no usable model for ``settings.backend``.
        """
        executor = inference_executor()
        try:
            loaded = executor.submit(open_model, path, backend=settings.backend, device=settings.device,
                                     precision=settings.precision).result()
        except BaseException:
            executor.shutdown(wait=False)
            raise
        return cls(loaded, settings, name=name, tag=tag, metrics=metrics, executor=executor)

    # ----------------------------------------------------------------------------------------- parameters
    def check(self, *, num_samples: NumSamples, seed: int | None, top_k: int, alpha: float | None,
              layer: int | None = None) -> Params:
        """Check what the API signature cannot (bounds that depend on the model).

        Raises:
            ServiceError: 400 ``invalid_parameter`` naming the parameter.
        """
        most = self.settings.max_num_samples
        if not _passes(check_num_samples, num_samples) or (isinstance(num_samples, int) and num_samples > most):
            raise invalid_parameter("num_samples", f"must be in [1, {most}] or 'auto', got {num_samples!r}")
        if not 1 <= top_k <= self.num_classes:
            raise invalid_parameter("top_k", f"must be in [1, {self.num_classes}] (the number of classes), got {top_k}")
        if layer is not None and not 0 <= layer < self.loaded.cfg.depth:
            raise invalid_parameter("layer", f"must be in [0, {self.loaded.cfg.depth - 1}] (the model has "
                                    f"{self.loaded.cfg.depth} blocks) or absent for the rollout, got {layer}")
        if seed is not None and not _passes(check_seed, seed):
            raise invalid_parameter("seed", f"must be in [0, {MAX_SEED}], got {seed}")
        return Params(num_samples, seed, top_k, self._resolve_alpha(alpha), layer)

    def _resolve_alpha(self, alpha: float | None) -> float | None:
        if not self.alphas:
            if alpha is not None:
                raise invalid_parameter("alpha", "this model has no conformal calibration, so there is no prediction "
                                        "set to choose; omit alpha (run `snodevit calibrate` to fit one)")
            return None
        if alpha is None:
            return default_alpha(self.loaded.calibration)
        try:
            return self.loaded.calibration.fitted_alpha(alpha)
        except ValueError:
            raise invalid_parameter("alpha", f"{alpha} has no fitted conformal threshold; use one of {self.alphas}") \
                from None

    # ----------------------------------------------------------------------------------------- decoding
    def read_upload(self, path: Path, where: str) -> bytes:
        """Bytes of an uploaded file, refusing oversized files before reading them.

        Raises:
            ServiceError: 413 ``too_large``.
        """
        size = path.stat().st_size
        if size > self.settings.max_bytes:
            raise ServiceError(413, "too_large", f"{where}: the image is {size} bytes, more than the limit of "
                               f"{self.settings.max_bytes}")
        return path.read_bytes()

    def decode(self, data: bytes, where: str | None = None) -> Decoded:
        """Decode untrusted bytes into the model input (``snodevit.data.decode``: byte and pixel caps, format list).

        Raises:
            ServiceError: 400 / 413 / 415 from the decoder, ``where`` in front of the detail.
        """
        t0 = time.perf_counter()
        prep = self.loaded.preprocessing
        try:
            image = decode_image(data, max_bytes=self.settings.max_bytes, max_pixels=self.settings.max_pixels)
            pixels = to_uint8_tensor(image, prep)
        except ImageError as err:
            raise ServiceError.from_image_error(err, where) from None
        except (MemoryError, RecursionError, ValueError, OSError, TypeError, IndexError, KeyError) as err:
            # Malformed input that slipped past the decoder's own mapping: still the client's file, not a 500.
            logger.warning("decoder failed on %s: %r", where or "an upload", err, exc_info=True)
            raise ServiceError.from_image_error(undecodable(err), where) from None
        return Decoded(pixels, normalize(pixels, prep), _ms(time.perf_counter() - t0))

    # ----------------------------------------------------------------------------------------- inference
    def _predict(self, images: torch.Tensor, num_samples: NumSamples, seeds: list[int], **kwargs: Any) -> Any:
        adaptive = self.adaptive if num_samples == AUTO else None
        return self.loaded.predict(images, num_samples=num_samples, seed=seeds, adaptive=adaptive, **kwargs)

    def _run_batch(self, items: list[_Item], count: bool = True) -> list[_Answer]:
        """One forward pass per (num_samples, alpha) group, at most ``max_batch_rows`` images * samples each
        ("auto" counts its most samples; its images leave the pass as their answers settle)."""
        groups: dict[tuple[NumSamples, float | None], list[int]] = defaultdict(list)
        for i, item in enumerate(items):
            groups[(item.num_samples, item.alpha)].append(i)
        answers: list[_Answer | None] = [None] * len(items)
        for (num_samples, alpha), indices in groups.items():
            most = self.adaptive.max_samples if num_samples == AUTO else num_samples
            assert isinstance(most, int)
            per_pass = max(1, self.settings.max_batch_rows // most)
            for start in range(0, len(indices), per_pass):
                chunk = indices[start:start + per_pass]
                t0 = time.perf_counter()
                pred = self._predict(torch.stack([items[i].image for i in chunk]), num_samples,
                                     [items[i].seed for i in chunk], alpha=alpha)
                inference_ms = _ms(time.perf_counter() - t0)
                by_k: dict[int, list[dict[str, Any]]] = {}
                for j, i in enumerate(chunk):
                    k = items[i].top_k
                    if k not in by_k:
                        by_k[k] = prediction_records(pred, self.loaded.class_names, k)
                    answers[i] = _Answer(by_k[k][j], len(chunk), _ms(t0 - items[i].enqueued), inference_ms)
                if count:
                    self._count(pred)
        return [a for a in answers if a is not None]

    def _count(self, pred: Prediction) -> None:
        """Samples run, the pass's size, the answers by decision and reason, and the gate's score / threshold."""
        if self.metrics is None:
            return
        m = self.metrics
        m.samples.inc(sum(pred.num_samples))
        for n in pred.num_samples:
            m.samples_per_image.observe(n)
        m.batch_size.observe(len(pred.num_samples))
        for (accepted, code), n in Counter(zip(pred.accept.tolist(), pred.reason_codes)).items():
            m.decisions.labels(decision="accept" if accepted else "review", reason=code).inc(n)
        gate = pred.ood_gate
        # a ratio reads the same for every model; it needs a positive finite threshold (true of the feature-density
        # and mutual-information gates; an energy gate's threshold may be negative, and is not observed)
        if gate is not None and pred.ood_score is not None:
            thresholds = (pred.gate_thresholds.tolist() if pred.gate_thresholds is not None
                          else [gate.threshold] * len(pred.ood_score))
            for score, threshold in zip(pred.ood_score.tolist(), thresholds):
                if math.isfinite(threshold) and threshold > 0:
                    m.ood_ratio.observe(score / threshold)

    async def _with_timeout(self, awaitable: Any) -> Any:
        try:
            return await asyncio.wait_for(awaitable, self.settings.timeout_s)
        except TimeoutError:
            raise ServiceError(504, "timeout", f"no answer within {self.settings.timeout_s:g} s; the service is "
                               "busy, retry later or ask for fewer samples") from None

    async def classify(self, images: list[bytes], params: Params, *, endpoint: str,
                       where: list[str] | None = None) -> tuple[list[tuple[dict[str, Any], Timing]], float]:
        """Classify encoded images; they join concurrent requests' forward passes.

        Args:
            images: encoded image files.
            params: checked parameters; ``params.seed`` None draws one seed per image.
            endpoint: counted in the ``snodevit_images`` metric.
            where: names of the images in error details (e.g. ``images[3]``); None for a single image.

        Returns:
            ([(prediction_records entry, timing) per image], total milliseconds).

        Raises:
            ServiceError: a refused image (the first one, named), or 504 when the answer takes too long.
        """
        t0 = time.perf_counter()
        names: list[str | None] = list(where) if where is not None else [None] * len(images)
        results = await asyncio.gather(*(asyncio.to_thread(self.decode, data, name)
                                         for data, name in zip(images, names)), return_exceptions=True)
        decoded: list[Decoded] = []
        for result in results:
            if isinstance(result, BaseException):
                raise result  # the first refused image, in upload order
            decoded.append(result)
        seeds = resolve_seeds(params.seed, len(images))
        now = time.perf_counter()
        items = [_Item(d.tensor, s, params.num_samples, params.alpha, params.top_k, now)
                 for d, s in zip(decoded, seeds)]
        answers: list[_Answer] = await self._with_timeout(self.batcher.submit(items))
        total_ms = _ms(time.perf_counter() - t0)
        if self.metrics is not None:
            self.metrics.images.labels(endpoint=endpoint).inc(len(images))
        return [(a.record, Timing(decode_ms=d.decode_ms, queue_ms=a.queue_ms, inference_ms=a.inference_ms,
                                  total_ms=total_ms, batch_size=a.batch_size))
                for a, d in zip(answers, decoded)], total_ms

    def _explain_sync(self, image: torch.Tensor, params: Params, seed: int) -> tuple[Any, float]:
        t0 = time.perf_counter()
        pred = self._predict(image[None], params.num_samples, [seed], alpha=params.alpha, attention=True)
        self._count(pred)
        return pred, _ms(time.perf_counter() - t0)

    async def explain(self, data: bytes, params: Params, *, endpoint: str) -> tuple[ExplainResponse, Decoded]:
        """Prediction plus attention maps (per block) and rollout of one image.

        Raises:
            ServiceError: a refused image; 501 ``not_available`` for an ONNX graph exported without attention
                maps; 504 on timeout.
        """
        if not has_attention(self.loaded):
            raise ServiceError(501, "not_available", "this ONNX graph was exported without attention maps; "
                               "re-export with `snodevit export --attention-maps` or serve the torch backend")
        t0 = time.perf_counter()
        decoded = await asyncio.to_thread(self.decode, data, None)
        seed = resolve_seeds(params.seed, 1)[0]
        queued = time.perf_counter()
        loop = asyncio.get_running_loop()
        pred, inference_ms = await self._with_timeout(
            loop.run_in_executor(self._executor, self._explain_sync, decoded.tensor, params, seed))
        queue_ms = max(0.0, _ms(time.perf_counter() - queued) - inference_ms)
        record = prediction_records(pred, self.loaded.class_names, params.top_k)[0]
        if self.metrics is not None:
            self.metrics.images.labels(endpoint=endpoint).inc()
        g = self.loaded.cfg.grid_size
        answer = ExplainResponse(
            prediction=Classification(**record), grid_size=g, depth=int(pred.attention.shape[1]),
            pool=self.loaded.cfg.pool, layers=pred.attention[0].tolist(), rollout=pred.rollout[0].tolist(),
            model=self.info, timing=Timing(decode_ms=decoded.decode_ms, queue_ms=queue_ms, inference_ms=inference_ms,
                                           total_ms=_ms(time.perf_counter() - t0), batch_size=1))
        return answer, decoded

    async def explain_png(self, data: bytes, params: Params, *, endpoint: str) -> tuple[bytes, ExplainResponse]:
        """The attention heatmap (rollout, or block ``params.layer``) over the image, as PNG bytes."""
        answer, decoded = await self.explain(data, params, endpoint=endpoint)
        heat = torch.tensor(answer.rollout if params.layer is None else answer.layers[params.layer])
        png = await asyncio.to_thread(overlay_png, decoded.pixels, heat)
        return png, answer

    # ----------------------------------------------------------------------------------------- the rest
    def metadata(self, uploads: dict[str, str]) -> MetadataResponse:
        """The ``/metadata`` answer (``service.describe``)."""
        return metadata_response(self.loaded, self.settings, info=self.info, figures=self.calibration_figures,
                                 auto_max_samples=self.adaptive.max_samples, uploads=uploads)

    def warm_up(self) -> float:
        """One forward pass of each kind on a blank image, so the first request does not pay for lazy setup.

        Returns:
            Seconds taken.
        """
        t0 = time.perf_counter()
        prep = self.loaded.preprocessing
        blank = torch.zeros(prep.channels, prep.image_size, prep.image_size)
        item = _Item(blank, 0, self.settings.num_samples, default_alpha(self.loaded.calibration), 1, t0)
        self.on_inference_thread(self._run_batch, [item], False)
        if has_attention(self.loaded):
            self.on_inference_thread(self.loaded.predict, blank[None], num_samples=1, seed=[0], attention=True)
        return time.perf_counter() - t0

    def on_inference_thread(self, fn: Any, /, *args: Any, **kwargs: Any) -> Any:
        """``fn(*args, **kwargs)`` run on the inference thread (the one that runs the model), waited for."""
        return self._executor.submit(fn, *args, **kwargs).result()

    def close(self) -> None:
        self.batcher.close()
        self._executor.shutdown(wait=False, cancel_futures=True)
