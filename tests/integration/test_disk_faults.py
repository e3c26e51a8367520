"""Disk faults under a live volume: real kernel I/O errors and hangs.

Node 2's disk directory lives on a faultfs (tests/integration/faultfs.py, a
passthrough FUSE filesystem that fails with EIO or hangs on command). Each
round writes a fresh volume (replicas=2, node 2 holding some replicas) with
fio verifying through node 1, turns node 2's disk bad mid-run and checks:
fio sees no error, the disk's health in the DiskPool status says what
happened (Failed on EIO, Isolated when it hangs), and the volume heals by
itself: every extent has two replicas again, none on node 2, identical to
the survivors. After a hang the daemon of node 2 lives on and its disk
becomes Healthy again.
"""

from __future__ import annotations

import threading
import time

import pytest

from storage_daemon import peer as P
from tests.conftest import wait
from tests.integration import faultfs
from tests.integration.storage_cluster import create_volume, fio_verify, need_tools, records, storage_cluster
from tests.integration.test_storage import live_peer_address, peer_call

pytestmark = pytest.mark.integration

MiB = 1 << 20
SIZE, EXTENT = 96 * MiB, 16 * MiB
FAULT_AT = 3.0        # seconds into the fio run
FIO_RUNTIME = 10


@pytest.fixture(scope="module")
def fcl(etcd_server, tmp_path_factory):
    reason = faultfs.unavailable()
    if reason:
        pytest.skip(f"faultfs: {reason}")
    need_tools("fio")
    tmp = tmp_path_factory.mktemp("disk-faults")
    reports: list[str] = []
    with faultfs.fault_mount(tmp / "s2-backing", tmp / "s2-mnt") as fm:
        try:
            with storage_cluster(etcd_server, tmp, "df", disks={2: tmp / "s2-mnt" / "d1"}) as c:
                c.fm, c.reports = fm, reports
                try:
                    yield c
                finally:
                    fm.set("ok")   # nothing may stay hung while the daemons stop
        finally:
            print(f"\ndisk fault rounds run: {len(reports)}")
            for line in reports:
                print("  " + line)


def disk_health(cl, node: str) -> str:
    try:
        return cl.api.get("diskpool", node).status.disks[0].health
    except Exception:  # noqa: BLE001 - not reported yet
        return ""


class Watch(threading.Thread):
    """From the fault on, every 0.2 s: the victim's disk health (the first time
    it is ``expected``, and every change) and when the volume has healed: every
    extent with two replicas, none on the victim, no joiners, phase Healthy."""

    def __init__(self, cl, volume: str, victim: str, expected: str):
        super().__init__(daemon=True)
        self.cl, self.volume, self.victim, self.expected = cl, volume, victim, expected
        self.t0 = time.monotonic()
        self.bad_at: float | None = None
        self.healed_at: float | None = None
        self.healths: list[str] = []
        self.phases: set[str] = set()
        self.errors: list[str] = []
        self.halt = threading.Event()

    def healed(self) -> bool:
        v = self.cl.api.get("volume", self.volume)
        self.phases.add(v.status.phase)
        recs = records(self.cl, self.volume)
        return v.status.phase == "Healthy" and all(
            len(r.replicas) == 2 and not r.joining and r.holds(self.victim) is None for r in recs.values())

    def run(self) -> None:
        while not self.halt.wait(0.2):
            now = time.monotonic() - self.t0
            try:
                h = disk_health(self.cl, self.victim)
                if not self.healths or self.healths[-1] != h:
                    self.healths.append(h)
                if h == self.expected and self.bad_at is None:
                    self.bad_at = now
                if self.healed_at is None and self.healed():
                    self.healed_at = now
            except Exception as exc:  # noqa: BLE001 - reported by the test if it matters
                self.errors.append(repr(exc))


