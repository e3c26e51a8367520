"""The fault-injection suite: rounds of faults under fio verify on a
replicas=2 and a replicas=3 volume.

Four storage daemons (node 2's disk on a faultfs, see
tests/integration/faultfs.py), a controller with a short --rebuild-delay,
scrubbing every 2 s. Both volumes are 64 MiB in extents of 16 MiB: fio
writes and verifies the first 48 MiB (extents 0..2) of each, both jobs at
once, through node 1; extent 3 holds a fixed pattern written once, read
back after every round (data fio does not own, carried through every
rebuild). In each round, ~2.5 s into the fio run, one fault, cycling:

1. ``kill``: kill -9 of the storage daemon (node 3 or 4) holding the most
   replicas; the volumes heal on the others (4 nodes: one is spare), then
   the daemon is restarted: it refuses I/O of the old generation and
   reclaims its dropped replicas;
2. ``eio``: node 2's disk fails every operation (disk Failed), until the
   volumes healed off it; then "ok" again until the disk is Healthy;
3. ``hang``: node 2's disk hangs (disk Isolated), the same way;
4. ``corrupt``: 64 bytes in each of 3 different 4 KiB blocks of one replica
   file of extent 3 are overwritten behind its daemon's back; reads stay
   right, the scrubber finds the 3 blocks and rewrites them from a peer
   (``status.scrub.repaired`` +3, ``unrepaired`` 0), the file's bytes are
   right again.

After every round: both fio jobs passed their verification, both volumes
are Healthy again by themselves (every extent with its full replica count,
no joiners, none on the faulted node), no extent was ever left without a
replica, the replicas of every extent hold the same bytes (read from each
member) and extent 3 still holds its pattern; the scrubber's ``mismatches``
during the round are reported (not asserted: it compares replicas while
fio writes to them). A disk round needs replicas on node 2, which the previous disk
round evacuated: a volume of which the victim holds nothing is re-created
first (said so in the summary).

``BRAID_FAULT_ROUNDS`` (default 4: one round of each kind) sets how many
rounds run; ``BRAID_FAULT_KINDS`` (default ``kill,eio,hang,corrupt``) which
kinds cycle, to chase one. A summary is printed at the end (``pytest -s``
shows it; so does a failure).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import threading
import time
from dataclasses import dataclass

import pytest

from braid import extents as X
from storage_daemon import peer as P
from tests.conftest import wait
from tests.integration import faultfs
from tests.integration.storage_cluster import (
    create_volume,
    fio_verify,
    need_tools,
    records,
    run,
    storage_cluster,
)
from tests.integration.test_storage import live_peer_address, peer_call

pytestmark = pytest.mark.integration

MiB = 1 << 20
SIZE, EXTENT = 64 * MiB, 16 * MiB
FIO_SIZE = 48 * MiB                          # fio owns extents 0..2
STATIC_INDEX = FIO_SIZE // EXTENT            # extent 3: a fixed pattern, written once
FAULT_AT = 2.5                               # seconds into the fio run
FIO_RUNTIME = 8
# a node dropped from an extent is not chosen to rebuild it for X.DROP_COOLDOWN (60 s): with
# replicas=3 on 4 nodes, a fault soon after another can leave an extent one replica short until then
HEAL_TIMEOUT = X.DROP_COOLDOWN + 60
ALL_KINDS = ("kill", "eio", "hang", "corrupt")
CORRUPT = ((7, 100), (1000, 0), (3000, 4000))  # (4 KiB block of the extent, offset of the 64 bytes in it)
SERVING, FAULTY = 0, 1                       # node 1 serves fio, node 2's disk is the faultfs


def _rounds() -> int:
    raw = os.environ.get("BRAID_FAULT_ROUNDS", "4")
    try:
        return int(raw)
    except ValueError:
        return -1


ROUNDS = _rounds()
# which kinds of round, cycling (a comma-separated subset of ALL_KINDS, to chase one kind of fault)
KINDS = tuple(k.strip() for k in os.environ.get("BRAID_FAULT_KINDS", ",".join(ALL_KINDS)).split(",") if k.strip())


@dataclass
class Vol:
    base: str
    replicas: int
    pattern: int
    serial: int = 0

    @property
    def name(self) -> str:
        return f"{self.base}-{self.serial}"


def wait_until(pred, timeout: float, what: str, now=None):
    """``wait``, and at a timeout also what ``now()`` says then (the state it ended in)."""
    try:
        return wait(pred, timeout, what)
    except AssertionError as exc:
        if now is None:
            raise
        raise AssertionError(f"{exc}; at the timeout: {now()}") from None


def disk_health(cl, node: str) -> str:
    try:
        return cl.api.get("diskpool", node).status.disks[0].health
    except Exception:  # noqa: BLE001 - not reported yet / daemon away
        return ""


def scrub_status(cl, node: str):
    return cl.api.get("diskpool", node).status.scrub


def is_live(cl, node: str) -> bool:
    return cl.store.get(f"node/live/{node}/storaged") is not None


def healed_now(vol: Vol, phase: str, recs: dict[int, X.ExtentRecord], victim: str | None) -> bool:
    return (phase == "Healthy" and len(recs) == SIZE // EXTENT and all(
        len(r.replicas) == vol.replicas and not r.joining and (victim is None or r.holds(victim) is None)
        for r in recs.values()))


def describe(cl, vols: list[Vol]) -> str:
    out = []
    for v in vols:
        phase = cl.api.get("volume", v.name).status
        recs = records(cl, v.name)
        exts = "; ".join(f"{i}: g{r.generation} [{','.join(x.node for x in r.replicas)}]"
                         + (f" joining [{','.join(x.node for x in r.joining)}]" if r.joining else "")
                         for i, r in sorted(recs.items()))
        out.append(f"{v.name} {phase.phase} ({phase.message}): {exts}")
    kvs, _ = cl.store.list("storage/rebuild/")   # copies in progress as the daemons report them
    if kvs:
        out.append("rebuild progress " + ", ".join(f"{kv.key.rsplit('/', 1)[-1]} {kv.value.decode()}" for kv in kvs))
    return " | ".join(out)


class Watch(threading.Thread):
    """From the fault on, every 0.25 s: both volumes' phases (each change),
    extents without any replica (data lost), when both are healed (Healthy,
    full replica counts, no joiners, nothing on ``victim``) and, for a disk
    fault, the victim's disk health (each change, and when it is ``expected``)."""

    def __init__(self, cl, vols: list[Vol], victim: str | None, expected: str | None = None):
        super().__init__(daemon=True)
        self.cl, self.vols, self.victim, self.expected = cl, vols, victim, expected
        self.t0 = time.monotonic()
        self.healed_at: float | None = None
        self.bad_at: float | None = None
        self.phases: dict[str, list[str]] = {v.name: [] for v in vols}
        self.healths: list[str] = []
        self.lost: set[tuple[str, int]] = set()
        self.errors: list[str] = []
        self.halt = threading.Event()

    def poll(self) -> bool:
        ok = True
        for v in self.vols:
            phase = self.cl.api.get("volume", v.name).status.phase
            seen = self.phases[v.name]
            if not seen or seen[-1] != phase:
                seen.append(phase)
            recs = records(self.cl, v.name)
            self.lost |= {(v.name, i) for i, r in recs.items() if not r.replicas}
            ok = healed_now(v, phase, recs, self.victim) and ok
        return ok

    def run(self) -> None:
        while not self.halt.wait(0.25):
            now = time.monotonic() - self.t0
            try:
                if self.expected is not None:
                    h = disk_health(self.cl, self.victim)
                    if not self.healths or self.healths[-1] != h:
                        self.healths.append(h)
                    if h == self.expected and self.bad_at is None:
                        self.bad_at = now
                if self.poll() and self.healed_at is None:
                    self.healed_at = now
            except Exception as exc:  # noqa: BLE001 - the test reports them if it matters
                self.errors.append(repr(exc))

    def stop(self) -> None:
        self.halt.set()
        self.join(10)

    def phase_text(self) -> str:
        return "; ".join(f"{name} {' -> '.join(p)}" for name, p in self.phases.items())


