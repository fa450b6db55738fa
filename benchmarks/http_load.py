"""Closed-loop load against a snodevit server (or any async callable): requests/s and exact latency percentiles.

Each of ``--concurrency`` workers sends one /classify request, waits for the answer, and sends the next, for
``--requests`` requests in all (after ``--warmup`` discarded ones). Percentiles are computed from every latency
(numpy, linear interpolation), not from histogram buckets. Only loopback addresses are accepted.

``closed_loop`` drives any ``send()`` coroutine, so ``benchmarks/bench.py`` runs the same loop against the HTTP
server and against the service engine called in-process; ``serve`` starts a real ``bentoml serve`` and stops it
(with every process it started) afterwards.

Usage::

    python benchmarks/http_load.py --url http://127.0.0.1:3000 --image examples/digit_7.png \\
        --num-samples 8 --concurrency 1 16 --requests 64
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np

ROOT = Path(__file__).resolve().parent.parent

# send() -> (HTTP status, images in the forward pass that answered it, or None when unknown)
Send = Callable[[], Awaitable[tuple[int, int | None]]]


def _check_loopback(url: str) -> None:
    host = urlparse(url).hostname or ""
    addr = ipaddress.ip_address(socket.gethostbyname(host))
    if not addr.is_loopback:
        raise SystemExit(f"refusing to load {host} ({addr}): this benchmark only targets loopback addresses")


def latency_figures(latencies_s: list[float]) -> dict[str, float]:
    """Exact p50/p90/p95/p99 and mean of latencies given in seconds, in milliseconds."""
    lat = np.asarray(latencies_s, dtype=np.float64) * 1000.0
    if lat.size == 0:
        return {k: float("nan") for k in ("p50_ms", "p90_ms", "p95_ms", "p99_ms", "mean_ms")}
    return {"p50_ms": float(np.percentile(lat, 50)), "p90_ms": float(np.percentile(lat, 90)),
            "p95_ms": float(np.percentile(lat, 95)), "p99_ms": float(np.percentile(lat, 99)),
            "mean_ms": float(lat.mean())}


async def closed_loop(send: Send, concurrency: int, requests: int, warmup: int) -> dict:
    """``concurrency`` workers call ``send`` back to back; the first ``warmup`` calls are not measured.

    Returns:
        requests, requests_per_s over the measured part, latency percentiles, mean batch size, statuses, and the
        measured latencies themselves (``latencies_ms``, in completion order).
    """
    latencies: list[float] = []
    statuses: Counter[int] = Counter()
    batch_sizes: list[int] = []
    counter = {"left": warmup + requests}
    measured_start: list[float] = []

    async def worker() -> None:
        while counter["left"] > 0:
            counter["left"] -= 1
            measured = counter["left"] < requests
            t0 = time.perf_counter()
            if measured and not measured_start:
                measured_start.append(t0)
            status, batch = await send()
            dt = time.perf_counter() - t0
            if measured:
                latencies.append(dt)
                statuses[status] += 1
                if batch is not None:
                    batch_sizes.append(batch)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - (measured_start[0] if measured_start else time.perf_counter())
    return {"concurrency": concurrency, "requests": len(latencies),
            "requests_per_s": len(latencies) / wall if wall > 0 else 0.0, **latency_figures(latencies),
            "mean_batch_size": statistics.fmean(batch_sizes) if batch_sizes else float("nan"),
            "statuses": {str(k): v for k, v in sorted(statuses.items())},
            "latencies_ms": [1000.0 * t for t in latencies]}


async def http_load(url: str, image: bytes, num_samples: int | str, concurrency: int, requests: int,
                    warmup: int, seed: int = 0) -> dict:
    """Closed-loop /classify load over HTTP (one connection per worker, kept alive)."""
    import httpx

    _check_loopback(url)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=120.0, limits=limits) as client:
        async def send() -> tuple[int, int | None]:
            try:
                r = await client.post("/classify", files={"image": ("x.png", image, "image/png")},
                                      data={"num_samples": str(num_samples), "seed": str(seed)})
            except httpx.HTTPError:
                return 599, None  # no answer at all (connection refused/reset, timeout)
            batch = int(r.json()["timing"]["batch_size"]) if r.status_code == 200 else None
            return r.status_code, batch

        row = await closed_loop(send, concurrency, requests, warmup)
    return {**row, "num_samples": num_samples}


# ----------------------------------------------------------------------------------------- the real server


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    """A ``bentoml serve`` subprocess on loopback (see :func:`serve`)."""

    def __init__(self, env: dict[str, str], startup_timeout_s: float = 240.0) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._log = tempfile.NamedTemporaryFile(prefix="bench-serve-", suffix=".log", delete=False)
        cli = Path(sys.executable).with_name("bentoml")  # the CLI of this interpreter's environment
        launcher = [str(cli)] if cli.exists() else [sys.executable, "-m", "bentoml"]
        cmd = [*launcher, "serve", "service.service:SNodeViTService", "--host", "127.0.0.1", "--port", str(self.port)]
        full_env = {**os.environ, **env, "PYTHONPATH": os.pathsep.join(
            p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)}
        full_env.pop("PROMETHEUS_MULTIPROC_DIR", None)  # `bentoml serve` sets its own
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=full_env, stdout=self._log, stderr=subprocess.STDOUT)
        self.startup_timeout_s = startup_timeout_s
        self.started = time.monotonic()
        self.ready_s: float | None = None

    def log_tail(self, chars: int = 3000) -> str:
        return Path(self._log.name).read_text(errors="replace")[-chars:]

    def wait_ready(self) -> float:
        """Block until /readyz answers 200; seconds since start. Raises RuntimeError on exit or timeout."""
        import httpx

        deadline = self.started + self.startup_timeout_s
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"bentoml serve exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    self.ready_s = time.monotonic() - self.started
                    return self.ready_s
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"bentoml serve not ready in {self.startup_timeout_s:.0f} s:\n{self.log_tail()}")
            time.sleep(0.25)

    def processes(self) -> list:
        """The server process and everything it started (psutil.Process objects)."""
        import psutil

        try:
            root = psutil.Process(self.proc.pid)
            return [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def stop(self) -> None:
        """SIGTERM the arbiter (it stops its workers), then kill whatever is left of what it started."""
        import psutil

        children = self.processes()[1:]
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        _, alive = psutil.wait_procs(children, timeout=10)
        for child in alive:
            child.kill()
        self._log.close()
        with contextlib.suppress(OSError):
            os.unlink(self._log.name)


@contextlib.contextmanager
def serve(env: dict[str, str]) -> Iterator[Server]:
    """Start ``bentoml serve service.service:SNodeViTService`` with ``env`` added; wait for it; stop it after."""
    server = Server(env)
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


class RSSSampler:
    """Samples the resident memory of a server's processes in a background thread (every ``interval_s``)."""

    def __init__(self, server: Server, interval_s: float = 0.1) -> None:
        import threading

        self.server = server
        self.interval_s = interval_s
        self.peak_total = 0
        self.peak_largest = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> tuple[int, int]:
        """(sum over the processes, the largest one) resident bytes now."""
        import psutil

        sizes = []
        for p in self.server.processes():
            with contextlib.suppress(psutil.Error):
                sizes.append(p.memory_info().rss)
        return sum(sizes), max(sizes, default=0)

    def _run(self) -> None:
        while not self._stop.is_set():
            total, largest = self.sample()
            self.peak_total = max(self.peak_total, total)
            self.peak_largest = max(self.peak_largest, largest)
            self._stop.wait(self.interval_s)

    def __enter__(self) -> RSSSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def engine_load(model_dir: str, tag: str, backend: str, threads: int, image: bytes, num_samples: int,
                levels: list[tuple[int, int, int]], bare_batches: list[int], progress: bool = False) -> dict:
    """The in-process reference: the closed loop calling the service engine directly (decode, micro-batching,
    predict, answer records; everything but HTTP), then bare ``predict`` at ``bare_batches`` images.

    Run it in a fresh process (``multiprocessing`` spawn), as the server's worker is one: a process whose other
    threads have run torch operators before holds more OpenMP threads than cores and runs the model slower
    (see ``service.engine.Engine.open``).

    Args:
        model_dir: a model directory (with ``model.onnx`` for the onnx backend).
        tag: the store tag reported in the answers.
        backend: "torch" or "onnx".
        threads: torch intra-op threads, as ``SNODEVIT_THREADS`` sets them in the server.
        image: the encoded image every request sends.
        num_samples: S of every request.
        levels: (concurrency, measured requests, discarded warm-up requests) per level.
        bare_batches: batch sizes of the bare ``predict`` timing.

    Returns:
        ``{"closed_loop": [row per level], "bare_predict": [{"batch_size", "ms", "images_per_s"}]}``.
    """
    import torch
    from tqdm.auto import tqdm

    start_engine(model_dir, tag, backend, threads, num_samples)
    engine = _ENGINE
    try:
        rows = [engine_round(image, num_samples, c, n, w)
                for c, n, w in tqdm(levels, desc=f"in-process engine ({backend})", disable=not progress,
                                    dynamic_ncols=True)]
        prep = engine.loaded.preprocessing
        x = torch.randn(max(bare_batches), prep.channels, prep.image_size, prep.image_size)
        bare = []
        for b in bare_batches:  # on the inference thread, as the engine runs it
            for _ in range(2):
                engine.on_inference_thread(engine.loaded.predict, x[:b], num_samples=num_samples, seed=0)
            times = []
            for _ in range(7):
                t0 = time.perf_counter()
                engine.on_inference_thread(engine.loaded.predict, x[:b], num_samples=num_samples, seed=0)
                times.append(time.perf_counter() - t0)
            ms = 1e3 * statistics.median(times)
            bare.append({"batch_size": b, "ms": ms, "images_per_s": b / (ms / 1e3)})
    finally:
        engine.close()
    return {"closed_loop": rows, "bare_predict": bare}


