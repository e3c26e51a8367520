"""The state layer against a real etcd server."""

from __future__ import annotations

import threading
import time

import pytest

from braid.store import (
    AlreadyExists,
    Conflict,
    Guard,
    GuardFailed,
    Informer,
    NotFound,
    Store,
)

pytestmark = pytest.mark.integration


def test_create_get_update_delete(store):
    rev = store.create("vm/spec/a", b"one")
    kv = store.get("vm/spec/a")
    assert kv.value == b"one" and kv.mod_revision == rev and kv.create_revision == rev
    with pytest.raises(AlreadyExists):
        store.create("vm/spec/a", b"two")
    rev2 = store.update("vm/spec/a", b"two", rev)
    assert rev2 > rev and store.get("vm/spec/a").value == b"two"
    with pytest.raises(Conflict):
        store.update("vm/spec/a", b"three", rev)  # stale revision
    with pytest.raises(NotFound):
        store.update("vm/spec/missing", b"x", 5)
    with pytest.raises(Conflict):
        store.delete("vm/spec/a", mod_revision=rev)
    store.delete("vm/spec/a", mod_revision=rev2)
    assert store.get("vm/spec/a") is None
    with pytest.raises(NotFound):
        store.delete("vm/spec/a")


def test_concurrent_updates_exactly_one_wins(store):
    rev = store.create("vm/spec/x", b"0")
    results = []
    barrier = threading.Barrier(8)

    def writer(i):
        barrier.wait()
        try:
            store.update("vm/spec/x", f"w{i}".encode(), rev)
            results.append(("ok", i))
        except Conflict:
            results.append(("conflict", i))

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [i for r, i in results if r == "ok"]
    assert len(winners) == 1 and len(results) == 8
    assert store.get("vm/spec/x").value == f"w{winners[0]}".encode()


def test_guard_fences_writes(store):
    token = store.create("election/x", b"me")
    store.put("vm/status/a", b"ok", guards=[Guard("election/x", token)])
    store.delete("election/x")
    store.create("election/x", b"someone-else")
    with pytest.raises(GuardFailed):
        store.put("vm/status/a", b"stale", guards=[Guard("election/x", token)])
    with pytest.raises(GuardFailed):
        store.create("vm/spec/b", b"stale", guards=[Guard("election/x", token)])
    assert store.get("vm/status/a").value == b"ok"
    assert store.get("vm/spec/b") is None


def test_list_prefix_and_revision(store):
    for i in range(5):
        store.create(f"net/spec/n{i}", b"v")
    store.create("netx/spec/other", b"v")  # must not match prefix net/
    kvs, rev = store.list("net/")
    assert sorted(kv.key for kv in kvs) == [f"net/spec/n{i}" for i in range(5)]
    assert rev >= max(kv.mod_revision for kv in kvs)


def test_lease_keys_vanish_when_revoked(store):
    lease = store.grant_lease(5)
    store.put("node/live/n1/node-agent", b"x", lease=lease)
    assert store.get("node/live/n1/node-agent").lease == lease
    store.revoke_lease(lease)
    assert store.get("node/live/n1/node-agent") is None


def test_watch_from_compacted_revision_raises(store):
    from braid.store import Compacted
    store.put("vm/spec/a", b"1")
    rev = store.put("vm/spec/a", b"2")
    store.compact(rev)
    with pytest.raises(Compacted):
        for _ in store.watch("vm/", rev - 1, threading.Event()):
            pass


def test_informer_sees_changes_in_order(store):
    seen = []
    inf = Informer(store, "vm/", lambda k, kv: seen.append((k, kv.value if kv else None))).start()
    try:
        assert inf.synced.wait(5)
        store.create("vm/spec/a", b"1")
        rev = store.create("vm/spec/b", b"1")
        store.update("vm/spec/b", b"2", rev)
        store.delete("vm/spec/a")
        deadline = time.monotonic() + 5
        while len(seen) < 4 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert seen == [("vm/spec/a", b"1"), ("vm/spec/b", b"1"), ("vm/spec/b", b"2"),
                        ("vm/spec/a", None)]
        assert inf.keys() == ["vm/spec/b"]
    finally:
        inf.stop()


def _wait(pred, timeout=15.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.05)
    return False


def test_watch_survives_etcd_restart_and_compaction(own_etcd):
    """Restart etcd during a watch: no change is missed. Compact history the
    watcher needs: it re-lists (deletes included) instead of crashing."""
    store = Store(own_etcd.endpoint, prefix="/braid/", retry_budget=20)
    writer = Store(own_etcd.endpoint, prefix="/braid/", retry_budget=20)
    state: dict[str, bytes] = {}
    gate, blocked = threading.Event(), threading.Event()
    gate.set()

    def on_change(key, kv):
        if key == "vm/spec/block" and not gate.is_set():
            blocked.set()
            gate.wait(30)
        if kv is None:
            state.pop(key, None)
        else:
            state[key] = kv.value

    inf = Informer(store, "vm/", on_change).start()
    try:
        assert inf.synced.wait(5)
        for i in range(20):
            writer.put(f"vm/spec/v{i}", b"before")
        assert _wait(lambda: len(state) == 20)

        own_etcd.stop()
        own_etcd.start()
        for i in range(20):
            writer.put(f"vm/spec/v{i}", b"after-restart")
        writer.put("vm/spec/new", b"x")
        assert _wait(lambda: len(state) == 21 and all(
            v == b"after-restart" for k, v in state.items() if k != "vm/spec/new"))

        # Hold the informer inside a handler, restart etcd (its watch drops),
        # change and compact meanwhile: on resume the history it needs is
        # gone, so it must re-list and still report the deletions.
        relists = inf.relists
        gate.clear()
        writer.put("vm/spec/block", b"x")
        assert blocked.wait(5)
        own_etcd.stop()
        own_etcd.start()
        for i in range(10):
            writer.delete(f"vm/spec/v{i}")
        writer.put("vm/spec/new", b"y")
        writer.compact(writer.revision())
        gate.set()
        assert _wait(lambda: state.get("vm/spec/new") == b"y" and len(state) == 12)
        expected = {kv.key: kv.value for kv in writer.list("vm/")[0]}
        assert len(expected) == 12 and state == expected
        assert inf.relists == relists + 1
    finally:
        inf.stop()
        store.close()
        writer.close()


def test_identical_concurrent_updates_still_exactly_one_wins(store):
    """Same bytes from 8 writers: CAS still lets exactly one through (a
    value match is only taken as "our own write" after a transport retry)."""
    rev = store.create("vm/spec/same", b"0")
    results = []
    barrier = threading.Barrier(8)

    def writer():
        barrier.wait()
        try:
            store.update("vm/spec/same", b"identical", rev)
            results.append("ok")
        except Conflict:
            results.append("conflict")

    threads = [threading.Thread(target=writer) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == ["conflict"] * 7 + ["ok"]