class FioPair:
    """The two fio jobs (one per volume, through the serving node), at once."""

    def __init__(self, serving, vols: list[Vol]):
        self.results: dict[str, dict] = {v.name: {} for v in vols}
        self.threads = [threading.Thread(target=self._run, args=(serving.unix_uri(v.name), self.results[v.name]))
                        for v in vols]
        self.t0 = time.monotonic()
        for th in self.threads:
            th.start()

    @staticmethod
    def _run(uri: str, result: dict) -> None:
        t0 = time.monotonic()
        try:
            result["out"] = fio_verify(uri, size=f"{FIO_SIZE >> 20}M", bs="4k", iodepth=16,
                                       extra=["--time_based", f"--runtime={FIO_RUNTIME}", "--verify_backlog=256"])
        except AssertionError as exc:
            result["error"] = str(exc)
        result["t"] = time.monotonic() - t0

    def alive(self) -> bool:
        return all(th.is_alive() for th in self.threads)

    def join(self) -> None:
        for th in self.threads:
            th.join(FIO_RUNTIME + 180)
        assert not any(th.is_alive() for th in self.threads), "fio did not finish"

    def verify_errors(self) -> int:
        """fio jobs that failed (with --verify_fatal=1 a mismatch ends the job with an error)."""
        return sum(1 for r in self.results.values() if "error" in r or r["out"]["jobs"][0]["error"])

    def failures(self) -> str:
        return "\n".join(f"{name}: {r.get('error') or r['out']['jobs'][0]}" for name, r in self.results.items()
                         if "error" in r or r["out"]["jobs"][0]["error"])

    def text(self) -> str:
        parts = []
        for name, r in self.results.items():
            if "out" not in r:
                parts.append(f"{name} FAILED")
                continue
            job = r["out"]["jobs"][0]
            parts.append(f"{name} {job['write']['total_ios']} writes/{job['read']['total_ios']} verify reads, "
                         f"longest write {job['write']['clat_ns']['max'] / 1e9:.2f}s, "
                         f"read {job['read']['clat_ns']['max'] / 1e9:.2f}s")
        return "; ".join(parts)


