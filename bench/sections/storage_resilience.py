"""Storage resilience: how fast lost replicas are rebuilt, and what a rebuild costs client I/O.

Local storage clusters (``bench.storage_cluster``: one etcd, a braid-controller
and 3 braid-storaged with one directory disk each, the disks in one directory
under /var/tmp, not tmpfs), a fresh cluster per measurement. The controller
runs with ``--rebuild-delay 1`` (default 60 s) so the idle replicas of a dead
daemon are rebuilt about 1 s after its lease expired; the storage daemons keep
their default lease TTL (5 s) but report every second and use
``--peer-timeout 10`` like the storage section (nothing here waits for a
dead peer). Volumes: replicas=2, extent size 64 MiB, filled by one sequential
1 MiB fio write pass through node 1's NBD socket (a flush every 64 MiB, then
``sync``); each measurement starts once every disk is Healthy and every
extent has exactly 2 replicas and no joiner.

``rebuild_throughput`` / ``rebuild_throughput_rate_2000``: a volume (quick
256 MiB, full 1 GiB) is filled, then the storage daemon holding the most of its
extents is killed (SIGKILL) while nothing writes. Time: from the kill until
every extent again has 2 replicas, none on the dead node, no joiners (extent
records in etcd polled every 0.1 s). Value: bytes of the extents that had a
replica on the dead node / that time (MB = 10^6 bytes). The time includes
noticing the death (lease expiry + rebuild delay: param ``detect_s``, kill ->
first joiner in etcd); ``copy_s`` / ``copy_MBps`` are from the first joiner
on. Both survivors copy at once (each extent is rebuilt on the node that did
not hold it), so the cap is 2 x ``--rebuild-rate``: param ``cap_MBps``
(``copier_extents``: how the extents split between the two). First metric:
the daemons' default rate (64 MiB/s per node); second: 2000 MiB/s, i.e. what
the copy itself achieves here. ``copier_cpu_pct``: CPU of the copying daemons
over the copy (100 % = one core; the data path is one thread);
``machine_busy_pct``: the whole machine's over the copy.

``iops_during_rebuild_ratio``: fio ``randwrite`` 4k, iodepth 16, through node
1's NBD unix socket on a prefilled 256 MiB volume, ``--time_based`` (quick 5 s,
full 15 s, after a 1 s ramp): first with no rebuild (baseline), then while
another filled volume (quick 1.5 GiB, full 3.5 GiB) is rebuilt at the default
rate. The rebuild is started right before fio by dropping the replicas of one
of the other nodes from that volume's extent records, as the writers do when
a node dies (the same CAS: generation bump, the node in ``dropped``); that
node's daemon stays up, so the fio volume is not disturbed. The controller
then rebuilds those extents on the two other nodes (node 1 copies some,
serves as source for the others). Param ``overlap``: share of the measured
window during which the rebuild was running (records polled every 0.1 s);
the volume is sized for the rebuild to outlast the window (cap 2 x 64 MiB/s).

``snapshot_create_seconds``: a 10 GiB volume (160 extents of 64 MiB,
replicas=2; quick and full alike: a snapshot copies no data, so its time
depends on the number of extents, not on what is written; 256 MiB of it is
written first) gets ``SNAPSHOTS`` snapshots one after the other while fio
writes to it (randwrite 4k, iodepth 16, through node 1, time based). Time: the
API Create until the snapshot's status is Ready (polled every 5 ms), median
of the samples; params: ``pause_ms`` (median of ``status.pause_seconds``: how
long the daemons held the volume's writes), ``fio_max_clat_ms`` (the
longest write of the fio run: held writes and the first write to each extent
after a snapshot, which copies the extent's data locally on each replica).

``linked_clone_create_seconds``: a clone of the last snapshot (API Create
until the volume is Healthy with an NBD socket on every node), median of
``SNAPSHOTS`` clones. ``full_clone_seconds`` (param of the same metric): one
full clone of the same snapshot until its every extent has its own copy.

``resync_after_restart_seconds``: 2 storage daemons, a filled replicas=2
volume (quick 256 MiB, full 1 GiB); node 2 is killed (SIGKILL), ``CHANGED_IOS``
random 4k writes go through node 1 (the extents they hit drop node 2), node 2
is restarted. Time: from its restart (ready) until every extent has both
replicas and no joiner. With no third node the dropped extents can only be
rebuilt on node 2 again, over its old copies: resynced, only the 1 MiB chunks
changed since copied (``--resync-margin 5``: the daemons' logs vouch for drops
5 s after their start). ``whole_copy_seconds``: the same with a margin no log
meets, so every chunk of those extents is copied; ``copied_MB`` /
``whole_copy_MB``: what each copied (from the daemon's log).
"""
from __future__ import annotations

