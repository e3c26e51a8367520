"""Level-triggered reconcile framework (Kubernetes-controller style).

A :class:`Controller` owns a :class:`WorkQueue` of string keys and a pool of
worker threads that call ``reconcile(key)``. Watch handlers only *enqueue*
keys; the reconciler reads current state and converges it, so a dropped or
coalesced event is harmless. Guarantees:

* keys are de-duplicated while queued;
* a key is never reconciled by two workers at once (a key re-added while
  being processed is re-queued exactly once, after ``done``);
* a raising reconcile is retried with per-key exponential backoff
  (:class:`RateLimiter`); success forgets the backoff and honours
  :attr:`Result.requeue_after`;
* an optional resync loop periodically enqueues every key from ``list_keys``.

All timing goes through a :class:`~braid.clock.Clock`, so tests can drive the
queue, backoff and resync with :class:`~braid.clock.FakeClock`.
"""

from __future__ import annotations

import heapq
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

from braid.clock import Clock, RealClock

__all__ = ["Controller", "RateLimiter", "Reconciler", "Result", "WorkQueue"]

log = logging.getLogger("braid.reconcile")


@dataclass(frozen=True)
class Result:
    """Outcome of a successful reconcile; ``requeue_after`` re-runs the key later."""

    requeue_after: float | None = None


class Reconciler(Protocol):
    """``reconcile(key)``: converge one object. Raise to retry with backoff."""

    def __call__(self, key: str) -> Result | None: ...


class WorkQueue:
    """Keyed, de-duplicated FIFO work queue with delayed adds.

    Protocol for consumers: ``key = q.get()``; process; ``q.done(key)``.
    Between ``get`` and ``done`` the key is *processing*: adding it again only
    marks it dirty, and it is re-queued (once) by ``done``. After
    :meth:`shutdown`, ``get`` returns ``None`` and adds are ignored; queued
    keys are dropped (level-triggered: the next resync recovers them).
    """

    def __init__(self, clock: Clock | None = None) -> None:
        self._clock = clock or RealClock()
        self._cond = threading.Condition()
        self._queue: deque[str] = deque()  # ready keys, FIFO
        self._dirty: set[str] = set()  # needs processing (queued or re-added)
        self._processing: set[str] = set()
        self._delayed: list[tuple[float, int, str]] = []  # heap (ready_at, seq, key)
        self._delayed_at: dict[str, float] = {}  # key -> earliest ready_at
        self._seq = 0
        self._shutdown = False

    def add(self, key: str) -> None:
        """Queue ``key`` unless it is already queued (or mark it dirty if processing)."""
        with self._cond:
            self._add_locked(key)

    def add_after(self, key: str, delay: float) -> None:
        """Queue ``key`` after ``delay`` seconds; keeps the earliest pending time per key."""
        with self._cond:
            if self._shutdown:
                return
            if delay <= 0:
                self._add_locked(key)
                return
            ready_at = self._clock.now() + delay
            current = self._delayed_at.get(key)
            if current is not None and current <= ready_at:
                return
            self._delayed_at[key] = ready_at
            self._seq += 1
            heapq.heappush(self._delayed, (ready_at, self._seq, key))
            self._cond.notify_all()  # getters recompute how long to wait

    def get(self, timeout: float | None = None) -> str | None:
        """Block until a key is ready and return it (now *processing*).

        Returns ``None`` on shutdown or when ``timeout`` (clock seconds) expires.
        """
        with self._cond:
            deadline = None if timeout is None else self._clock.now() + timeout
            while True:
                if self._shutdown:
                    return None
                now = self._clock.now()
                self._promote_locked(now)
                if self._queue:
                    key = self._queue.popleft()
                    self._dirty.discard(key)
                    self._processing.add(key)
                    return key
                if deadline is not None and now >= deadline:
                    return None
                wake = deadline
                if self._delayed:
                    ready_at = self._delayed[0][0]
                    wake = ready_at if wake is None else min(wake, ready_at)
                if wake is None:
                    self._cond.wait()
                else:
                    self._clock.wait_until(self._cond, wake)

    def done(self, key: str) -> None:
        """Finish processing ``key``; re-queue it if it was added meanwhile."""
        with self._cond:
            self._processing.discard(key)
            if key in self._dirty and not self._shutdown:
                self._queue.append(key)
                self._cond.notify()

    def shutdown(self) -> None:
        """Stop the queue: drop pending keys and wake every blocked ``get`` (returns ``None``)."""
        with self._cond:
            self._shutdown = True
            self._queue.clear()
            self._dirty.clear()
            self._delayed.clear()
            self._delayed_at.clear()
            self._cond.notify_all()

    @property
    def shutting_down(self) -> bool:
        with self._cond:
            return self._shutdown

    def __len__(self) -> int:
        """Number of keys ready to be handed out (excludes processing and not-yet-due keys)."""
        with self._cond:
            self._promote_locked(self._clock.now())
            return len(self._queue)

    def _add_locked(self, key: str) -> None:
        if self._shutdown or key in self._dirty:
            return
        self._dirty.add(key)
        if key in self._processing:
            return  # re-queued by done()
        self._queue.append(key)
        self._cond.notify()

    def _promote_locked(self, now: float) -> None:
        while self._delayed and self._delayed[0][0] <= now:
            ready_at, _, key = heapq.heappop(self._delayed)
            if self._delayed_at.get(key) != ready_at:
                continue  # superseded by an earlier add_after
            del self._delayed_at[key]
            self._add_locked(key)


