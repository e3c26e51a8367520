"""Replicated volumes end to end: real storage daemons, a real controller and
etcd, and real NBD clients (nbdinfo, qemu-img, nbdcopy, fio's nbd engine)."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import pytest

from braid import extents as X
from storage_daemon import peer as P
from tests.conftest import wait
from tests.integration.storage_cluster import (
    create_volume,
    fio_verify,
    need_tools,
    random_file,
    records,
    run,
    sha256,
    storage_cluster,
)

MiB, GiB = 1 << 20, 1 << 30


@pytest.fixture(scope="module")
def cl(etcd_server, tmp_path_factory):
    with storage_cluster(etcd_server, tmp_path_factory.mktemp("storage"), "st") as c:
        yield c


def test_volume_is_placed_on_distinct_nodes_and_shows_its_exports(cl):
    vol = create_volume(cl, "vol-place", GiB, replicas=2)
    assert (vol.status.extents, vol.status.healthy_extents) == (16, 16)
    recs = records(cl, "vol-place")
    assert sorted(recs) == list(range(16))
    for r in recs.values():
        assert r.generation == 1 and r.uid == vol.metadata.uid
        assert len({rep.node for rep in r.replicas}) == 2
    per_node = {m.name: sum(1 for r in recs.values() for rep in r.replicas if rep.node == m.name)
                for m in cl.nodes}
    assert max(per_node.values()) - min(per_node.values()) <= 1, per_node  # balanced: 32 replicas on 3
    uris = {e.uri for e in vol.status.exports}
    for m in cl.nodes:
        assert m.unix_uri("vol-place") in uris
    assert sum(1 for u in uris if u.startswith("nbd://127.0.0.1:")) == 3
    pools = {p.metadata.name: p for p in cl.api.list("diskpool")[0]}
    assert {m.name for m in cl.nodes} <= set(pools)
    assert all(p.status.disks[0].health == "Healthy" and p.status.disks[0].capacity_bytes > 0
               for n, p in pools.items() if n.startswith("st-"))


def test_nbdinfo_and_qemu_img_on_a_volume(cl, tmp_path):
    need_tools("nbdinfo", "qemu-img")
    create_volume(cl, "vol-img", 256 * MiB)
    uri = cl.nodes[0].unix_uri("vol-img")
    info = json.loads(run(["nbdinfo", "--json", uri]).stdout)
    export = info["exports"][0]
    assert export["export-size"] == 256 * MiB
    assert export.get("can_flush", export.get("can-flush")) in (True, None)
    img = json.loads(run(["qemu-img", "info", "--output=json", uri]).stdout)
    assert img["virtual-size"] == 256 * MiB

    src = random_file(tmp_path / "src.raw", 64 * MiB)
    run(["qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(src), uri])
    back = tmp_path / "back.raw"
    # read back through ANOTHER node (its data comes from the replicas, not this node's cache)
    other = cl.nodes[1].unix_uri("vol-img")
    run(["qemu-img", "convert", "-f", "raw", "-O", "raw", other, str(back)])
    with open(back, "rb") as f:
        assert hashlib_prefix(f, 64 * MiB) == sha256(src)
    # never-written space reads as holes/zeros in the allocation map
    mapping = json.loads(run(["nbdinfo", "--map", "--json", other]).stdout)
    assert mapping and mapping[-1]["offset"] + mapping[-1]["length"] == 256 * MiB
    assert any(m["type"] & 1 for m in mapping if m["offset"] >= 64 * MiB), mapping


def hashlib_prefix(f, n: int) -> str:
    import hashlib
    h = hashlib.sha256()
    left = n
    while left:
        chunk = f.read(min(left, 1 << 20))
        h.update(chunk)
        left -= len(chunk)
    return h.hexdigest()


def test_nbdcopy_one_gib_in_and_out_identical(cl, tmp_path):
    need_tools("nbdcopy")
    create_volume(cl, "vol-copy", GiB)
    src = random_file(tmp_path / "src.raw", GiB)
    t0 = time.monotonic()
    run(["nbdcopy", str(src), cl.nodes[0].unix_uri("vol-copy")], timeout=600)
    t_in = time.monotonic() - t0
    out = tmp_path / "out.raw"
    tcp = next(e.uri for e in cl.api.get("volume", "vol-copy").status.exports
               if e.node == cl.nodes[2].name and e.uri.startswith("nbd://"))
    t0 = time.monotonic()
    run(["nbdcopy", tcp, str(out)], timeout=600)
    t_out = time.monotonic() - t0
    print(f"\nnbdcopy 1 GiB in: {t_in:.1f}s ({1024 / t_in:.0f} MiB/s), out via TCP of another node: "
          f"{t_out:.1f}s ({1024 / t_out:.0f} MiB/s)")
    assert sha256(out) == sha256(src)
    vol = wait(lambda: (v := cl.api.get("volume", "vol-copy")).status.allocated_bytes >= GiB and v, 15,
               "allocated bytes reported")
    assert vol.status.allocated_bytes <= GiB + 16 * MiB


@pytest.mark.parametrize("replicas", [2, 3])
def test_fio_randwrite_verify(cl, replicas):
    need_tools("fio")
    name = f"vol-fio{replicas}"
    create_volume(cl, name, 128 * MiB, replicas=replicas, extent_size=16 * MiB)
    fio_verify(cl.nodes[0].unix_uri(name), size="64M")
    # and a second pass through another node's export, 64k blocks
    fio_verify(cl.nodes[1].unix_uri(name), size="64M", bs="64k", rw="randwrite")
    assert cl.api.get("volume", name).status.phase == "Healthy"


def test_resize_grows_and_delete_reclaims(cl, tmp_path):
    need_tools("nbdinfo", "nbdcopy")
    vol = create_volume(cl, "vol-grow", 128 * MiB, extent_size=32 * MiB)
    vol.spec.size_bytes = 256 * MiB
    vol.ClearField("status")
    cl.api.update(vol)
    wait(lambda: cl.api.get("volume", "vol-grow").status.extents == 8
         and cl.api.get("volume", "vol-grow").status.phase == "Healthy", 20, "grown volume placed")
    assert sorted(records(cl, "vol-grow")) == list(range(8))
    size = wait(lambda: (json.loads(run(["nbdinfo", "--json", cl.nodes[1].unix_uri("vol-grow")]).stdout)
                         ["exports"][0]["export-size"] == 256 * MiB), 10, "new size on the export")
    assert size
    with pytest.raises(Exception, match="cannot shrink"):
        vol = cl.api.get("volume", "vol-grow")
        vol.spec.size_bytes = 64 * MiB
        vol.ClearField("status")
        cl.api.update(vol)
    uid = cl.api.get("volume", "vol-grow").metadata.uid
    run(["nbdcopy", str(random_file(tmp_path / "r.raw", 256 * MiB)), cl.nodes[0].unix_uri("vol-grow")])
    wait(lambda: any(uid in str(p) for m in cl.nodes for p in m.replica_files()), 10, "replicas written")
    cl.api.delete("volume", "vol-grow")
    wait(lambda: not records(cl, "vol-grow"), 20, "extent records removed")
    wait(lambda: not any(uid in str(p) for m in cl.nodes for p in m.replica_files()), 30,
         "replica files reclaimed")
    wait(lambda: all(not m.socket("vol-grow").exists() for m in cl.nodes), 10, "NBD sockets removed")


def peer_call(address: str, *args, **kwargs):
    async def go():
        client = P.PeerClient("test", address)
        try:
            return await client.call(*args, **kwargs)
        finally:
            await client.close()
    return asyncio.run(go())


def live_peer_address(cl, node: str) -> str:
    kv = cl.store.get(f"node/live/{node}/storaged")
    return json.loads(kv.value)["peer_address"]


def test_kill_a_replica_during_fio_verify(cl, etcd_server, tmp_path):
    """kill -9 a replica's daemon mid-run: fio goes on (the replica is dropped
    by a generation bump), no verify error; the volume rebuilds what it lost
    on the third node and is Healthy again by itself (replicas identical);
    the restarted daemon refuses I/O for the old generation and reclaims its
    abandoned replicas."""
    need_tools("fio")
    name = "vol-kill"
    create_volume(cl, name, 128 * MiB, replicas=2, extent_size=16 * MiB)
    before = records(cl, name)
    # fio covers the first 96 MiB = extents 0..5 of 16 MiB; the victim is the node holding
    # most of them (placement follows the free space earlier tests left), another one serves
    held = {m.name: sum(1 for i, r in before.items() if i < 6 and r.holds(m.name)) for m in cl.nodes}
    victim = max(cl.nodes, key=lambda m: held[m.name])
    serving = next(m for m in cl.nodes if m is not victim)
    victim_extents = [i for i, r in before.items() if r.holds(victim.name) and i < 6]
    assert len(victim_extents) >= 4, held
    result: dict = {}

    def run_fio():
        t0 = time.monotonic()
        try:
            # writes for 10 s, verifying as it goes (a time-based job has no separate verify pass)
            result["out"] = fio_verify(serving.unix_uri(name), size="96M", bs="4k", iodepth=16,
                                       extra=["--time_based", "--runtime=10", "--verify_backlog=256"])
        except AssertionError as exc:
            result["error"] = exc
        result["t"] = time.monotonic() - t0

    th = threading.Thread(target=run_fio)
    th.start()
    time.sleep(3)
    assert th.is_alive(), result

    victim.kill()
    th.join(600)
    assert "error" not in result, result["error"]
    job = result["out"]["jobs"][0]
    stall = job["write"]["clat_ns"]["max"] / 1e9
    print(f"\nfio finished {result['t']:.1f}s after start, victim killed at 3 s; "
          f"{job['write']['total_ios']} writes, {job['read']['total_ios']} verify reads; "
          f"longest write {stall:.2f}s (peer timeout 1 s)")
    # the writes that hit the dead replica waited for the peer timeout, then the drop:
    # bounded by design (timeout + one etcd CAS), far from fio's own 30 s I/O timeout
    assert stall < 5, stall

    after = records(cl, name)
    for i in victim_extents:
        r = after[i]
        assert r.holds(victim.name) is None and r.generation > before[i].generation, r
        assert any(d.node == victim.name for d in r.dropped)

    # the volume repairs itself: what the victim held is rebuilt on the third node
    phases = set()

    def healthy():
        v = cl.api.get("volume", name)
        phases.add(v.status.phase)
        return v if v.status.phase == "Healthy" else None

    def rebuilt():   # written extents lost the victim at once; the others after --rebuild-delay (5 s)
        recs = records(cl, name)
        done = all(len(r.replicas) == 2 and not r.joining and r.holds(victim.name) is None
                   for r in recs.values())
        return healthy() if done else None

    t0 = time.monotonic()
    wait(rebuilt, 120, "every extent rebuilt off the victim and the volume Healthy")
    healed = records(cl, name)
    print(f"rebuilt to Healthy {time.monotonic() - t0:.1f}s after fio ended; phases seen: {sorted(phases)}")
    for i, r in healed.items():
        assert len(r.replicas) == 2 and not r.joining and r.holds(victim.name) is None, r
    for i in victim_extents:   # the rebuilt replica holds the survivor's bytes
        r = healed[i]
        for off in range(0, r.size, 4 * MiB):
            copies = {peer_call(live_peer_address(cl, rep.node), P.OP_READ, name, r.uid, i, r.generation,
                                off, 4 * MiB)[1] for rep in r.replicas}
            assert len(copies) == 1, f"extent {i} differs between {r.replicas} at {off}"

    victim.start()  # comes back with its stale replicas
    addr = wait(lambda: cl.store.get(f"node/live/{victim.name}/storaged") and live_peer_address(cl, victim.name),
                20, "victim back")
    i = victim_extents[0]
    old, now = before[i], records(cl, name)[i]
    with pytest.raises(P.PeerError) as exc:
        peer_call(addr, P.OP_WRITE, name, old.uid, i, old.generation, 0, payload=b"x" * 4096)
    assert exc.value.stale and exc.value.generation == now.generation
    with pytest.raises(P.PeerError) as exc:  # even with the new generation: it is not in the set
        peer_call(addr, P.OP_READ, name, old.uid, i, now.generation, 0, 4096)
    assert exc.value.stale
    # its abandoned replicas are reclaimed (it keeps only those it is still a member of)
    keep = {r.index for r in records(cl, name).values() if r.holds(victim.name)}
    wait(lambda: {int(f.stem) for f in victim.replica_files() if f.parent.name == old.uid} <= keep, 20,
         "the victim's dropped replicas to be reclaimed")
    # the restarted node still serves the volume (from the current replicas)
    wait(lambda: victim.socket(name).exists(), 15, "victim's NBD socket")
    fio_verify(victim.unix_uri(name), size="16M", rw="randwrite")


def test_garbage_in_etcd_and_bad_peer_frames_do_not_kill_the_daemon(cl):
    create_volume(cl, "vol-bad", 64 * MiB, extent_size=16 * MiB)
    cl.store.put(X.extent_key("vol-bad", 3), b"{not json")
    cl.store.put(X.extent_key("other-vol", 0), b'{"volume": 1}')
    node = cl.nodes[0]
    addr = live_peer_address(cl, node.name)
    import socket
    host, port = addr.rsplit(":", 1)
    with socket.create_connection((host, int(port))) as s:
        s.sendall(b"\xff" * 200)
        s.settimeout(5)
        try:  # the daemon hangs up: FIN, or RST since our garbage is left unread
            assert s.recv(100) == b""
        except ConnectionResetError:
            pass
    time.sleep(1.5)
    assert all(m.proc.proc.poll() is None for m in cl.nodes)
    # extents 0..2 still work
    p = run(["nbdinfo", "--json", node.unix_uri("vol-bad")])
    assert json.loads(p.stdout)["exports"][0]["export-size"] == 64 * MiB


def test_cli_volume_create_describe_and_errors(cl):
    import subprocess
    import sys

    def braid(*args):
        return subprocess.run([sys.executable, "-m", "braid.cli.main", "--server", cl.ctl.proc.address,
                               *args], capture_output=True, text=True, timeout=60)
    p = braid("volume", "create", "vcli", "--size", "128M", "--replicas", "2", "--extent-size", "32M")
    assert p.returncode == 0, p.stderr
    assert "Healthy (4/4 extents healthy)" in p.stderr
    assert f"nbd+unix:///vcli?socket={cl.nodes[0].socket_dir}/vcli.sock" in p.stdout
    desc = json.loads(braid("volume", "describe", "vcli", "-o", "json").stdout)
    assert desc["status"]["phase"] == "Healthy" and int(desc["spec"]["size_bytes"]) == 128 * MiB
    assert len(desc["status"]["exports"]) == 6   # unix + tcp on 3 nodes
    p = braid("volume", "resize", "vcli", "--size", "64M")
    assert p.returncode == 4 and "cannot shrink" in p.stderr, p.stderr  # FAILED_PRECONDITION
    p = braid("volume", "create", "vbig", "--size", "1G", "--replicas", "4")
    assert p.returncode == 2 and "invalid choice" in p.stderr
    p = braid("volume", "create", "vbad", "--size", "12Q")
    assert p.returncode == 2 and "bad size" in p.stderr
    p = braid("get", "volumes")
    assert p.returncode == 0 and "vcli" in p.stdout and "Healthy" in p.stdout


def test_qos_iops_limit_is_enforced_and_settable_live(cl):
    need_tools("fio")
    vol = create_volume(cl, "vol-qos", 64 * MiB, extent_size=16 * MiB)
    vol.spec.qos.iops = 200
    vol.ClearField("status")
    cl.api.update(vol)
    time.sleep(1)  # the daemons' informers apply it

    def iops(seconds: int) -> float:
        out = run(["fio", "--name=q", "--ioengine=nbd", f"--uri={cl.nodes[0].unix_uri('vol-qos')}",
                   "--rw=randwrite", "--bs=4k", "--iodepth=8", "--size=32M", "--time_based",
                   f"--runtime={seconds}", "--output-format=json"], timeout=120)
        return json.loads(out.stdout[out.stdout.index("{"):])["jobs"][0]["write"]["iops"]
    limited = iops(6)
    # the limit holds: 200/s plus at most one second's burst over the 6 s run (+10 % for fio's clock)
    assert 0 < limited <= 200 * 7 / 6 * 1.1, limited
    vol = cl.api.get("volume", "vol-qos")
    vol.spec.qos.iops = 0
    vol.ClearField("status")
    cl.api.update(vol)
    time.sleep(1)
    unlimited = iops(3)
    print(f"\nQoS: {limited:.0f} IOPS with iops=200, {unlimited:.0f} without a limit")
    assert unlimited > 2 * limited


def test_stopping_every_daemon_gracefully_degrades_nothing(etcd_server, tmp_path):
    """A cluster shutdown (all storage daemons SIGTERMed together right after
    unflushed writes) keeps every replica in its set, and the data written
    before is readable after the restart."""
    need_tools("nbdcopy", "fio")
    (tmp_path / "c").mkdir()
    with storage_cluster(etcd_server, tmp_path / "c", "gs") as c:
        create_volume(c, "vol-stop", 64 * MiB, replicas=3, extent_size=16 * MiB)
        src = random_file(tmp_path / "src.raw", 32 * MiB)
        run(["nbdcopy", str(src), c.nodes[0].unix_uri("vol-stop")])
        # then writes nobody flushes (fio's nbd engine does not), to the upper half
        run(["fio", "--name=w", "--ioengine=nbd", f"--uri={c.nodes[0].unix_uri('vol-stop')}",
             "--rw=randwrite", "--bs=4k", "--offset=32M", "--size=32M", "--io_size=8M",
             "--output-format=json"])
        before = records(c, "vol-stop")
        import concurrent.futures
        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            list(pool.map(lambda m: m.stop(), c.nodes))
        assert records(c, "vol-stop") == before   # nobody was dropped
        for m in c.nodes:
            m.start()
        wait(lambda: all(m.socket("vol-stop").exists() for m in c.nodes), 20, "sockets back")
        out = tmp_path / "out.raw"
        run(["nbdcopy", "--", c.nodes[2].unix_uri("vol-stop"), str(out)])
        with open(out, "rb") as f:
            assert hashlib_prefix(f, 32 * MiB) == sha256(src)