import concurrent.futures
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.framework import Metric, SectionContext
from bench.sections.storage import DISK_PARENT, fio_version, run_fio
from bench.storage_cluster import StorageCluster, cpu_seconds, machine_cpu
from braid import extents as X

MiB = 1 << 20
MB = 1e6
EXTENT = 64 * MiB
REBUILD_DELAY = 1.0
DEFAULT_RATE = 64      # MiB/s, the daemons' default --rebuild-rate
HIGH_RATE = 2000
LEASE_TTL = 5          # the daemons' default --lease-ttl
POLL = 0.1
RESYNC_MARGIN = 5.0    # --resync-margin of the resync measurement (default 60 s: a shorter wait)
CHANGED_IOS = 64       # random 4k writes while the node is away


def _log(msg: str) -> None:
    print(f"[bench] storage_resilience: {msg}", file=sys.stderr, flush=True)


def _cluster(ctx: SectionContext, base: Path, tag: str, rate: float) -> StorageCluster:
    return StorageCluster(ctx.tmp_dir / tag, base / tag, nodes=3, peer_timeout=10.0, progress=_log,
                          controller_args=["--rebuild-delay", str(REBUILD_DELAY)],
                          daemon_args=["--rebuild-rate", str(rate), "--report-interval", "1"])


def _fill(cluster: StorageCluster, volume: str, size: int) -> float:
    """Create and fill a volume through node 1; returns the fill rate in MiB/s.
    An NBD FLUSH every 64 MiB spreads the replicas' writeback over the fill (a
    multi-GiB flush at once can stall the disk health probes: a Slow verdict
    would start rebuilds of its own)."""
    cluster.create_volume(volume, size, 2, EXTENT)
    t0 = time.perf_counter()
    cmd = ["fio", "--name=fill", "--ioengine=nbd", f"--uri={cluster.nodes[0].uri(volume)}", "--rw=write",
           "--bs=1m", "--iodepth=4", f"--size={size}", "--fsync=64", "--output-format=json"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if p.returncode != 0:
        raise RuntimeError(f"fio fill of {volume} exited {p.returncode}: {p.stderr[-2000:]}")
    rate = size / MiB / (time.perf_counter() - t0)
    os.sync()  # no writeback of the fill in what is measured next
    return rate


def _settle(cluster: StorageCluster, volumes: list[str], timeout: float = 60.0) -> None:
    """Wait until every disk is Healthy and every extent of ``volumes`` has exactly
    2 replicas and no joiner (a measurement must start from a quiet, healthy cluster)."""
    deadline = time.monotonic() + timeout
    while True:
        cluster.check_alive()
        disks = {f"{p.metadata.name}/{d.name}": d.health for p in cluster.api.list("diskpool")[0]
                 for d in p.status.disks}
        odd = [r.to_json().decode() for v in volumes for r in cluster.extent_records(v)
               if len(r.replicas) != 2 or r.joining]
        if not odd and all(h == "Healthy" for h in disks.values()):
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"cluster not quiet {timeout:.0f}s after the fill: disks {disks}, "
                               f"extents {odd[:6]}")
        time.sleep(0.2)


def _rebuilt(recs: list[X.ExtentRecord], gone: str) -> bool:
    return all(len(r.replicas) == 2 and not r.joining and r.holds(gone) is None for r in recs)


def _status(cluster: StorageCluster, volume: str) -> tuple[str, float]:
    v = cluster.api.get("volume", volume)
    return v.status.phase, v.status.rebuild_progress


