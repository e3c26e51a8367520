"""The replicated data path in one process: three StorageNodes with real
replica files and real loopback replication servers, an in-memory extent map
with etcd's compare-and-set semantics. Drops, generation fencing, reads from
peers, flush fan-out."""

from __future__ import annotations

import asyncio
import errno

import pytest

from braid import extents as X
from storage_daemon import peer as P
from storage_daemon.datapath import ExtentView, StorageNode, VolumeEngine, VolumeInfo
from storage_daemon.extent_store import DiskStore
from storage_daemon.nbd import NbdError

MiB = 1 << 20
UID = "0b9c4a5e-6f1d-4e2a-9b3c-1d2e3f4a5b6c"
ES = 4 * MiB


class FakeEtcd:
    """The extent records with CAS, like the daemon's etcd helpers."""

    def __init__(self):
        self.recs: dict[tuple[str, int], X.ExtentRecord] = {}
        self.rev = 1
        self.cas_calls = 0

    def get(self, volume, index):
        r = self.recs.get((volume, index))
        return (r, self.rev) if r else (None, 0)

    def cas(self, old, new):
        self.cas_calls += 1
        if self.recs.get((old.volume, old.index)) != old:
            return False
        self.recs[(old.volume, old.index)] = new
        self.rev += 1
        return True


class Cluster:
    def __init__(self, tmp, n=3, timeout=0.5):
        self.etcd = FakeEtcd()
        self.addresses: dict[str, str] = {}
        self.nodes: dict[str, StorageNode] = {}
        self.servers = {}
        self.tmp = tmp
        self.timeout = timeout
        self.names = [f"n{i}" for i in range(1, n + 1)]

    async def start(self):
        for name in self.names:
            view = ExtentView()
            disk = DiskStore(self.tmp / name, "d1")
            sn = StorageNode(name, {"d1": disk}, view, self.addresses.get, self.etcd.get, self.etcd.cas,
                             peer_timeout=self.timeout)
            srv = await sn.serve_peers("127.0.0.1", 0)
            self.addresses[name] = f"127.0.0.1:{srv.sockets[0].getsockname()[1]}"
            self.nodes[name], self.servers[name] = sn, srv
        return self

    def place(self, volume, n_extents, replicas):
        for i in range(n_extents):
            reps = tuple(X.Replica(self.names[(i + k) % len(self.names)], "d1") for k in range(replicas))
            rec = X.ExtentRecord(volume, UID, i, ES, 1, reps)
            self.etcd.recs[(volume, i)] = rec
            self.sync_views()

    def sync_views(self):
        for sn in self.nodes.values():
            for rec in self.etcd.recs.values():
                sn.track_joins(sn.view.put(rec, self.etcd.rev))

    def engine(self, node, volume="v", n_extents=4, replicas=2):
        return VolumeEngine(self.nodes[node], VolumeInfo(volume, UID, n_extents * ES, ES, replicas))

    async def stop(self):
        for sn in self.nodes.values():
            for c in sn.peers.values():
                await c.close()
        for srv in self.servers.values():
            srv.close()
        for sn in self.nodes.values():
            for d in sn.disks.values():
                d.close()


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 30))


def test_writes_reach_every_replica_and_read_back_from_any_node(tmp_path):
    async def go():
        cl = await Cluster(tmp_path).start()
        cl.place("v", 4, 2)
        e1 = cl.engine("n1")
        data = bytes(range(256)) * 64 * 3   # 48 KiB crossing no extent boundary
        await e1.write(ES - 8192, memoryview(data), fua=False)  # crosses extent 0 -> 1
        await e1.flush()
        for node in cl.names:  # every node reads the same, local or from a peer
            got = await cl.engine(node).read(ES - 8192, len(data))
            assert bytes(got) == data, node
        # the replicas themselves hold it: extent 0 on n1+n2, extent 1 on n2+n3
        for node, idx, off in (("n1", 0, ES - 8192), ("n2", 0, ES - 8192), ("n2", 1, 0), ("n3", 1, 0)):
            rf = cl.nodes[node].disks["d1"].get(UID, idx)
            n = 8192 if idx == 0 else len(data) - 8192
            assert bytes(rf.read(off, n)) == (data[:8192] if idx == 0 else data[8192:]), (node, idx)
        assert cl.nodes["n1"].disks["d1"].get(UID, 1) is None  # not a replica holder: nothing created
        await cl.stop()
    run(go())


