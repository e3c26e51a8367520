"""Unit tests for braid.reconcile (work queue, backoff, controller) and braid.clock.

Timing-dependent behaviour (backoff, requeue_after, resync) is driven by
FakeClock: a test waits until the worker/resync thread is parked on a
fake-time deadline, then moves time exactly to it. Real threads, no sleeps.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator

import pytest

from braid.clock import FakeClock, RealClock
from braid.reconcile import Controller, RateLimiter, Result, WorkQueue

WAIT = 2.0  # real-time upper bound for synchronisation waits (never reached when green)


class Recorder:
    """Thread-safe log of (key, fake time) reconcile calls with a blocking wait."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.calls: list[tuple[str, float]] = []
        self._cond = threading.Condition()

    def record(self, key: str) -> int:
        with self._cond:
            self.calls.append((key, self.clock.now()))
            self._cond.notify_all()
            return len(self.calls)

    def reconcile(self, key: str) -> None:
        """A reconciler that only records the call."""
        self.record(key)

    def wait_calls(self, n: int) -> None:
        with self._cond:
            assert self._cond.wait_for(lambda: len(self.calls) >= n, WAIT), self.calls

    def keys(self) -> list[str]:
        with self._cond:
            return [k for k, _ in self.calls]

    def times(self) -> list[float]:
        with self._cond:
            return [t for _, t in self.calls]


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def make_controller(clock: FakeClock) -> Iterator[Callable[..., Controller]]:
    controllers: list[Controller] = []

    def make(reconcile: Callable[[str], Result | None], **kwargs: object) -> Controller:
        ctrl = Controller("test", reconcile, clock=clock, **kwargs)  # type: ignore[arg-type]
        controllers.append(ctrl)
        return ctrl

    yield make
    for ctrl in controllers:
        assert ctrl.stop(timeout=WAIT), "controller threads did not exit"


def step_to_next_deadline(clock: FakeClock) -> float:
    """Wait until a thread is parked on a fake deadline and jump exactly to it."""
    assert clock.wait_for_waiters(1, WAIT), "nothing is waiting on fake time"
    deadline = clock.next_deadline()
    assert deadline is not None
    clock.set_time(deadline)
    return deadline


# --- clock ----------------------------------------------------------------


def test_fake_clock_sleep_wakes_only_when_deadline_reached(clock: FakeClock) -> None:
    woke = threading.Event()
    t = threading.Thread(target=lambda: (clock.sleep(5.0), woke.set()), daemon=True)
    t.start()
    assert clock.wait_for_waiters(1, WAIT)
    assert clock.next_deadline() == 5.0
    clock.advance(4.0)
    assert clock.waiters() == 1 and not woke.is_set()
    clock.advance(1.0)
    t.join(WAIT)
    assert woke.is_set() and clock.now() == 5.0
    with pytest.raises(ValueError):
        clock.advance(-1.0)


def test_real_clock_wait_times_out() -> None:
    real, cond = RealClock(), threading.Condition()
    start = real.now()
    with cond:
        real.wait(cond, 0.01)
    assert real.now() - start >= 0.009


# --- work queue -----------------------------------------------------------


def test_queue_deduplicates_queued_keys(clock: FakeClock) -> None:
    q = WorkQueue(clock)
    for _ in range(5):
        q.add("a")
    q.add("b")
    assert len(q) == 2
    assert q.get(timeout=0) == "a"
    assert q.get(timeout=0) == "b"
    assert q.get(timeout=0) is None


def test_queue_readd_during_processing_requeued_once_after_done(clock: FakeClock) -> None:
    q = WorkQueue(clock)
    q.add("a")
    assert q.get(timeout=0) == "a"
    for _ in range(3):
        q.add("a")
    assert len(q) == 0
    assert q.get(timeout=0) is None  # never handed to a second consumer
    q.done("a")
    assert len(q) == 1
    assert q.get(timeout=0) == "a"
    q.done("a")
    assert q.get(timeout=0) is None


def test_queue_add_after_uses_fake_time_and_keeps_earliest(clock: FakeClock) -> None:
    q = WorkQueue(clock)
    q.add_after("a", 2.0)
    q.add_after("a", 1.0)  # earlier wins
    q.add_after("a", 3.0)  # later is ignored
    assert q.get(timeout=0) is None
    clock.advance(0.5)
    assert len(q) == 0
    clock.advance(0.5)
    assert len(q) == 1 and q.get(timeout=0) == "a"
    q.done("a")
    clock.advance(5.0)
    assert len(q) == 0  # the superseded 2.0/3.0 entries did not fire


