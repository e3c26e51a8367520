"""Scrubbing with real storage daemons: bytes of one replica's file are
corrupted behind the daemon's back; client reads stay right (served by the
other replica), and the next scrub pass finds the bad blocks and rewrites
them from the good replica (DiskPool status.scrub shows it)."""

from __future__ import annotations

import os

import pytest

from tests.conftest import wait
from tests.integration.storage_cluster import create_volume, need_tools, records, run, storage_cluster

pytestmark = pytest.mark.integration
MiB = 1 << 20


def test_scrub_finds_and_repairs_a_corrupted_replica(etcd_server, tmp_path):
    need_tools("qemu-io")
    with storage_cluster(etcd_server, tmp_path, "scrub", nodes=2,
                         storaged_args=["--scrub-interval", "2", "--scrub-rate", "256"]) as cl:
        create_volume(cl, "svol", 32 * MiB, replicas=2, extent_size=16 * MiB)
        a, b = cl.nodes
        uri = a.unix_uri("svol")
        run(["qemu-io", "-f", "raw", "-c", "write -P 0x5a 0 8M", "-c", "flush", uri])
        uid = records(cl, "svol")[0].uid
        victim = b.disk / "replicas" / uid / "0.data"
        with open(victim, "r+b") as f:   # corrupt 3 blocks' worth of bytes in b's copy
            for off in (4096 * 10 + 7, 4096 * 200, 4096 * 1000 + 4000):
                f.seek(off)
                f.write(os.urandom(64))
        # reads through b (whose own copy is bad) still return the data
        r = run(["qemu-io", "-f", "raw", "-c", "read -P 0x5a 0 8M", b.unix_uri("svol")])
        assert "Pattern verification failed" not in r.stdout, r.stdout

        def scrubbed():
            st = cl.api.get("diskpool", b.name).status.scrub
            return st if st.repaired >= 3 and st.passes >= 1 else None

        st = wait(scrubbed, 60, f"{b.name}'s scrub to repair the corrupted blocks")
        print(f"\nscrub on {b.name}: {st.checksum_errors} bad blocks, {st.repaired} repaired, "
              f"pass of {st.bytes_verified} bytes in {st.last_pass_seconds}s")
        assert st.checksum_errors == 3 and st.unrepaired == 0 and st.mismatches == 0
        with open(victim, "rb") as f:   # b's own file holds the right bytes again
            for off in (4096 * 10, 4096 * 200, 4096 * 1000):
                f.seek(off)
                assert f.read(4096) == b"\x5a" * 4096, off
        assert cl.api.get("diskpool", a.name).status.scrub.mismatches == 0
