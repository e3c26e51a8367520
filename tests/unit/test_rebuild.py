"""Rebuild of a replica in one process (three StorageNodes with real replica
files and loopback replication, the extent map with CAS semantics), and the
pure repair planner."""

from __future__ import annotations

import asyncio
import os
import random

from braid import extents as X
from storage_daemon.datapath import Intervals
from storage_daemon.rebuild import Rebuilder
from tests.unit.test_datapath import ES, UID, Cluster, run

R = X.Replica


def test_intervals_merge_and_gaps():
    iv = Intervals()
    for a, b in ((10, 20), (30, 40), (18, 31), (50, 60), (60, 61), (0, 0)):
        iv.add(a, b)
    assert iv.spans == [[10, 40], [50, 61]]
    assert iv.gaps(0, 100) == [(0, 10), (40, 50), (61, 100)]
    assert iv.gaps(12, 38) == [] and iv.gaps(39, 52) == [(40, 50)]
    rnd, ref = random.Random(3), set()
    iv = Intervals()
    for _ in range(300):
        a = rnd.randrange(0, 1000)
        b = a + rnd.randrange(0, 40)
        iv.add(a, b)
        ref.update(range(a, b))
    covered = set(range(1000)) - {x for g in iv.gaps(0, 1000) for x in range(*g)}
    assert covered == {x for x in ref if x < 1000}


def test_record_join_promote_and_json():
    rec = X.ExtentRecord("v", UID, 0, ES, 3, (R("n1", "d1"),),
                         dropped=(X.Dropped("n2", "d1", 2, "gone"),))
    j = rec.join(R("n3", "d1"))
    assert j.generation == 4 and j.joiner("n3") and j.holds("n3") is None and j.writable("n3")
    assert X.ExtentRecord.from_json(j.to_json()) == j
    p = j.promote(R("n3", "d1"))
    assert p.generation == 5 and p.holds("n3") and not p.joining
    dropped = j.without([R("n3", "d1")], "copy failed")
    assert not dropped.joining and dropped.replicas == rec.replicas and dropped.dropped[-1].node == "n3"


