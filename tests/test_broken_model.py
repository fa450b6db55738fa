"""A broken model at start is never served: weights changed after registration, weights cut short, a calibration
that went missing (``benchmarks/faults_models.py`` damages a copy of a good store entry).

Each fault goes through ``service.lifecycle.open_engine``, the function the service's ``__init__`` calls, with the
real files; the subtlest one (the weights still load, with other numbers) also through the real ``bentoml serve``:
up and alive, never ready, every API and ``/readyz`` answering 503 with the reason, one log line.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import bentoml
import httpx
import pytest

from service.lifecycle import Lifecycle, open_engine
from service.settings import ServiceSettings
from service.testing import prepare_service

from _benchmarks import load_benchmark

pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning")]

http_load = load_benchmark("http_load")
models = load_benchmark("faults_models")


@pytest.mark.parametrize("fault", models.FAULTS)
def test_open_engine_refuses_a_damaged_entry_and_says_why(fault: str) -> None:
    prepared = prepare_service()
    tag = models.broken_entry(prepared.tag, fault)
    lifecycle = Lifecycle()
    assert open_engine(bentoml.models.get(tag), ServiceSettings.from_env(), lifecycle) is None
    assert lifecycle.state == "broken" and not lifecycle.ready
    assert models.REASON_WORDS[fault] in lifecycle.reason
    refusal = lifecycle.refusal()
    assert refusal is not None and (refusal.status, refusal.error) == (503, "model_unavailable")


def test_the_good_entry_opens() -> None:  # the reference: the same call on the undamaged entry serves
    prepared = prepare_service()
    lifecycle = Lifecycle()
    engine = open_engine(bentoml.models.get(prepared.tag), ServiceSettings.from_env(), lifecycle)
    assert engine is not None and lifecycle.state == "starting"
    engine.close()


@pytest.fixture(scope="module")
def broken_server() -> Iterator[Any]:
    prepared = prepare_service()
    tag = models.broken_entry(prepared.tag, "hash_mismatch")
    srv = http_load.Server({**prepared.env, "SNODEVIT_MODEL": tag, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.monotonic() + srv.startup_timeout_s
        while time.monotonic() < deadline:  # up (BentoML's startup has returned) but, by design, never ready
            assert srv.proc.poll() is None, srv.log_tail()
            try:
                if httpx.get(f"{srv.url}/livez", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.25)
        yield srv
    finally:
        srv.stop()


@pytest.mark.integration
@pytest.mark.slow
def test_a_server_with_changed_weights_is_alive_never_ready_and_says_why(broken_server: Any) -> None:
    url = broken_server.url
    readyz = [httpx.get(f"{url}/readyz", timeout=5) for _ in range(3)]
    assert {r.status_code for r in readyz} == {503}
    body = readyz[0].json()
    assert body["error"] == "model_unavailable" and "records" in body["detail"] and "register" in body["detail"]
    classify = httpx.post(f"{url}/classify", files={"image": ("x.png", b"\x89PNG", "image/png")}, timeout=10)
    assert classify.status_code == 503 and classify.json() == body
    assert httpx.get(f"{url}/metadata", timeout=5).json() == body
    assert httpx.get(f"{url}/livez", timeout=5).status_code == 200
    lines = [line for line in broken_server.log_tail(10**6).splitlines() if "not serving" in line]
    assert len(lines) == 1 and "records" in lines[0], broken_server.log_tail()
    assert "Traceback" not in broken_server.log_tail(10**6)
