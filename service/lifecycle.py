"""Where a server worker is in its life, and what that means for a request.

===========  ==========================================================================================
``starting`` the model is loading (uvicorn accepts no connection before BentoML's startup has finished)
``ready``    loaded and warmed up; requests are admitted up to :class:`Admission`'s limit (429 beyond)
``broken``   the model cannot be served (a weights hash that does not match, truncated weights, a calibration
             that went missing): never ready; ``/readyz`` and every API answer 503 ``model_unavailable``
             naming the reason, logged once
``draining`` SIGTERM arrived: ``/readyz`` answers 503 at once, new requests get 503 ``shutting_down``, the
             admitted ones get ``SNODEVIT_DRAIN_S`` to finish (those still running then get 503); then
             uvicorn's own graceful shutdown runs, BentoML's shutdown hook closes the engine, the worker exits
===========  ==========================================================================================

Why the drain is not uvicorn's alone: on SIGTERM uvicorn stops accepting at once and finishes the requests it
holds, which is the right end of a drain but not its beginning. Under ``bentoml serve`` the listening socket
belongs to the circus arbiter, so a connection made after that moment waits in the kernel's backlog, unanswered,
until the arbiter exits and resets it: a client sees a hang, then a reset, instead of a clean refusal, and a
keep-alive connection that was idle at that instant is closed under the next request sent on it. So the worker
keeps accepting while it drains and refuses what is new with 503; only when the admitted requests are done does it
hand the signal to uvicorn's handler, which then finds nothing left to wait for.

The admission limit is sized from throughput measured on the serving machine when the worker starts
(:func:`measure_throughput`): a request admitted at the back of a full queue waits about
``SNODEVIT_MAX_QUEUE_WAIT_S`` for the passes ahead of it, instead of whatever a fixed count happens to mean on
this hardware. ``SNODEVIT_MAX_CONCURRENCY`` stays the hard cap (it bounds the request bodies held in memory).
"""

from __future__ import annotations

import asyncio
import logging
import math
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import torch

from snodevit.checkpoint import CheckpointError, weights_hash
from snodevit.inference.backends import TORCH

from .engine import Engine
from .errors import ServiceError
from .metrics import ServiceMetrics
from .schemas import AdmissionInfo
from .settings import ServiceSettings
from .store import check_served, stored_metadata

logger = logging.getLogger(__name__)

State = Literal["starting", "ready", "broken", "draining"]
#: After the last admitted request has answered, the draining worker keeps refusing for this long (at most
#: ``SNODEVIT_DRAIN_S``): a client that was reading that answer and sends its next request at once gets a 503 to
#: act on instead of a connection closed under it.
LINGER_S = 1.0


@dataclass(frozen=True)
class Admission:
    """How many requests a ready worker admits at once, and why (``/metadata``'s ``admission`` block)."""

    max_in_flight: int  # requests in progress before new ones get 429
    images_per_s: float  # throughput of one full forward pass, measured when the worker started
    num_samples: int  # the S it was measured at (the service's default)
    max_queue_wait_s: float  # SNODEVIT_MAX_QUEUE_WAIT_S: the wait the limit is sized for
    max_concurrency: int  # SNODEVIT_MAX_CONCURRENCY: the hard cap, whatever the throughput

    def retry_after_s(self, in_flight: int) -> int:
        """Whole seconds until the requests in progress have been answered at the measured rate (at least 1)."""
        if not self.images_per_s > 0:
            return 1
        return max(1, math.ceil(in_flight / self.images_per_s))


def admission_info(admission: Admission, settings: ServiceSettings) -> AdmissionInfo:
    """``/metadata``'s ``admission`` block: the limit, the throughput it was sized from, the drain timeout."""
    return AdmissionInfo(max_in_flight=admission.max_in_flight,
                         measured_images_per_s=round(admission.images_per_s, 3), num_samples=admission.num_samples,
                         max_queue_wait_s=admission.max_queue_wait_s, max_concurrency=admission.max_concurrency,
                         drain_s=settings.drain_s)


def size_admission(images_per_s: float, *, num_samples: int, max_queue_wait_s: float,
                   max_concurrency: int, min_in_flight: int = 1) -> Admission:
    """The admission limit: ``floor(images_per_s * max_queue_wait_s)`` requests, within
    [min(min_in_flight, max_concurrency), max_concurrency].

    A request counts as one image: the limit is sized for the single-image routes (a ``/classify_batch``
    request counts once; its body is bounded by ``SNODEVIT_MAX_REQUEST_BYTES`` and the buffered-bytes budget).
    The service passes its batch size as ``min_in_flight``: a rate measured while something else loaded the CPU
    (0.8 images/s was seen here, against 28 on a quiet machine) would otherwise admit one request at a time for the
    worker's whole life, and one request at a time never fills a batch, so the server would stay as slow as it
    was measured.
    """
    floor = min(max(1, min_in_flight), max_concurrency)
    if not images_per_s > 0 or not math.isfinite(images_per_s):
        limit = max_concurrency
    else:
        limit = min(max_concurrency, max(floor, math.floor(images_per_s * max_queue_wait_s)))
    return Admission(limit, images_per_s, num_samples, max_queue_wait_s, max_concurrency)


