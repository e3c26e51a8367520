"""Leader election with real processes (braid-scheduler replicas)."""

from __future__ import annotations

import json
import signal
import threading
import time

import pytest

from braid.store import Election, GuardFailed, Store
from tests.conftest import DaemonProc

pytestmark = pytest.mark.integration

TTL = 2


def _leader(store: Store) -> tuple[str | None, int]:
    kv = store.get("election/scheduler")
    return (kv.value.decode(), kv.create_revision) if kv else (None, 0)


def _wait(pred, timeout):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(0.02)
    return None


def _scheduler(etcd, prefix, tmp, i):
    return DaemonProc("scheduler.main", ["--etcd", etcd.endpoint, "--prefix", prefix,
                                         "--lease-ttl", str(TTL), "--id", f"sched-{i}"],
                      tmp, f"scheduler-{i}")


def test_kill9_leader_fails_over_within_two_ttl(etcd_server, prefix, tmp_path):
    store = Store(etcd_server.endpoint, prefix=prefix)
    procs = [_scheduler(etcd_server, prefix, tmp_path, i) for i in range(3)]
    try:
        first = _wait(lambda: _leader(store)[0], 10)
        assert first in {"sched-0", "sched-1", "sched-2"}
        victim = procs[int(first.split("-")[1])]
        victim.proc.send_signal(signal.SIGKILL)
        t0 = time.monotonic()
        victim.proc.wait(5)
        new = _wait(lambda: (lambda l: l if l and l != first else None)(_leader(store)[0]), 4 * TTL)
        took = time.monotonic() - t0
        assert new is not None, "no new leader"
        assert took <= 2 * TTL, f"failover took {took:.2f}s > 2 x TTL"
        # the new leader acts: its fenced heartbeat appears
        hb = _wait(lambda: (lambda kv: kv and json.loads(kv.value)["leader"] == new)(
            store.get("scheduler/status/leader")), 5)
        assert hb
    finally:
        for p in procs:
            p.stop()
        store.delete_prefix("")
        store.close()


def test_paused_leader_is_fenced_after_takeover(etcd_server, prefix, tmp_path):
    """SIGSTOP the leader until its lease expires and another replica leads;
    on SIGCONT the old leader's writes are rejected by the guard: the
    heartbeat key is never written by two leaders after the takeover."""
    store = Store(etcd_server.endpoint, prefix=prefix)
    procs = [_scheduler(etcd_server, prefix, tmp_path, i) for i in range(2)]
    try:
        first, token1 = _wait(lambda: (lambda l: l if l[0] else None)(_leader(store)), 10)
        old = procs[int(first.split("-")[1])]
        old.proc.send_signal(signal.SIGSTOP)
        second = _wait(lambda: (lambda l: l if l[0] and l[0] != first else None)(_leader(store)),
                       4 * TTL)
        assert second, "no takeover while the leader was paused"
        takeover_rev = second[1]
        old.proc.send_signal(signal.SIGCONT)
        time.sleep(3)  # let the old leader wake up and try to act
        # every heartbeat written after the takeover carries the new token
        history = []
        stop = threading.Event()
        for batch in store.watch("scheduler/status/", takeover_rev, stop):
            if not batch:
                break
            history += [json.loads(ev.kv.value) for ev in batch if ev.type == "put"]
        assert history, "the new leader did not act"
        assert {h["leader"] for h in history} == {second[0]}
        assert {h["token"] for h in history} == {takeover_rev}
        log = old.log.read_text()
        assert old.proc.poll() is None  # it survived being deposed
        assert "no longer leads" in log or "fenced" in log
    finally:
        for p in procs:
            p.proc.send_signal(signal.SIGCONT)
            p.stop()
        store.delete_prefix("")
        store.close()


def test_in_process_election_guard(store):
    a = Election(store, "x", "a", ttl=TTL).start()
    assert a.wait_leading(5)
    b = Election(store, "x", "b", ttl=TTL).start()
    try:
        guard = a.guard()
        store.put("x/status/owner", b"a", guards=[guard])
        a.stop()  # resigns: b takes over quickly
        assert b.wait_leading(2 * TTL)
        with pytest.raises(GuardFailed):
            store.put("x/status/owner", b"a-late", guards=[guard])
        store.put("x/status/owner", b"b", guards=[b.guard()])
        assert store.get("x/status/owner").value == b"b"
        assert b.leader() == "b"
    finally:
        b.stop()