def _rebuild_after_kill(ctx: SectionContext, base: Path, rate: float, name: str) -> Metric:
    size = (256 if ctx.quick else 1024) * MiB
    cluster = _cluster(ctx, base, f"kill-{rate:g}", rate)
    try:
        cluster.start()
        fill = _fill(cluster, "rb", size)
        _settle(cluster, ["rb"])
        before = cluster.extent_records("rb")
        victim = max(cluster.nodes, key=lambda n: sum(1 for r in before if r.holds(n.name)))
        lost = [r for r in before if r.holds(victim.name)]
        lost_bytes = sum(r.size for r in lost)
        survivors = [n for n in cluster.nodes if n is not victim]
        _log(f"rate {rate:g}: filled {size // MiB} MiB at {fill:.0f} MiB/s; killing {victim.name} "
             f"({len(lost)} of {len(before)} extents)")
        t_kill = time.monotonic()
        victim.kill()
        t_join = None
        cpu0: dict[str, float] = {}
        phases, progress = set(), []
        while True:
            cluster.check_alive()
            recs = cluster.extent_records("rb")
            now = time.monotonic()
            if t_join is None and any(r.joining for r in recs):
                t_join = now
                cpu0 = {n.name: cpu_seconds(n.pid) for n in survivors}
                m0 = machine_cpu()
            if _rebuilt(recs, victim.name):
                break
            if t_join is not None:
                phase, prog = _status(cluster, "rb")
                phases.add(phase)
                progress.append(prog)
            if now - t_kill > 120:
                raise TimeoutError(f"not rebuilt 120 s after killing {victim.name}: "
                                   f"{[r.to_json().decode() for r in recs if r.joining or len(r.replicas) != 2]}")
            time.sleep(POLL)
        t_done = time.monotonic()
        if t_join is None:
            raise RuntimeError("rebuilt without a joiner ever seen in etcd (polling too slow?)")
        cpu = {n.name: round(100 * (cpu_seconds(n.pid) - cpu0[n.name]) / (t_done - t_join), 1)
               for n in survivors}
        busy, ticks = (a - b for a, b in zip(machine_cpu(), m0))
        # the node each lost extent was rebuilt on: the member it did not have before
        lost_by_index = {r.index: r for r in lost}
        copied_by = [next(x.node for x in after.replicas if lost_by_index[after.index].holds(x.node) is None)
                     for after in recs if after.index in lost_by_index]
        copiers = sorted(set(copied_by))
        total, copy = t_done - t_kill, t_done - t_join
        _log(f"rate {rate:g}: {lost_bytes / MB:.0f} MB rebuilt {total:.2f}s after the kill "
             f"(detect {t_join - t_kill:.2f}s, copy {copy:.2f}s, {lost_bytes / MB / copy:.0f} MB/s), "
             f"CPU {cpu}")
        cap = len(copiers) * rate * MiB / MB
        return Metric(name, lost_bytes / MB / total, "MB/s", higher_is_better=True, params={
            "rebuild_rate_MiBps": rate, "total_s": round(total, 2), "detect_s": round(t_join - t_kill, 2),
            "copy_s": round(copy, 2), "copy_MBps": round(lost_bytes / MB / copy, 1),
            "rebuilt_MB": round(lost_bytes / MB), "extents_rebuilt": f"{len(lost)}/{len(before)}",
            "copiers": len(copiers), "cap_MBps": round(cap, 1), "copy_vs_cap": round(lost_bytes / MB / copy / cap, 3),
            "copier_extents": "/".join(str(copied_by.count(c)) for c in copiers),
            "copier_cpu_pct": "/".join(str(cpu[c]) for c in copiers if c in cpu),
            "machine_busy_pct": round(100 * busy / max(1, ticks), 1),
            "phases_seen": "/".join(sorted(phases)),
            "max_progress_seen": round(max(progress, default=0.0), 2),
            "volume_MiB": size // MiB, "extent_MiB": EXTENT // MiB, "fill_MiBps": round(fill),
            "lease_ttl_s": LEASE_TTL, "rebuild_delay_s": REBUILD_DELAY, "nodes": 3, "cores": os.cpu_count()})
    finally:
        cluster.stop()
        shutil.rmtree(base / f"kill-{rate:g}", ignore_errors=True)


def _drop_node(cluster: StorageCluster, volume: str, node: str) -> list[X.ExtentRecord]:
    """Drop ``node``'s replicas from the volume's extents, as a writer does when
    a replica fails (compare-and-set, generation bump); returns the changed extents."""
    kvs, _ = cluster.store.list(X.volume_prefix(volume))
    out = []
    for kv in kvs:
        rec = X.ExtentRecord.from_json(kv.value)
        rep = rec.holds(node)
        if rep is not None:
            cluster.store.update(rec.key, rec.without([rep], "bench: replica dropped").to_json(),
                                 kv.mod_revision)
            out.append(rec)
    return out