def test_a_silent_replica_is_dropped_before_the_write_is_acked(tmp_path):
    async def go():
        cl = await Cluster(tmp_path, timeout=0.3).start()
        cl.place("v", 2, 2)          # extent 0: n1+n2, extent 1: n2+n3
        cl.servers["n2"].close()     # n2 stops answering: new connections refused
        cl.addresses["n2"] = "127.0.0.1:9"  # discard port: nothing listens
        e1 = cl.engine("n1", n_extents=2)
        await e1.write(0, memoryview(b"a" * 4096), fua=True)
        rec = cl.etcd.recs[("v", 0)]
        assert rec.generation == 2 and rec.holds("n2") is None and rec.dropped[0].node == "n2"
        assert bytes(await e1.read(0, 4096)) == b"a" * 4096
        # extent 1 with n2 and n3: n3 survives alone
        await e1.write(ES, memoryview(b"b" * 4096), fua=False)
        assert [r.node for r in cl.etcd.recs[("v", 1)].replicas] == ["n3"]
        assert bytes(await e1.read(ES, 4096)) == b"b" * 4096
        assert cl.nodes["n1"].counters.drops == 2
        await cl.stop()
    run(go())


def test_stale_generation_is_refused_and_the_sender_refreshes(tmp_path):
    async def go():
        cl = await Cluster(tmp_path).start()
        cl.place("v", 1, 3)
        # n3 is dropped by someone else; n1's view still says generation 1
        old = cl.etcd.recs[("v", 0)]
        new = old.without([X.Replica("n3", "d1")], "test")
        assert cl.etcd.cas(old, new)
        for name in ("n2", "n3"):
            cl.nodes[name].view.put(new, cl.etcd.rev)
        e1 = cl.engine("n1", n_extents=1, replicas=3)
        await e1.write(0, memoryview(b"c" * 4096), fua=False)   # ESTALE from n2 -> refresh -> resend
        assert cl.nodes["n1"].view.get("v", 0).generation == 2
        assert cl.nodes["n2"].counters.stale_refusals >= 1
        # n3, dropped, refuses anything for this extent, whatever generation it is sent
        client = cl.nodes["n1"].peer("n3")
        for gen in (1, 2):
            with pytest.raises(P.PeerError) as exc:
                await client.call(P.OP_WRITE, "v", UID, 0, gen, 0, payload=b"x" * 4096)
            assert exc.value.status == errno.ESTALE and exc.value.generation == 2
        # and it never got the write
        rf = cl.nodes["n3"].disks["d1"].get(UID, 0)
        assert rf is None or bytes(rf.read(0, 4096)) != b"c" * 4096
        await cl.stop()
    run(go())


def test_every_replica_failing_is_an_io_error_not_a_silent_loss(tmp_path):
    async def go():
        cl = await Cluster(tmp_path, timeout=0.2).start()
        cl.place("v", 1, 2)
        rec = cl.etcd.recs[("v", 0)]
        other = [r.node for r in rec.replicas if r.node != "n3"]
        for name in other:
            cl.servers[name].close()
            cl.addresses[name] = "127.0.0.1:9"
        e3 = cl.engine("n3", n_extents=1)   # n3 holds no replica of extent 0
        with pytest.raises(NbdError) as exc:
            await e3.write(0, memoryview(b"d" * 4096), fua=False)
        assert exc.value.errno == errno.EIO and "every replica failed" in str(exc.value)
        assert cl.etcd.recs[("v", 0)] == rec   # nothing dropped: no survivor to hold the write
        await cl.stop()
    run(go())


def test_flush_syncs_local_and_peer_replicas(tmp_path, monkeypatch):
    import os
    synced = []
    real = os.fdatasync
    monkeypatch.setattr(os, "fdatasync", lambda fd: (synced.append(fd), real(fd))[1])

    async def go():
        cl = await Cluster(tmp_path).start()
        cl.place("v", 1, 3)
        e1 = cl.engine("n1", n_extents=1, replicas=3)
        await e1.write(0, memoryview(b"e" * 8192), fua=False)
        synced.clear()
        await e1.flush()
        assert len(synced) >= 6   # data + crc file on each of 3 replicas
        synced.clear()
        await e1.flush()          # nothing written since: nothing to sync
        assert synced == []
        await cl.stop()
    run(go())


def test_block_status_and_zeroes(tmp_path):
    async def go():
        cl = await Cluster(tmp_path).start()
        cl.place("v", 2, 2)
        e1 = cl.engine("n1", n_extents=2)
        assert await e1.block_status(0, 2 * ES) == [(ES, 3)]   # nothing written: one hole, first extent
        await e1.write(64 * 1024, memoryview(b"f" * 4096), fua=False)
        runs = await e1.block_status(0, ES)
        assert sum(n for n, _ in runs) == ES and (4096, 0) in runs
        await e1.write_zeroes(64 * 1024, 4096, fua=False, may_trim=True)
        assert bytes(await e1.read(64 * 1024, 4096)) == bytes(4096)
        assert bytes(await cl.engine("n2", n_extents=2).read(64 * 1024, 4096)) == bytes(4096)
        await cl.stop()
    run(go())


