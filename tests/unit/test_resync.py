"""Resync of a returning replica: only what changed since it was dropped is copied
(``storage_daemon.changes``), in one process with real replica files and loopback
replication (the harness of test_datapath)."""

from __future__ import annotations

import asyncio
import os
import time

import pytest

from braid import extents as X
from storage_daemon import changes as C
from storage_daemon.extent_store import DiskStore, ReplicaMeta, blank_digests
from storage_daemon.rebuild import Rebuilder
from tests.unit.test_datapath import ES, UID, Cluster, run

R = X.Replica
MiB = 1 << 20


def test_change_log_answers_only_what_it_saw_whole():
    now = [1000.0]
    log = C.ChangeLog(chunk=MiB, margin=60, clock=lambda: now[0], max_generations=3)
    key = ("data", 0)
    log.note(key, 5, 0, 10)                            # before the node was seen in the set: kept,
    assert log.since(key, 5, 2000.0) is None           # but the log cannot vouch for generation 5
    log.member(key, 5)
    now[0] = 1900.0
    log.note(key, 5, 3 * MiB - 1, 2)                   # straddles chunks 2 and 3
    now[0] = 2000.0
    log.note(key, 6, 5 * MiB, MiB)                     # exactly chunk 5
    log.note(key, 7, 0, 0)                             # nothing
    # dropped at 1990 from generation 5: its writes from 1930 on (none) and all of 6, 7
    assert log.since(key, 5, 1990.0) == 0b100000
    # dropped at 1950: the write of 1900 is within the margin (it may have failed on it)
    assert log.since(key, 5, 1950.0) == 0b101100
    assert log.since(key, 6, 1990.0) == 0b100000
    assert log.since(key, 4, 1990.0) is None           # before the node was in the set
    assert log.since(key, 6, 1030.0) is None           # a drop too soon after this daemon started
    log.note(key, 8, MiB, 1)
    log.note(key, 9, MiB, 1)                           # 4 generations: 5 is trimmed
    assert log.since(key, 5, 1950.0) is None and log.since(key, 6, 1990.0) == 0b100010
    log.forget(key)                                    # left the set: nothing known any more
    assert log.since(key, 6, 1990.0) is None
    log.member(key, 12)
    assert log.since(key, 12, 1990.0) == 0


def test_change_log_merges_old_buckets_but_never_loses_a_chunk():
    now = [0.0]
    log = C.ChangeLog(chunk=MiB, margin=60, clock=lambda: now[0])
    key = ("data", 0)
    log.member(key, 1)
    for i in range(40):                                # 40 buckets of 30 s, chunk i % 8 each
        now[0] = 10_000.0 + i * 30
        log.note(key, 1, (i % 8) * MiB, 1)
    # the last ten buckets are apart: a drop at the end gets the chunks of the last
    # minute (writes 37..39: whole buckets from 60 s before the drop)
    assert log.since(key, 1, now[0]) == 0b11100000
    # ... a drop long ago gets the merged ones too (more than needed, never less)
    assert log.since(key, 1, 10_100.0) == 0xFF


def test_answer_round_trip_and_plan():
    digests = [bytes([i]) * 8 for i in range(4)]
    assert C.decode_answer(C.encode_answer(0b1010, digests), 4) == (0b1010, digests)
    assert C.decode_answer(C.encode_answer(None, digests), 4) == (None, digests)
    for bad in (b"", b"{}", b'{"known": true, "mask": "zz", "digests": []}', b"[1]"):
        with pytest.raises(ValueError):
            C.decode_answer(bad, 4)
    with pytest.raises(ValueError):
        C.decode_answer(C.encode_answer(0, digests), 5)
    mine = list(digests)
    mine[3] = b"x" * 8
    assert C.plan(0b0010, digests, mine) == [1, 3]     # logged, or checksums differ
    assert C.plan(None, digests, mine) == [0, 1, 2, 3]  # no log: everything
    assert C.plan(0, digests, digests) == []