class Suite:
    def __init__(self, cl, tmp):
        self.cl, self.tmp = cl, tmp
        self.serving = cl.nodes[SERVING]
        self.faulty = cl.nodes[FAULTY]
        self.vols = [Vol("r2", 2, 0x5A), Vol("r3", 3, 0xA5)]
        self.lines: list[str] = []
        self.verify_errors = 0
        self.lost: set[tuple[str, int]] = set()
        self.corrupt_rounds = 0

    # -- volumes

    def create(self, v: Vol) -> None:
        create_volume(self.cl, v.name, SIZE, replicas=v.replicas, extent_size=EXTENT, timeout=60)
        run(["qemu-io", "-f", "raw", "-c", f"write -P {v.pattern:#x} {FIO_SIZE} {SIZE - FIO_SIZE}", "-c", "flush",
             self.serving.unix_uri(v.name)])

    def recreate(self, v: Vol) -> None:
        old = v.name
        self.cl.api.delete("volume", old)
        wait(lambda: not records(self.cl, old), 30, f"{old}'s extent records deleted")
        v.serial += 1
        self.create(v)

    def static_intact(self, v: Vol, via=None) -> None:
        """Extent 3 still holds the pattern written when the volume was created."""
        node = via or self.serving
        r = run(["qemu-io", "-f", "raw", "-c", f"read -P {v.pattern:#x} {FIO_SIZE} {SIZE - FIO_SIZE}",
                 node.unix_uri(v.name)], check=False)
        assert r.returncode == 0 and "Pattern verification failed" not in r.stdout, (
            f"{v.name}: extent {STATIC_INDEX} (written once, never since) does not read back through "
            f"{node.name}:\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")

    def mismatches(self) -> dict[str, int]:
        return {m.name: scrub_status(self.cl, m.name).mismatches for m in self.cl.nodes}

    def holds(self, node: str, v: Vol) -> int:
        return sum(1 for r in records(self.cl, v.name).values() if r.holds(node))

    def ensure_held_by(self, node: str, notes: list[str]) -> None:
        """Re-create each volume of which ``node`` holds no replica (a fault there would test nothing)."""
        for v in self.vols:
            for _attempt in range(3):
                if self.holds(node, v):
                    break
                notes.append(f"{v.name} re-created ({node} held none of it)")
                self.recreate(v)
            assert self.holds(node, v), f"{node} holds no replica of {v.name}: {describe(self.cl, self.vols)}"

    # -- between rounds

    def settle(self) -> None:
        cl = self.cl
        for m in cl.nodes:
            assert m.proc.proc.poll() is None, f"{m.name}'s storage daemon exited ({m.proc.proc.returncode})"
        wait(lambda: all(is_live(cl, m.name) for m in cl.nodes), 30, "every storage daemon live")
        wait_until(lambda: all(disk_health(cl, m.name) == "Healthy" for m in cl.nodes), 60, "every disk Healthy",
                   lambda: [disk_health(cl, m.name) for m in cl.nodes])
        wait_until(lambda: all(healed_now(v, cl.api.get("volume", v.name).status.phase, records(cl, v.name), None)
                               for v in self.vols), HEAL_TIMEOUT, "both volumes Healthy before the round",
                   lambda: describe(cl, self.vols))

    def replicas_identical(self) -> int:
        """Every extent of both volumes (fio stopped): all its members hold the same bytes."""
        cl = self.cl
        want = [(v.name, r) for v in self.vols for r in records(cl, v.name).values()]
        addrs = {m.name: live_peer_address(cl, m.name) for m in cl.nodes if is_live(cl, m.name)}

        async def digests():
            clients = {node: P.PeerClient("test", a) for node, a in addrs.items()}
            differ = []
            try:
                for name, r in want:
                    for off in range(0, r.size, 4 * MiB):
                        seen = {}
                        for rep in r.replicas:
                            _, data = await clients[rep.node].call(P.OP_READ, name, r.uid, r.index, r.generation,
                                                                   off, 4 * MiB, timeout=30)
                            seen[rep.node] = hashlib.sha256(data).hexdigest()[:12]
                        if len(set(seen.values())) > 1:
                            differ.append(f"{name} extent {r.index} at {off >> 20} MiB: {seen}")
            finally:
                for c in clients.values():
                    await c.close()
            return differ
        differ = asyncio.run(digests())
        assert not differ, f"replicas differ after the round: {differ}"
        return len(want)

    # -- a round

    def round(self, n: int, kind: str) -> None:
        cl = self.cl
        t_round = time.monotonic()
        self.settle()
        notes: list[str] = []
        fm = cl.fm
        victim = None
        expected = None
        corrupt = None
        if kind == "kill":
            spares = [m for i, m in enumerate(cl.nodes) if i not in (SERVING, FAULTY)]

            def pick():   # the one holding the most replicas fio writes to, then the most replicas
                def weight(m):
                    recs = [records(cl, v.name) for v in self.vols]
                    return (sum(1 for rs in recs for i, r in rs.items() if i < STATIC_INDEX and r.holds(m.name)),
                            sum(1 for rs in recs for r in rs.values() if r.holds(m.name)))
                return max(spares, key=weight)
            victim = pick()
            self.ensure_held_by(victim.name, notes)
        elif kind in ("eio", "hang"):
            victim = self.faulty
            expected = {"eio": "Failed", "hang": "Isolated"}[kind]
            self.ensure_held_by(victim.name, notes)
        else:
            v = self.vols[self.corrupt_rounds % len(self.vols)]
            self.corrupt_rounds += 1
            rec = records(cl, v.name)[STATIC_INDEX]
            members = [m for m in cl.nodes if rec.holds(m.name)]
            target = next((m for m in members if m is self.serving), None) or next(
                (m for m in members if m is not self.faulty), members[0])
            path = target.disk / "replicas" / rec.data_id / f"{STATIC_INDEX}.data"
            orig = {}
            with open(path, "rb") as f:
                for blk, _ in CORRUPT:
                    f.seek(blk * 4096)
                    orig[blk] = f.read(4096)
                    assert orig[blk] == bytes([v.pattern]) * 4096, f"{path} block {blk} is not the pattern"
            corrupt = (v, target, path, orig, scrub_status(cl, target.name))
        before = {v.name: records(cl, v.name) for v in self.vols}
        mism0 = self.mismatches()
        t_settled = time.monotonic()

        fio = FioPair(self.serving, self.vols)
        time.sleep(FAULT_AT)
        assert fio.alive(), fio.results
        counter = {"eio": "eio", "hang": "hung"}.get(kind)
        hits0 = fm.stats().get(counter, 0) if counter else 0
        if kind == "kill":
            victim.kill()
        elif kind in ("eio", "hang"):
            fm.set(kind)
        else:
            v, target, path, orig, _ = corrupt
            with open(path, "r+b") as f:
                for blk, inner in CORRUPT:
                    f.seek(blk * 4096 + inner)
                    f.write(bytes(b ^ 0xFF for b in orig[blk][inner:inner + 64]))
        watch = Watch(cl, self.vols, victim.name if victim else None, expected)
        watch.start()
        try:
            if corrupt:   # reads are right meanwhile (a bad block is read from another member)
                self.static_intact(corrupt[0], via=corrupt[1])
            fio.join()
            errors = fio.verify_errors()
            self.verify_errors += errors
            assert errors == 0, f"round {n} ({kind}): fio verify failed:\n{fio.failures()}"
            if expected:
                wait_until(lambda: watch.bad_at is not None, 30, f"{victim.name}'s disk {expected}",
                           lambda: f"seen {watch.healths}")
                hits = fm.stats().get(counter, 0) - hits0
                assert hits > 0, f"the fault never hit an operation: {fm.stats()}"
                notes.append(f"disk {expected} {watch.bad_at:.1f}s after the fault, {hits} operations hit")
            wait_until(lambda: watch.healed_at is not None, HEAL_TIMEOUT,
                       f"round {n} ({kind}): both volumes Healthy again by themselves, nothing on "
                       f"{victim.name if victim else '-'}",
                       lambda: f"phases {watch.phase_text()}; errors {watch.errors[-3:]}; fio: {fio.text()}; "
                               f"faultfs {fm.stats()}; {describe(cl, self.vols)}")
            watch.stop()
            assert watch.poll(), describe(cl, self.vols)
        finally:
            watch.stop()
            if kind in ("eio", "hang"):
                fm.set("ok")
        self.lost |= watch.lost
        assert not watch.lost, f"round {n} ({kind}): extents left without any replica: {sorted(watch.lost)}"
        if kind != "corrupt":   # (a corrupted replica is compared once the scrubber repaired it, below)
            compared = self.replicas_identical()

        if kind in ("eio", "hang"):
            # the disk answers again: the daemon lived through it and its disk is Healthy again
            t_ok = time.monotonic()
            back = [disk_health(cl, victim.name)]

            def healthy_again():
                h = disk_health(cl, victim.name)
                if h != back[-1]:
                    back.append(h)
                return h == "Healthy"
            wait_until(healthy_again, 60, f"{victim.name}'s disk Healthy again", lambda: f"seen {back}")
            assert victim.proc.proc.poll() is None, f"{victim.name}'s storage daemon died"
            notes.append(f"disk {' -> '.join(watch.healths)}; after ok {' -> '.join(back)} "
                         f"in {time.monotonic() - t_ok:.1f}s")
        elif kind == "kill":
            self.restart_victim(victim, before, notes)
        else:
            v, target, path, orig, base = corrupt

            def repaired():
                st = scrub_status(cl, target.name)
                return st if st.repaired >= base.repaired + len(CORRUPT) else None
            st = wait_until(repaired, 60, f"{target.name}'s scrubber to repair {len(CORRUPT)} blocks of {path}",
                            lambda: f"before {base}, now {scrub_status(cl, target.name)}")
            assert st.repaired - base.repaired == len(CORRUPT), (base, st)
            assert st.checksum_errors - base.checksum_errors == len(CORRUPT), (base, st)
            assert st.unrepaired == 0, st
            with open(path, "rb") as f:
                for blk, _ in CORRUPT:
                    f.seek(blk * 4096)
                    assert f.read(4096) == orig[blk], f"{path} block {blk} still differs after the repair"
            notes.append(f"{v.name} extent {STATIC_INDEX} on {target.name}: {len(CORRUPT)} blocks corrupted, "
                         f"scrub checksum errors +{st.checksum_errors - base.checksum_errors}, repaired "
                         f"+{st.repaired - base.repaired}, unrepaired {st.unrepaired}; file bytes right again")
            compared = self.replicas_identical()
        for v in self.vols:
            self.static_intact(v)
        mism = {node: (c - mism0.get(node, 0) if c >= mism0.get(node, 0) else c)   # a restart resets it
                for node, c in self.mismatches().items()}
        mism = {node: c for node, c in mism.items() if c}
        if mism:
            notes.append(f"scrub reported replicas differing (mismatches) during the round: {mism}")

        healed = f"{watch.healed_at:.1f}s" if watch.healed_at is not None else "?"
        line = (f"round {n} {kind}{' of ' + victim.name if victim else ''}: healthy again {healed} after the "
                f"fault; fio verify errors {errors} ({fio.text()}); extents with no replica 0; "
                f"replicas identical ({compared} extents compared); phases {watch.phase_text()}"
                + "".join(f"; {x}" for x in notes)
                + f"; round {time.monotonic() - t_round:.1f}s (settling {t_settled - t_round:.1f}s)")
        print("\n" + line)
        self.lines.append(line)

    def restart_victim(self, victim, before, notes: list[str]) -> None:
        """The killed daemon comes back: it refuses I/O of its old generation and reclaims what it lost."""
        cl = self.cl
        victim.start()
        addr = wait(lambda: is_live(cl, victim.name) and live_peer_address(cl, victim.name), 30,
                    f"{victim.name} back")
        vol = next(v for v in self.vols if any(r.holds(victim.name) for r in before[v.name].values()))
        i = min(i for i, r in before[vol.name].items() if r.holds(victim.name))
        old, now = before[vol.name][i], records(cl, vol.name)[i]
        assert now.writable(victim.name) is None, now
        with pytest.raises(P.PeerError) as exc:
            peer_call(addr, P.OP_WRITE, vol.name, old.uid, i, old.generation, 0, payload=b"x" * 4096)
        assert exc.value.stale, exc.value
        with pytest.raises(P.PeerError) as exc:   # even at the current generation: it left the set
            peer_call(addr, P.OP_READ, vol.name, old.uid, i, now.generation, 0, 4096)
        assert exc.value.stale, exc.value

        def leftovers():
            out = []
            for v in self.vols:
                recs = records(cl, v.name)
                ids = {r.data_id for r in before[v.name].values()}
                keep = {(r.data_id, r.index) for r in recs.values() if r.writable(victim.name)}
                out += [f for f in victim.replica_files() if f.parent.name in ids
                        and (f.parent.name, int(f.stem)) not in keep]
            return out
        t0 = time.monotonic()
        wait_until(lambda: not leftovers(), 30, f"{victim.name}'s dropped replicas reclaimed",
                   lambda: f"left {leftovers()}")
        wait(lambda: all(victim.socket(v.name).exists() for v in self.vols), 15, f"{victim.name}'s NBD sockets")
        notes.append(f"restarted: stale I/O refused, dropped replicas reclaimed in {time.monotonic() - t0:.1f}s")


