"""Faults against a real ``bentoml serve``: SIGTERM under load, kill -9 of the worker, a broken model at start.

Each function drives a server started by ``http_load.Server`` (loopback only) and returns plain, JSON-able figures:
``benchmarks/faults.py`` writes them into ``docs/reliability.md``, and ``tests/test_drain.py`` /
``tests/test_broken_model.py`` assert on the same figures with the tiny test model.

Clients are closed loops on ``/classify`` that stop at their first answer other than 200 (a load balancer would
send the next request elsewhere) or at their first request with no answer at all.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NamedTuple

if str(Path(__file__).resolve().parent) not in sys.path:  # imported by the tests, not only by faults.py
    sys.path.insert(0, str(Path(__file__).resolve().parent))

import httpx  # noqa: E402
import psutil  # noqa: E402

from http_load import Server  # noqa: E402

WORKER_MODULE = "_bentoml_impl.worker.service"  # the module BentoML's arbiter runs as each worker
INITIALIZED = "Service snodevit initialized"  # BentoML's log line once __init__ (load, warm-up) has returned


@dataclass
class Outcome:
    """One request of a client."""

    client: int
    sent: float  # seconds on the fault's clock
    done: float
    status: int | None  # None: no answer at all (connection closed or reset, or timed out)
    error: str = ""  # the refusal's error code, or the exception's name when there was no answer
    detail: str = ""


async def _client(c: httpx.AsyncClient, i: int, clock: Callable[[], float], image: bytes, num_samples: int,
                  out: list[Outcome]) -> None:
    while True:
        sent = clock()
        try:
            r = await c.post("/classify", files={"image": ("x.png", image, "image/png")},
                             data={"num_samples": str(num_samples)})
        except httpx.HTTPError as err:
            out.append(Outcome(i, sent, clock(), None, type(err).__name__))
            return
        body = r.json() if r.status_code != 200 else {}
        out.append(Outcome(i, sent, clock(), r.status_code, body.get("error", ""), body.get("detail", "")))
        if r.status_code != 200:
            return


def _client_pool(url: str, clients: int) -> httpx.AsyncClient:
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    return httpx.AsyncClient(base_url=url, timeout=120.0, limits=limits)


class _Load(NamedTuple):
    client: httpx.AsyncClient
    clock: Callable[[], float]  # seconds since the load started
    tasks: list[asyncio.Task[None]]  # one closed loop per client
    out: list[Outcome]  # every request's outcome, appended as it ends


@contextlib.asynccontextmanager
async def _under_load(url: str, clients: int, image: bytes, num_samples: int, load_s: float) -> AsyncIterator[_Load]:
    """``clients`` closed loops of /classify against ``url``; the body runs ``load_s`` seconds into the load (the
    fault), and ends the loops itself (awaits or cancels ``tasks``)."""
    out: list[Outcome] = []
    t0 = time.monotonic()
    clock = lambda: time.monotonic() - t0  # noqa: E731
    async with _client_pool(url, clients) as c:
        tasks = [asyncio.create_task(_client(c, i, clock, image, num_samples, out)) for i in range(clients)]
        await asyncio.sleep(load_s)
        yield _Load(c, clock, tasks, out)


async def _readiness_after(c: httpx.AsyncClient, clock: Callable[[], float], until: float) -> list[tuple]:
    """(seconds, status or exception name, error code) of /readyz polled every 20 ms until ``until`` or the end."""
    seen: list[tuple] = []
    while clock() < until:
        t = clock()
        try:
            r = await c.get("/readyz", timeout=1.0)
            code = r.json().get("error", "") if r.status_code != 200 else ""
            seen.append((round(t, 3), r.status_code, code))
        except (httpx.HTTPError, ValueError) as err:
            seen.append((round(t, 3), type(err).__name__, ""))
            break  # the worker has stopped listening
        await asyncio.sleep(0.02)
    return seen


def drain_under_load(server: Server, image: bytes, *, clients: int = 8, num_samples: int = 32,
                     load_s: float = 3.0, exit_timeout_s: float = 120.0) -> dict[str, Any]:
    """SIGTERM to ``bentoml serve`` while ``clients`` closed loops run; the figures of the drain."""
    async def run() -> tuple[list[Outcome], list[tuple], float]:
        async with _under_load(server.url, clients, image, num_samples, load_s) as load:
            term = load.clock()
            server.proc.send_signal(signal.SIGTERM)
            probes = await _readiness_after(load.client, load.clock, term + exit_timeout_s)
            await asyncio.gather(*load.tasks)
        return load.out, probes, term

    t0 = time.monotonic()
    outcomes, probes, term = asyncio.run(run())
    try:
        rc: int | None = server.proc.wait(timeout=exit_timeout_s)
    except Exception:  # noqa: BLE001 - reported as "did not exit"
        rc = None
    exited = time.monotonic() - t0 - term
    return drain_figures(outcomes, probes, term, rc, exited)


def drain_figures(outcomes: list[Outcome], probes: list[tuple], term: float, rc: int | None,
                  exited_s: float) -> dict[str, Any]:
    """What a drain did to each request and to readiness; ``term`` is the SIGTERM's time on the clock."""
    after = [o for o in outcomes if o.done >= term]
    not_ready = next((p for p in probes if p[1] != 200), None)
    return {
        "requests": len(outcomes),
        "in_progress_at_sigterm_answered_200": sum(o.status == 200 and o.sent < term for o in after),
        "refused_503_shutting_down": sum(o.status == 503 and o.error == "shutting_down"
                                         and "SNODEVIT_DRAIN_S" not in o.detail for o in outcomes),
        "cut_at_drain_deadline": sum(o.status == 503 and "SNODEVIT_DRAIN_S" in o.detail for o in outcomes),
        "no_answer": sum(o.status is None for o in outcomes),
        "other_statuses": dict(Counter(str(o.status) for o in outcomes if o.status not in (200, 503, None))),
        "readyz_first_not_ready_s": None if not_ready is None else round(not_ready[0] - term, 3),
        "readyz_answers_after_sigterm": dict(Counter(f"{p[1]} {p[2]}".strip() for p in probes)),
        "readyz_200_after_first_503": any(p[1] == 200 for p in probes[probes.index(not_ready):])
        if not_ready is not None else None,
        "exit_code": rc,
        "exit_s": round(exited_s, 3),
        "outcomes": [asdict(o) for o in outcomes],
    }


