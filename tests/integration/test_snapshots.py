"""Snapshots, clones and reverts with real storage daemons, a real
controller and real NBD clients (qemu-io, and a raw client for ordered
writes).

* data: a snapshot keeps what the volume held; the volume, a linked clone
  and a full clone then diverge without touching it; revert brings it back;
  deleting the snapshot keeps what clones still share; deleting everything
  reclaims the space;
* accounting: allocated (what the guest sees) vs physical (what only the
  volume holds);
* crash consistency: a client writes sequence-numbered blocks one after the
  other, spread over every extent, while the snapshot is taken; the snapshot
  must hold exactly a prefix of them (a write is in it only if every write
  before it is).
"""

from __future__ import annotations

import socket
import struct
import threading
import time

import pytest

from braid import extents as X
from braid.v1 import storage_pb2
from tests.conftest import wait
from tests.integration.storage_cluster import create_volume, need_tools, records, run, storage_cluster
from tests.nbd_rawclient import CMD_READ, CMD_WRITE, RawClient

pytestmark = pytest.mark.integration
MiB = 1 << 20
ES = 4 * MiB


def snapshot(cl, volume: str, name: str, timeout: float = 30) -> storage_pb2.Snapshot:
    s = storage_pb2.Snapshot()
    s.metadata.name, s.spec.volume = name, volume
    cl.api.create(s)

    def ready():
        got = cl.api.get("snapshot", name)
        assert got.status.phase != "Failed", got.status.message
        return got if got.status.phase == "Ready" else None
    return wait(ready, timeout, f"snapshot {name} Ready", interval=0.05)


def clone(cl, snap: str, name: str, full: bool = False, phase: str = "Healthy", timeout: float = 60):
    v = storage_pb2.Volume()
    v.metadata.name = name
    v.spec.source_snapshot, v.spec.full_clone = snap, full
    cl.api.create(v)
    got = wait(lambda: (lambda x: x if x.status.phase == phase else None)(cl.api.get("volume", name)),
               timeout, f"clone {name} {phase}")
    wait(lambda: all(m.socket(name).exists() for m in cl.nodes), 15, f"NBD sockets of {name}")
    return got


def pattern(uri: str, byte: int, off: int, length: int, write: bool = False) -> None:
    op = "write" if write else "read"
    r = run(["qemu-io", "-f", "raw", "-c", f"{op} -P {byte:#x} {off} {length}", uri])
    assert "Pattern verification failed" not in r.stdout, f"{uri} {off}+{length} is not {byte:#x}:\n{r.stdout}"


def test_snapshot_clone_revert_delete_and_accounting(etcd_server, tmp_path):
    need_tools("qemu-io")
    with storage_cluster(etcd_server, tmp_path, "snaps", nodes=3,
                         storaged_args=["--report-interval", "0.5"]) as cl:
        a, b, c = cl.nodes
        create_volume(cl, "vol", 4 * ES, replicas=2, extent_size=ES)
        pattern(a.unix_uri("vol"), 0x11, 0, 4 * ES, write=True)
        old = records(cl, "vol")
        s1 = snapshot(cl, "vol", "s1")
        st = s1.status
        print(f"\nsnapshot of a 16 MiB volume: writes held {st.pause_seconds * 1000:.1f} ms")
        assert (st.extents, st.size_bytes, st.volume_uid) == (4, 4 * ES, old[0].uid)
        snap_recs = records(cl, "@s1")
        assert [snap_recs[i].data_id for i in range(4)] == [old[i].data_id for i in range(4)]
        new = records(cl, "vol")
        assert all(new[i].base == (old[i].data_id,) and new[i].generation == old[i].generation + 1
                   for i in range(4))

        pattern(b.unix_uri("vol"), 0x22, 0, ES, write=True)        # extent 0 diverges
        for m in cl.nodes:
            pattern(m.unix_uri("vol"), 0x22, 0, ES)
            pattern(m.unix_uri("vol"), 0x11, ES, 3 * ES)
        wait(lambda: not records(cl, "vol")[0].base, 10, "extent 0 to forget its base")
        assert records(cl, "vol")[1].base == (old[1].data_id,)

        def accounted():
            v = cl.api.get("volume", "vol").status
            return v if v.allocated_bytes == 4 * ES and v.physical_bytes == ES else None
        v = wait(accounted, 15, "allocated 16 MiB, physical 4 MiB")
        print(f"volume: allocated {v.allocated_bytes >> 20} MiB, physical {v.physical_bytes >> 20} MiB")
        wait(lambda: cl.api.get("snapshot", "s1").status.allocated_bytes == 4 * ES, 15,
             "snapshot allocated 16 MiB")

        # a linked clone reads the snapshot, writes its own data
        c1 = clone(cl, "s1", "c1")
        assert c1.spec.size_bytes == 4 * ES and c1.spec.extent_size_bytes == ES
        crec = records(cl, "c1")
        assert all(crec[i].base == (old[i].data_id,) and crec[i].replicas == snap_recs[i].replicas
                   for i in range(4))
        pattern(c.unix_uri("c1"), 0x11, 0, 4 * ES)
        pattern(a.unix_uri("c1"), 0x33, ES, ES, write=True)
        pattern(b.unix_uri("c1"), 0x33, ES, ES)
        pattern(b.unix_uri("vol"), 0x11, ES, ES)                   # the volume did not change

        # a full clone copies everything, then shares nothing
        clone(cl, "s1", "f1", full=True)
        wait(lambda: all(not r.base for r in records(cl, "f1").values()), 30, "full clone f1 copied")
        wait(lambda: cl.api.get("volume", "f1").status.phase == "Healthy", 10, "f1 Healthy")
        pattern(a.unix_uri("f1"), 0x11, 0, 4 * ES)

        # revert: the volume's data is the snapshot's again
        r = cl.api.revert_volume("vol", "s1")
        assert r.extents == 4
        for m in cl.nodes:
            pattern(m.unix_uri("vol"), 0x11, 0, 4 * ES)

        # deleting the snapshot keeps the data the clone (and the volume) still share
        cl.api.delete("snapshot", "s1")
        wait(lambda: not records(cl, "@s1"), 10, "s1's records removed")
        time.sleep(2.0)   # several garbage collection passes (report interval 0.5 s)
        for m in cl.nodes:
            pattern(m.unix_uri("c1"), 0x11, 0, ES)
            pattern(m.unix_uri("c1"), 0x33, ES, ES)
            pattern(m.unix_uri("vol"), 0x11, 0, 4 * ES)
        old_files = {f"{old[i].data_id}/{i}.data" for i in range(4)}

        def held_files():
            return {f"{p.parent.name}/{p.name}" for m in cl.nodes for p in m.replica_files()} & old_files
        assert held_files() == old_files
        for name in ("c1", "vol"):
            cl.api.delete("volume", name)
        wait(lambda: not held_files(), 20, "the snapshot's data reclaimed once nothing derives from it")
        pattern(a.unix_uri("f1"), 0x11, 0, 4 * ES)


