"""Image work on a few threads: Pillow's decoders, encoders and resampling release the GIL, so decoding or writing
many images scales with the cores while the stage's own thread goes on."""

from __future__ import annotations

import logging
import os
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")
R = TypeVar("R")
MAX_WORKERS = 8
log = logging.getLogger(__name__)


def worker_count(jobs: int, limit: int = MAX_WORKERS) -> int:
    """Threads for ``jobs`` independent jobs: at most ``limit``, the CPU count and the number of jobs (>= 1)."""
    return max(1, min(limit, os.cpu_count() or 1, jobs))


def map_in_threads(fn: Callable[[T], R], items: Iterable[T], limit: int = MAX_WORKERS) -> list[R]:
    """``[fn(item) for item in items]``, in order, run on up to ``limit`` threads (in this one where a single
    thread would do); the first error is raised."""
    items = list(items)
    workers = worker_count(len(items), limit)
    if workers == 1:
        return [fn(item) for item in items]
    with ThreadPoolExecutor(workers, thread_name_prefix="stage-worker") as pool:
        return list(pool.map(fn, items))


class BackgroundJobs:
    """Calls run by a few background threads, at most ``max_pending`` queued; a failed call is re-raised by the
    next :meth:`submit` or by :meth:`close`, which waits for every call. As a context manager it closes on exit;
    when the block raised, what was queued still finishes and the block's error is the one raised."""

    def __init__(self, workers: int = 2, max_pending: int = 64, name: str = "background") -> None:
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix=name)
        self._pending: deque[Future[Any]] = deque()
        self._max_pending = max_pending

    def submit(self, fn: Callable[..., Any], *args: Any) -> None:
        """Queue ``fn(*args)``; raises the error of an earlier call that failed."""
        self._pending.append(self._pool.submit(fn, *args))
        while self._pending and (self._pending[0].done() or len(self._pending) > self._max_pending):
            self._pending.popleft().result()

    def close(self) -> None:
        """Wait for every queued call; raise the first error."""
        try:
            while self._pending:
                self._pending.popleft().result()
        finally:
            self._pool.shutdown(wait=True, cancel_futures=False)

    def __enter__(self) -> BackgroundJobs:
        return self

    def __exit__(self, exc_type: object, exc: BaseException | None, tb: object) -> None:
        if exc is None:
            self.close()
            return
        try:  # finish what was queued (a killed run keeps it), but report the original error
            self.close()
        except Exception as err:  # noqa: BLE001 -- logged: the block's own error is the one raised
            log.error("%s", err)