def worker_cpu_seconds(server: Server) -> dict[int, float]:
    """User + system CPU seconds so far of each of the server's workers (the processes BentoML's arbiter started
    with ``WORKER_MODULE``, each holding a model), by pid."""
    cpu = {}
    for p in server.processes()[1:]:
        try:
            if WORKER_MODULE in " ".join(p.cmdline()):
                t = p.cpu_times()
                cpu[p.pid] = t.user + t.system
        except psutil.Error:
            continue
    return cpu


def worker_pids(server: Server) -> list[int]:
    """The pids of the server's workers."""
    return list(worker_cpu_seconds(server))


def _readyz(url: str) -> tuple[int | str, str]:
    try:
        r = httpx.get(f"{url}/readyz", timeout=1.0)
    except httpx.HTTPError as err:
        return type(err).__name__, ""
    return r.status_code, (r.json().get("error", "") if r.status_code != 200 else "")


async def _probe_until_ready(server: Server, killed: float, clock: Callable[[], float],
                             timeout_s: float) -> list[tuple]:
    """/readyz every 100 ms after the kill, until it answers 200: (seconds after the kill, answer, initializations
    logged so far)."""
    seen: list[tuple] = []
    while clock() - killed < timeout_s:
        answer, code = await asyncio.to_thread(_readyz, server.url)
        seen.append((round(clock() - killed, 3), f"{answer} {code}".strip(), server.log_tail(10**8).count(INITIALIZED)))
        if answer == 200:
            break
        await asyncio.sleep(0.1)
    return seen