def test_queue_get_timeout_in_fake_time(clock: FakeClock) -> None:
    q = WorkQueue(clock)
    out: list[str | None] = ["unset"]
    t = threading.Thread(target=lambda: out.__setitem__(0, q.get(timeout=5.0)), daemon=True)
    t.start()
    assert step_to_next_deadline(clock) == 5.0
    t.join(WAIT)
    assert not t.is_alive() and out[0] is None


def test_shutdown_wakes_blocked_getters(clock: FakeClock) -> None:
    q = WorkQueue(clock)
    results: list[str | None] = []
    threads = [
        threading.Thread(target=lambda: results.append(q.get()), daemon=True) for _ in range(3)
    ]
    for t in threads:
        t.start()
    time.sleep(0.02)  # let them block (they would block forever without shutdown)
    assert all(t.is_alive() for t in threads)
    q.shutdown()
    for t in threads:
        t.join(WAIT)
    assert not any(t.is_alive() for t in threads)
    assert results == [None, None, None]
    q.add("late")
    assert q.get(timeout=0) is None and q.shutting_down


def test_rate_limiter_doubles_caps_and_forgets() -> None:
    rl = RateLimiter(base=0.05, cap=0.3)
    assert [rl.when("k") for _ in range(5)] == pytest.approx([0.05, 0.1, 0.2, 0.3, 0.3])
    assert rl.when("other") == pytest.approx(0.05)  # per key
    assert rl.failures("k") == 5
    rl.forget("k")
    assert rl.failures("k") == 0 and rl.when("k") == pytest.approx(0.05)


# --- controller -----------------------------------------------------------


def test_controller_deduplicates_enqueues(clock: FakeClock, make_controller) -> None:
    rec = Recorder(clock)
    ctrl = make_controller(rec.reconcile)
    for _ in range(5):
        ctrl.enqueue("a")
    ctrl.enqueue("z")  # FIFO sentinel: any duplicate "a" would run before it
    assert ctrl.stats["queue_depth"] == 2
    ctrl.start()
    rec.wait_calls(2)
    assert rec.keys() == ["a", "z"]


def test_no_concurrent_reconciles_per_key_with_four_workers(
    clock: FakeClock, make_controller
) -> None:
    lock = threading.Lock()
    active: Counter[str] = Counter()
    max_active: Counter[str] = Counter()
    calls: Counter[str] = Counter()
    peak_total = [0]
    both_running = threading.Barrier(2)
    all_done = threading.Event()

    def reconcile(key: str) -> None:
        with lock:
            active[key] += 1
            calls[key] += 1
            max_active[key] = max(max_active[key], active[key])
            peak_total[0] = max(peak_total[0], sum(active.values()))
            n = calls[key]
        if n == 1 and key in ("k0", "k1"):
            both_running.wait(WAIT)  # proves distinct keys do run in parallel
        if n < 20:
            ctrl.enqueue(key)  # re-add while processing: idle workers must not take it
        time.sleep(0.001)  # widen the window in which a buggy queue would double-dispatch
        with lock:
            active[key] -= 1
            if sum(calls.values()) == 60:
                all_done.set()

    ctrl = make_controller(reconcile, workers=4)
    ctrl.start()
    for key in ("k0", "k1", "k2"):
        ctrl.enqueue(key)
    assert all_done.wait(WAIT), dict(calls)
    assert ctrl.stop(timeout=WAIT)
    assert calls == {"k0": 20, "k1": 20, "k2": 20}
    assert dict(max_active) == {"k0": 1, "k1": 1, "k2": 1}
    assert peak_total[0] >= 2


def test_readd_during_processing_reconciled_again_once(clock: FakeClock, make_controller) -> None:
    rec = Recorder(clock)

    def reconcile(key: str) -> None:
        if rec.record(key) == 1:
            for _ in range(3):
                ctrl.enqueue("a")

    ctrl = make_controller(reconcile)
    ctrl.enqueue("a")
    ctrl.start()
    rec.wait_calls(2)
    ctrl.enqueue("z")  # sentinel: extra "a" runs would precede it
    rec.wait_calls(3)
    assert rec.keys() == ["a", "a", "z"]


