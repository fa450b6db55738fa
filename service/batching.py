"""Adaptive micro-batching: images from concurrent requests share one forward pass.

One worker task per event loop takes whatever is waiting, up to ``max_batch_size`` items, and runs the batch
function on a single inference thread. While a pass runs, new items queue up and form the next batch, so the
batch size follows the load by itself: a busy server fills its batches. A worker that ran out of items waits up
to ``max_wait_s`` for company when there is load to wait for: its last batch held several items (concurrent
clients, whose next requests are on their way), or the request that woke it arrived within ``max_wait_s`` of the
one before (a burst). A lone request (a closed loop at concurrency 1, sparse traffic) runs at once instead of
paying the window on every call. The
model only ever runs on the one inference thread, so passes never compete for the CPU or GPU.

BentoML's ``@bentoml.api(batchable=True)`` batches only calls that arrive over HTTP; reaching it from the
public endpoints of the same process means a second HTTP hop that re-serialises the image tensors, or a
second service process (``bentoml.depends``). Batching here keeps one process and batches in every test tier.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from typing import Generic, TypeVar

logger = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")


class MicroBatcher(Generic[T, R]):
    """Collect items from concurrent callers and run them through ``run`` in batches.

    Args:
        run: maps a list of items to a list of results of the same length, in order. Runs on ``executor``.
        executor: where ``run`` runs (one thread, so the model is used by one pass at a time).
        max_batch_size: the most items handed to one ``run`` call.
        max_wait_s: how long the first item to reach an idle batcher waits for company, when the last batch held
            several items or the item arrived within ``max_wait_s`` of the previous submission (0: never wait).

    Attributes:
        company_waits: how many times an idle worker waited ``max_wait_s`` for more items (for tests, metrics).
    """

    def __init__(self, run: Callable[[list[T]], list[R]], executor: Executor, *, max_batch_size: int,
                 max_wait_s: float = 0.0) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if max_wait_s < 0:
            raise ValueError(f"max_wait_s must be >= 0, got {max_wait_s}")
        self._run = run
        self._executor = executor
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pending: deque[tuple[T, asyncio.Future[R]]] = deque()
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._last_arrival = -float("inf")  # loop time of the latest submit
        self._burst = False  # the latest submit came within max_wait_s of the one before it
        self._last_batch = 0  # items in the latest batch run
        self.company_waits = 0

    def _ensure_worker(self) -> tuple[asyncio.AbstractEventLoop, asyncio.Event]:
        loop = asyncio.get_running_loop()
        if self._loop is not loop or self._task is None or self._task.done() or self._wakeup is None:
            # A new event loop (each asyncio.run in tests, a restarted server): start over on it.
            self._loop = loop
            self._pending = deque()
            self._wakeup = asyncio.Event()
            self._task = loop.create_task(self._work(), name="snodevit-batcher")
        return loop, self._wakeup

    async def submit(self, items: Sequence[T]) -> list[R]:
        """Queue ``items`` and wait for their results (in order). They may be split over several batches.

        Cancelling the caller drops its items that have not started yet.
        """
        loop, wakeup = self._ensure_worker()
        now = loop.time()
        self._burst = now - self._last_arrival <= self.max_wait_s
        self._last_arrival = now
        futures: list[asyncio.Future[R]] = [loop.create_future() for _ in items]
        self._pending.extend(zip(items, futures))
        wakeup.set()
        try:
            results = await asyncio.gather(*futures, return_exceptions=True)
        except BaseException:
            for f in futures:
                f.cancel()
            raise
        for result in results:
            if isinstance(result, BaseException):
                raise result
        return list(results)

    async def _work(self) -> None:
        assert self._wakeup is not None
        loop, wakeup, pending = asyncio.get_running_loop(), self._wakeup, self._pending
        while True:
            if not pending:
                wakeup.clear()
                await wakeup.wait()
                busy = self._burst or self._last_batch > 1
                if self.max_wait_s > 0 and busy and len(pending) < self.max_batch_size:
                    self.company_waits += 1
                    await asyncio.sleep(self.max_wait_s)
            batch: list[tuple[T, asyncio.Future[R]]] = []
            while pending and len(batch) < self.max_batch_size:
                item, future = pending.popleft()
                if not future.done():  # skip items whose caller gave up
                    batch.append((item, future))
            if not batch:
                continue
            self._last_batch = len(batch)
            try:
                results = await loop.run_in_executor(self._executor, self._run, [item for item, _ in batch])
                if len(results) != len(batch):
                    raise RuntimeError(f"batch function returned {len(results)} results for {len(batch)} items")
            except asyncio.CancelledError:
                for _, future in batch:
                    future.cancel()
                raise
            except Exception as err:  # noqa: BLE001 - handed to every caller of this batch
                logger.exception("batch of %d failed", len(batch))
                for _, future in batch:
                    if not future.done():
                        future.set_exception(err)
                continue
            for (_, future), result in zip(batch, results):
                if not future.done():
                    future.set_result(result)

    def close(self) -> None:
        """Stop the worker and cancel everything still waiting."""
        if self._loop is None or self._loop.is_closed():
            return
        if self._task is not None and not self._task.done():
            self._task.cancel()
        for _, future in self._pending:
            future.cancel()
        self._pending.clear()