def _iops_during_rebuild(ctx: SectionContext, base: Path) -> Metric:
    runtime = 5 if ctx.quick else 15
    io_size = 256 * MiB
    bg_size = (1536 if ctx.quick else 3584) * MiB
    version = fio_version()
    cluster = _cluster(ctx, base, "iops", DEFAULT_RATE)
    pool = concurrent.futures.ThreadPoolExecutor(1)
    try:
        cluster.start()
        serving = cluster.nodes[0]
        fill = _fill(cluster, "io", io_size)
        _fill(cluster, "bg", bg_size)
        _settle(cluster, ["io", "bg"])
        io_recs = cluster.extent_records("io")
        bg_recs = cluster.extent_records("bg")
        # the other node with the most extents of bg loses them (the rebuild's size)
        lost = max(cluster.nodes[1:], key=lambda n: sum(1 for r in bg_recs if r.holds(n.name)))
        uri = serving.uri("io")

        def fio(tag: str) -> tuple[dict, dict]:
            m0 = machine_cpu()
            job = run_fio(uri, tag, "randwrite", "4k", 16, io_size, runtime)
            busy, total = (a - b for a, b in zip(machine_cpu(), m0))
            changed = [r.to_json().decode() for r, r0 in zip(cluster.extent_records("io"), io_recs)
                       if r != r0]
            if changed:
                _log(f"WARNING: the extents of volume io changed during the {tag} run: {changed}")
            return job["write"], {"machine_busy_pct": round(100 * busy / max(1, total), 1),
                                  "io_extents_changed": len(changed)}

        base_w, base_cpu = fio("baseline")
        if base_cpu["io_extents_changed"]:
            raise RuntimeError("volume io changed during the baseline run (see the warning above)")
        _log(f"baseline: {base_w['iops']:,.0f} IOPS {base_cpu}")
        t_drop = time.monotonic()
        dropped = _drop_node(cluster, "bg", lost.name)
        rebuilt_bytes = sum(r.size for r in dropped)
        t_start = time.monotonic()
        fut = pool.submit(fio, "during-rebuild")
        samples, phases = [], set()
        while not fut.done():
            recs = cluster.extent_records("bg")
            samples.append((time.monotonic(), sum(1 for r in recs if r.joining)))
            phases.add(_status(cluster, "bg")[0])
            time.sleep(POLL)
        t_end = time.monotonic()
        during_w, during_cpu = fut.result()
        window = [s for s in samples if t_start + 1.0 <= s[0] <= t_end]
        overlap = sum(1 for s in window if s[1]) / max(1, len(window))
        copiers = sorted({j.node for r in cluster.extent_records("bg") for j in r.joining})
        while not _rebuilt(cluster.extent_records("bg"), lost.name):
            cluster.check_alive()
            if time.monotonic() - t_drop > 300:
                raise TimeoutError("volume bg not rebuilt 300 s after the drop")
            time.sleep(POLL)
        rebuild_s = time.monotonic() - t_drop
        _log(f"during rebuild: {during_w['iops']:,.0f} IOPS {during_cpu}, overlap {overlap:.2f}; "
             f"{rebuilt_bytes / MB:.0f} MB rebuilt in {rebuild_s:.1f}s (to {copiers or 'done'})")
        if len(window) < 3:
            raise RuntimeError(f"too few samples of the rebuild during fio: {samples}")

        def p99(w: dict) -> float:
            return round(w.get("clat_ns", {}).get("percentile", {}).get("99.000000", 0.0) / 1e3, 1)

        return Metric("iops_during_rebuild_ratio", during_w["iops"], "IOPS", "iops_without_rebuild",
                      base_w["iops"], True, {
                          "overlap": round(overlap, 3), "runtime_s": runtime, "ramp_s": 1, "bs": "4k",
                          "iodepth": 16, "rebuild_rate_MiBps": DEFAULT_RATE,
                          "rebuilt_MB": round(rebuilt_bytes / MB),
                          "extents_rebuilt": f"{len(dropped)}/{len(bg_recs)}",
                          "rebuild_s": round(rebuild_s, 1),
                          "rebuild_MBps": round(rebuilt_bytes / MB / rebuild_s, 1),
                          "joining_at_fio_end": window[-1][1], "phases_seen": "/".join(sorted(phases)),
                          "p99_us": p99(during_w), "baseline_p99_us": p99(base_w),
                          "machine_busy_pct": during_cpu["machine_busy_pct"],
                          "io_extents_changed": during_cpu["io_extents_changed"],
                          "baseline_machine_busy_pct": base_cpu["machine_busy_pct"],
                          "io_volume_MiB": io_size // MiB, "rebuilt_volume_MiB": bg_size // MiB,
                          "fill_MiBps": round(fill), "fio": version, "nodes": 3, "cores": os.cpu_count()})
    finally:
        cluster.stop()  # first: a fio still running then fails at once
        pool.shutdown(wait=True)
        shutil.rmtree(base / "iops", ignore_errors=True)