@pytest.mark.timeout(240 + max(ROUNDS, 1) * 300)
def test_fault_rounds_under_fio_verify(etcd_server, tmp_path):
    assert ROUNDS >= 1, f"BRAID_FAULT_ROUNDS={os.environ.get('BRAID_FAULT_ROUNDS')!r}: a number of rounds >= 1"
    assert KINDS and set(KINDS) <= set(ALL_KINDS), f"BRAID_FAULT_KINDS: a comma-separated subset of {ALL_KINDS}"
    reason = faultfs.unavailable()
    if reason:
        pytest.skip(f"faultfs: {reason}")
    need_tools("fio", "qemu-io")
    t0 = time.monotonic()
    suite = None
    done = 0
    try:
        with faultfs.fault_mount(tmp_path / "s2-backing", tmp_path / "s2-mnt") as fm:
            with storage_cluster(etcd_server, tmp_path, "fr", nodes=4, peer_timeout=1.0, rebuild_delay=2.0,
                                 disks={FAULTY + 1: tmp_path / "s2-mnt" / "d1"},
                                 storaged_args=["--scrub-interval", "2", "--scrub-rate", "256"]) as cl:
                try:
                    cl.fm = fm
                    suite = Suite(cl, tmp_path)
                    for v in suite.vols:
                        suite.create(v)
                    for n in range(1, ROUNDS + 1):
                        suite.round(n, KINDS[(n - 1) % len(KINDS)])
                        done = n
                    suite.lines.append(f"scrub mismatches reported per node (since each daemon started): "
                                       f"{suite.mismatches()}")
                finally:
                    fm.set("ok")   # nothing may stay hung while the daemons stop
    finally:
        if suite is not None:
            print(f"\nfault rounds run: {done} of {ROUNDS} in {time.monotonic() - t0:.0f}s (logs: {tmp_path})")
            for line in suite.lines:
                print("  " + line)
            print(f"  fio verify errors: {suite.verify_errors}; data lost: "
                  f"{suite.verify_errors + len(suite.lost)} (fio verify errors + extents with no replica)")
    assert suite.verify_errors == 0 and not suite.lost
    assert done == ROUNDS
