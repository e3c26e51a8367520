"""Injectable time source for Braid's control loops.

Everything that waits or schedules work (the reconcile work queue, resync
loops, backoff) takes a :class:`Clock` instead of calling :mod:`time`
directly, so tests can swap in :class:`FakeClock` and drive timing by hand:
no real sleeps, exact and reproducible delays.

The one non-obvious primitive is :meth:`Clock.wait_until`: "wait on this
:class:`threading.Condition` until notified or until the clock reaches a
deadline". With :class:`RealClock` that is simply ``cond.wait(timeout)``;
with :class:`FakeClock` the deadline is measured in fake time and the waiter
is woken by :meth:`FakeClock.advance`. Like ``Condition.wait`` it may return
early (notification or spuriously), so callers always re-check in a loop.
"""

from __future__ import annotations

import threading
import time

__all__ = ["Clock", "RealClock", "FakeClock"]


class Clock:
    """Monotonic time source. Subclasses implement :meth:`now` and :meth:`sleep`."""

    def now(self) -> float:
        """Monotonic time in seconds (arbitrary epoch)."""
        raise NotImplementedError

    def sleep(self, seconds: float) -> None:
        """Block the calling thread for ``seconds`` of this clock's time."""
        raise NotImplementedError

    def wait(self, cond: threading.Condition, timeout: float | None) -> None:
        """Wait on ``cond`` until notified or ``timeout`` seconds pass (``None``: no timeout).

        The caller must hold ``cond``'s lock (same contract as
        :meth:`threading.Condition.wait`). May return early; re-check your
        predicate in a loop.
        """
        if timeout is None:
            cond.wait()
        else:
            self.wait_until(cond, self.now() + timeout)

    def wait_until(self, cond: threading.Condition, deadline: float) -> None:
        """Like :meth:`wait` but with an absolute deadline on this clock."""
        remaining = deadline - self.now()
        if remaining > 0:
            cond.wait(remaining)


class RealClock(Clock):
    """Real time: :func:`time.monotonic` and :func:`time.sleep`."""

    def now(self) -> float:
        return time.monotonic()

    def sleep(self, seconds: float) -> None:
        if seconds > 0:
            time.sleep(seconds)


class FakeClock(Clock):
    """Manually driven clock for tests; safe to use from many threads.

    Time only moves when the test calls :meth:`advance` or :meth:`set_time`.
    Threads blocked in :meth:`sleep` / :meth:`wait` / :meth:`wait_until` with
    a deadline are registered as *waiters*; moving time past a waiter's
    deadline notifies its condition. :meth:`wait_for_waiters` and
    :meth:`next_deadline` let a test synchronise with those threads ("the
    worker is now parked until t=0.5") before advancing.
    """

    def __init__(self, start: float = 0.0) -> None:
        self._now = float(start)
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)  # waiter set changed
        # token -> (deadline, condition to notify). A token is removed either
        # when its deadline is fired by advance() or when the waiter returns.
        self._waiters: dict[object, tuple[float, threading.Condition]] = {}

    def now(self) -> float:
        with self._lock:
            return self._now

    def sleep(self, seconds: float) -> None:
        cond = threading.Condition()
        with cond:
            deadline = self.now() + seconds
            while self.now() < deadline:
                self.wait_until(cond, deadline)

    def wait_until(self, cond: threading.Condition, deadline: float) -> None:
        token = object()
        with self._lock:
            if deadline <= self._now:
                return
            self._waiters[token] = (deadline, cond)
            self._changed.notify_all()
        try:
            # We still hold cond's lock, so advance() cannot notify before we
            # are inside wait(): it must take cond's lock to notify.
            cond.wait()
        finally:
            with self._lock:
                if self._waiters.pop(token, None) is not None:
                    self._changed.notify_all()

    def advance(self, seconds: float) -> None:
        """Move time forward by ``seconds`` and wake waiters whose deadline passed."""
        if seconds < 0:
            raise ValueError("FakeClock cannot go backwards")
        with self._lock:
            target = self._now + seconds
        self.set_time(target)

    def set_time(self, when: float) -> None:
        """Set the current time (must not go backwards) and wake expired waiters."""
        with self._lock:
            if when < self._now:
                raise ValueError(f"FakeClock cannot go backwards ({when} < {self._now})")
            self._now = float(when)
            fired = [tok for tok, (dl, _) in self._waiters.items() if dl <= self._now]
            conds = [self._waiters.pop(tok)[1] for tok in fired]
            if fired:
                self._changed.notify_all()
        # Notify outside our lock: waiters take cond's lock, then ours.
        for cond in conds:
            with cond:
                cond.notify_all()

    def next_deadline(self) -> float | None:
        """Earliest deadline of a currently blocked waiter, or ``None``."""
        with self._lock:
            return min((dl for dl, _ in self._waiters.values()), default=None)

    def waiters(self) -> int:
        """Number of threads currently blocked on a fake-time deadline."""
        with self._lock:
            return len(self._waiters)

    def wait_for_waiters(self, count: int = 1, timeout: float = 5.0) -> bool:
        """Block (real time, up to ``timeout``) until >= ``count`` threads wait on a deadline."""
        with self._changed:
            return self._changed.wait_for(lambda: len(self._waiters) >= count, timeout)