def measure_throughput(engine: Engine, *, images: int, num_samples: int, rounds: int = 2) -> float:
    """Images per second of the served model: the faster of ``rounds`` passes of ``images`` blank images at S =
    ``num_samples``, on the inference thread (after the warm-up, so no lazy setup is timed).

    The forward pass alone: decoding and HTTP add to a request's cost, so the queue waits longer than the limit is
    sized for (``docs/reliability.md`` measures by how much).
    """
    prep = engine.loaded.preprocessing
    blank = torch.zeros(images, prep.channels, prep.image_size, prep.image_size)
    best = math.inf
    for _ in range(rounds):
        t0 = time.perf_counter()
        engine.on_inference_thread(engine.loaded.predict, blank, num_samples=num_samples, seed=list(range(images)))
        best = min(best, time.perf_counter() - t0)
    return images / max(best, 1e-9)


class Drainable(Protocol):
    """What the drain needs of the request guard (``service.guard.RequestGuard``)."""

    in_flight: int

    async def drain(self, timeout_s: float, linger_s: float) -> int: ...


class Lifecycle:
    """The worker's state, shared by the service instance (which sets it) and the request guard (which reads it).

    One per worker process (``service.service.LIFECYCLE``); each new service instance starts it over.
    """

    def __init__(self) -> None:
        self.state: State = "starting"
        self.reason = ""
        self.admission: Admission | None = None
        self.guard: Drainable | None = None  # the guard of the app being served; set by the guard itself
        self.drain_task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self.state, self.reason, self.admission = "starting", "", None

    def serve(self, admission: Admission) -> None:
        self.state, self.reason, self.admission = "ready", "", admission

    def fail(self, reason: str) -> None:
        self.state, self.reason = "broken", reason

    @property
    def ready(self) -> bool:
        return self.state == "ready"

    def refusal(self) -> ServiceError | None:
        """The 503 a request gets in this state; None when ready."""
        if self.state == "ready":
            return None
        if self.state == "broken":
            return ServiceError(503, "model_unavailable", f"the model cannot be served: {self.reason}")
        if self.state == "draining":
            return ServiceError(503, "shutting_down", "the server is shutting down; send the request to another "
                                "replica or retry shortly", headers={"Retry-After": "1"})
        return ServiceError(503, "starting", "the model is still loading; retry shortly", headers={"Retry-After": "1"})

    async def drain(self, drain_s: float) -> None:
        """Readiness false and new requests refused (now), then wait for the admitted ones (``drain_s`` at most)."""
        self.state = "draining"
        t0 = time.perf_counter()
        held = self.guard.in_flight if self.guard is not None else 0
        logger.warning("SIGTERM: draining; not ready, new requests get 503, %d in progress get up to %g s", held, drain_s)
        cut = await self.guard.drain(drain_s, min(LINGER_S, drain_s)) if self.guard is not None else 0
        logger.warning("drained in %.2f s (%d requests answered 503 at the drain deadline); shutting down",
                    time.perf_counter() - t0, cut)


def install_sigterm_drain(lifecycle: Lifecycle, drain_s: float) -> bool:
    """On SIGTERM, drain (:meth:`Lifecycle.drain`), then hand the signal to the handler installed before (uvicorn's
    ``Server.handle_exit``, which runs uvicorn's graceful shutdown). A second SIGTERM goes to it at once.

    Only where the event loop runs in the main thread and a Python handler is installed (a server worker); in a test
    process or a notebook the default handler stays and this returns False.
    """
    if threading.current_thread() is not threading.main_thread():
        return False
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        return False
    previous = signal.getsignal(signal.SIGTERM)
    if not callable(previous):
        return False
    handler: Callable[[int, object], object] = previous

    async def drain_then_exit(signum: int) -> None:
        try:
            await lifecycle.drain(drain_s)
        finally:
            handler(signum, None)

    def on_sigterm(signum: int, frame: object) -> None:
        if lifecycle.state == "draining":
            handler(signum, frame)
            return
        lifecycle.state = "draining"  # readiness false from this instant, before the loop runs the drain

        def start() -> None:
            lifecycle.drain_task = loop.create_task(drain_then_exit(signum))  # held: the loop keeps weak refs

        loop.call_soon_threadsafe(start)

    signal.signal(signal.SIGTERM, on_sigterm)
    return True


def open_engine(stored: Any, settings: ServiceSettings, lifecycle: Lifecycle, *,
                metrics: ServiceMetrics | None = None) -> Engine | None:
    """The engine serving a stored model (a BentoML model with ``path`` and ``tag``), checked against its store
    entry (``service.store.check_served``).

    A model that cannot be served (files missing or damaged, weights changed since registration, calibration gone)
    gives None: ``lifecycle`` turns broken with the reason, logged once in one line, and the worker stays up, never
    ready. A worker that exited instead would be restarted by BentoML's arbiter into the same failure, in a loop.
    """
    engine = None
    try:
        engine = Engine.open(stored.path, settings, name=stored.tag.name, tag=str(stored.tag), metrics=metrics)
        loaded = engine.loaded
        sha = engine.on_inference_thread(weights_hash, loaded.backend) if loaded.backend_name == TORCH else None
        check_served(loaded, stored_metadata(str(stored.tag)), name=str(stored.tag), weights_sha256=sha)
        return engine
    except (CheckpointError, ValueError, OSError) as err:
        if engine is not None:
            engine.close()
        lifecycle.fail(str(err))
        logger.error("not serving %s, never ready (/readyz and every API answer 503 model_unavailable): %s",
                     stored.tag, err)
        return None
