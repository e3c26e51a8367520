"""Scrubbing in one process (three StorageNodes, real replica files, loopback
replication): a corrupted block is found and rewritten from a good replica;
replicas that differ with valid checksums are reported, not guessed at."""

from __future__ import annotations

import os

from storage_daemon.scrub import Scrubber
from tests.unit.test_datapath import ES, UID, Cluster, run


def _data_file(cl, node: str, index: int):
    return cl.nodes[node].disks["d1"].root / "replicas" / UID / f"{index}.data"


def test_a_corrupted_block_is_repaired_from_a_good_replica(tmp_path):
    async def go():
        cl = await Cluster(tmp_path).start()
        cl.place("v", 2, 2)                       # extent 0: n1+n2, extent 1: n2+n3
        e1 = cl.engine("n1", n_extents=2)
        data = os.urandom(2 * ES)
        await e1.write(0, memoryview(data), fua=True)
        # flip bytes in n2's copy of extent 0, behind the extent store's back
        path = _data_file(cl, "n2", 0)
        with open(path, "r+b") as f:
            f.seek(123456)
            f.write(b"\x00garbage\xff")
        cl.nodes["n2"].forget(UID, 0)
        cl.nodes["n2"].disks["d1"].close()
        from storage_daemon.extent_store import DiskStore
        cl.nodes["n2"].disks["d1"] = DiskStore(tmp_path / "n2", "d1")   # as after a restart
        # a client read never sees the bad bytes (the engine reads a peer's copy)
        assert bytes(await cl.engine("n2", n_extents=2).read(0, ES)) == data[:ES]
        st = await Scrubber(cl.nodes["n2"], rate=1 << 40).scrub_pass()
        assert (st.checksum_errors, st.repaired, st.unrepaired, st.mismatches) == (1, 1, 0, 0)
        assert st.bytes_verified == 2 * ES and st.passes == 1
        rf = cl.nodes["n2"].disks["d1"].get(UID, 0)
        assert bytes(rf.read(0, ES)) == data[:ES]          # verified and right again
        st = await Scrubber(cl.nodes["n2"], rate=1 << 40).scrub_pass()
        assert st.checksum_errors == 0
        await cl.stop()
    run(go())


def test_replicas_that_differ_with_valid_checksums_are_reported(tmp_path):
    async def go():
        cl = await Cluster(tmp_path).start()
        cl.place("v", 1, 2)                       # extent 0: n1 (first member) + n2
        e1 = cl.engine("n1", n_extents=1)
        await e1.write(0, memoryview(b"a" * 65536), fua=True)
        rf2 = cl.nodes["n2"].disks["d1"].get(UID, 0)
        rf2.write(4096, b"b" * 4096)              # a lost write, as it would look: valid crc
        st = await Scrubber(cl.nodes["n1"], rate=1 << 40).scrub_pass()
        assert st.mismatches == 1 and st.checksum_errors == 0
        st2 = await Scrubber(cl.nodes["n2"], rate=1 << 40).scrub_pass()   # not the first member: no compare
        assert st2.mismatches == 0
        await cl.stop()
    run(go())
