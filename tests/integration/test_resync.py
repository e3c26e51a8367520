"""A replica that comes back resyncs only what changed while it was away: real
storage daemons (kill -9 and restart), a real controller and etcd, real NBD
clients (qemu-img, qemu-io)."""

from __future__ import annotations

import re
import time

from tests.conftest import wait
from tests.integration.storage_cluster import (
    create_volume,
    need_tools,
    random_file,
    records,
    run,
    sha256,
    storage_cluster,
)
from tests.integration.test_storage import live_peer_address, peer_call

MiB = 1 << 20
EXTENT = 16 * MiB


def test_a_killed_replica_comes_back_and_copies_only_what_changed(etcd_server, tmp_path):
    """Two nodes, replicas=2: with no third node, the extents the killed daemon
    missed writes of can only be rebuilt on it once it is back. Its old copies
    were complete when it was dropped and the survivor logged what was written
    since, so it copies those chunks (1 MiB each) and not the 16 MiB extents."""
    need_tools("qemu-img", "qemu-io")
    with storage_cluster(etcd_server, tmp_path, "rsy", nodes=2, rebuild_delay=3,
                         storaged_args=["--resync-margin", "2"]) as cl:
        name = "vol-rsy"
        create_volume(cl, name, 4 * EXTENT, replicas=2, extent_size=EXTENT)
        serving, victim = cl.nodes
        image = random_file(tmp_path / "image", 4 * EXTENT)
        run(["qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(image), serving.unix_uri(name)])
        t_write = time.time()
        # the first writes must lie before the drop by more than the margin (2 s) and the
        # log's time granularity (1 s): else they count as maybe missed, and are copied
        time.sleep(4)
        before = records(cl, name)

        victim.kill()
        # while it is away: 64 KiB in extent 1 (across its chunks 2 and 3), 4 KiB in extent 3
        changes = [(EXTENT + 3 * MiB - 32 * 1024, 64 * 1024, 0xA1), (3 * EXTENT + 5 * MiB, 4096, 0xB2)]
        for off, n, pattern in changes:
            run(["qemu-io", "-f", "raw", "-c", f"write -P {pattern} {off} {n}", serving.unix_uri(name)])
        with open(image, "r+b") as f:
            for off, n, pattern in changes:
                f.seek(off)
                f.write(bytes([pattern]) * n)
        dropped = records(cl, name)
        assert [i for i, r in dropped.items() if r.holds(victim.name) is None] == [1, 3], dropped
        time.sleep(2.5)   # (so that its restart is after the drop, to the second)

        victim.start()
        t0 = time.monotonic()

        def whole():
            recs = records(cl, name)
            ok = all(r.holds(victim.name) and r.holds(serving.name) and not r.joining for r in recs.values())
            return recs if ok and cl.api.get("volume", name).status.phase == "Healthy" else None

        healed = wait(whole, 60, "the victim back in every extent and the volume Healthy")
        took = time.monotonic() - t0
        for i in (1, 3):
            assert healed[i].generation > dropped[i].generation
        for i in (0, 2):   # never written while it was away: nothing to do
            assert healed[i].generation == before[i].generation

        log = victim.proc.log.read_text(errors="replace")
        copied = {int(m[1]): (int(m[2]), int(m[3])) for m in re.finditer(
            r"resync of extent/vol-rsy/(\d+) on \S+ from generation \d+: copying (\d+) of (\d+) bytes", log)}
        print(f"\nvictim whole again {took:.1f}s after its restart; resynced bytes per extent: {copied}")
        assert copied == {1: (2 * MiB, EXTENT), 3: (MiB, EXTENT)}, (copied, t_write, dropped)
        assert "discarding an old copy" not in log

        # both replicas hold the same bytes, and the volume reads back as written, from either node
        addr = {m.name: live_peer_address(cl, m.name) for m in cl.nodes}
        for i, r in healed.items():
            for off in range(0, EXTENT, 4 * MiB):
                got = {peer_call(addr[rep.node], 1, name, r.uid, i, r.generation, off, 4 * MiB)[1]
                       for rep in r.replicas}
                assert len(got) == 1, f"extent {i} differs between its replicas at {off}"
        for m in cl.nodes:
            out = tmp_path / f"read-{m.name}"
            run(["qemu-img", "convert", "-f", "raw", "-O", "raw", m.unix_uri(name), str(out)])
            assert sha256(out) == sha256(image), f"volume read through {m.name} differs"
