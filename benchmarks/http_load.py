"""Closed-loop HTTP load against a running snodevit server: requests/s and exact latency percentiles.

Each of ``--concurrency`` workers sends one /classify request, waits for the answer, and sends the next, for
``--requests`` requests in all (after ``--warmup`` discarded ones). Only loopback addresses are accepted.

Usage::

    python benchmarks/http_load.py --url http://127.0.0.1:3000 --image examples/digit_7.png \\
        --num-samples 8 --concurrency 1 16 --requests 64
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import socket
import statistics
import sys
import time
from collections import Counter
from pathlib import Path
from urllib.parse import urlparse

import httpx
import numpy as np


def _check_loopback(url: str) -> None:
    host = urlparse(url).hostname or ""
    addr = ipaddress.ip_address(socket.gethostbyname(host))
    if not addr.is_loopback:
        raise SystemExit(f"refusing to load {host} ({addr}): this benchmark only targets loopback addresses")


async def _run(url: str, image: bytes, num_samples: int, concurrency: int, requests: int, warmup: int) -> dict:
    latencies: list[float] = []
    statuses: Counter[int] = Counter()
    batch_sizes: list[int] = []
    counter = {"left": warmup + requests}
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=120.0, limits=limits) as client:
        async def worker() -> None:
            while counter["left"] > 0:
                counter["left"] -= 1
                measured = counter["left"] < requests
                t0 = time.perf_counter()
                r = await client.post("/classify", files={"image": ("x.png", image, "image/png")},
                                      data={"num_samples": str(num_samples), "seed": "0"})
                dt = time.perf_counter() - t0
                if measured:
                    latencies.append(dt)
                    statuses[r.status_code] += 1
                    if r.status_code == 200:
                        batch_sizes.append(int(r.json()["timing"]["batch_size"]))

        t_start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - t_start
    lat = np.array(latencies) * 1000
    return {"concurrency": concurrency, "num_samples": num_samples, "requests": len(latencies),
            "requests_per_s": len(latencies) / wall if wall else 0.0,
            "p50_ms": float(np.percentile(lat, 50)), "p90_ms": float(np.percentile(lat, 90)),
            "p95_ms": float(np.percentile(lat, 95)), "p99_ms": float(np.percentile(lat, 99)),
            "mean_batch_size": statistics.fmean(batch_sizes) if batch_sizes else 0.0,
            "statuses": dict(statuses)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default="http://127.0.0.1:3000")
    p.add_argument("--image", type=Path, default=Path("examples/digit_7.png"))
    p.add_argument("--num-samples", type=int, default=8)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--warmup", type=int, default=8)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    _check_loopback(args.url)
    image = args.image.read_bytes()
    rows = [asyncio.run(_run(args.url, image, args.num_samples, c, args.requests, args.warmup))
            for c in args.concurrency]
    if args.json:
        print(json.dumps(rows))
    else:
        print("| concurrency | S | requests | req/s | p50 ms | p90 ms | p95 ms | p99 ms | mean batch | statuses |")
        print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
        for r in rows:
            print(f"| {r['concurrency']} | {r['num_samples']} | {r['requests']} | {r['requests_per_s']:.1f} | "
                  f"{r['p50_ms']:.1f} | {r['p90_ms']:.1f} | {r['p95_ms']:.1f} | {r['p99_ms']:.1f} | "
                  f"{r['mean_batch_size']:.1f} | {r['statuses']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