def test_repair_planner():
    d = [X.DiskCandidate("n1", "d1", 10 * ES), X.DiskCandidate("n2", "d1", 10 * ES),
         X.DiskCandidate("n3", "d1", 50 * ES), X.DiskCandidate("n4", "spare", 1 * ES, hot_spare=True),
         X.DiskCandidate("n5", "tiny", ES // 2)]
    rec = X.ExtentRecord("v", UID, 0, ES, 2, (R("n1", "d1"),))
    assert X.repair(rec, 2, lambda r: True, d) == ("join", R("n4", "spare"))   # hot spare first
    assert X.repair(rec, 2, lambda r: True, d[:3]) == ("join", R("n3", "d1"))  # then most free
    assert X.repair(rec.join(R("n3", "d1")), 2, lambda r: True, d) is None      # already rebuilding
    assert X.repair(rec, 1, lambda r: True, d) is None                           # policy met
    bad_disk = X.ExtentRecord("v", UID, 0, ES, 2, (R("n1", "d1"), R("n2", "d1")))
    usable = lambda r: r.node != "n2"  # noqa: E731
    assert X.repair(bad_disk, 2, usable, d[:3]) == ("join", R("n3", "d1"))      # copy first ...
    three = bad_disk.join(R("n3", "d1")).promote(R("n3", "d1"))
    assert X.repair(three, 2, usable, d[:3]) == ("drop", [R("n2", "d1")])       # ... then evacuate
    empty = X.ExtentRecord("v", UID, 0, ES, 2, ())
    assert X.repair(empty, 2, lambda r: True, d) is None                         # nothing to copy from
    assert X.repair(rec, 2, lambda r: True, [d[4]]) is None                      # no room anywhere


def test_rebuild_copies_while_writes_go_on(tmp_path):
    """n3 joins extent 0 (n1+n2... n2 lost): writes keep coming through n1 during
    the copy, some to ranges the copy has not reached, some to ranges it has;
    the promoted replica must equal the survivor's, byte for byte."""
    async def go():
        cl = await Cluster(tmp_path).start()
        cl.place("v", 1, 2)                                   # extent 0 on n1 + n2
        e1 = cl.engine("n1", n_extents=1)
        rnd = random.Random(7)
        base = os.urandom(ES // 2)
        await e1.write(0, memoryview(base), fua=False)       # half the extent has data
        rec = cl.etcd.recs[("v", 0)]
        assert cl.etcd.cas(rec, rec.without([R("n2", "d1")], "test: n2 lost"))
        rec = cl.etcd.recs[("v", 0)]
        assert cl.etcd.cas(rec, rec.join(R("n3", "d1")))
        cl.sync_views()
        rb = Rebuilder(cl.nodes["n3"], rate=ES, chunk=256 << 10)   # ~1 s for the extent
        rb.poke()
        for _ in range(60):                                   # unaligned writes while it copies
            off = rnd.randrange(0, ES - 9000)
            await e1.write(off, memoryview(os.urandom(rnd.randrange(1, 9000))), fua=False)
            await asyncio.sleep(0.005)
        # the copy was still running: the mirrored writes were noted for it
        assert cl.etcd.recs[("v", 0)].joiner("n3") and cl.nodes["n3"].joins[(UID, 0)].spans
        for _ in range(200):
            if cl.etcd.recs[("v", 0)].holds("n3") and rb.completed:   # (it counts after its refresh)
                break
            await asyncio.sleep(0.05)
            cl.sync_views()
        final = cl.etcd.recs[("v", 0)]
        assert final.holds("n3") and not final.joining and final.generation == rec.generation + 2
        assert rb.completed == 1 and rb.progress == {}
        await e1.write(ES - 4096, memoryview(b"z" * 4096), fua=False)   # the new set takes writes
        # a write still in flight with the joining record, arriving after the promotion,
        # must land in the promoted replica (not make it look like a leftover to discard)
        joined = cl.etcd.recs[("v", 0)]
        stale = X.ExtentRecord(joined.volume, joined.uid, 0, ES, joined.generation - 1,
                               (R("n1", "d1"),), joining=(R("n3", "d1"),))
        rf3 = await cl.nodes["n3"].replica(stale, create=True)
        rf3.write(8192, b"s" * 4096)
        cl.nodes["n1"].disks["d1"].get(UID, 0).write(8192, b"s" * 4096)
        a = cl.nodes["n1"].disks["d1"].get(UID, 0).read(0, ES)
        b = cl.nodes["n3"].disks["d1"].get(UID, 0).read(0, ES)
        assert bytes(a) == bytes(b), "the rebuilt replica differs from the survivor"
        assert "v" not in [k for k, _ in cl.nodes["n3"].joins]
        await cl.stop()
    run(go())


def test_a_failed_joiner_is_dropped_and_writes_still_succeed(tmp_path):
    async def go():
        cl = await Cluster(tmp_path, timeout=0.3).start()
        cl.place("v", 1, 2)
        rec = cl.etcd.recs[("v", 0)]
        assert cl.etcd.cas(rec, rec.join(R("n3", "d1")))
        cl.sync_views()
        cl.servers["n3"].close()
        cl.addresses["n3"] = "127.0.0.1:9"
        e1 = cl.engine("n1", n_extents=1)
        await e1.write(0, memoryview(b"q" * 4096), fua=True)
        now = cl.etcd.recs[("v", 0)]
        assert not now.joining and len(now.replicas) == 2 and now.dropped[-1].node == "n3"
        await cl.stop()
    run(go())


def test_leftover_partial_copy_is_discarded_and_copied_afresh(tmp_path):
    async def go():
        cl = await Cluster(tmp_path).start()
        cl.place("v", 1, 2)
        e1 = cl.engine("n1", n_extents=1)
        await e1.write(0, memoryview(b"w" * 65536), fua=False)
        rec = cl.etcd.recs[("v", 0)]
        joined = rec.without([R("n2", "d1")], "t").join(R("n3", "d1"))
        assert cl.etcd.cas(rec, joined)
        cl.sync_views()
        # a replica file from an earlier attempt (a daemon restart): not trusted
        cl.nodes["n3"].disks["d1"].open_replica(UID, 0, ES, joined.generation, True).write(0, b"junk")
        rb = Rebuilder(cl.nodes["n3"], rate=64 * ES)
        rb.poke()
        for _ in range(100):
            await asyncio.sleep(0.05)
            cl.sync_views()
            rb.poke()
            if cl.etcd.recs[("v", 0)].holds("n3"):
                break
        final = cl.etcd.recs[("v", 0)]
        assert final.holds("n3") and final.generation == joined.generation + 1   # promoted
        assert bytes(cl.nodes["n3"].disks["d1"].get(UID, 0).read(0, 65536)) == b"w" * 65536
        await cl.stop()
    run(go())


def test_a_write_landing_between_the_copys_read_and_write_is_not_undone(tmp_path):
    """The race the copy must survive, made certain: a chunk is read from the
    survivor, then a write to that chunk reaches both replicas, then the copy
    writes the (older) chunk it read. The write must win on the new replica."""
    async def go():
        cl = await Cluster(tmp_path).start()
        cl.place("v", 1, 2)
        e1 = cl.engine("n1", n_extents=1)
        await e1.write(0, memoryview(b"o" * ES), fua=False)      # old data everywhere
        rec = cl.etcd.recs[("v", 0)]
        assert cl.etcd.cas(rec, rec.without([R("n2", "d1")], "t").join(R("n3", "d1")))
        cl.sync_views()

        class Racy(Rebuilder):
            async def _read(self, volume, index, uid, off, n):
                got = await super()._read(volume, index, uid, off, n)
                if off == 0:   # between this read and its write: a client write to the chunk
                    await e1.write(1000, memoryview(b"N" * 5000), fua=False)
                return got

        rb = Racy(cl.nodes["n3"], rate=64 * ES, chunk=64 << 10)
        rb.poke()
        for _ in range(100):
            await asyncio.sleep(0.05)
            cl.sync_views()
            if cl.etcd.recs[("v", 0)].holds("n3"):
                break
        assert cl.etcd.recs[("v", 0)].holds("n3")
        got = bytes(cl.nodes["n3"].disks["d1"].get(UID, 0).read(0, 8192))
        assert got == b"o" * 1000 + b"N" * 5000 + b"o" * 2192
        await cl.stop()
    run(go())


def test_volume_status_shows_rebuild_progress():
    from braid.cli.output import _field
    from braid.v1 import storage_pb2
    from controller.volumes import volume_status
    vol = storage_pb2.Volume()
    vol.metadata.name = "v"
    vol.spec.size_bytes, vol.spec.replicas, vol.spec.extent_size_bytes = 2 * ES, 2, ES
    a = X.ExtentRecord("v", UID, 0, ES, 3, (R("n1", "d1"),), joining=(R("n3", "d1"),))
    b = X.ExtentRecord("v", UID, 1, ES, 1, (R("n1", "d1"), R("n2", "d1")))
    st = volume_status(vol, {0: a, 1: b}, {}, "", [], {"v/0": (ES // 4, ES)})
    assert st.phase == "Rebuilding" and abs(st.rebuild_progress - 0.25) < 1e-9 and "n3" in st.message
    vol.status.CopyFrom(st)
    assert _field(vol, "status|volphase") == "Rebuilding 25%"
    st = volume_status(vol, {0: a.promote(R("n3", "d1")), 1: b}, {}, "", [], {})
    assert st.phase == "Healthy" and st.rebuild_progress == 0


def test_a_node_just_dropped_is_not_chosen_again():
    d = [X.DiskCandidate("n2", "d1", 50 * ES), X.DiskCandidate("n3", "d1", 10 * ES)]
    rec = X.ExtentRecord("v", UID, 0, ES, 1, (R("n1", "d1"), R("n2", "d1"))).without([R("n2", "d1")], "dead")
    at = rec.dropped[-1].at
    assert at > 0 and X.ExtentRecord.from_json(rec.to_json()) == rec
    assert X.repair(rec, 2, lambda r: True, d, now=at + 1) == ("join", R("n3", "d1"))
    assert X.repair(rec, 2, lambda r: True, d[:1], now=at + 1) is None
    assert X.repair(rec, 2, lambda r: True, d, now=at + X.DROP_COOLDOWN + 1) == ("join", R("n2", "d1"))


def test_a_lost_joiner_is_dropped_and_surplus_members_trimmed():
    d = [X.DiskCandidate("n3", "d1", 10 * ES), X.DiskCandidate("n4", "d1", 10 * ES)]
    rec = X.ExtentRecord("v", UID, 0, ES, 3, (R("n1", "d1"),), joining=(R("n3", "d1"),))
    dead = lambda r: r.node != "n3"  # noqa: E731 - n3's daemon is gone
    assert X.repair(rec, 2, dead, d) == ("drop", [R("n3", "d1")])
    after = rec.without([R("n3", "d1")], "gone")
    assert X.repair(after, 2, dead, d, now=after.dropped[-1].at + 1) == ("join", R("n4", "d1"))
    three = X.ExtentRecord("v", UID, 0, ES, 5, (R("n1", "d1"), R("n2", "d1"), R("n3", "d1")))
    assert X.repair(three, 2, lambda r: True, d) == ("drop", [R("n3", "d1")])
    assert X.repair(three.join(R("n4", "d1")), 2, lambda r: True, d) is None   # not while copying