def test_garbage_frames_close_the_connection_and_the_server_lives_on(tmp_path):
    async def go():
        cl = await Cluster(tmp_path).start()
        cl.place("v", 1, 2)
        host, port = cl.addresses["n2"].rsplit(":", 1)
        r, w = await asyncio.open_connection(host, int(port))
        w.write(b"\x00" * P.REQ.size)
        assert await asyncio.wait_for(r.read(), 5) == b""   # closed, no reply
        w.close()
        # unknown volume / uid / out of range: error replies, connection stays usable
        client = cl.nodes["n1"].peer("n2")
        with pytest.raises(P.PeerError) as exc:
            await client.call(P.OP_READ, "nope", UID, 0, 1, 0, 4096)
        assert exc.value.status == errno.ENOENT
        with pytest.raises(P.PeerError) as exc:
            await client.call(P.OP_READ, "v", UID, 0, 1, ES - 10, 4096)
        assert exc.value.status == errno.EINVAL
        gen, data = await client.call(P.OP_READ, "v", UID, 0, 1, 0, 4096)
        assert gen == 1 and data == bytes(4096)
        await cl.stop()
    run(go())


def test_a_replica_that_accepts_but_never_answers_is_dropped_after_the_timeout(tmp_path):
    async def go():
        cl = await Cluster(tmp_path, timeout=0.3).start()
        cl.place("v", 1, 2)   # extent 0 on n1 + n2

        async def black_hole(reader, writer):   # a hung daemon: takes the bytes, says nothing
            while await reader.read(1 << 16):
                pass
        hole = await asyncio.start_server(black_hole, "127.0.0.1", 0)
        cl.addresses["n2"] = f"127.0.0.1:{hole.sockets[0].getsockname()[1]}"
        e1 = cl.engine("n1", n_extents=1)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        await e1.write(0, memoryview(b"g" * 4096), fua=False)
        took = loop.time() - t0
        assert 0.3 <= took < 3, took
        rec = cl.etcd.recs[("v", 0)]
        assert [r.node for r in rec.replicas] == ["n1"] and "no answer in time" in rec.dropped[0].reason
        hole.close()
        await cl.stop()
    run(go())


def test_a_fenced_node_neither_writes_nor_gets_through_its_peers(tmp_path):
    async def go():
        cl = await Cluster(tmp_path).start()
        cl.place("v", 1, 2)   # extent 0 on n1 + n2
        e1 = cl.engine("n1", n_extents=1)
        await e1.write(0, memoryview(b"h" * 4096), fua=False)
        old = cl.etcd.recs[("v", 0)]
        fenced = old.fence("n1")     # HA: n1's VM runs elsewhere now
        assert cl.etcd.cas(old, fenced) and fenced.generation == old.generation + 1
        cl.nodes["n2"].view.put(fenced, cl.etcd.rev)   # the replicas know; n1's view is still old
        with pytest.raises(NbdError) as exc:
            await e1.write(0, memoryview(b"i" * 4096), fua=False)   # ESTALE -> refresh -> fenced
        assert exc.value.errno == errno.EPERM and "fenced" in str(exc.value)
        # n1 had already written its own replica: it took itself out of the set
        rec = cl.etcd.recs[("v", 0)]
        assert rec.holds("n1") is None and "written after fencing" in rec.dropped[0].reason
        cl.sync_views()
        assert bytes(await cl.engine("n2", n_extents=1).read(0, 4096)) == b"h" * 4096
        assert bytes(await cl.engine("n3", n_extents=1).read(0, 4096)) == b"h" * 4096
        # another node writes on (the VM's new home)
        await cl.engine("n3", n_extents=1).write(0, memoryview(b"j" * 4096), fua=False)
        assert bytes(await cl.engine("n2", n_extents=1).read(0, 4096)) == b"j" * 4096
        await cl.stop()
    run(go())


def test_without_etcd_a_failed_replica_cannot_be_dropped_so_the_write_fails(tmp_path):
    """The witness rule: acknowledging a write that one replica missed needs
    the CAS that drops it; cut off from etcd, the write fails instead."""
    async def go():
        cl = await Cluster(tmp_path, timeout=0.3).start()
        cl.place("v", 1, 2)   # extent 0 on n1 + n2
        cl.servers["n2"].close()
        cl.addresses["n2"] = "127.0.0.1:9"

        def no_etcd(old, new):
            raise ConnectionError("etcd unreachable")
        cl.nodes["n1"].etcd_cas = no_etcd
        with pytest.raises(NbdError) as exc:
            await cl.engine("n1", n_extents=1).write(0, memoryview(b"k" * 4096), fua=False)
        assert exc.value.errno == errno.EIO and "cannot be reached" in str(exc.value)
        assert cl.etcd.recs[("v", 0)].generation == 1   # nothing dropped
        await cl.stop()
    run(go())