def test_meta_complete_flag_and_digests(tmp_path):
    legacy = b'{"extent_size": 4194304, "generation": 3, "index": 0, "volume": "' + UID.encode() + b'"}\n'
    meta = ReplicaMeta.from_json(legacy)
    assert meta.complete and meta.to_json() == legacy     # the old form, unchanged
    part = ReplicaMeta(UID, 0, ES, 3, complete=False)
    assert ReplicaMeta.from_json(part.to_json()) == part
    with pytest.raises(ValueError):
        ReplicaMeta.from_json(legacy.replace(b"}", b', "complete": "yes"}'))
    with DiskStore(tmp_path / "a", "d1") as a, DiskStore(tmp_path / "b", "d1") as b:
        ra = a.open_replica(UID, 0, ES, 1, True)
        rb = b.open_replica(UID, 0, ES, 1, True, complete=False)
        assert not rb.meta.complete
        b.set_meta(UID, 0, generation=4)
        assert b.get(UID, 0).meta == ReplicaMeta(UID, 0, ES, 4, complete=False)
        assert ra.chunk_digests(MiB) == rb.chunk_digests(MiB) == blank_digests(ES, MiB)
        data = os.urandom(4096)
        ra.write(2 * MiB + 8192, data)
        da = ra.chunk_digests(MiB)
        assert [i for i in range(4) if da[i] != rb.chunk_digests(MiB)[i]] == [2]
        rb.write(2 * MiB + 8192, data)
        assert rb.chunk_digests(MiB) == da


async def _rejoin(cl, node: str, rate: float = 64 * ES) -> Rebuilder:
    """``node`` joins extent 0 again and a Rebuilder on it runs until promoted."""
    rec = cl.etcd.recs[("v", 0)]
    assert cl.etcd.cas(rec, rec.join(R(node, "d1")))
    cl.sync_views()
    rb = Rebuilder(cl.nodes[node], rate=rate, chunk=256 << 10)
    rb.poke()
    for _ in range(200):
        await asyncio.sleep(0.02)
        cl.sync_views()
        rb.poke()
        if cl.etcd.recs[("v", 0)].holds(node) and rb.completed:
            return rb
    raise AssertionError(f"{node} did not rejoin: {cl.etcd.recs[('v', 0)]}")


def _replica(cl, node):
    return cl.nodes[node].disks["d1"].get(UID, 0)


def _same(cl, a, b) -> bool:
    return bytes(_replica(cl, a).read(0, ES)) == bytes(_replica(cl, b).read(0, ES))


def _age(cl, seconds: float = 3600) -> None:
    """As if every daemon had been running for a while (the logs' margin), and the
    writes until ``_now`` were made ``seconds`` ago."""
    for sn in cl.nodes.values():
        sn.changes.started -= 2 * seconds
        sn.changes.clock = lambda: time.time() - seconds


def _now(cl) -> None:
    for sn in cl.nodes.values():
        sn.changes.clock = time.time


def test_a_returning_replica_copies_only_the_chunks_changed_since(tmp_path):
    async def go():
        cl = await Cluster(tmp_path, n=2).start()
        cl.place("v", 1, 2)                                   # extent 0 on n1 + n2
        _age(cl)
        e1 = cl.engine("n1", n_extents=1)
        await e1.write(0, memoryview(os.urandom(ES)), fua=False)    # every chunk has data
        _now(cl)
        rec = cl.etcd.recs[("v", 0)]
        assert cl.etcd.cas(rec, rec.without([R("n2", "d1")], "test: n2 away"))
        cl.sync_views()
        # while n2 is away: a write in chunk 1, a trim of chunk 3 (zeros there now)
        await e1.write(MiB + 100, memoryview(b"n" * 5000), fua=False)
        await e1.trim(3 * MiB, MiB, fua=False)
        assert not _same(cl, "n1", "n2")
        rb = await _rejoin(cl, "n2")
        assert rb.resynced == 1 and rb.resync_bytes == 2 * MiB      # chunks 1 and 3 only
        assert _same(cl, "n1", "n2") and bytes(_replica(cl, "n2").read(3 * MiB, MiB)) == bytes(MiB)
        # complete on disk with the first write as a member (no extra fsync at the join)
        assert not _replica(cl, "n2").meta.complete
        await e1.write(0, memoryview(b"after" * 100), fua=False)
        assert _replica(cl, "n2").meta.complete and _same(cl, "n1", "n2")
        await cl.stop()
    run(go())