# ------------------------------------------------------------------------- a persistent in-process engine

_ENGINE: Any = None  # the engine of a worker process started with ``start_engine``


def start_engine(model_dir: str, tag: str, backend: str, threads: int, num_samples: int) -> None:
    """Open and warm the service engine of this (fresh, spawned) process for :func:`engine_round`: the
    ``ProcessPoolExecutor`` initializer of the bench's alternated concurrency-1 rounds, and the start of
    :func:`engine_load`."""
    import torch

    from service.engine import Engine
    from service.settings import ServiceSettings

    global _ENGINE
    torch.set_num_threads(threads)
    settings = ServiceSettings(model=tag, num_samples=num_samples, backend=backend,  # type: ignore[arg-type]
                               precision="fp32")
    _ENGINE = Engine.open(model_dir, settings, name="snodevit-bench", tag=tag)
    _ENGINE.warm_up()


def engine_round(image: bytes, num_samples: int, concurrency: int, requests: int, warmup: int) -> dict:
    """One closed-loop level against the engine of :func:`start_engine` (everything but HTTP)."""
    from service.errors import ServiceError

    engine = _ENGINE
    params = engine.check(num_samples=num_samples, seed=0, top_k=3, alpha=None)

    async def send() -> tuple[int, int | None]:
        try:
            answers, _ = await engine.classify([image], params, endpoint="bench")
        except ServiceError as err:
            return err.status, None
        return 200, answers[0][1].batch_size

    return asyncio.run(closed_loop(send, concurrency, requests, warmup))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default="http://127.0.0.1:3000")
    p.add_argument("--image", type=Path, default=ROOT / "examples" / "digit_7.png")
    p.add_argument("--num-samples", default="8", help="an integer or 'auto'")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--warmup", type=int, default=8)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    _check_loopback(args.url)
    image = args.image.read_bytes()
    rows = [asyncio.run(http_load(args.url, image, args.num_samples, c, args.requests, args.warmup))
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