class RateLimiter:
    """Per-key exponential backoff: ``base * 2**failures``, capped at ``cap``."""

    def __init__(self, base: float = 0.05, cap: float = 30.0) -> None:
        if base <= 0 or cap < base:
            raise ValueError("need 0 < base <= cap")
        self.base = base
        self.cap = cap
        self._failures: dict[str, int] = {}
        self._lock = threading.Lock()

    def when(self, key: str) -> float:
        """Record a failure of ``key`` and return how long to wait before retrying."""
        with self._lock:
            n = self._failures.get(key, 0)
            self._failures[key] = n + 1
        return min(self.cap, self.base * 2.0 ** min(n, 64))

    def forget(self, key: str) -> None:
        """Reset ``key``'s backoff (call after a success)."""
        with self._lock:
            self._failures.pop(key, None)

    def failures(self, key: str) -> int:
        """Consecutive failures currently recorded for ``key``."""
        with self._lock:
            return self._failures.get(key, 0)


class Controller:
    """Runs ``reconcile`` over a work queue with ``workers`` threads and optional resync.

    ``list_keys`` (if given) is called at :meth:`start` and then every
    ``resync_period`` clock seconds; every key it returns is enqueued.
    """

    def __init__(
        self,
        name: str,
        reconcile: Reconciler | Callable[[str], Result | None],
        workers: int = 1,
        resync_period: float = 30.0,
        list_keys: Callable[[], Iterable[str]] | None = None,
        clock: Clock | None = None,
        rate_limiter: RateLimiter | None = None,
    ) -> None:
        if workers < 1:
            raise ValueError("workers must be >= 1")
        if list_keys is not None and resync_period <= 0:
            raise ValueError("resync_period must be > 0")
        self.name = name
        self._reconcile = reconcile
        self._workers = workers
        self._resync_period = resync_period
        self._list_keys = list_keys
        self._clock = clock or RealClock()
        self.rate_limiter = rate_limiter or RateLimiter()
        self.queue = WorkQueue(self._clock)
        self._cond = threading.Condition()  # guards the fields below
        self._started = False
        self._stopping = False
        self._threads: list[threading.Thread] = []
        self._counters = {
            "reconciles_total": 0,
            "errors_total": 0,
            "resyncs_total": 0,
            "resync_errors_total": 0,
        }

    def start(self) -> None:
        """Start the worker threads and, if ``list_keys`` was given, the resync thread."""
        with self._cond:
            if self._started:
                raise RuntimeError(f"controller {self.name} already started")
            self._started = True
            for i in range(self._workers):
                self._spawn(self._worker, f"{self.name}-worker-{i}")
            if self._list_keys is not None:
                self._spawn(self._resync_loop, f"{self.name}-resync")

    def enqueue(self, key: str) -> None:
        """Request a reconcile of ``key`` (use from watch/event handlers)."""
        self.queue.add(key)

    def enqueue_after(self, key: str, delay: float) -> None:
        """Request a reconcile of ``key`` in ``delay`` clock seconds."""
        self.queue.add_after(key, delay)

    def stop(self, timeout: float = 10.0) -> bool:
        """Stop taking work, let in-flight reconciles finish, join threads.

        ``timeout`` is real seconds for the joins. Returns ``True`` if every
        thread exited in time. Queued-but-unstarted keys are dropped.
        """
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
            threads = list(self._threads)
        self.queue.shutdown()
        deadline = time.monotonic() + timeout
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))
        return not any(t.is_alive() for t in threads)

    @property
    def stats(self) -> dict[str, int]:
        """Snapshot of counters: reconciles_total, errors_total, resyncs_total,
        resync_errors_total, queue_depth (ready keys)."""
        with self._cond:
            snapshot = dict(self._counters)
        snapshot["queue_depth"] = len(self.queue)
        return snapshot

    def _spawn(self, target: Callable[[], None], name: str) -> None:
        thread = threading.Thread(target=target, name=name, daemon=True)
        self._threads.append(thread)
        thread.start()

    def _count(self, counter: str) -> None:
        with self._cond:
            self._counters[counter] += 1

    def _worker(self) -> None:
        while (key := self.queue.get()) is not None:
            try:
                self._process(key)
            finally:
                self.queue.done(key)

    def _process(self, key: str) -> None:
        try:
            result = self._reconcile(key)
        except Exception:
            delay = self.rate_limiter.when(key)
            self._count("errors_total")
            log.exception(
                "controller %s: reconcile of key %r failed; retry in %.3fs", self.name, key, delay
            )
            self.queue.add_after(key, delay)
        else:
            self.rate_limiter.forget(key)
            if result is not None and result.requeue_after is not None:
                self.queue.add_after(key, result.requeue_after)
        finally:
            self._count("reconciles_total")

    def _resync_loop(self) -> None:
        next_at = self._clock.now()
        while True:
            with self._cond:
                while not self._stopping and self._clock.now() < next_at:
                    self._clock.wait_until(self._cond, next_at)
                if self._stopping:
                    return
            self._resync_once()
            next_at += self._resync_period
            now = self._clock.now()
            if next_at <= now:  # fell behind (slow list_keys): skip missed ticks
                next_at = now + self._resync_period

    def _resync_once(self) -> None:
        assert self._list_keys is not None
        try:
            keys = list(self._list_keys())
        except Exception:
            self._count("resync_errors_total")
            log.exception("controller %s: resync list_keys failed", self.name)
            return
        self._count("resyncs_total")
        for key in keys:
            self.queue.add(key)
