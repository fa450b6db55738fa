"""A worker's end, against the real ``bentoml serve``: kill -9 under load (recovered, never ready before it is warm)
and SIGTERM under load (readiness false at once, admitted requests answered, new ones refused with 503, exit 0).

Both run on one server, the crash first (the drain ends it). The figures come from ``benchmarks/faults_server.py``,
the functions ``make bench-faults`` runs with the shipped model; here with the tiny test model at S = 256, so that
requests are in progress when the signal lands. Plus the drain deadline, through the guard in process: what has not
finished within ``SNODEVIT_DRAIN_S`` is answered 503, what has finished is not touched.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from service.errors import ErrorShapeMiddleware
from service.guard import RequestGuard
from service.lifecycle import Lifecycle, size_admission
from service.settings import ServiceSettings
from service.testing import prepare_service

from _benchmarks import load_benchmark

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.filterwarnings("ignore::DeprecationWarning")]

ROOT = Path(__file__).parent.parent
DIGIT_7 = (ROOT / "examples" / "digit_7.png").read_bytes()
http_load = load_benchmark("http_load")
faults = load_benchmark("faults_server")


@pytest.fixture(scope="module")
def server() -> Iterator[Any]:
    prepared = prepare_service()
    srv = http_load.Server({**prepared.env, "OMP_NUM_THREADS": "1", "SNODEVIT_DRAIN_S": "30"})
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.stop()


def test_metadata_shows_the_admission_limit_sized_from_the_measured_rate(server: Any) -> None:
    a = httpx.get(f"{server.url}/metadata", timeout=30).json()["admission"]
    assert a["num_samples"] == 8 and a["drain_s"] == 30 and a["max_concurrency"] == 64  # the test env's settings
    assert a["measured_images_per_s"] > 0
    batch = ServiceSettings().max_batch_size  # the floor: one full forward pass (the test env keeps the default)
    assert a["max_in_flight"] == min(64, max(batch, math.floor(a["measured_images_per_s"] * a["max_queue_wait_s"])))


def test_kill_9_of_the_worker_is_recovered_and_readyz_is_never_200_before_the_new_worker_is_warm(server: Any) -> None:
    figures = faults.crash_recovery(server, DIGIT_7, clients=4, num_samples=256, load_s=1.0)
    assert figures["recovery_s"] is not None, figures  # /readyz answered 200 again
    assert figures["new_workers"] and figures["old_worker"] not in figures["new_workers"]
    assert figures["initializations_logged"] == 1  # the new worker loaded and warmed up (BentoML's log line)
    assert "200" not in figures["readyz_answers_before_ready"]  # only timeouts / 503 until then
    assert figures["classify_after_recovery"] == 200
    assert figures["other_answers"] == {}  # the requests of the dead worker got no answer: none got a wrong one


def test_sigterm_under_load_answers_the_admitted_refuses_the_new_and_exits_0(server: Any) -> None:
    figures = faults.drain_under_load(server, DIGIT_7, clients=8, num_samples=256, load_s=1.5)
    assert figures["exit_code"] == 0, server.log_tail()
    assert figures["no_answer"] == 0 and figures["other_statuses"] == {}, figures["outcomes"]
    assert figures["in_progress_at_sigterm_answered_200"] >= 1  # admitted before the signal, answered during the drain
    assert figures["refused_503_shutting_down"] >= 1  # each client's next request was refused cleanly
    assert figures["cut_at_drain_deadline"] == 0  # 30 s is plenty
    assert "503 shutting_down" in figures["readyz_answers_after_sigterm"]
    assert figures["readyz_200_after_first_503"] is False
    log = server.log_tail(10**6)
    assert "SIGTERM: draining" in log and "drained in" in log


def test_requests_still_running_at_the_drain_deadline_are_answered_503() -> None:
    release = asyncio.Event()

    async def app(scope: Any, receive: Any, send: Any) -> None:  # /slow waits for the test; /fast answers at once
        await receive()
        if scope["path"] == "/slow":
            await release.wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"done"})

    lifecycle = Lifecycle()
    lifecycle.serve(size_admission(1000.0, num_samples=8, max_queue_wait_s=1.0, max_concurrency=8))
    guard = RequestGuard(app, rules={}, max_concurrency=8, guarded_paths=("/slow", "/fast"), lifecycle=lifecycle)
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=ErrorShapeMiddleware(guard)), base_url="http://t")

    async def scenario() -> tuple[httpx.Response, httpx.Response, httpx.Response, httpx.Response, int]:
        slow = asyncio.create_task(client.get("/slow"))
        await asyncio.sleep(0.05)
        lifecycle.state = "draining"
        new, ready = await client.get("/fast"), await client.get("/readyz")
        cut = await guard.drain(0.2, 0.0)
        release.set()
        return await slow, new, ready, await client.get("/fast"), cut

    slow, new, ready, late, cut = asyncio.run(scenario())
    assert cut == 1 and guard.in_flight == 0
    assert slow.status_code == 503 and slow.json()["error"] == "shutting_down"
    assert "SNODEVIT_DRAIN_S" in slow.json()["detail"]
    for refused in (new, ready, late):
        assert refused.status_code == 503 and refused.json()["error"] == "shutting_down"
        assert refused.headers["Retry-After"] == "1"


def test_beyond_the_admission_limit_429_says_when_to_retry_at_the_measured_rate() -> None:
    """0.5 images/s and a 4 s wait admit 2 requests; the third gets 429 with Retry-After = ceil(2 / 0.5) = 4 s."""
    release = asyncio.Event()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        await release.wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"done"})

    lifecycle = Lifecycle()
    lifecycle.serve(size_admission(0.5, num_samples=8, max_queue_wait_s=4.0, max_concurrency=64))
    guard = RequestGuard(app, rules={}, max_concurrency=64, guarded_paths=("/slow",), lifecycle=lifecycle)
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=ErrorShapeMiddleware(guard)), base_url="http://t")

    async def scenario() -> tuple[list[httpx.Response], httpx.Response]:
        admitted = [asyncio.create_task(client.get("/slow")) for _ in range(2)]
        await asyncio.sleep(0.05)
        refused = await client.get("/slow")
        release.set()
        return list(await asyncio.gather(*admitted)), refused

    admitted, refused = asyncio.run(scenario())
    assert lifecycle.admission is not None and lifecycle.admission.max_in_flight == 2
    assert [r.status_code for r in admitted] == [200, 200]
    assert refused.status_code == 429 and refused.json()["error"] == "overloaded"
    assert refused.headers["Retry-After"] == "4"