def crash_recovery(server: Server, image: bytes, *, clients: int = 8, num_samples: int = 32, load_s: float = 2.0,
                   timeout_s: float = 180.0) -> dict[str, Any]:
    """kill -9 of the worker while ``clients`` closed loops run; recovery time and what /readyz said meanwhile."""
    [old] = worker_pids(server)
    before = server.log_tail(10**8).count(INITIALIZED)

    async def run() -> tuple[list[Outcome], list[tuple], float]:
        async with _under_load(server.url, clients, image, num_samples, load_s) as load:
            killed = load.clock()
            os.kill(old, signal.SIGKILL)
            probes = await _probe_until_ready(server, killed, load.clock, timeout_s)
            await asyncio.sleep(0.5)  # let the clients that waited through the restart be answered
            for task in load.tasks:
                task.cancel()
            await asyncio.gather(*load.tasks, return_exceptions=True)
        return load.out, probes, killed

    outcomes, probes, killed = asyncio.run(run())
    time.sleep(1.0)  # the new worker's log line travels through the arbiter's pipe
    after = httpx.post(f"{server.url}/classify", files={"image": ("x.png", image, "image/png")}, timeout=60)
    ready = probes[-1] if probes and probes[-1][1] == "200" else None
    return {
        "old_worker": old, "new_workers": worker_pids(server),
        "recovery_s": None if ready is None else ready[0],
        "in_progress_at_kill_lost": sum(o.status is None and o.sent < killed for o in outcomes),
        "sent_during_restart_answered_200": sum(o.status == 200 and o.done > killed for o in outcomes),
        "other_answers": dict(Counter(str(o.status) for o in outcomes if o.status not in (200, None))),
        "readyz_answers_before_ready": dict(Counter(p[1] for p in probes[:-1])),
        "initializations_logged": server.log_tail(10**8).count(INITIALIZED) - before,
        "classify_after_recovery": after.status_code,
    }


def _wait_alive(server: Server) -> float:
    """Seconds until /livez answers 200 (BentoML's startup has returned, ready or not)."""
    while time.monotonic() - server.started < server.startup_timeout_s:
        if server.proc.poll() is not None:
            raise RuntimeError(f"bentoml serve exited with {server.proc.returncode}:\n{server.log_tail()}")
        try:
            if httpx.get(f"{server.url}/livez", timeout=2).status_code == 200:
                return time.monotonic() - server.started
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    raise RuntimeError(f"bentoml serve not alive in {server.startup_timeout_s:.0f} s:\n{server.log_tail()}")


def broken_start(env: dict[str, str], image: bytes, *, watch_s: float = 5.0) -> dict[str, Any]:
    """Start ``bentoml serve`` on a broken model (``env`` names it) and record what it says: alive, ready or not,
    what the APIs answer, what it logs; then SIGTERM it."""
    server = Server(env)
    try:
        alive_s = _wait_alive(server)
        polls: Counter[str] = Counter()
        end = time.monotonic() + watch_s
        while time.monotonic() < end:
            answer, code = _readyz(server.url)
            polls[f"{answer} {code}".strip()] += 1
            time.sleep(0.25)
        readyz = httpx.get(f"{server.url}/readyz", timeout=5)
        classify = httpx.post(f"{server.url}/classify", files={"image": ("x.png", image, "image/png")}, timeout=30)
        metadata = httpx.get(f"{server.url}/metadata", timeout=5)
        time.sleep(0.5)
        log = server.log_tail(10**8)
    finally:
        server.stop()
    return {"alive_s": round(alive_s, 2), "readyz_polls": dict(polls), "readyz": [readyz.status_code, readyz.json()],
            "classify": [classify.status_code, classify.json()], "metadata_status": metadata.status_code,
            "log_lines": [line[line.find("not serving"):] for line in log.splitlines() if "not serving" in line],
            "tracebacks_logged": log.count("Traceback"), "exit_code": server.proc.returncode}