SNAPSHOTS = 5


def _snapshots_and_clones(ctx: SectionContext, base: Path) -> list[Metric]:
    from braid.v1 import storage_pb2
    size = 10 << 30
    cluster = _cluster(ctx, base, "snap", DEFAULT_RATE)
    pool = concurrent.futures.ThreadPoolExecutor(1)
    try:
        cluster.start()
        cluster.create_volume("big", size, 2, EXTENT, timeout=120)
        uri = cluster.nodes[0].uri("big")
        run_fio(uri, "prefill", "write", "1m", 4, 256 * MiB)
        times, pauses = [], []
        load = pool.submit(run_fio, uri, "load", "randwrite", "4k", 16, 1 << 30, runtime=6 + 2 * SNAPSHOTS)
        time.sleep(3)
        for i in range(SNAPSHOTS):
            s = storage_pb2.Snapshot()
            s.metadata.name, s.spec.volume = f"s{i}", "big"
            t0 = time.perf_counter()
            cluster.api.create(s)
            while True:
                st = cluster.api.get("snapshot", f"s{i}").status
                if st.phase in ("Ready", "Failed"):
                    break
                time.sleep(0.005)
            if st.phase != "Ready":
                raise RuntimeError(f"snapshot s{i} failed: {st.message}")
            times.append(time.perf_counter() - t0)
            pauses.append(st.pause_seconds)
            _log(f"snapshot s{i} of the 10 GiB volume: {times[-1] * 1000:.0f} ms "
                 f"(writes held {st.pause_seconds * 1000:.0f} ms)")
            time.sleep(1.5)
        job = load.result()
        clones = []
        for i in range(SNAPSHOTS):
            v = storage_pb2.Volume()
            v.metadata.name = f"c{i}"
            v.spec.source_snapshot = f"s{SNAPSHOTS - 1}"
            t0 = time.perf_counter()
            cluster.api.create(v)
            cluster._wait(lambda n=f"c{i}": cluster.api.get("volume", n).status.phase == "Healthy"
                          and all(node.socket(n).exists() for node in cluster.nodes), 60, f"clone c{i}")
            clones.append(time.perf_counter() - t0)
        v = storage_pb2.Volume()
        v.metadata.name = "full"
        v.spec.source_snapshot, v.spec.full_clone = f"s{SNAPSHOTS - 1}", True
        t0 = time.perf_counter()
        cluster.api.create(v)
        cluster._wait(lambda: cluster.api.get("volume", "full").status.phase == "Healthy", 600, "full clone")
        full = time.perf_counter() - t0
        med = sorted(times)[len(times) // 2]
        common = {"volume_GiB": 10, "extents": size // EXTENT, "replicas": 2, "nodes": 3,
                  "samples": SNAPSHOTS, "cores": os.cpu_count()}
        return [
            Metric("snapshot_create_seconds", round(med, 4), "s", higher_is_better=False, params={
                **common, "all_s": [round(t, 4) for t in times],
                "pause_ms": round(sorted(pauses)[len(pauses) // 2] * 1000, 1),
                "fio_write_iops": round(job["write"]["iops"]),
                "fio_max_clat_ms": round(job["write"]["clat_ns"]["max"] / 1e6, 1)}),
            Metric("linked_clone_create_seconds", round(sorted(clones)[len(clones) // 2], 4), "s",
                   higher_is_better=False, params={
                       **common, "all_s": [round(t, 4) for t in clones],
                       "full_clone_seconds": round(full, 2), "prefill_MiB": 256})]
    finally:
        cluster.stop()
        pool.shutdown(wait=True)
        shutil.rmtree(base / "snap", ignore_errors=True)


def _resync_after_restart(ctx: SectionContext, base: Path, margin: float) -> tuple[float, dict]:
    """Two nodes, a filled replicas=2 volume; node 2 is killed, ``CHANGED_IOS``
    random 4k writes go to node 1, node 2 comes back: seconds from its restart
    until every extent has both replicas again, and what was copied."""
    size = (256 if ctx.quick else 1024) * MiB
    tag = f"resync-{margin:g}"
    cluster = StorageCluster(ctx.tmp_dir / tag, base / tag, nodes=2, peer_timeout=2.0, progress=_log,
                             controller_args=["--rebuild-delay", str(REBUILD_DELAY)],
                             daemon_args=["--report-interval", "1", "--resync-margin", str(margin)])
    try:
        cluster.start()
        _fill(cluster, "rs", size)
        _settle(cluster, ["rs"])
        time.sleep(RESYNC_MARGIN + 3)   # the fill lies before the drops by more than the margin
        serving, victim = cluster.nodes
        victim.kill()
        cmd = ["fio", "--name=change", "--ioengine=nbd", f"--uri={serving.uri('rs')}", "--rw=randwrite",
               "--bs=4k", "--iodepth=1", f"--size={size}", f"--number_ios={CHANGED_IOS}", "--norandommap",
               "--randrepeat=0", "--output-format=json"]
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        if p.returncode != 0:
            raise RuntimeError(f"fio exited {p.returncode}: {p.stderr[-2000:]}")
        dropped = [r for r in cluster.extent_records("rs") if r.holds(victim.name) is None]
        time.sleep(2.5)   # restarted after the drops, to the second (daemons' started_at)
        log_at = victim.proc.log.stat().st_size
        victim.restart()
        t0 = time.monotonic()
        while True:
            cluster.check_alive()
            if all(len(r.replicas) == 2 and not r.joining for r in cluster.extent_records("rs")):
                break
            if time.monotonic() - t0 > 300:
                raise TimeoutError("not whole 300 s after the restart")
            time.sleep(POLL)
        took = time.monotonic() - t0
        with open(victim.proc.log, "rb") as f:
            f.seek(log_at)
            text = f.read().decode(errors="replace")
        copies = [(int(a), int(b)) for a, b in re.findall(r"resync of \S+ on \S+ from generation \d+: "
                                                         r"copying (\d+) of (\d+) bytes", text)]
        copied = sum(a for a, _ in copies)
        _log(f"margin {margin:g}: {len(dropped)} extents dropped, whole {took:.2f}s after the restart, "
             f"{copied / MB:.0f} MB copied ({len(copies)} resyncs)")
        return took, {"extents_dropped": len(dropped), "resyncs": len(copies), "copied_MB": round(copied / MB, 1),
                      "extents_MB": round(sum(r.size for r in dropped) / MB)}
    finally:
        cluster.stop()
        shutil.rmtree(base / tag, ignore_errors=True)


def _resync(ctx: SectionContext, base: Path) -> Metric:
    took, info = _resync_after_restart(ctx, base, RESYNC_MARGIN)
    full, full_info = _resync_after_restart(ctx, base, 1e9)   # no log can vouch: every chunk copied
    return Metric("resync_after_restart_seconds", took, "s", higher_is_better=False, params={
        **info, "whole_copy_seconds": round(full, 2), "whole_copy_MB": full_info["copied_MB"],
        "speedup": round(full / took, 1) if took else None, "changed_4k_writes": CHANGED_IOS,
        "volume_MiB": (256 if ctx.quick else 1024), "extent_MiB": EXTENT // MiB, "nodes": 2,
        "rebuild_rate_MiBps": DEFAULT_RATE, "resync_margin_s": RESYNC_MARGIN})


def run(ctx: SectionContext) -> list[Metric]:
    if shutil.which("fio") is None:
        raise RuntimeError("fio is not installed (scripts/setup.sh installs it)")
    base = Path(tempfile.mkdtemp(prefix="braid-bench-resilience-", dir=DISK_PARENT))
    try:
        return [_rebuild_after_kill(ctx, base, DEFAULT_RATE, "rebuild_throughput"),
                _rebuild_after_kill(ctx, base, HIGH_RATE, f"rebuild_throughput_rate_{HIGH_RATE}"),
                _iops_during_rebuild(ctx, base), *_snapshots_and_clones(ctx, base), _resync(ctx, base)]
    finally:
        shutil.rmtree(base, ignore_errors=True)
