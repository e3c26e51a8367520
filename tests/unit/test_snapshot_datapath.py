"""Snapshots in the data path, in one process (three StorageNodes with real
replica files and loopback replication, the extent map with CAS semantics):
records split by ``freeze``, redirect-on-write reads from the base, the
first write copying the base, the base forgotten once every replica has its
own copy, writes held while the map changes, and the sparse local copy."""

from __future__ import annotations

import asyncio
import os

from braid import extents as X
from storage_daemon.extent_store import DiskStore
from tests.unit.test_datapath import ES, UID, Cluster, run

SNAP_UID = "5a0b0c0d-0e0f-4011-8213-141516171819"
CLONE_UID = "6a0b0c0d-0e0f-4011-8213-141516171819"


def test_freeze_and_derive_records_round_trip():
    rec = X.ExtentRecord("v", UID, 2, ES, 5, (X.Replica("n1", "d1"), X.Replica("n2", "d1")),
                         joining=(X.Replica("n3", "d1"),))
    snap, nxt = rec.freeze("s1", SNAP_UID, "data-2")
    assert snap.key == "extent/@s1/000002" and snap.uid == SNAP_UID and snap.data_id == UID
    assert snap.generation == 5 and not snap.joining and snap.replicas == rec.replicas
    assert nxt.generation == 6 and nxt.data_id == "data-2" and nxt.base == (UID,) and nxt.joining == rec.joining
    clone = snap.derive("c1", CLONE_UID, "data-3")
    assert clone.generation == 1 and clone.base == (UID,) and clone.uid == CLONE_UID
    snap2, nxt2 = nxt.freeze("s2", SNAP_UID, "data-4")
    assert snap2.data_id == "data-2" and snap2.base == (UID,) and nxt2.base == ("data-2", UID)
    for r in (snap, nxt, clone, nxt2):
        assert X.ExtentRecord.from_json(r.to_json()) == r
    assert b'"data"' not in rec.to_json()   # unchanged records keep their old form
    for bad in (b'"data":"../x"', b'"base":["a/b"]', b'"base":"x"'):
        raw = rec.to_json()[:-1] + b"," + bad + b"}"
        try:
            X.ExtentRecord.from_json(raw)
            raise AssertionError(f"accepted {bad!r}")
        except X.BadRecord:
            pass


def test_clone_replica_copies_data_holes_and_checksums(tmp_path):
    a, b = DiskStore(tmp_path / "a", "a"), DiskStore(tmp_path / "b", "b")
    src = a.open_replica("src", 0, ES, 3, True)
    blob = os.urandom(64 << 10)
    src.write(4096, blob)
    src.write(ES - 8192, b"x" * 8192)
    for disk in (a, b):   # same disk, and another disk of the node
        dst = disk.clone_replica(src, "dst", 0, 7)
        assert dst.meta.generation == 7 and dst.meta.volume == "dst"
        assert bytes(dst.read(4096, len(blob))) == blob and bytes(dst.read(ES - 8192, 8192)) == b"x" * 8192
        assert bytes(dst.read(1 << 20, 4096)) == bytes(4096)
        assert dst.allocated_bytes() <= src.allocated_bytes() + 8192   # holes stay holes
        dst.write(4096, b"y" * 4096)   # the copy is independent
        assert bytes(src.read(4096, 4096)) == blob[:4096]
        assert disk.clone_replica(src, "dst", 0, 9) is dst   # once only
    a.close()
    b.close()


def _freeze(cl, volume, snap):
    for (v, i), rec in list(cl.etcd.recs.items()):
        if v == volume:
            frozen, nxt = rec.freeze(snap, SNAP_UID, X.new_data_id())
            cl.etcd.recs[(frozen.volume, i)] = frozen
            assert cl.etcd.cas(rec, nxt)
    cl.sync_views()


def test_snapshot_reads_redirect_and_first_write_copies(tmp_path):
    async def go():
        cl = await Cluster(tmp_path).start()
        cl.place("v", 2, 2)
        e1 = cl.engine("n1", n_extents=2)
        old = os.urandom(1 << 20)
        await e1.write(0, memoryview(old), fua=False)
        await e1.flush()
        _freeze(cl, "v", "s1")
        rec = cl.etcd.recs[("v", 0)]
        assert rec.base == (UID,)
        for node in cl.names:   # reads come from the snapshot's data: nothing was copied
            assert bytes(await cl.engine(node, n_extents=2).read(0, 1 << 20)) == old
        for rep in rec.replicas:
            assert cl.nodes[rep.node].disks["d1"].get(rec.data_id, 0) is None
        await e1.write(8192, memoryview(b"n" * 4096), fua=False)   # first write: each replica copies
        for rep in rec.replicas:
            own = cl.nodes[rep.node].disks["d1"].get(rec.data_id, 0)
            assert own is not None and bytes(own.read(0, 8192)) == old[:8192]
            assert bytes(own.read(8192, 4096)) == b"n" * 4096
            snap_rf = cl.nodes[rep.node].disks["d1"].get(UID, 0)
            assert bytes(snap_rf.read(8192, 4096)) == old[8192:12288]   # the snapshot is unchanged
        for _ in range(50):   # the base is forgotten once every replica has its own copy
            if not cl.etcd.recs[("v", 0)].base:
                break
            await asyncio.sleep(0.02)
        assert cl.etcd.recs[("v", 0)].base == () and cl.etcd.recs[("v", 1)].base == (UID,)
        cl.sync_views()
        expect = old[:8192] + b"n" * 4096 + old[12288:]
        for node in cl.names:
            assert bytes(await cl.engine(node, n_extents=2).read(0, 1 << 20)) == expect
        # a linked clone of the snapshot reads the old data, writes its own
        for i in range(2):
            d = cl.etcd.recs[("@s1", i)].derive("c", CLONE_UID, X.new_data_id())
            cl.etcd.recs[("c", i)] = d
        cl.sync_views()
        from storage_daemon.datapath import VolumeEngine, VolumeInfo
        ec = VolumeEngine(cl.nodes["n2"], VolumeInfo("c", CLONE_UID, 2 * ES, ES, 2))
        assert bytes(await ec.read(0, 1 << 20)) == old
        await ec.write(0, memoryview(b"c" * 4096), fua=False)
        assert bytes(await ec.read(0, 8192)) == b"c" * 4096 + old[4096:8192]
        assert bytes(await e1.read(0, 4096)) == old[:4096]
        # materialize (full clone): every extent gets its own copy, base forgotten
        assert await ec.materialize(1)
        assert cl.etcd.recs[("c", 1)].base == ()
        await cl.stop()
    run(go())


def test_hold_waits_for_writes_in_flight_and_blocks_new_ones(tmp_path):
    async def go():
        cl = await Cluster(tmp_path).start()
        cl.place("v", 1, 2)
        e1 = cl.engine("n1", n_extents=1)
        await e1.write(0, memoryview(b"a" * 4096), fua=False)
        await e1.hold()
        assert e1.inflight == 0
        late = asyncio.ensure_future(e1.write(0, memoryview(b"b" * 4096), fua=False))
        await asyncio.sleep(0.1)
        assert not late.done()                      # held
        _freeze(cl, "v", "s1")
        e1.release()
        await asyncio.wait_for(late, 5)
        rec = cl.etcd.recs[("v", 0)]
        snap = cl.nodes["n1"].disks["d1"].get(UID, 0)
        assert bytes(snap.read(0, 4096)) == b"a" * 4096   # the held write went to the new data
        assert bytes(await e1.read(0, 4096)) == b"b" * 4096 and rec.data_id != UID
        await cl.stop()
    run(go())