class OrderedWriter(threading.Thread):
    """Writes block k (its number, repeated) one at a time, each only after
    the previous one was acknowledged, spreading consecutive blocks over all
    extents."""

    def __init__(self, sock_path: str, extents: int, count: int):
        super().__init__(daemon=True)
        self.sock_path, self.extents, self.count = sock_path, extents, count
        self.acked = 0
        self.error: BaseException | None = None

    @staticmethod
    def offset(k: int, extents: int) -> int:
        return (k % extents) * ES + (k // extents) * 4096

    def run(self) -> None:
        try:
            s = socket.socket(socket.AF_UNIX)
            s.connect(self.sock_path)
            c = RawClient(s)
            c.connect("")
            for k in range(1, self.count + 1):
                r = c.call(CMD_WRITE, self.offset(k, self.extents), 4096, payload=struct.pack("<Q", k) * 512)
                assert r.error == 0, f"write {k}: error {r.error}"
                self.acked = k
            c.close()
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.error = exc


def test_snapshot_under_ordered_writes_is_crash_consistent(etcd_server, tmp_path):
    extents, count = 4, 1500
    with storage_cluster(etcd_server, tmp_path, "snapcc", nodes=3) as cl:
        create_volume(cl, "cc", extents * ES, replicas=2, extent_size=ES)
        w = OrderedWriter(str(cl.nodes[0].socket("cc")), extents, count)
        w.start()
        wait(lambda: w.acked >= 200 or w.error, 60, "the writer under way", interval=0.01)
        before = w.acked
        s = snapshot(cl, "cc", "cut")
        after = w.acked
        w.join(120)
        assert w.error is None, w.error
        assert w.acked == count and before < after < count, (before, after, w.acked)
        print(f"\nsnapshot taken between writes {before} and {after}; writes held "
              f"{s.status.pause_seconds * 1000:.1f} ms")
        clone(cl, "cut", "cut-view")
        sock = socket.socket(socket.AF_UNIX)
        sock.connect(str(cl.nodes[1].socket("cut-view")))
        rc = RawClient(sock)
        rc.connect("")
        seen = []
        for k in range(1, count + 1):
            r = rc.call(CMD_READ, OrderedWriter.offset(k, extents), 4096)
            assert r.error == 0
            v = struct.unpack_from("<Q", r.data)[0]
            assert v in (0, k), f"block {k} holds {v}"
            seen.append(v == k)
        rc.close()
        m = seen.index(False) if False in seen else count
        assert not any(seen[m:]), f"the snapshot holds write {seen.index(True, m) + 1} but not write {m + 1}"
        assert before <= m <= after, (before, m, after)
        print(f"the snapshot holds exactly writes 1..{m}")
        # and the volume itself holds them all
        sock = socket.socket(socket.AF_UNIX)
        sock.connect(str(cl.nodes[2].socket("cc")))
        rc = RawClient(sock)
        rc.connect("")
        for k in (1, m, m + 1, count):
            r = rc.call(CMD_READ, OrderedWriter.offset(k, extents), 4096)
            assert struct.unpack_from("<Q", r.data)[0] == k
        rc.close()
        assert X.snapshot_extents("cut") == "@cut"
