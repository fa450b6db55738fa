"""SNODEVIT_WORKERS: BentoML worker processes, each with its own model, sharing the cores without oversubscribing.

The setting's rules, that the service declaration carries it, and a real ``bentoml serve`` with two workers:
both processes answer, with the same answer for the same image and seed. Its throughput is measured by
``benchmarks/scale_out.py`` (``make bench-scale``), not here.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import httpx
import pytest
import torch

from service.settings import DECLARED_FIELDS, ServiceSettings
from service.testing import prepare_service

from _benchmarks import load_benchmark

DIGIT_7 = (Path(__file__).parent.parent / "examples" / "digit_7.png").read_bytes()


def test_each_worker_gets_its_share_of_the_cores() -> None:
    cores = torch.get_num_threads()
    assert ServiceSettings().workers == 1 and ServiceSettings().threads == cores  # one worker: as before
    for workers in (1, 2, 3, 64):
        assert ServiceSettings(workers=workers).threads == max(1, cores // workers)
    assert ServiceSettings(workers=2, threads=5).threads == 5  # an explicit SNODEVIT_THREADS wins
    env = {"SNODEVIT_WORKERS": "2", "SNODEVIT_THREADS": "0"}  # 0: the default, the cores shared out
    assert ServiceSettings.from_env(env).threads == max(1, cores // 2)


def test_workers_is_declared_and_checked() -> None:
    assert "workers" in DECLARED_FIELDS  # the decorator needs it when service.service is imported
    assert ServiceSettings.from_env({"SNODEVIT_WORKERS": "3"}, only=DECLARED_FIELDS).workers == 3
    with pytest.raises(ValueError, match="SNODEVIT_WORKERS must be > 0"):
        ServiceSettings.from_env({"SNODEVIT_WORKERS": "0"})
    with pytest.raises(ValueError, match="SNODEVIT_WORKERS must be an integer"):
        ServiceSettings.from_env({"SNODEVIT_WORKERS": "two"})


def test_the_service_declaration_carries_the_workers() -> None:
    prepared = prepare_service()
    declared = prepared.module.DECLARED  # type: ignore[union-attr]
    assert prepared.service_class.config.get("workers") == declared.workers


@pytest.mark.integration
def test_two_real_workers_both_answer_and_agree() -> None:
    http_load, faults = load_benchmark("http_load"), load_benchmark("faults_server")
    prepared = prepare_service()
    env = {**prepared.env, "SNODEVIT_WORKERS": "2", "SNODEVIT_MAX_QUEUE_WAIT_S": "120"}  # no 429 on busy cores
    with http_load.serve(env) as server:
        pids = faults.worker_pids(server)
        assert len(pids) == 2, server.log_tail()
        time.sleep(3.0)  # let both finish warming up
        cpu_idle = faults.worker_cpu_seconds(server)
        time.sleep(3.0)  # what a worker spends doing nothing, for comparison
        cpu_before = faults.worker_cpu_seconds(server)

        async def burst() -> list[httpx.Response]:
            # 64 requests, 16 at a time, each on a new connection: the workers share the listening socket and the
            # kernel hands each connection to one of them (kept-alive connections would pin the load to a few)
            limits = httpx.Limits(max_connections=16, max_keepalive_connections=0)
            async with httpx.AsyncClient(base_url=server.url, timeout=120, limits=limits) as client:
                return await asyncio.gather(*(client.post(
                    "/classify", files={"image": ("7.png", DIGIT_7, "image/png")},
                    data={"num_samples": "32", "seed": "5"}) for _ in range(64)))

        answers = asyncio.run(burst())
        cpu_after = faults.worker_cpu_seconds(server)
    assert [r.status_code for r in answers] == [200] * 64, [r.text for r in answers if r.status_code != 200][:2]
    bodies = [r.json() for r in answers]
    for key in ("label", "prediction_set", "decision", "reason_code"):  # one answer, whichever worker served
        assert len({json.dumps(b[key]) for b in bodies}) == 1, key
    for b in bodies:  # the numbers within float32 rounding: the adaptive batcher groups requests differently
        assert b["confidence"] == pytest.approx(bodies[0]["confidence"], rel=1e-5)
        assert b["uncertainty"]["total"] == pytest.approx(bodies[0]["uncertainty"]["total"], rel=1e-4, abs=1e-6)
    # both worked: about 1.5 CPU seconds in all (0.58 / 0.95 and 0.80 / 0.61 s seen) against at most 0.02 s in
    # 3 idle seconds
    idle = {pid: cpu_before[pid] - cpu_idle[pid] for pid in pids}
    busy = {pid: cpu_after[pid] - cpu_before[pid] for pid in pids}
    assert all(busy[pid] > 4 * idle[pid] + 0.1 for pid in pids), (idle, busy)