def test_failures_retry_with_exponential_backoff_then_reset(
    clock: FakeClock, make_controller, caplog: pytest.LogCaptureFixture
) -> None:
    rec = Recorder(clock)
    fail_on = {1, 2, 3, 4, 5, 7}  # calls 1-5 fail, 6 succeeds, 7 fails again

    def reconcile(key: str) -> None:
        if rec.record(key) in fail_on:
            raise RuntimeError("boom")

    ctrl = make_controller(reconcile, rate_limiter=RateLimiter(base=0.5, cap=4.0))
    caplog.set_level(logging.ERROR, logger="braid.reconcile")
    ctrl.enqueue("vm-1")
    ctrl.start()
    for n in range(2, 7):
        rec.wait_calls(n - 1)
        step_to_next_deadline(clock)
        rec.wait_calls(n)
    # delays 0.5, 1, 2, 4, capped 4 (dyadic values: exact in floating point)
    assert rec.times() == [0.0, 0.5, 1.5, 3.5, 7.5, 11.5]
    # success forgot the backoff: the next failure retries after base again
    ctrl.enqueue("vm-1")
    rec.wait_calls(7)
    assert step_to_next_deadline(clock) == 11.5 + 0.5
    rec.wait_calls(8)
    assert rec.times()[6:] == [11.5, 12.0]
    errors = [r for r in caplog.records if r.name == "braid.reconcile"]
    assert len(errors) == 6
    assert all("vm-1" in r.getMessage() and r.exc_info for r in errors)
    stats = ctrl.stats
    assert stats["errors_total"] == 6 and stats["reconciles_total"] >= 7


def test_requeue_after_honoured(clock: FakeClock, make_controller) -> None:
    rec = Recorder(clock)

    def reconcile(key: str) -> Result | None:
        return Result(requeue_after=7.0) if rec.record(key) == 1 else None

    ctrl = make_controller(reconcile)
    ctrl.enqueue("net-1")
    ctrl.start()
    rec.wait_calls(1)
    assert clock.wait_for_waiters(1, WAIT) and clock.next_deadline() == 7.0
    clock.advance(6.5)
    assert clock.waiters() == 1 and len(rec.calls) == 1  # not yet due, worker still parked
    clock.advance(0.5)
    rec.wait_calls(2)
    assert rec.times() == [0.0, 7.0]
    assert ctrl.rate_limiter.failures("net-1") == 0


def test_resync_enqueues_listed_keys_every_period_and_survives_errors(
    clock: FakeClock, make_controller, caplog: pytest.LogCaptureFixture
) -> None:
    rec = Recorder(clock)
    lists = [0]

    def list_keys() -> list[str]:
        lists[0] += 1
        if lists[0] == 2:
            raise ConnectionError("etcd down")
        return ["a", "b"]

    ctrl = make_controller(rec.reconcile, list_keys=list_keys)
    caplog.set_level(logging.ERROR, logger="braid.reconcile")
    ctrl.start()
    rec.wait_calls(2)  # initial list at start
    assert step_to_next_deadline(clock) == 30.0  # list_keys raises here
    assert step_to_next_deadline(clock) == 60.0  # thread survived, next tick scheduled
    rec.wait_calls(4)
    assert step_to_next_deadline(clock) == 90.0
    rec.wait_calls(6)
    assert sorted(rec.calls) == [
        ("a", 0.0), ("a", 60.0), ("a", 90.0), ("b", 0.0), ("b", 60.0), ("b", 90.0)
    ]
    assert lists[0] == 4
    failures = [r for r in caplog.records if "list_keys failed" in r.getMessage()]
    assert len(failures) == 1 and failures[0].exc_info[0] is ConnectionError
    stats = ctrl.stats
    assert stats["resyncs_total"] == 3 and stats["resync_errors_total"] == 1


def test_graceful_stop_waits_for_in_flight_reconcile(clock: FakeClock) -> None:
    started, release, finished = threading.Event(), threading.Event(), threading.Event()
    seen: list[str] = []

    def reconcile(key: str) -> None:
        seen.append(key)
        started.set()
        release.wait(WAIT)
        finished.set()

    ctrl = Controller("stop", reconcile, clock=clock)
    ctrl.start()
    ctrl.enqueue("a")
    assert started.wait(WAIT)
    ctrl.enqueue("b")  # queued behind the in-flight key; must not start after stop
    stopped: list[bool] = []
    stopper = threading.Thread(
        target=lambda: stopped.append(ctrl.stop(timeout=WAIT)), daemon=True
    )
    stopper.start()
    stopper.join(0.05)
    assert stopper.is_alive() and not finished.is_set()  # stop is waiting for "a"
    release.set()
    stopper.join(WAIT)
    assert stopped == [True] and finished.is_set()
    assert seen == ["a"]
    ctrl.enqueue("c")  # ignored after stop
    assert ctrl.stats["queue_depth"] == 0
