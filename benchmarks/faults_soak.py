"""A long soak of a real server: ``concurrency`` closed-loop clients on ``/classify`` for ``duration_s`` seconds.

A client that gets 429 waits the ``Retry-After`` the server named, then tries again (what a well-behaved client
does); any other answer is sent again at once. Every answer is kept: statuses over the whole soak, latency
percentiles of the admitted (200) requests overall and per tenth of the soak, and the resident memory of the
server's processes sampled every ``rss_every_s`` seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from typing import Any

import httpx
import numpy as np
import psutil

from http_load import Server


def _rss(server: Server) -> tuple[int, int]:
    """(all the server's processes, its largest one: the worker) resident bytes."""
    sizes = []
    for p in server.processes():
        with contextlib.suppress(psutil.Error):
            sizes.append(p.memory_info().rss)
    return sum(sizes), max(sizes, default=0)


async def _run(server: Server, image: bytes, concurrency: int, duration_s: float, num_samples: int,
               rss_every_s: float) -> tuple[list[tuple[float, str, float]], list[tuple[float, int, int]], Counter]:
    answers: list[tuple[float, str, float]] = []  # (done, status, latency s)
    memory: list[tuple[float, int, int]] = []
    retry_after: Counter[str] = Counter()
    t0 = time.monotonic()
    clock = lambda: time.monotonic() - t0  # noqa: E731
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)

    async def client(c: httpx.AsyncClient) -> None:
        while clock() < duration_s:
            sent = clock()
            try:
                r = await c.post("/classify", files={"image": ("x.png", image, "image/png")},
                                 data={"num_samples": str(num_samples)})
            except httpx.HTTPError as err:
                answers.append((clock(), type(err).__name__, clock() - sent))
                await asyncio.sleep(0.1)
                continue
            answers.append((clock(), str(r.status_code), clock() - sent))
            if r.status_code == 429:
                retry_after[r.headers.get("Retry-After", "none")] += 1
                await asyncio.sleep(float(r.headers.get("Retry-After", "1")))

    async def sampler() -> None:
        while clock() < duration_s:
            total, largest = await asyncio.to_thread(_rss, server)
            memory.append((clock(), total, largest))
            await asyncio.sleep(rss_every_s)
        total, largest = await asyncio.to_thread(_rss, server)
        memory.append((clock(), total, largest))

    async with httpx.AsyncClient(base_url=server.url, timeout=120.0, limits=limits) as c:
        await asyncio.gather(sampler(), *(client(c) for _ in range(concurrency)))
    return answers, memory, retry_after


def _percentiles(latencies: list[float]) -> dict[str, float | None]:
    if not latencies:
        return {"p50_ms": None, "p99_ms": None}
    ms = np.asarray(latencies) * 1000.0
    return {"p50_ms": round(float(np.percentile(ms, 50)), 1), "p99_ms": round(float(np.percentile(ms, 99)), 1)}


def _median_rss(memory: list[tuple[float, int, int]], lo: float, hi: float, column: int) -> float:
    window = [m[column] for m in memory if lo <= m[0] <= hi] or [memory[-1][column]]
    return float(np.median(window))


def memory_figures(memory: list[tuple[float, int, int]], duration_s: float) -> dict[str, Any]:
    """RSS at the middle and at the end of the soak (medians of the samples in [45 %, 55 %] and [90 %, 100 %] of
    the duration), and the growth over the second half, for all the server's processes and for the worker alone."""
    out: dict[str, Any] = {}
    for name, column in (("total", 1), ("worker", 2)):
        half = _median_rss(memory, 0.45 * duration_s, 0.55 * duration_s, column)
        end = _median_rss(memory, 0.90 * duration_s, 1.01 * duration_s, column)
        out[name] = {"half_mib": round(half / 2**20, 1), "end_mib": round(end / 2**20, 1),
                     "peak_mib": round(max(m[column] for m in memory) / 2**20, 1),
                     "second_half_growth_pct": round(100.0 * (end - half) / half, 2)}
    out["samples"] = [(round(t, 1), round(a / 2**20, 1), round(b / 2**20, 1)) for t, a, b in memory]
    return out


def soak(server: Server, image: bytes, *, concurrency: int = 64, duration_s: float = 600.0, num_samples: int = 32,
         rss_every_s: float = 5.0) -> dict[str, Any]:
    """The soak's figures: statuses, admitted p50/p99 (overall and per tenth), RSS over time, Retry-After seen."""
    answers, memory, retry_after = asyncio.run(_run(server, image, concurrency, duration_s, num_samples,
                                                    rss_every_s))
    ok = [lat for _, status, lat in answers if status == "200"]
    tenths = []
    for k in range(10):
        lo, hi = k * duration_s / 10, (k + 1) * duration_s / 10
        lat = [la for done, status, la in answers if status == "200" and lo <= done < hi]
        tenths.append({"from_s": round(lo), "to_s": round(hi), "admitted": len(lat), **_percentiles(lat)})
    statuses = Counter(status for _, status, _ in answers)
    return {"concurrency": concurrency, "duration_s": duration_s, "num_samples": num_samples,
            "requests": len(answers), "statuses": dict(sorted(statuses.items())),
            "errors_beyond_429": sum(n for s, n in statuses.items() if s not in ("200", "429")),
            "admitted_per_s": round(len(ok) / duration_s, 2), **_percentiles(ok),
            "retry_after_values": dict(retry_after), "tenths": tenths,
            "memory": memory_figures(memory, duration_s)}