def test_without_a_log_that_can_tell_the_whole_extent_is_copied_over_the_old_copy(tmp_path):
    async def go():
        cl = await Cluster(tmp_path, n=2).start()
        cl.place("v", 1, 2)
        e1 = cl.engine("n1", n_extents=1)          # n1 "just started": its log cannot vouch
        await e1.write(0, memoryview(os.urandom(ES)), fua=False)
        rec = cl.etcd.recs[("v", 0)]
        assert cl.etcd.cas(rec, rec.without([R("n2", "d1")], "test: n2 away"))
        cl.sync_views()
        await e1.trim(0, 2 * MiB, fua=False)       # n2's old data must not survive there
        rb = await _rejoin(cl, "n2")
        assert rb.resynced == 1 and rb.resync_bytes == ES
        assert _same(cl, "n1", "n2")
        assert bytes(_replica(cl, "n2").read(0, 2 * MiB)) == bytes(2 * MiB)
        await cl.stop()
    run(go())


def test_a_write_only_the_old_copy_got_is_undone_by_the_checksums(tmp_path):
    """The log of n1 says nothing about chunk 2 (n1 never applied that write), but
    the old copy on n2 holds it: the checksum digests differ, the chunk is copied."""
    async def go():
        cl = await Cluster(tmp_path, n=2).start()
        cl.place("v", 1, 2)
        _age(cl)
        e1 = cl.engine("n1", n_extents=1)
        await e1.write(0, memoryview(os.urandom(ES)), fua=False)
        _replica(cl, "n2").write(2 * MiB, b"only on n2" * 100)
        _now(cl)
        rec = cl.etcd.recs[("v", 0)]
        assert cl.etcd.cas(rec, rec.without([R("n2", "d1")], "test: n2 away"))
        cl.sync_views()
        rb = await _rejoin(cl, "n2")
        assert rb.resync_bytes == MiB and _same(cl, "n1", "n2")
        await cl.stop()
    run(go())


def test_an_interrupted_copy_is_never_resynced(tmp_path):
    """n2 was joining (copy half done) when it was dropped: its file is not complete,
    so when it joins again the file is discarded and copied afresh."""
    async def go():
        cl = await Cluster(tmp_path, n=2).start()
        cl.place("v", 1, 1)                                   # extent 0 on n1 only
        _age(cl)
        e1 = cl.engine("n1", n_extents=1, replicas=2)
        await e1.write(0, memoryview(os.urandom(ES)), fua=False)
        rec = cl.etcd.recs[("v", 0)]
        assert cl.etcd.cas(rec, rec.join(R("n2", "d1")))
        cl.sync_views()
        await e1.write(0, memoryview(b"m" * 4096), fua=False)     # mirrored: n2's file exists now
        assert not _replica(cl, "n2").meta.complete
        rec = cl.etcd.recs[("v", 0)]
        assert cl.etcd.cas(rec, rec.without([R("n2", "d1")], "test: copy failed"))
        cl.sync_views()
        rb = await _rejoin(cl, "n2")
        assert rb.resynced == 0 and rb.completed == 1 and _same(cl, "n1", "n2")
        await e1.write(0, memoryview(b"after" * 100), fua=False)
        assert _replica(cl, "n2").meta.complete
        await cl.stop()
    run(go())


def test_the_planner_prefers_the_old_copy_and_a_restarted_node():
    d = [X.DiskCandidate("n2", "d1", ES), X.DiskCandidate("n3", "d1", 50 * ES),
         X.DiskCandidate("n4", "spare", 50 * ES, hot_spare=True)]
    rec = X.ExtentRecord("v", UID, 0, ES, 3, (R("n1", "d1"),),
                         dropped=(X.Dropped("n2", "d1", 2, "gone", 1000.0),))
    ok = lambda r: True  # noqa: E731
    # right after the drop, n2's lease may be the dead daemon's: not n2 yet
    assert X.repair(rec, 2, ok, d, now=1010.0) == ("join", R("n4", "spare"))
    # its daemon started after the drop: back for real, and it holds the old copy
    assert X.repair(rec, 2, ok, d, now=1010.0, started={"n2": 1005.0}) == ("join", R("n2", "d1"))
    assert X.repair(rec, 2, ok, d, now=1010.0, started={"n2": 990.0}) == ("join", R("n4", "spare"))
    # after the cooldown, the old copy comes first, even before a hot spare
    assert X.repair(rec, 2, ok, d, now=2000.0) == ("join", R("n2", "d1"))