def run_fault_round(cl, mode: str, name: str) -> None:
    fm = cl.fm
    serving, victim, _ = cl.nodes
    fm.set("ok")
    wait(lambda: disk_health(cl, victim.name) == "Healthy", 30, f"{victim.name}'s disk Healthy")
    create_volume(cl, name, SIZE, replicas=2, extent_size=EXTENT)
    before = records(cl, name)
    victim_extents = sorted(i for i, r in before.items() if r.holds(victim.name))
    assert victim_extents, f"{victim.name} holds no replica of {name}: {before}"

    result: dict = {}

    def run_fio():
        t0 = time.monotonic()
        try:
            result["out"] = fio_verify(serving.unix_uri(name), size=f"{SIZE >> 20}M", bs="4k", iodepth=16,
                                       extra=["--time_based", f"--runtime={FIO_RUNTIME}",
                                              "--verify_backlog=256"])
        except AssertionError as exc:
            result["error"] = exc
        result["t"] = time.monotonic() - t0

    counter = "eio" if mode == "eio" else "hung"
    hits0 = fm.stats().get(counter, 0)
    expected = {"eio": "Failed", "hang": "Isolated"}[mode]
    th = threading.Thread(target=run_fio)
    th.start()
    time.sleep(FAULT_AT)
    assert th.is_alive(), result
    fm.set(mode)
    watch = Watch(cl, name, victim.name, expected)
    watch.start()
    try:
        th.join(FIO_RUNTIME + 120)
        assert not th.is_alive(), "fio did not finish"
        assert "error" not in result, result["error"]
        job = result["out"]["jobs"][0]
        verify_errors = job["error"]   # with --verify_fatal=1 any mismatch ends the job with an error
        assert verify_errors == 0, job
        stall = job["write"]["clat_ns"]["max"] / 1e9
        # a write that hit the bad replica waited at most the peer timeout (1 s), then the drop (a CAS)
        assert stall < 5, stall
        wait(lambda: watch.bad_at is not None, 30,
             f"{victim.name}'s disk {expected} in its DiskPool status (seen: {watch.healths})")
        hits = fm.stats().get(counter, 0) - hits0
        assert hits > 0, f"the fault never hit an operation: {fm.stats()}"
        # the volume heals by itself: what node 2 held is rebuilt elsewhere
        wait(lambda: watch.healed_at is not None, 120,
             f"every extent of {name} off {victim.name} and the volume Healthy "
             f"(phases seen: {sorted(watch.phases)}; errors: {watch.errors[-3:]})")
        watch.halt.set()
        watch.join(10)
        assert watch.healed(), records(cl, name)
        after = records(cl, name)
        for i in victim_extents:
            assert after[i].generation > before[i].generation, after[i]
            assert any(d.node == victim.name for d in after[i].dropped), after[i]
        for i in victim_extents:  # the rebuilt replica holds the survivor's bytes
            r = after[i]
            for off in range(0, r.size, 4 * MiB):
                copies = {peer_call(live_peer_address(cl, rep.node), P.OP_READ, name, r.uid, i, r.generation,
                                    off, 4 * MiB)[1] for rep in r.replicas}
                assert len(copies) == 1, f"extent {i} differs between {r.replicas} at {off}"
    finally:
        watch.halt.set()
        fm.set("ok")
        th.join(FIO_RUNTIME + 120)

    # the disk answers again: node 2's daemon lived through it, answers, and its disk is Healthy
    t_ok = time.monotonic()
    assert victim.proc.proc.poll() is None, f"{victim.name}'s storage daemon died"
    back = [disk_health(cl, victim.name)]

    def healthy_again():
        h = disk_health(cl, victim.name)
        if h != back[-1]:
            back.append(h)
        return h == "Healthy"
    wait(healthy_again, 30, f"{victim.name}'s disk Healthy again (seen: {back})")
    t_back = time.monotonic() - t_ok
    vol = cl.api.get("volume", name)
    peer_call(live_peer_address(cl, victim.name), P.OP_PING, name, vol.metadata.uid, 0, 0)
    assert victim.proc.proc.poll() is None

    line = (f"{mode}: fio verify errors {verify_errors} ({job['write']['total_ios']} writes, "
            f"{job['read']['total_ios']} verify reads, longest write {stall:.2f}s, fio {result['t']:.1f}s "
            f"with the fault at {FAULT_AT:.0f}s; {hits} operations hit); "
            f"disk {expected} {watch.bad_at:.1f}s after the fault; volume Healthy again "
            f"{watch.healed_at:.1f}s after the fault ({len(victim_extents)} extents rebuilt, phases seen "
            f"{'/'.join(sorted(watch.phases))}); disk health {' -> '.join(watch.healths)}, after ok "
            f"{' -> '.join(back)} in {t_back:.1f}s")
    print("\n" + line)
    cl.reports.append(line)
    cl.api.delete("volume", name)


def test_eio_on_a_replica_disk_during_fio_verify(fcl):
    """EIO from node 2's disk mid-run: its replicas are dropped at the first
    failed write, the disk is Failed, the volume heals on the others."""
    run_fault_round(fcl, "eio", "vol-eio")


def test_hang_of_a_replica_disk_during_fio_verify(fcl):
    """Node 2's disk hangs mid-run: writes wait at most the peer timeout,
    the disk is Isolated after ~10 s, the volume heals; once the disk answers
    again, node 2's daemon is alive and its disk Healthy."""
    run_fault_round(fcl, "hang", "vol-hang")
